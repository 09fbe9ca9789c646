#!/usr/bin/env bash
# Builds (once, then cached) the Debian 12 root tree that tests boot with systemd-nspawn: a real
# systemd as PID 1, a real D-Bus system bus and journald, and CRIU 4.2 installed by the project's
# own packaging/install-criu.sh (root /opt/llmuxd/criu, wrapper /usr/local/bin/criu), exactly as
# the Dockerfile installs it. See docs/measured.md.
#
# The checkout is not installed in the image: tests bind it into containers at the same path (the
# venv was made with /usr/bin/python3, which the image has too: same Debian 3.11).
#
# Cache: the tree is rebuilt only when this script or packaging/*.sh change (a sha256 of their
# contents, plus the suite/mirror settings, is kept in IMAGE/etc/llmuxd-test-image, written last;
# the new tree is built next to the old one and swapped in). Concurrent runs wait on a lock.
#
# Usage: tests/infra/build-image.sh [--force] [--print-dir]
# Environment: LLMUXD_TEST_IMAGE (default /var/cache/llmuxd-test/image; never under /tmp),
#   LLMUXD_TEST_MIRROR (default http://deb.debian.org/debian),
#   LLMUXD_TEST_SECURITY_MIRROR (default http://deb.debian.org/debian-security),
#   LLMUXD_TEST_EXTRA_PACKAGES (comma-separated, added to the image and to the cache key).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=../../packaging/apt-missing.sh
source "$REPO/packaging/apt-missing.sh"
IMAGE=${LLMUXD_TEST_IMAGE:-/var/cache/llmuxd-test/image}
MIRROR=${LLMUXD_TEST_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${LLMUXD_TEST_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
SUITE=bookworm
FORCE=0
PRINT_DIR=0
for a in "$@"; do
  case "$a" in
    --force) FORCE=1 ;;
    --print-dir) PRINT_DIR=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-image.sh: unknown argument $a" >&2; exit 2 ;;
  esac
done

