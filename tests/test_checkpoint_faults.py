"""Faults around checkpoints: each gives a clear error, loses nothing, and the daemon keeps
serving the other models.  CRIU is real; where a fault must be injected into it, criu_path
points at a wrapper script around the real binary."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from conftest import model_entry
from harness import free_ports, remove_cgroups, wait_until
from llmuxd.isolation.procfs import alive
from llmuxd.sim import gpu as simgpu
from test_switching import metric

pytestmark = [pytest.mark.criu]
CRIU = "/usr/local/bin/criu"


def complete(d, model, prompt="hello", n=4):
    return httpx.post(d.url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": n}, timeout=120)


def wrapper(tmp_path: Path, body: str) -> str:
    p = tmp_path / "criu-wrapper"
    p.write_text(f"#!/bin/sh\n{body}\nexec {CRIU} \"$@\"\n")
    p.chmod(0o755)
    return str(p)


@pytest.fixture
def ck(make_daemon, tmp_path):
    def make(criu=CRIU, images=None, isolation=None, checkpoint_timeouts=None, **kw):
        p = free_ports(2)
        models = {"m1": model_entry("m1", p[0], "discard", "checkpoint"), "m2": model_entry("m2", p[1])}
        extra = {"isolation": isolation} if isolation else {}
        return make_daemon(models=models, checkpoint={"criu_path": criu, "images_dir": str(images or tmp_path / "ck"),
                                                      **(checkpoint_timeouts or {})}, **extra, **kw)
    return make


def ckdir(d) -> Path:
    return Path(d.config["checkpoint"]["images_dir"]) / "m1" / "images"


def checkpointed(d) -> None:
    assert complete(d, "m1").status_code == 200
    r = d.control("sleep", "m1").json()
    assert r["state"] == "checkpointed", r


def assert_cold_started_with(d, expected, words: str) -> None:
    r = complete(d, "m1", "after", 4)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected("m1", "after", 4)
    st = d.status()["models"]["m1"]
    assert st["last_wake_kind"] == "cold_start" and words in st["last_error"], st


def test_dump_failing_midway_escalates_to_stop(ck, tmp_path, sim_env):
    # CRIU writes part of the images, then fails: the tree is still running.
    w = wrapper(tmp_path, 'if [ "$1" = dump ]; then D=$(echo "$@" | sed "s/.*-D \\([^ ]*\\).*/\\1/"); '
                          'head -c 100000 /dev/urandom > "$D/pages-1.img"; echo "Error: injected" >&2; exit 1; fi')
    d = ck(criu=w)
    assert complete(d, "m1").status_code == 200
    pids = d.status()["models"]["m1"]["pids"]
    r = d.control("sleep", "m1").json()
    assert r["state"] == "stopped" and "criu dump failed" in r["last_error"] and "escalated to stop" in r["last_error"]
    assert not any(alive(p) for p in pids)  # GPU share freed: the tree is gone
    assert simgpu.usage(sim_env["LLMUXD_SIM_GPU_DIR"])["used"] == 0
    assert not ckdir(d).exists() and not list(ckdir(d).parent.glob("images.partial-*"))  # no half checkpoint
    assert complete(d, "m2").status_code == 200


def test_disk_full_during_dump(ck, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=True)
    try:
        d = ck(images=small)
        assert complete(d, "m1").status_code == 200
        r = d.control("sleep", "m1").json()
        assert r["state"] == "stopped" and "escalated to stop" in r["last_error"], r
        assert not list(small.rglob("manifest.json")) and not list(small.rglob("*.partial-*"))
        assert complete(d, "m2").status_code == 200
        d.stop()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=True)


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "missing_saved_file"])
def test_damaged_checkpoint_is_detected_quarantined_and_cold_started(ck, expected, damage):
    d = ck()
    checkpointed(d)
    path = ckdir(d)
    manifest = json.loads((path / "manifest.json").read_text())
    if damage == "missing_saved_file":
        (path / "files" / manifest["saved"][0]["blake3"]).unlink()
        words = "missing from the checkpoint"
    else:
        img = max((path / "criu").glob("pages-*.img"), key=lambda p: p.stat().st_size)
        if damage == "corrupt":
            with open(img, "r+b") as f:
                f.seek(img.stat().st_size // 2)
                f.write(b"\xde\xad\xbe\xef")
            words = "corrupt"
        else:
            os.truncate(img, img.stat().st_size // 2)
            words = "truncated"
    assert_cold_started_with(d, expected, words)
    assert not path.exists() and list(path.parent.glob("images.quarantine-*"))
    assert metric(d, "llmuxd_restore_failures_total", model="m1") == 1
    assert complete(d, "m2").status_code == 200  # the others are served (m1 is checkpointed anew)


def _take_pid(pid: int) -> subprocess.Popen | None:
    wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 10, what=f"PID {pid} free")
    for _ in range(20):
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        p = subprocess.Popen(["sleep", "60"])
        if p.pid == pid:
            return p
        time.sleep(0.2)  # an orphan of the dumped tree may still hold it as a session id
        p.kill()
        p.wait()
    return None


def test_dumped_pids_taken_at_restore(ck, expected, tmp_path):
    """Without a PID namespace a taken PID is detected before CRIU runs; with one (the default)
    it cannot happen: the same checkpoint restores while its old PIDs are in use."""
    d = ck(isolation={"pid_namespace": False})
    checkpointed(d)
    manifest = json.loads((ckdir(d) / "manifest.json").read_text())
    squatter = _take_pid(manifest["pids"][0])
    assert squatter is not None, f"could not take PID {manifest['pids'][0]} ({manifest['pids'][:5]})"
    try:
        assert_cold_started_with(d, expected, "are taken")
        assert ckdir(d).exists()
    finally:
        squatter.kill()
        squatter.wait()
    d.stop()
    # Pid namespaces: occupy the dumped tree's outer PIDs, restore anyway.  A checkpoint folder of
    # its own: d's checkpoint (kept above) serves another port, and whether a daemon would try it
    # first would hang on whether its PIDs happen to be free by now.
    d2 = ck(images=tmp_path / "ck2")
    assert complete(d2, "m1").status_code == 200
    outer = d2.status()["models"]["m1"]["pids"]
    assert d2.control("sleep", "m1").json()["state"] == "checkpointed"
    wait_until(lambda: not any(alive(p) for p in outer), 10, what="dumped tree gone")
    squatters = [s for s in (_take_pid(p) for p in outer[:2]) if s]
    try:
        assert squatters
        r = complete(d2, "m1", "x")
        assert r.json()["choices"][0]["text"] == expected("m1", "x", 4)
        assert d2.status()["models"]["m1"]["last_wake_kind"] == "restore"
    finally:
        for s in squatters:
            s.kill()
            s.wait()


def _sim_serving(port: int) -> list[int]:
    """Simulator processes started to serve on ``port``, found by their command line alone."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and alive(int(entry.name)):
            try:
                argv = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(a.endswith(b"llmuxd-vllm-sim") for a in argv) and str(port).encode() in argv:
                found.append(int(entry.name))
    return sorted(found)


