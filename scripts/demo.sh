#!/usr/bin/env bash
# Set everything up (idempotent, quick once done) and run the demo: on the vLLM simulator, or with
# --vllm its checkpoint part on the real vLLM CPU build (whose set-up takes minutes the first time).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
bash "$ROOT/scripts/setup.sh"
for a in "$@"; do
  [[ "$a" == --vllm ]] && bash "$ROOT/scripts/setup-vllm.sh" >/dev/null
done
exec "$ROOT/.venv/bin/python" "$ROOT/scripts/demo.py" "$@"
