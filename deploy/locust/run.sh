#!/usr/bin/env bash
# make loadtest: start a local server (unless URL is set), run Locust headless for a bounded
# time, write CSV + HTML reports to docs/loadtest/, stop the server. Exit code = the SLO verdict.
# Knobs (env): URL, USERS (10), RATE per user (2), DURATION (30s), SLO_P95_MS, SLO_P99_MS, MAX_FAIL_RATIO.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-.venv}
OUT=${OUT:-docs/loadtest}
mkdir -p "$OUT"
PID=""
cleanup() { [ -n "$PID" ] && kill -INT "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true; }
trap cleanup EXIT
if [ -z "${URL:-}" ]; then
  PORT=${PORT:-8090}
  "$VENV/bin/cmserve" serve --port "$PORT" --log-level warning > "$OUT/server.log" 2>&1 &
  PID=$!
  URL="http://127.0.0.1:$PORT"
  for _ in $(seq 1 600); do
    curl -sf "$URL/readyz" >/dev/null 2>&1 && break
    kill -0 "$PID" 2>/dev/null || { cat "$OUT/server.log"; exit 1; }
    sleep 0.2
  done
fi
"$VENV/bin/locust" -f deploy/locust/locustfile.py --headless -H "$URL" \
  -u "${USERS:-10}" -r "${USERS:-10}" -t "${DURATION:-30s}" --stop-timeout 30 \
  --user-rate "${RATE:-2}" --slo-p95-ms "${SLO_P95_MS:-1000}" --slo-p99-ms "${SLO_P99_MS:-2000}" \
  --max-fail-ratio "${MAX_FAIL_RATIO:-0.01}" --csv "$OUT/locust" --html "$OUT/locust.html" --only-summary
