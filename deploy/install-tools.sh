#!/usr/bin/env bash
# Ops test tools (see deploy/README in the main README's Operations section). Idempotent.
set -euo pipefail
VENV=${1:-.venv}
echo "ops tools: nothing needed yet"
