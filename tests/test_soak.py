"""The soak run (bench/soak.py), short: three simulated models (m1 discard + checkpoint with
keep_images false, m2 offload + keep_running, m3 discard + keep_running) switching under four
concurrent official-openai clients for 30 switches, through a daemon restart in container A and a
change to a new container B, with every answer checked and the leak checks (files, checkpoint
folder, fds, cgroups, processes, mounts and namespaces, RSS, restores, metrics, log) run along the
way.  The long runs: ``bench/soak.py --sim`` (60 switches) and ``--vllm``."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from harness import REPO
from test_cross_container import require_mntns

pytestmark = [pytest.mark.criu, pytest.mark.slow]

TIMEOUT = 480  # seconds; about 45 s on a 2-core machine


def test_soak_sim_short(tmp_path):
    require_mntns()
    report = tmp_path / "soak.json"
    cmd = [sys.executable, str(REPO / "bench" / "soak.py"), "--sim", "--switches", "30", "--clients", "4",
           "--report", str(report), "--keep", str(tmp_path / "logs")]
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGTERM)  # the soak cleans up (containers, cgroups) on SIGTERM
        try:
            out, _ = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        pytest.fail(f"the soak run took more than {TIMEOUT} s:\n{out[-6000:]}")
    print(out[-4000:])
    assert p.returncode == 0, f"soak failed (logs in {tmp_path / 'logs'}):\n{out[-8000:]}"
    r = json.loads(report.read_text())
    assert r["backend"] == "sim"
    assert r["switches"] >= 30, r
    assert r["cycles"] >= 5, r  # m1 dumped (a restored tree, keep_images false) and restored again
    assert r["m1_restores"] == r["cycles"] and r["m1_dumps"] >= r["cycles"]
    assert r["requests"] > 0 and r["answers_checked"] == r["requests"]
    assert r["wrong_answers"] == 0 and r["request_errors"] == 0, r
    assert r["leaks"] == 0, r["findings"]
    assert r["checks"] >= 4, r
    assert r["rss_flat"], r["lifetimes"]
    assert r["restart"]["done"] and r["restart"]["stop_rc"] == 0 and r["restart"]["m1_checkpointed_at_stop"]
    assert r["restart"]["m1_first_wake_kind"] == "restore", r["restart"]
    assert r["container_change"]["done"] and r["container_change"]["m1_checkpointed_at_stop"]
    assert r["container_change"]["m1_state_in_b"] == "checkpointed"
    assert r["container_change"]["m1_first_wake_kind"] == "restore", r["container_change"]
    assert r["final_stop"]["done"] and r["final_stop"]["stop_rc"] == 0
    # three daemon lifetimes (A, A restarted, B) in two containers
    assert len(r["lifetimes"]) == 3 and len({lt["pid"] for lt in r["lifetimes"]}) == 3
    assert len({lt["container"] for lt in r["lifetimes"]}) == 2
    assert r["switches_by_kind"].get("restore", 0) == r["cycles"]
    assert r["ok"] is True


def _soak_module():
    import importlib.util

    if "soak_bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("soak_bench", REPO / "bench" / "soak.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["soak_bench"] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
    return sys.modules["soak_bench"]


def test_soak_checks_find_leaks(tmp_path):
    """The soak's file and checkpoint-folder checks do find what they look for (a check that
    finds nothing proves nothing otherwise): unheld files in the container's /tmp and /dev/shm,
    partial and quarantined dumps, a stale checkpoint, folders of other models."""
    import os
    import time
    from types import SimpleNamespace

    require_mntns()
    soak = _soak_module()
    c = soak.mntns.MountContainer(f"llmuxd-soak-neg-{os.getpid()}")
    c.start()
    try:
        c.run("echo x >/dev/shm/leaked; mkdir -p /tmp/d; echo y >/tmp/d/leaked2; echo z >/tmp/held; "
              "echo w >/dev/shm/mapped; echo v >/dev/shm/psm_expected")
        c.spawn(["python3", "-c", "import mmap, time\nf = open('/dev/shm/mapped', 'r+b')\n"
                 "m = mmap.mmap(f.fileno(), 0)\nf.close()\ng = open('/tmp/held')\ntime.sleep(120)"])
        deadline = time.monotonic() + 10
        while True:  # until the holder has its file open and mapped
            s = soak.Soak(None, "sim", {}, tmp_path, None)
            soak.check_files(s, SimpleNamespace(c=c), set(c.pids()), {"/dev/shm/psm_expected"}, "test")
            if len(s.findings) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert sorted(f[2].split()[0] for f in s.findings) == ["/dev/shm/leaked", "/tmp/d/leaked2"], s.findings
    finally:
        c.stop()

    ckpt = tmp_path / "ckpt"
    (ckpt / "m1" / "images").mkdir(parents=True)
    (ckpt / "m1" / "images" / "manifest.json").write_text("{}")
    s = soak.Soak(None, "sim", {}, ckpt, None)
    soak.check_ckpt(s, "checkpointed", "test")
    assert s.findings == []
    soak.check_ckpt(s, "awake", "test")  # keep_images false: a restored model leaves no images
    assert [f[0] for f in s.findings] == ["checkpoint"] and "still there" in s.findings[0][2]
    (ckpt / "m1" / "images.partial-20260101-000000-0123").mkdir()
    (ckpt / "m1" / "images.quarantine-20260101-000000-01").mkdir()
    (ckpt / "m2").mkdir()
    s.findings.clear()
    soak.check_ckpt(s, "checkpointed", "test")
    text = "\n".join(f[2] for f in s.findings)
    assert "images.partial-" in text and "images.quarantine-" in text and "expected only m1" in text, text
