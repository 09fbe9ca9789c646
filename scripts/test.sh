#!/usr/bin/env bash
# Set everything up (idempotent, cached) and run the whole test suite.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
bash "$ROOT/scripts/setup.sh" --tests
export LLMUXD_REQUIRE_SYSTEMD=1  # the systemd tests must run here, never skip
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest tests --durations=15 "$@"
