"""What a model's tree leaves on disk once it is gone: nothing.

The simulator, like vLLM, keeps shared-memory segments (``/dev/shm/psm_*``) and a named
semaphore (``sem.mp-*``, mapped under a temporary name glibc unlinked, so a dump makes CRIU's
``/dev/shm/link_remap.N``).  A killed tree cannot remove them, and a tree ended by its dump does
not; llmuxd removes them by inode (only what the tree held and nobody holds now), and a stale
link_remap.N that its own checkpoint recorded never makes the next dump fail."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
from pathlib import Path

import httpx
import pytest

from conftest import model_entry
from harness import LLMUXD, free_ports, wait_until
from llmuxd.checkpoint import remaps
from llmuxd.isolation.procfs import held_inodes

pytestmark = [pytest.mark.criu]
CRIU = "/usr/local/bin/criu"
SHM = Path("/dev/shm")


def complete(d, model: str) -> str:
    r = httpx.post(d.url + "/v1/completions", json={"model": model, "prompt": "leftovers", "max_tokens": 4},
                   timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def unheld_new(before: set[str]) -> list[str]:
    """Entries of /dev/shm made since ``before`` that no process holds (what was left)."""
    out = []
    for e in os.scandir(SHM):
        if e.name in before:
            continue
        try:
            st = e.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if not held_inodes({(st.st_dev, st.st_ino)}):
            out.append(e.name)
    return sorted(out)


@pytest.fixture
def daemon(make_daemon, tmp_path):
    p = free_ports(2)
    models = {"m1": model_entry("m1", p[0], "discard", "checkpoint"), "m2": model_entry("m2", p[1])}
    return make_daemon(models=models, checkpoint={"criu_path": CRIU, "images_dir": str(tmp_path / "ck"),
                                                  "keep_images": True})


def manifest(d) -> dict:
    return json.loads((Path(d.config["checkpoint"]["images_dir"]) / "m1" / "images" / "manifest.json").read_text())


def crash_server(d, model: str) -> None:
    """SIGKILL the model's server, as a crash would: its tree cannot clean up after itself."""
    os.kill(d.status()["models"][model]["pid"], signal.SIGKILL)  # the tree's root: all of it dies
    wait_until(lambda: d.status()["models"][model]["state"] == "stopped", 30, what=f"{model} stopped")


def test_dumped_crashed_and_stopped_trees_leave_nothing_in_dev_shm(daemon, expected):
    before = {e.name for e in os.scandir(SHM)}
    d = daemon
    assert complete(d, "m1") == expected("m1", "leftovers", 4)
    held = {p for p in (os.readlink(f"/proc/{pid}/fd/{fd}") for pid in d.status()["models"]["m1"]["pids"]
                        for fd in os.listdir(f"/proc/{pid}/fd")) if p.startswith("/dev/shm/")}
    assert any("/psm_" in p for p in held), held  # the simulator holds segments, like vLLM
    r = d.control("sleep", "m1").json()
    assert r["state"] == "checkpointed", r
    m = manifest(d)
    assert [x["path"] for x in m["link_remaps"]], "the named semaphore should make CRIU link-remap it"
    # Ended by its dump: its segments, semaphore names and CRIU's link_remap.N are gone (the
    # checkpoint keeps copies).
    assert unheld_new(before) == [], d.log()[-3000:]
    assert complete(d, "m1") == expected("m1", "leftovers", 4)  # restored: the copies were put back
    assert d.status()["models"]["m1"]["last_wake_kind"] == "restore"
    crash_server(d, "m1")  # a restored tree that dies: what it held is released too
    wait_until(lambda: unheld_new(before) == [], 15, what="nothing left after the crash")
    assert complete(d, "m2") == expected("m2", "leftovers", 4)
    assert complete(d, "m1") == expected("m1", "leftovers", 4)  # cold start (the tree crashed)
    d.stop()
    assert unheld_new(before) == [], d.log()[-3000:]


def test_put_back_files_of_a_restore_that_did_not_happen_never_fail_a_dump(daemon, expected):
    """The put-back of a restore that then did not happen (the restore unit's prepare-restore,
    and the model was cold-started instead) leaves the checkpoint's /dev/shm files and its
    link_remap.N in place.  A dump of a tree alike would make the same link_remap.N, and CRIU fails
    on an existing one ('Can't link remap ... File exists'): they are removed before the dump (and
    before a cold start), because they carry llmuxd's mark."""
    before = {e.name for e in os.scandir(SHM)}
    d = daemon
    complete(d, "m1")
    assert d.control("sleep", "m1").json()["state"] == "checkpointed"
    m = manifest(d)
    transient = [r["path"] for r in m["link_remaps"]] + [r["path"] for r in m["saved"] if r["path"].startswith("/dev/shm/")]
    complete(d, "m1")  # restored (keep_images: the checkpoint stays)
    crash_server(d, "m1")  # stopped, with the checkpoint still there
    assert complete(d, "m1") == expected("m1", "leftovers", 4)
    assert d.status()["models"]["m1"]["last_wake_kind"] == "cold_start"
    r = subprocess.run([LLMUXD, "prepare-restore", "--config", str(d.config_path)], capture_output=True, text=True)
    assert r.returncode == 0 and all(os.path.exists(p) for p in transient), r.stdout + r.stderr
    r = d.control("sleep", "m1").json()
    assert r["state"] == "checkpointed", (r, d.log()[-3000:])
    st = d.status()["models"]["m1"]
    assert st["escalations"] == 0 and st["last_checkpoint"]["path"], st
    assert f"removed what was put back for a restore that did not happen: {', '.join(transient)}" in d.log()
    assert unheld_new(before) == []
    assert complete(d, "m1") == expected("m1", "leftovers", 4)
    assert d.status()["models"]["m1"]["last_wake_kind"] == "restore"


