#!/bin/sh
# The image's entrypoint.  As PID 1 of its own PID namespace (plain `docker run`), boot systemd,
# which runs llmuxd.service (and the restore unit before it).  Without its own PID namespace
# (`docker run --pid=host ...`, where systemd cannot be PID 1), or when given arguments, run
# llmuxd directly: `IMAGE` -> `llmuxd serve`, `IMAGE status` -> `llmuxd status`, ...
#
# `docker logs` shows, in both shapes, llmuxd's own log and each model's output with the model's
# name on every line (llmuxd forwards it: llmuxd/logfollow.py; to the journal under systemd, to its
# stdout otherwise).  Under systemd that takes two things from here: the container's environment
# (`docker run -e`, the image's ENV) saved for the llmuxd units, which systemd would not give them,
# and a pump that keeps the container's stdout, which systemd replaces with /dev/null, for
# llmuxd-console.service to write the journal into.
set -e
RUN_DIR=${LLMUXD_RUN_DIR:-/run/llmuxd}
VENV=${LLMUXD_VENV:-/opt/llmuxd/venv}
CONFIG=/etc/llmux/config.json

if [ "$$" = 1 ] && [ $# -eq 0 ] && [ -z "${LLMUXD_NO_SYSTEMD:-}" ]; then
  mkdir -p -m 0700 "$RUN_DIR"
  # The environment for the units' EnvironmentFile= (systemd's syntax, values quoted; 0600: it may
  # hold tokens).
  if [ -x "$VENV/bin/python3" ]; then
    "$VENV/bin/python3" -c '
import os, re, sys
skip = {"HOME", "HOSTNAME", "TERM", "SHLVL", "PWD", "OLDPWD", "_", "container", "NOTIFY_SOCKET"}
lines = []
for k, v in sorted(os.environ.items()):
    if k in skip or k.startswith("LISTEN_") or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
        continue
    v = v.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n").replace("$", "\\$")
    lines.append(f"{k}=\"{v}\"\n")
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
os.write(fd, "".join(lines).encode())
os.close(fd)
' "$RUN_DIR/environment" || true
  fi
  rm -f "$RUN_DIR/console"
  if mkfifo -m 0600 "$RUN_DIR/console" 2>/dev/null; then
    # Opened read-write, the FIFO never reports end-of-file: the pump lives until the container ends.
    sh -c 'exec 3<>"$1"; exec cat <&3' llmuxd-console-pump "$RUN_DIR/console" &
    # cgroup v2: the container's root cgroup must hold no process once systemd delegates controllers.
    if [ -f /sys/fs/cgroup/cgroup.controllers ] && [ -w /sys/fs/cgroup/cgroup.procs ]; then
      { mkdir -p /sys/fs/cgroup/init.scope && echo "$!" >/sys/fs/cgroup/init.scope/cgroup.procs; } 2>/dev/null || true
    fi
  fi
  exec /lib/systemd/systemd
fi
[ $# -eq 0 ] && set -- serve
if [ "$1" = serve ]; then
  # What the restore unit does under systemd, then the daemon.
  /usr/local/bin/llmuxd prepare-restore --config "$CONFIG" || true
  shift
  exec /usr/local/bin/llmuxd serve --config "$CONFIG" "$@"
fi
exec /usr/local/bin/llmuxd "$@"
