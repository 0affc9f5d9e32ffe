#!/usr/bin/env bash
# System tools the ops and browser tests need (the Python ones come with the `test` extra):
# Prometheus and promtool, and Chromium for the playground's browser test, from Debian.
# Idempotent. As root (CI) or with passwordless sudo it installs them and fails loudly if that
# fails; elsewhere it says it cannot, and the tests that need them skip, saying why.
set -euo pipefail
need=()
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1 || ! sudo -n true 2>/dev/null; then
    echo "not installing ${need[*]}: needs root (or passwordless sudo) and apt-get;" \
         "the tests that use them will be skipped (CI installs them as root)"
    exit 0
  fi
  SUDO="sudo"
fi
echo "installing ${need[*]} (Debian packages) for the ops and browser tests"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
command -v prometheus && command -v promtool && command -v chromium