def test_a_link_remap_that_is_not_ours_is_left_and_the_failure_is_loud(daemon, expected):
    """A file at a link_remap.N name without our mark may be anyone's: it is not removed; the dump fails, the model escalates to stop — and says so in its status, the
    metrics and the log."""
    from test_switching import metric

    d = daemon
    complete(d, "m1")
    assert d.control("sleep", "m1").json()["state"] == "checkpointed"
    path = manifest(d)["link_remaps"][0]["path"]
    complete(d, "m1")
    crash_server(d, "m1")
    ck = Path(d.config["checkpoint"]["images_dir"]) / "m1"
    shutil.rmtree(ck)  # no checkpoint records that name any more
    Path(path).write_bytes(b"someone else's")
    try:
        complete(d, "m1")
        r = d.control("sleep", "m1").json()
        assert r["state"] == "stopped", r
        st = d.status()["models"]["m1"]
        assert st["escalations"] == 1 and "escalated to stop" in st["last_error"], st
        assert "link_remap" in st["last_error"], st["last_error"]
        assert metric(d, "llmuxd_eviction_escalations_total", model="m1") == 1
        assert "escalated to stop" in d.log()
        assert Path(path).read_bytes() == b"someone else's"
    finally:
        Path(path).unlink(missing_ok=True)


def test_each_tree_has_its_own_tmpdir_emptied_when_it_is_gone(make_daemon, tmp_path, expected):
    """vLLM leaves files in its temporary folder at every start; in a folder llmuxd made for the
    tree they are provably the tree's, and go with it."""
    p = free_ports(2)
    d = make_daemon(models={"m1": model_entry("m1", p[0]), "m2": model_entry("m2", p[1])})
    assert complete(d, "m1") == expected("m1", "leftovers", 4)
    own = Path(f"/tmp/llmuxd-tree-{p[0]}")
    st = os.lstat(own)
    assert st.st_mode & 0o777 == 0o700 and st.st_uid == 0
    sockets = [e for e in os.scandir(own) if stat.S_ISSOCK(e.stat(follow_symlinks=False).st_mode)]
    assert sockets, "the simulator's ZMQ sockets live in its own temporary folder"
    (own / "vllm_dist_feedbeef").write_text("what vLLM leaves at every start")
    crash_server(d, "m1")
    wait_until(lambda: not any(os.scandir(own)), 10, what="the crashed tree's temporary folder emptied")
    assert complete(d, "m1") == expected("m1", "leftovers", 4)
    assert complete(d, "m2") == expected("m2", "leftovers", 4)  # m1 asleep (keep_running): its folder stays
    d.stop()
    assert not own.exists() and not Path(f"/tmp/llmuxd-tree-{p[1]}").exists()


def test_a_planted_link_for_the_tmpdir_is_never_followed(make_daemon, tmp_path, expected):
    p = free_ports(2)
    victim = tmp_path / "victim"
    victim.mkdir()
    planted = Path(f"/tmp/llmuxd-tree-{p[0]}")
    planted.symlink_to(victim)
    try:
        d = make_daemon(models={"m1": model_entry("m1", p[0]), "m2": model_entry("m2", p[1])})
        assert complete(d, "m1") == expected("m1", "leftovers", 4)  # served, with the default TMPDIR
        assert "own temporary folder not used" in d.log() and "symbolic link" in d.log()
        d.stop()
        assert list(victim.iterdir()) == [] and planted.is_symlink()
    finally:
        planted.unlink()


def test_another_daemons_put_back_files_are_never_taken(make_daemon, tmp_path, expected):
    """Two llmuxd sharing one /dev/shm (containers with the host's IPC namespace): the one about
    to restore has put its link_remap.N back; the other, dumping a tree alike, must not remove it
    (the mark names the model's port).  Its own dump then fails on the name, loudly."""
    p = free_ports(4)
    a = make_daemon(models={"m1": model_entry("m1", p[0], "discard", "checkpoint"), "m2": model_entry("m2", p[1])},
                    checkpoint={"criu_path": CRIU, "images_dir": str(tmp_path / "ck-a")})
    complete(a, "m1")
    assert a.control("sleep", "m1").json()["state"] == "checkpointed"
    m = manifest(a)
    remap = m["link_remaps"][0]["path"]
    try:
        r = subprocess.run([LLMUXD, "prepare-restore", "--config", str(a.config_path)], capture_output=True,
                           text=True)
        assert r.returncode == 0 and os.path.exists(remap), r.stdout + r.stderr
        b = make_daemon(models={"m1": model_entry("m1", p[2], "discard", "checkpoint"),
                                "m2": model_entry("m2", p[3])},
                        checkpoint={"criu_path": CRIU, "images_dir": str(tmp_path / "ck-b")})
        complete(b, "m1")
        r = b.control("sleep", "m1").json()
        assert r["state"] == "stopped" and "Can't link remap" in r["last_error"], r  # refused by CRIU, loudly
        assert os.path.exists(remap)  # a's file is still there
        assert complete(a, "m1") == expected("m1", "leftovers", 4)  # and a restores with it
        assert a.status()["models"]["m1"]["last_wake_kind"] == "restore"
    finally:  # what a's put-back placed, should the test fail before a's restore consumed it
        remaps.remove_marked([r["path"] for r in m["link_remaps"] + m["saved"] if r["path"].startswith("/dev/shm/")],
                             m["port"])