@pytest.mark.parametrize("isolation", [None, {"pid_namespace": False}], ids=["pidns", "no_pidns"])
def test_tree_restored_from_another_daemons_dump_is_tracked_and_stopped(ck, make_daemon, expected, isolation):
    """CRIU puts a restored tree back into the cgroups recorded at the dump; a checkpoint made by
    a daemon on another port names that daemon's layout (llmuxd-<port>/model-m1).  The restored
    tree is this daemon's all the same: listed, in this daemon's cgroup, stopped with it."""
    d = ck(isolation=isolation)
    checkpointed(d)
    d.stop()
    pids = json.loads((ckdir(d) / "manifest.json").read_text())["pids"]  # zombies until reaped hold them
    wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in pids), 15, what="the dumped PIDs free")
    extra = {"isolation": isolation} if isolation else {}
    d2 = make_daemon(models=d.config["models"], checkpoint=d.config["checkpoint"], **extra)  # another port
    try:
        r = complete(d2, "m1", "x")
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected("m1", "x", 4), r.text
        st = d2.status()["models"]["m1"]
        assert st["last_wake_kind"] == "restore", st
        servers = _sim_serving(d.config["models"]["m1"]["port"])
        assert servers and set(servers) <= set(st["pids"]), (servers, st["pids"])
        if isolation:  # no init of its own: the restored tree itself is moved into the cgroup
            in_cgroup = {int(p) for p in (Path(st["cgroup"]) / "cgroup.procs").read_text().split()}
            assert set(st["pids"]) <= in_cgroup, (st["pids"], in_cgroup)
        started = time.monotonic()
        assert d2.stop() == 0 and time.monotonic() - started < 20
        assert d2.leftovers == [] and _sim_serving(d.config["models"]["m1"]["port"]) == []
    finally:
        remove_cgroups(d.port)  # what CRIU re-created of d's layout for the restored tree


