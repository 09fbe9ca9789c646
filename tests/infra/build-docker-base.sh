#!/usr/bin/env bash
# Builds (once, then cached in the Docker engine) the base image the Docker tests build the
# project's Dockerfile FROM (`--build-arg BASE_IMAGE=...`), since images cannot be pulled in CI:
# a Debian 12 root tree made by mmdebstrap (like tests/infra/build-image.sh) and `docker import`ed.
# It stands in for vllm/vllm-openai: an apt-based distribution with python3 and its venv module,
# curl and CA certificates, and libnuma1 (vLLM's CPU build loads it).  systemd and D-Bus are
# included so that the image build does not spend a minute installing them (the Dockerfile's
# install step installs them when a base lacks them, as vLLM's does).  No compiler: the test
# checks that the built image has none.
#
# Cache: the image is tagged lmx-test-base:KEY, KEY a hash of this script and the settings;
# an existing tag is reused; older lmx-test-base tags are removed after a new build.
#
# Usage: tests/infra/build-docker-base.sh [--force]     Prints the image name on stdout.
# Environment: DOCKER (client, default docker), LLMUXD_TEST_MIRROR, LLMUXD_TEST_SECURITY_MIRROR.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../../packaging/apt-missing.sh
source "$HERE/../../packaging/apt-missing.sh"
DOCKER=${DOCKER:-docker}
MIRROR=${LLMUXD_TEST_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${LLMUXD_TEST_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
SUITE=bookworm
PACKAGES=python3,python3-venv,systemd,systemd-sysv,dbus,libpam-systemd,procps,curl,ca-certificates,iproute2,util-linux,mount,libnuma1
FORCE=0
[[ "${1:-}" == "--force" ]] && FORCE=1

log() { printf '[build-docker-base] %s\n' "$*" >&2; }
die() { printf '[build-docker-base] ERROR: %s\n' "$*" >&2; exit 1; }
[[ $EUID -eq 0 ]] || die "must run as root (mmdebstrap --mode=root)"
export DOCKER_BUILDKIT=0

KEY=$( { cat "$HERE/build-docker-base.sh"; printf '%s\n' "$SUITE" "$MIRROR" "$SECURITY_MIRROR" "$PACKAGES"; } \
  | sha256sum | cut -c1-16)
TAG=lmx-test-base:$KEY

if [[ $FORCE == 0 ]] && "$DOCKER" image inspect "$TAG" >/dev/null 2>&1; then
  log "cached: $TAG"
  echo "$TAG"
  exit 0
fi
command -v mmdebstrap >/dev/null || apt_install_missing mmdebstrap

T=$(mktemp -d /var/tmp/llmuxd-docker-base.XXXXXX)
trap 'rm -rf --one-file-system "$T"' EXIT
t0=$SECONDS
log "building $SUITE ($PACKAGES)"
mmdebstrap --variant=apt --mode=root --format=tar --components=main \
  --include="$PACKAGES" \
  --aptopt='Acquire::Languages "none"' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-include=/usr/share/locale/locale.alias' \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --customize-hook='rm -rf "$1"/var/cache/apt/*.bin "$1"/var/lib/apt/lists/* "$1"/var/log/journal/*; : >"$1/etc/machine-id"' \
  "$SUITE" "$T/base.tar" \
  "deb $MIRROR $SUITE main" \
  "deb $MIRROR $SUITE-updates main" \
  "deb $SECURITY_MIRROR $SUITE-security main" \
  >"$T/mmdebstrap.log" 2>&1 || { tail -n 40 "$T/mmdebstrap.log" >&2; die "mmdebstrap failed"; }
log "root tree in $((SECONDS - t0)) s ($(du -h "$T/base.tar" | cut -f1)); importing as $TAG"
"$DOCKER" import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  --change "LABEL lmx-test-base=$KEY" \
  "$T/base.tar" "$TAG" >/dev/null
# Older bases (other keys) are of no use any more.
"$DOCKER" images --format '{{.Repository}}:{{.Tag}}' lmx-test-base | grep -vx "$TAG" \
  | xargs -r "$DOCKER" rmi >/dev/null 2>&1 || true
log "built $TAG in $((SECONDS - t0)) s"
echo "$TAG"
