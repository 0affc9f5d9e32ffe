#!/usr/bin/env bash
# make loadtest: start a local server (unless URL is set), run Locust headless for a bounded
# time, write CSV + HTML reports to docs/loadtest/, stop the server. Exit code = the SLO verdict.
# Knobs (env): URL, USERS (10), RATE per user (2), DURATION (30s), SLO_P95_MS, SLO_P99_MS, MAX_FAIL_RATIO,
# DRAIN_TIMEOUT (30: seconds the requests in flight at the end get; unfinished ones count as failures).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-.venv}
OUT=${OUT:-docs/loadtest}
mkdir -p "$OUT"
PID=""
LOCUST=""
# what it started goes down with it: bash runs a trap only between commands, so the children
# run in the background and the script waits for them (a wait a signal interrupts)
cleanup() {
  [ -n "$LOCUST" ] && kill -TERM "$LOCUST" 2>/dev/null && wait "$LOCUST" 2>/dev/null || true
  [ -n "$PID" ] && kill -TERM "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
  LOCUST=""; PID=""
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM
if [ -z "${URL:-}" ]; then
  PORT=${PORT:-8090}
  "$VENV/bin/cmserve" serve --port "$PORT" --log-level warning > "$OUT/server.log" 2>&1 &
  PID=$!
  URL="http://127.0.0.1:$PORT"
  echo "started a server (pid $PID, log $OUT/server.log); waiting for $URL/readyz (load and warm-up)"
  for i in $(seq 1 1500); do  # up to 300 s: the shipped model and its 32-step teacher warm up first
    curl -sf "$URL/readyz" >/dev/null 2>&1 && { echo "ready after $((i / 5)) s"; break; }
    kill -0 "$PID" 2>/dev/null || { cat "$OUT/server.log"; exit 1; }
    [ $((i % 50)) -eq 0 ] && echo "still warming up ($((i / 5)) s)"
    sleep 0.2
  done
fi
echo "load: ${USERS:-10} users x ${RATE:-2} req/s for ${DURATION:-30s} against $URL"
rc=0
"$VENV/bin/locust" -f deploy/locust/locustfile.py --headless -H "$URL" \
  -u "${USERS:-10}" -r "${USERS:-10}" -t "${DURATION:-30s}" --stop-timeout 30 \
  --user-rate "${RATE:-2}" --slo-p95-ms "${SLO_P95_MS:-1000}" --slo-p99-ms "${SLO_P99_MS:-2000}" \
  --max-fail-ratio "${MAX_FAIL_RATIO:-0.01}" --drain-timeout "${DRAIN_TIMEOUT:-30}" \
  --csv "$OUT/locust" --html "$OUT/locust.html" --only-summary &
LOCUST=$!
wait "$LOCUST" || rc=$?
LOCUST=""
exit "$rc"
