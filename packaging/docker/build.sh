#!/usr/bin/env bash
# The Dockerfile's build stages (never the final image): what needs a compiler, the network or
# the build's package-index settings happens here, and only the results are copied on.
#
#   build.sh tools            gcc, pkg-config, libsystemd-dev (systemd-python has no wheels), the
#                             Python headers and venv module when the base lacks them, Debian's
#                             archive keyring for CRIU's packages when the base is not Debian
#   build.sh deps SRC         the venv /opt/llmuxd/venv with llmuxd's dependencies (from SRC's
#                             pyproject.toml: a layer that survives source changes)
#   build.sh package SRC      llmuxd itself into the venv, and pycriu importable in it
#   build.sh cuda-checkpoint  download CUDA_CHECKPOINT_URL to /out/cuda-checkpoint and check it
#                             against CUDA_CHECKPOINT_SHA256 (an empty URL skips it)
#
# Package-index settings: the build arguments PIP_INDEX_URL, PIP_EXTRA_INDEX_URL and
# PIP_TRUSTED_HOST (empty ones are ignored) and, from the BUILD_EXTRA folder copied to
# /tmp/build-extra, a CA bundle `ca.crt` (pip and curl) and a wheelhouse `wheels/` (then pip
# installs from it only).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=/opt/llmuxd/venv
EXTRA=/tmp/build-extra
PROTOBUF_SPEC='protobuf>=3.20,<7'
log() { printf '[build] %s\n' "$*" >&2; }

for v in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST; do
  if [[ -z "${!v:-}" ]]; then unset "$v"; fi
done
if [[ -f $EXTRA/ca.crt ]]; then
  export PIP_CERT=$EXTRA/ca.crt CURL_CA_BUNDLE=$EXTRA/ca.crt
fi
if compgen -G "$EXTRA/wheels/*" >/dev/null; then
  export PIP_FIND_LINKS=$EXTRA/wheels PIP_NO_INDEX=1
  log "installing from the wheelhouse only"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore PYTHONDONTWRITEBYTECODE=1

case "${1:-}" in
  tools)
    pkgs=(gcc libc6-dev pkg-config libsystemd-dev)
    python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' \
      || pkgs+=(python3-dev)
    python3 -c 'import venv, ensurepip' 2>/dev/null || pkgs+=(python3-venv)
    [[ -f /usr/share/keyrings/debian-archive-keyring.gpg ]] || pkgs+=(debian-archive-keyring)
    # (sourced here only: the cuda-checkpoint stage has build.sh alone)
    # shellcheck source=../apt-missing.sh
    source "$HERE/../apt-missing.sh"
    apt_install_missing "${pkgs[@]}"
    ;;
  deps)
    src=$2
    python3 -m venv "$VENV"
    python3 -c 'import sys, tomllib; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))' \
      "$src/pyproject.toml" >/tmp/requirements.txt
    log "python: $(python3 --version) venv $VENV; dependencies: $(tr '\n' ' ' </tmp/requirements.txt)"
    "$VENV/bin/pip" install -q -r /tmp/requirements.txt "$PROTOBUF_SPEC" "setuptools>=68" wheel
    ;;
  package)
    src=$2
    "$VENV/bin/pip" install -q --no-deps --no-build-isolation "$src"
    # pycriu (CRIU's own root, /opt/llmuxd/criu) importable from the venv; no download (protobuf is there).
    bash "$src/packaging/install-criu.sh" --root /opt/llmuxd/criu --wrapper /usr/local/bin/criu --venv "$VENV" --no-check
    "$VENV/bin/python3" -c 'import llmuxd, systemd.journal, pycriu.images'
    find "$VENV" -name __pycache__ -prune -exec rm -rf {} +
    ;;
  cuda-checkpoint)
    mkdir -p /out
    if [[ -z "${CUDA_CHECKPOINT_URL:-}" ]]; then
      log "cuda-checkpoint: skipped (empty CUDA_CHECKPOINT_URL); CUDA suspend and GPU checkpoints need it"
      exit 0
    fi
    [[ -n "${CUDA_CHECKPOINT_SHA256:-}" ]] || { log "CUDA_CHECKPOINT_SHA256 is empty"; exit 1; }
    log "cuda-checkpoint: $CUDA_CHECKPOINT_URL"
    curl -fsSL --retry 3 -o /out/cuda-checkpoint "$CUDA_CHECKPOINT_URL"
    echo "$CUDA_CHECKPOINT_SHA256  /out/cuda-checkpoint" | sha256sum -c -
    chmod 0755 /out/cuda-checkpoint
    ;;
  *)
    sed -n '2,18p' "$0" >&2
    exit 2
    ;;
esac
