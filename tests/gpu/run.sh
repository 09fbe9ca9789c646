#!/bin/bash
# The GPU run, on the GPU machine: `bash tests/gpu/run.sh [bench/run.py options]` (see
# tests/gpu/drive.py for what the GPU part does).
#
# Needs, in the checkout (both git-ignored):
#   .cache/criu-root/   CRIU 4.2.1's extracted root (a copy of /opt/llmuxd/criu, as
#                       packaging/install-criu.sh makes it), run with its own loader;
#   .cache/gpu-wheels/  llmuxd's Python deps missing from the machine's image, for Python 3.12:
#                       pydantic, pydantic-core, annotated-types, typing-inspection,
#                       typing-extensions, pyzmq, sdnotify, dbus-fast, protobuf<7, blake3,
#                       httptools.
# Optional: .cache/llmuxd-src/llmuxd, a pinned copy of llmuxd (e.g. `git archive HEAD llmuxd |
#   tar -x -C .cache/llmuxd-src`) used instead of the checkout's, which may be mid-edit.
# Run: `OUT=DIR bash tests/gpu/run.sh` with those folders in place (about 24 MiB); a few minutes
# on an H200.  Arguments go to bench/run.py (its GPU mode runs tests/gpu/drive.py, then the proxy
# benchmark).
# Everything is put outside /tmp (each test container gets a fresh tmpfs there): code in
# /opt/llmuxd-gpu, CRIU in /opt/llmuxd/criu, HF cache + checkpoints + logs in /var/lib/llmuxd-gpu.
# Results: $OUT/summary-h200.{json,md}, gpu-h200.{json,md}, proxy-h200.json, bench.log, drive.log,
# amx.json, setup.log, logs.tar.gz.
set -u
OUT=${OUT:-/var/tmp/llmuxd-gpu-out}
mkdir -p "$OUT"
REPO=$(cd "$(dirname "$0")/../.." && pwd)  # the repository root (.cache/, llmuxd/, tests/)
cd "$REPO"
ROOT=/opt/llmuxd-gpu
STATE=/var/lib/llmuxd-gpu
{
  echo "repo: $REPO"; date; uname -a; python3 -V; command -v python3
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
  command -v unshare mount iptables iptables-restore nft || true
  rm -rf "$ROOT" "$STATE" && mkdir -p "$ROOT/src" "$STATE" /opt/llmuxd
  # llmuxd from a pinned snapshot when there is one (the checkout may be mid-edit), else the checkout's
  if [ -d .cache/llmuxd-src/llmuxd ]; then cp -a .cache/llmuxd-src/llmuxd "$ROOT/src/"; else cp -a llmuxd "$ROOT/src/"; fi
  # the GPU backend and its driver (the package `gpu`), and the test containers' base beside it
  cp -a tests/gpu tests/infra bench "$ROOT/src/"
  [ -x /opt/llmuxd/criu/usr/sbin/criu ] || cp -a .cache/criu-root /opt/llmuxd/criu
  C=/opt/llmuxd/criu
  printf '#!/bin/sh\nexec %s/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --library-path %s/usr/lib/x86_64-linux-gnu %s/usr/sbin/criu "$@"\n' \
    "$C" "$C" "$C" >"$ROOT/criu"
  chmod +x "$ROOT/criu"
  "$ROOT/criu" --version && "$ROOT/criu" check
  [ -n "${SKIP_WHEELS:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --target "$ROOT/site" .cache/gpu-wheels/*.whl
} >"$OUT/setup.log" 2>&1
export PYTHONPATH=$ROOT/site:$ROOT/src:/opt/llmuxd/criu/usr/lib/python3/dist-packages
export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/usr/local/nvidia/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PYTHONUNBUFFERED=1
python3 -c 'import llmuxd.cli, pydantic, zmq, pycriu, torch; print("imports ok; cuda:", torch.cuda.is_available())' >>"$OUT/setup.log" 2>&1
cd /
# the benchmark's GPU mode: tests/gpu/drive.py (figures and checks: gpu-h200.{json,md}, drive.log)
# and the proxy benchmark, summed up against the targets in summary-h200.{json,md}
timeout "${DRIVE_TIMEOUT:-540}" python3 "$ROOT/src/bench/run.py" --gpu --quick --label h200 --results "$OUT" \
  --drive "$ROOT/src/gpu/drive.py" --criu "$ROOT/criu" "$@" >"$OUT/bench.log" 2>&1
rc=$?
echo "bench/run.py exit status $rc" >>"$OUT/bench.log"
# AMX permission across fork, exec and a CRIU dump/restore (an AMX host only; see amx_probe.py)
timeout 60 python3 "$ROOT/src/gpu/amx_probe.py" --criu "$ROOT/criu" --out "$OUT/amx.json" >"$OUT/amx.log" 2>&1
# what llmuxd, the backends and CRIU wrote (no images)
tar -czf "$OUT/logs.tar.gz" --exclude='*.img' -C "$STATE" logs config.json $(cd "$STATE" && ls llmuxd-*.log 2>/dev/null) \
  $(cd "$STATE" && ls -d ck/ck/images/manifest.json ck/ck/images/dump.log 2>/dev/null) 2>>"$OUT/setup.log"
tail -c 3000 "$OUT/drive.log"; tail -c 3000 "$OUT/bench.log"
exit $rc
