"""The README's first command: scripts/demo.py (what scripts/demo.sh runs after the set-up), end
to end on free ports — switching, then a model checkpointed with discard + checkpoint and restored
in its container and in a new one — and its clean-up, also when it is stopped half-way."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from harness import REPO, free_ports
from test_cross_container import require_mntns

sys.path.insert(0, str(Path(__file__).resolve().parent / "infra"))
import mntns  # noqa: E402

SECS = r"\s+\d+\.\d\d s"


def start_demo(tmp_path: Path) -> tuple[subprocess.Popen, list[int]]:
    port, *models = free_ports(4)
    # 1 s of simulated loading keeps the test short; what it asserts does not depend on it.
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "demo.py"), "--port", str(port),
                             "--model-ports", ",".join(map(str, models)), "--work", str(tmp_path / "demo"),
                             "--load-seconds", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    return proc, [port, *models]


def assert_nothing_left(proc: subprocess.Popen, tmp_path: Path, ports: list[int]) -> None:
    for letter in "ab":
        assert mntns.leftovers(f"llmuxd-demo-{letter}-{proc.pid}") == []
    assert not (tmp_path / "demo" / "checkpoints").exists()
    listening = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True, check=True).stdout
    for port in ports:
        assert f":{port} " not in listening, (port, listening)


@pytest.mark.criu
@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    require_mntns()
    proc, ports = start_demo(tmp_path)
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    steps = [
        r"request for chat \(cold start\)" + SECS, r"request for code \(switch: chat offloaded, code cold\)" + SECS,
        r"request for chat \(switch back: wake from offload\)" + SECS, r"POST /control/wake code \(wake from discard\)" + SECS + "  -> awake",
        r"request for story \(cold start\)" + SECS,
        r"sleep: weights dropped, whole process tree CRIU-dumped" + SECS + "  -> checkpointed",
        r"images \d+ MiB, without the weights",
        r"request for story \(restore in container A\)" + SECS + "  -> same answer",
        r"sleep again \(the checkpoint is kept and reused\)" + SECS + "  -> checkpointed",
        r"container A stopped; a new container B started",
        r"request for story \(restore in container B\)" + SECS + "  -> same answer",
        # the headline
        r"cold start -> first answer" + SECS,
        r"sleep: drop the weights, CRIU dump" + SECS + r"   criu dump \d+\.\d\d s, images \d+ MiB \(weights: 128 MiB\)",
        r"restore -> first answer, same container" + SECS + r"   .*; criu restore \d+\.\d\d s",
        r"restore -> first answer, new container" + SECS + r"   .*; criu restore \d+\.\d\d s",
        r"Cleaned up: containers, their mounts and processes, the checkpoint; nothing left behind\.",
    ]
    at = 0
    for step in steps:  # each present, in this order
        m = re.compile(step).search(out, at)
        assert m, f"{step!r} not found after position {at} in:\n{out}"
        at = m.end()
    # Container B was new: its entrypoint had to put A's run-time files back before the restore.
    b_log = (tmp_path / "demo" / "run" / f"llmuxd-demo-b-{proc.pid}" / "entrypoint.log").read_text()
    assert "restored /dev/shm/psm_" in b_log and "restored from /tmp/llmux-checkpoints/story/images" in b_log, b_log
    assert_nothing_left(proc, tmp_path, ports)


@pytest.mark.criu
@pytest.mark.slow
def test_demo_stopped_half_way_cleans_up(tmp_path):
    """SIGTERM (or Ctrl-C) once the checkpoint exists: the demo stops, and removes the container,
    its processes and mounts, and the checkpoint."""
    require_mntns()
    proc, ports = start_demo(tmp_path)
    timer = threading.Timer(600, proc.kill)  # a hung demo fails the test instead of hanging it
    timer.start()
    seen = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if "CRIU-dumped" in line:
                assert (tmp_path / "demo" / "checkpoints" / "story" / "images" / "manifest.json").exists()
                proc.terminate()
                break
        rest, _ = proc.communicate()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(seen) + rest
    assert "CRIU-dumped" in out, out
    assert proc.returncode == 130, out
    assert "\ninterrupted\n" in out and "nothing left behind." in out, out
    assert_nothing_left(proc, tmp_path, ports)


def test_demo_refuses_what_its_containers_cannot_see():
    """The containers' image is the root filesystem's own mount: the checkout and its venv must be
    on it (or the checkout bound in), or the demo says so before it starts anything."""
    spec = importlib.util.spec_from_file_location("llmuxd_demo", REPO / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.not_in_image([str(REPO), sys.prefix]) == []
    missing = demo.not_in_image(["/proc/self/status", str(REPO)])
    assert len(missing) == 1 and "(on the mount /proc)" in missing[0], missing