@pytest.mark.parametrize("phase", ["dump", "restore"])
def test_llmuxd_killed_during_dump_or_restore(ck, expected, tmp_path, phase):
    w = wrapper(tmp_path, f'[ "$1" = {phase} ] && [ -e {tmp_path}/slow ] && sleep 2')
    d = ck(criu=w)
    if phase == "restore":
        checkpointed(d)
    else:
        assert complete(d, "m1").status_code == 200
    (tmp_path / "slow").touch()
    verb = "sleep" if phase == "dump" else "wake"
    t = subprocess.Popen(["curl", "-s", "-X", "POST", d.url + f"/control/{verb}", "-d", '{"model":"m1"}'])
    time.sleep(1)
    os.kill(d.proc.pid, signal.SIGKILL)
    d.proc.wait()
    t.wait()
    time.sleep(2.5)  # the orphaned criu finishes what it was doing
    (tmp_path / "slow").unlink()
    d.start()
    st = d.status()["models"]["m1"]
    assert st["state"] in ("stopped", "checkpointed", "awake", "asleep"), st
    assert not list(ckdir(d).parent.glob("images.partial-*"))  # never a half checkpoint
    if phase == "restore":
        assert ckdir(d).exists()  # the checkpoint survived
    r = complete(d, "m1", "k")
    assert r.json()["choices"][0]["text"] == expected("m1", "k", 4)
    assert complete(d, "m2").status_code == 200


def _alive_with(marker: str) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{entry.name}/cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.mark.parametrize("isolation", [None, {"pid_namespace": False}], ids=["pidns", "no_pidns"])
def test_hung_criu_dump_is_killed_and_escalates(ck, tmp_path, expected, isolation):
    marker = f"1000.{os.getpid()}{len(str(tmp_path))}{abs(hash(str(tmp_path))) % 100000}"
    w = wrapper(tmp_path, f'[ "$1" = dump ] && sleep {marker}')
    d = ck(criu=w, isolation=isolation, checkpoint_timeouts={"dump_timeout_secs": 2})
    assert complete(d, "m1").status_code == 200
    started = time.monotonic()
    r = d.control("sleep", "m1").json()
    took = time.monotonic() - started
    assert r["state"] == "stopped" and "no answer after 2 s" in r["last_error"], r
    assert "escalated to stop" in r["last_error"] and took < 20, (took, r)
    assert _alive_with(marker) == []  # criu (here: the hung wrapper) and all it started: killed
    assert not ckdir(d).exists() and not list(ckdir(d).parent.glob("images.partial-*"))
    assert metric(d, "llmuxd_eviction_escalations_total", model="m1") == 1
    assert complete(d, "m2").status_code == 200
    assert_cold_started_with(d, expected, "no answer after 2 s")


@pytest.mark.parametrize("isolation", [None, {"pid_namespace": False}], ids=["pidns", "no_pidns"])
def test_hung_criu_restore_is_killed_and_the_model_cold_starts(ck, tmp_path, expected, isolation):
    marker = f"1000.{os.getpid()}{abs(hash(str(tmp_path))) % 100000}"
    w = wrapper(tmp_path, f'[ "$1" = restore ] && [ -e {tmp_path}/hang ] && sleep {marker}')
    d = ck(criu=w, isolation=isolation, checkpoint_timeouts={"restore_timeout_secs": 2})
    checkpointed(d)
    pids = json.loads((ckdir(d) / "manifest.json").read_text())["pids"]
    wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in pids), 15, what="the dumped PIDs free")
    (tmp_path / "hang").touch()
    started = time.monotonic()
    r = complete(d, "m1", "after", 4)
    took = time.monotonic() - started
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected("m1", "after", 4)
    st = d.status()["models"]["m1"]
    assert st["state"] == "awake" and st["last_wake_kind"] == "cold_start", st
    assert "restore failed (timeout)" in st["last_error"] and "checkpoint kept" in st["last_error"], st
    assert took < 20, took
    assert _alive_with(marker) == []
    assert metric(d, "llmuxd_restore_failures_total", model="m1", reason="timeout") == 1
    assert ckdir(d).exists() and not list(ckdir(d).parent.glob("images.quarantine-*"))  # not its fault
    assert complete(d, "m2").status_code == 200
