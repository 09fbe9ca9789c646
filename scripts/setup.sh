#!/usr/bin/env bash
# One-time, idempotent set-up of everything llmuxd and its tests need on Debian 12 (as root).
# Re-running it is cheap: each step checks whether it is already done.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
log() { printf '[setup] %s\n' "$*" >&2; }
# shellcheck source=../packaging/apt-missing.sh
source "$ROOT/packaging/apt-missing.sh"

apt_install_missing python3-venv python3-dev gcc libsystemd-dev pkg-config curl procps iproute2 dbus

# The venv is made with Debian's own python3 so that the same interpreter exists inside the
# test containers (they bind this checkout at the same path; venv shebangs are absolute).
VENV="$ROOT/.venv"
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [[ ! -f "$stamp" ]]; then
  log "creating the Python environment in $VENV"
  [[ -x "$VENV/bin/python" ]] || /usr/bin/python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -U pip
  "$VENV/bin/pip" install -q -e ".[test]"
  rm -f "$VENV"/.installed-*; touch "$stamp"
fi
log "Python environment ready: $VENV"

# CRIU >= 4.2 from Debian's packages, in its own root (Debian 12's 3.17 does not start on current
# kernels); also makes pycriu importable in the venv.
bash "$ROOT/packaging/install-criu.sh" --venv "$VENV" >&2

if [[ "${1:-}" == "--tests" ]]; then
  # The booted systemd-nspawn containers the tests run llmuxd in (cached).
  bash "$ROOT/tests/infra/build-image.sh" >&2
  # torch for the GPU test backend's CPU tests (tests/test_gpu_backend.py); 2.13.0 is the CPU
  # wheel (pip fetches it where no local copy is cached).
  "$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/pip" install -q torch==2.13.0 2>&1 | grep -v "is ignored" >&2 || true
  # The real vLLM CPU build and its tiny models (cached; tests/test_vllm.py fails with the
  # reason if this did not work).
  bash "$ROOT/scripts/setup-vllm.sh" >&2 || log "vLLM set-up failed: the real-vLLM tests will fail with the reason"
  # A headless browser for the status page's tests (tests/test_ui.py drives it over the
  # DevTools protocol).
  apt_install_missing chromium || log "installing chromium failed: the status page tests will fail with the reason"
  # The Docker engine and mmdebstrap for tests/test_docker.py (which starts the engine when none
  # runs, builds its base image and the project's image, and stops the engine again).
  docker_pkgs=()
  command -v dockerd >/dev/null || docker_pkgs+=(docker.io)
  command -v mmdebstrap >/dev/null || docker_pkgs+=(mmdebstrap)
  if ((${#docker_pkgs[@]})); then
    apt_install_missing "${docker_pkgs[@]}" || log "installing ${docker_pkgs[*]} failed: the Docker tests will fail with the reason"
  fi
fi
