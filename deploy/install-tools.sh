#!/usr/bin/env bash
# System tools the ops tests need (the Python ones come with the `test` extra): Prometheus and
# promtool from Debian. Idempotent; fails loudly if they cannot be installed, so the Prometheus
# tests fail rather than skip.
set -euo pipefail
if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "installing prometheus (Debian package) for the ops tests"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v prometheus && command -v promtool