log() { printf '[build-image] %s\n' "$*" >&2; }
die() { printf '[build-image] ERROR: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }

[[ $EUID -eq 0 ]] || die "must run as root (mmdebstrap --mode=root, chroot)"
[[ "$IMAGE" = /* ]] || die "LLMUXD_TEST_IMAGE must be absolute: $IMAGE"
IMAGE=${IMAGE%/}
case "$IMAGE/" in /tmp/*) die "LLMUXD_TEST_IMAGE must not be under /tmp: $IMAGE" ;; esac

# libnuma1: the real vLLM CPU build (tests/test_vllm.py, run from a bound venv) loads it, as vLLM's own image has it.
PACKAGES=systemd,systemd-sysv,dbus,libpam-systemd,python3,python3-venv,procps,curl,iproute2,ca-certificates,util-linux,less,libnuma1
[[ -n "${LLMUXD_TEST_EXTRA_PACKAGES:-}" ]] && PACKAGES+=",$LLMUXD_TEST_EXTRA_PACKAGES"
# Units that slow the boot down or make no sense in a test container ("ln -s /dev/null": masked,
# whether or not the unit exists).
MASK_UNITS=(console-getty.service getty@.service serial-getty@.service getty-static.service
  container-getty@.service getty.target systemd-networkd-wait-online.service
  systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer apt-daily.service
  apt-daily-upgrade.service dpkg-db-backup.timer e2scrub_all.timer e2scrub_reap.service
  fstrim.timer man-db.timer systemd-hwdb-update.service)

KEY=$( {
  cat "$HERE/build-image.sh" "$REPO"/packaging/*.sh
  printf '%s\n' "$SUITE" "$MIRROR" "$SECURITY_MIRROR" "$PACKAGES"
} | sha256sum | cut -c1-16)
STAMP_REL=etc/llmuxd-test-image

current_key() { sed -n 's/^key=//p' "$IMAGE/$STAMP_REL" 2>/dev/null || true; }

done_msg() {
  log "image ready: $IMAGE (key $KEY, $(du -sh --one-file-system "$IMAGE" 2>/dev/null | cut -f1))"
  ((PRINT_DIR)) && echo "$IMAGE"
  exit 0
}

if [[ $FORCE == 0 && "$(current_key)" == "$KEY" ]]; then done_msg; fi

# ---------------------------------------------------------------------------------------------
# Host tools.
mkdir -p "$(dirname "$IMAGE")"
exec 9>"$IMAGE.lock"
flock 9
if [[ $FORCE == 0 && "$(current_key)" == "$KEY" ]]; then done_msg; fi   # built while we waited

apt_install_missing systemd-container mmdebstrap libsystemd-dev pkg-config

# ---------------------------------------------------------------------------------------------
# The tree.
NEW=$IMAGE.new
cleanup() {
  # mmdebstrap unmounts what it mounted, even on failure; make sure nothing is left before rm.
  if [[ -d "$NEW" ]]; then
    for m in $(awk -v p="$NEW/" 'index($2, p) == 1 {print $2}' /proc/self/mounts | sort -r); do
      umount -l "$m" 2>/dev/null || true
    done
    rm -rf --one-file-system "$NEW"
  fi
}
trap cleanup EXIT
cleanup

log "building $SUITE into $NEW (key $KEY): $PACKAGES"
t0=$(now)
# The customize hooks run with "$1" = the new root; /proc, /sys, /dev are mounted in it and the
# host's resolv.conf is copied in (mmdebstrap's setup and mount steps).
mmdebstrap --variant=minbase --mode=root --format=directory --components=main \
  --include="$PACKAGES" \
  --aptopt='Acquire::Languages "none"' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-include=/usr/share/locale/locale.alias' \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --customize-hook='echo llmuxd-test >"$1/etc/hostname"; printf "127.0.0.1 localhost llmuxd-test\n::1 localhost\n" >"$1/etc/hosts"' \
  --customize-hook="mkdir -p \"\$1/opt/llmuxd/src\" && cp -r '$REPO/packaging' \"\$1/opt/llmuxd/src/packaging\"" \
  --customize-hook='chroot "$1" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root CRIU_CHECK=0 bash /opt/llmuxd/src/packaging/install.sh --stages system,criu' \
  --customize-hook="for u in ${MASK_UNITS[*]}; do ln -sfn /dev/null \"\$1/etc/systemd/system/\$u\"; done" \
  --customize-hook='rm -rf "$1"/var/cache/apt/*.bin "$1"/var/log/journal/* ; : >"$1/etc/machine-id"' \
  "$SUITE" "$NEW" \
  "deb $MIRROR $SUITE main" \
  "deb $MIRROR $SUITE-updates main" \
  "deb $SECURITY_MIRROR $SUITE-security main" \
  >"$NEW.log" 2>&1 || { tail -n 40 "$NEW.log" >&2; rm -f "$NEW.log"; die "mmdebstrap failed"; }
t_build=$(since "$t0")
grep -E '^\[install(-criu)?\]' "$NEW.log" >&2 || true
rm -f "$NEW.log"

# Sanity checks on the tree.
[[ -x "$NEW/usr/lib/systemd/systemd" || -x "$NEW/lib/systemd/systemd" ]] || die "no systemd in the image"
[[ -x "$NEW/usr/bin/python3" ]] || die "no python3 in the image"
[[ -x "$NEW/usr/local/bin/criu" && -x "$NEW/opt/llmuxd/criu/usr/sbin/criu" ]] || die "no CRIU in the image"
criu_v=$(chroot "$NEW" /usr/local/bin/criu --version | sed -n 's/^Version: //p')
py_v=$(chroot "$NEW" /usr/bin/python3 -c 'import platform; print(platform.python_version())')
host_py_v=$(/usr/bin/python3 -c 'import platform; print(platform.python_version())' 2>/dev/null || echo none)
[[ "$py_v" == "$host_py_v" ]] || log "WARNING: the image has Python $py_v, the host $host_py_v (a venv made on the host may not work inside)"
sysd_v=$(chroot "$NEW" dpkg-query -W -f='${Version}' systemd)

{
  echo "key=$KEY"
  echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "suite=$SUITE"
  echo "systemd=$sysd_v"
  echo "python=$py_v"
  echo "criu=$criu_v"
  echo "packages=$PACKAGES"
} >"$NEW/$STAMP_REL"

if [[ -e "$IMAGE" ]]; then
  rm -rf --one-file-system "$IMAGE.old"
  mv "$IMAGE" "$IMAGE.old"
fi
mv "$NEW" "$IMAGE"
rm -rf --one-file-system "$IMAGE.old"
log "built in $t_build s: systemd $sysd_v, python $py_v, criu $criu_v"
done_msg
