"""Model trees in cgroups without systemd (entrypoint mode, this host's hybrid layout with
cgroup2 at /sys/fs/cgroup/unified), adoption after a crash, and the fallback to session
tracking where cgroup v2 cannot be written."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from harness import LLMUXD, wait_until
from llmuxd.isolation.cgroups import cgroup2_mount, own_cgroup
from llmuxd.isolation.procfs import alive


def complete(d, model):
    return httpx.post(d.url + "/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 2}, timeout=60)


def test_each_model_tree_in_its_own_cgroup(make_daemon):
    mount = cgroup2_mount()
    if mount is None:
        pytest.fail("no cgroup v2 mount on this machine")
    d = make_daemon()
    complete(d, "m1")
    complete(d, "m2")
    st = d.status()
    base = mount / own_cgroup().lstrip("/") / f"llmuxd-{d.port}"
    for m in ("m1", "m2"):
        cg = Path(st["models"][m]["cgroup"])
        assert cg == base / f"model-{m}"
        assert sorted(int(p) for p in (cg / "cgroup.procs").read_text().split()) == st["models"][m]["pids"]
    assert str(d.proc.pid) in (base / "supervisor" / "cgroup.procs").read_text().split()
    assert "cgroup v2 not usable" not in d.log()
    d.stop()
    assert d.leftovers == [] and not base.exists()  # trees gone, layout removed


def test_restart_after_kill9_adopts_running_trees(make_daemon, expected):
    d = make_daemon()
    complete(d, "m2")
    complete(d, "m1")
    before = d.status()["models"]
    os.kill(d.proc.pid, signal.SIGKILL)
    d.proc.wait()
    assert all(alive(p) for m in before.values() for p in m["pids"])  # the trees outlive it
    d.start()  # same config, same port: finds the trees in its cgroups
    after = d.status()
    assert after["active_model"] == "m1"
    assert after["models"]["m1"]["state"] == "awake" and after["models"]["m1"]["pids"] == before["m1"]["pids"]
    assert after["models"]["m2"]["state"] == "asleep" and after["models"]["m2"]["pids"] == before["m2"]["pids"]
    assert d.log().count("adopted running tree") == 2
    r = complete(d, "m2")  # wake the adopted sleeper: same processes, right answer
    assert r.json()["choices"][0]["text"] == expected("m2", "x", 2)
    assert d.status()["models"]["m2"]["pids"] == before["m2"]["pids"]
    # An adopted tree that dies is noticed like a child would be.
    os.kill(after["models"]["m1"]["pid"], signal.SIGKILL)
    wait_until(lambda: d.status()["models"]["m1"]["state"] == "stopped", 10, what="adopted tree's death")


def test_falls_back_to_session_tracking_without_writable_cgroups(make_daemon):
    mount = cgroup2_mount()
    d = make_daemon(start=False)
    # A private mount namespace in which the cgroup2 hierarchy is read-only.
    d.argv_prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                     f"mount -o bind,remount,ro {mount} && exec \"$0\" \"$@\""]
    d.start()
    complete(d, "m1")
    st = d.status()
    assert st["models"]["m1"]["cgroup"] is None and len(st["models"]["m1"]["pids"]) >= 2
    assert d.log().count("cgroup v2 not usable") == 1
    assert "tracking model trees by process session" in d.log()
    d.stop()
    assert d.leftovers == []
