#!/usr/bin/env bash
# Install llmuxd into an image or machine.  Used by the Dockerfile and by the tests' container
# image, so the tests exercise this very install.
#
#   install.sh [--stages system,criu,python,files] [--src DIR] [--venv PATH]
#
# Stages (default: all, in this order):
#   system  Debian/Ubuntu packages llmuxd needs at run time (apt; only what is missing)
#   criu    CRIU >= 4.2 in its own root (packaging/install-criu.sh)
#   python  a venv at /opt/llmuxd/venv with llmuxd from --src (skipped with --venv PATH: use that one)
#   files   systemd units, D-Bus policy, /usr/local/bin/llmuxd, /etc/llmux, /var/log/llmuxd
#   enable  start llmuxd at boot (not in the default set)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(cd "$HERE/.." && pwd)
# shellcheck source=apt-missing.sh
source "$HERE/apt-missing.sh"
STAGES=system,criu,python,files
VENV=""
while (($#)); do
  case "$1" in
    --stages) STAGES=$2; shift 2 ;;
    --src) SRC=$(cd "$2" && pwd); shift 2 ;;
    --venv) VENV=$2; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
log() { printf '[install] %s\n' "$*" >&2; }
has() { [[ ",$STAGES," == *",$1,"* ]]; }

if has system; then
  pkgs=(dbus systemd procps iproute2 curl ca-certificates)
  # Python only where there is none that makes venvs: on vLLM's image (python3.12 as python3),
  # installing the distribution's python3 would take /usr/bin/python3 over.
  python3 -c 'import venv, ensurepip' 2>/dev/null || pkgs=(python3 python3-venv "${pkgs[@]}")
  apt_install_missing "${pkgs[@]}"
fi

if has criu; then
  bash "$HERE/install-criu.sh" --root /opt/llmuxd/criu --wrapper /usr/local/bin/criu --venv none --no-check
fi

if has python && [[ -z "$VENV" ]]; then
  VENV=/opt/llmuxd/venv
  log "python: llmuxd from $SRC into $VENV"
  [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --no-cache-dir -U pip
  "$VENV/bin/pip" install -q --no-cache-dir "$SRC"
  # pycriu (for reading CRIU images) from the CRIU root, with a protobuf it works with.
  if [[ -d /opt/llmuxd/criu ]]; then
    bash "$HERE/install-criu.sh" --root /opt/llmuxd/criu --wrapper /usr/local/bin/criu --venv "$VENV" --no-check
  fi
fi

if has files; then
  VENV=${VENV:-/opt/llmuxd/venv}
  log "files: units, D-Bus policy and interface, /usr/local/bin/llmuxd -> $VENV/bin/llmuxd"
  install -d /etc/systemd/system /usr/share/dbus-1/system.d /usr/share/dbus-1/interfaces /etc/llmux /var/log/llmuxd
  install -m 0644 "$SRC/systemd/llmuxd.service" "$SRC/systemd/llmuxd-restore.service" /etc/systemd/system/
  install -m 0644 "$SRC/dbus/io.llmux.Llmuxd1.conf" /usr/share/dbus-1/system.d/
  install -m 0644 "$SRC/dbus/io.llmux.Llmuxd1.xml" /usr/share/dbus-1/interfaces/
  ln -sf "$VENV/bin/llmuxd" /usr/local/bin/llmuxd
  ln -sf "$VENV/bin/llmuxd-vllm-sim" /usr/local/bin/llmuxd-vllm-sim
  if [[ -d /run/systemd/system ]]; then  # a running systemd (not an image build): pick them up
    systemctl daemon-reload
    busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus ReloadConfig >/dev/null 2>&1 || true
  fi
fi

if has enable; then  # start at boot (the image's default: systemd as PID 1 runs llmuxd)
  install -d /etc/systemd/system/multi-user.target.wants
  ln -sf /etc/systemd/system/llmuxd.service /etc/systemd/system/multi-user.target.wants/llmuxd.service
  ln -sf /etc/systemd/system/llmuxd-restore.service /etc/systemd/system/multi-user.target.wants/llmuxd-restore.service
fi
log "done (stages $STAGES)"
