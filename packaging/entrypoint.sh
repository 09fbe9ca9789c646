#!/bin/sh
# The image's entrypoint.  As PID 1 of its own PID namespace (plain `docker run`), boot systemd,
# which runs llmuxd.service (and the restore unit before it).  Without its own PID namespace
# (`docker run --pid=host ...`, where systemd cannot be PID 1), or when given arguments, run
# llmuxd directly: `IMAGE` -> `llmuxd serve`, `IMAGE status` -> `llmuxd status`, ...
set -e
if [ "$$" = 1 ] && [ $# -eq 0 ] && [ -z "${LLMUXD_NO_SYSTEMD:-}" ]; then
  exec /lib/systemd/systemd
fi
[ $# -eq 0 ] && set -- serve
if [ "$1" = serve ]; then
  # What the restore unit does under systemd, then the daemon.
  /usr/local/bin/llmuxd prepare-restore --config /etc/llmux/config.json || true
  shift
  exec /usr/local/bin/llmuxd serve --config /etc/llmux/config.json "$@"
fi
exec /usr/local/bin/llmuxd "$@"
