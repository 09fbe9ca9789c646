"""``llmuxd.checkpoint.images``: real ``criu dump`` of small real process trees, read back and checked
against what /proc showed just before the dump.  No mocks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from llmuxd.checkpoint.images import ImageError, ImageNeeds, read_images

CRIU = shutil.which("criu") or "/usr/local/bin/criu"


def _pycriu() -> bool:
    try:
        import pycriu  # noqa: F401
        return True
    except ImportError:
        return False


needs_criu = pytest.mark.skipif(not (os.path.exists(CRIU) and os.geteuid() == 0 and _pycriu()),
                                reason="needs root, CRIU and pycriu")
pytestmark = pytest.mark.criu

# A tree holding one of everything a model server holds.  argv: workdir, shm path.
TREE = r'''
import ctypes, json, mmap, os, socket, sys, threading, time
work, shm = sys.argv[1], sys.argv[2]
os.chdir(work)
data = open("data.txt", "rb")                                   # regular file, read
shared = open("shared.bin", "r+b")
shared_map = mmap.mmap(shared.fileno(), 8192, flags=mmap.MAP_SHARED)
us = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)          # ZMQ-like ipc socket
us.bind(os.path.join(work, "ipc", "ctl.sock")); us.listen()
abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
abstract.bind("\0llmuxd-test-%d" % os.getpid()); abstract.listen()
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen()    # API listener
port = ls.getsockname()[1]
client = socket.create_connection(("127.0.0.1", port)); server, _ = ls.accept()
ghost = open("ghost.txt", "w+"); ghost.write("boo"); ghost.flush(); os.unlink("ghost.txt")
with open(shm, "wb") as f:                                      # psm_-like shared memory file
    f.write(b"s" * 4096)
sh = open(shm, "r+b"); sh_map = mmap.mmap(sh.fileno(), 4096, flags=mmap.MAP_SHARED)
os.link(shm, shm + ".keep"); os.unlink(shm)                     # deleted, other link alive: link_remap
mfd = os.memfd_create("llmuxd-test"); os.ftruncate(mfd, 4096)
mfd_map = mmap.mmap(mfd, 4096, flags=mmap.MAP_SHARED)
ino = ctypes.CDLL(None, use_errno=True).inotify_init()          # an fd type images.py does not read
assert ino >= 0
r, w = os.pipe()
child = os.fork()
if child == 0:
    threading.Thread(target=time.sleep, args=(1000,), daemon=True).start()
    os.write(w, b"x")
    while True:
        time.sleep(1)
threading.Thread(target=time.sleep, args=(1000,), daemon=True).start()
os.read(r, 1)
with open("ready.tmp", "w") as f:
    json.dump({"pid": os.getpid(), "child": child, "port": port}, f)
os.rename("ready.tmp", "ready")
while True:
    time.sleep(1)
'''

# A tree run as the init of its own PID namespace: writes its inner pids.
NS_TREE = r'''
import json, os, sys, time
child = os.fork()
if child == 0:
    while True:
        time.sleep(1)
with open(sys.argv[1] + "/ready.tmp", "w") as f:
    json.dump({"pid": os.getpid(), "child": child}, f)
os.rename(sys.argv[1] + "/ready.tmp", sys.argv[1] + "/ready")
while True:
    time.sleep(1)
'''


@pytest.fixture
def workdir():
    d = Path(tempfile.mkdtemp(prefix="llmuxd-criu-images-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def start(argv: list[str], work: Path) -> subprocess.Popen:
    log = os.open(work / "tree.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        return subprocess.Popen(argv, cwd=work, stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True)
    finally:
        os.close(log)


def wait_ready(p: subprocess.Popen, work: Path) -> dict:
    deadline = time.monotonic() + 15
    while not (work / "ready").exists():
        if p.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"tree did not start: {(work / 'tree.log').read_text()}")
        time.sleep(0.02)
    return json.loads((work / "ready").read_text())


def snapshot(pid: int) -> dict:
    """What /proc says the process uses, just before the dump."""
    fd = {}
    for n in os.listdir(f"/proc/{pid}/fd"):
        try:
            fd[int(n)] = os.readlink(f"/proc/{pid}/fd/{n}")
        except FileNotFoundError:
            pass
    maps = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            maps.add(parts[5])
    return {"fd": fd, "maps": maps, "cwd": os.readlink(f"/proc/{pid}/cwd"), "exe": os.readlink(f"/proc/{pid}/exe"),
            "comm": Path(f"/proc/{pid}/comm").read_text().strip(),
            "tasks": sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))}


def dump(pid: int, images: Path) -> float:
    images.mkdir()
    t0 = time.monotonic()
    r = subprocess.run([CRIU, "dump", "-t", str(pid), "-D", str(images), "--tcp-established", "--ext-unix-sk",
                        "--link-remap", "--ghost-limit", "256M", "--network-lock", "skip", "-o", "dump.log", "-v4"],
                       capture_output=True, text=True)
    elapsed = time.monotonic() - t0
    if r.returncode:
        log = (images / "dump.log").read_text() if (images / "dump.log").exists() else ""
        errors = "\n".join(line for line in log.splitlines() if "Error" in line)
        raise AssertionError(f"criu dump failed ({r.returncode}): {r.stderr}\n{errors}")
    return elapsed


def reap(p: subprocess.Popen, pids: list[int]) -> None:
    """The dumped tree exits on dump; kill what is left of it, by pid."""
    for pid in pids:
        deadline = time.monotonic() + 5
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            if p.poll() is not None and pid == p.pid:
                break
            time.sleep(0.02)
        if pid != p.pid and os.path.exists(f"/proc/{pid}"):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if p.poll() is None:
        p.kill()
    p.wait(timeout=10)


def timed_read(images: Path) -> ImageNeeds:
    t0 = time.perf_counter()
    needs = read_images(images)
    print(f"read_images({images.name}): {(time.perf_counter() - t0) * 1000:.1f} ms, "
          f"{len(needs.files)} files, {len(needs.image_files)} image files, {needs.pages_bytes} page bytes")
    return needs


def split_deleted(paths) -> tuple[set[str], set[str]]:
    paths = [p for p in paths if not p.startswith("/memfd:")]  # memfd content is in the images
    live = {p for p in paths if p.startswith("/") and not p.endswith(" (deleted)")}
    gone = {p[: -len(" (deleted)")] for p in paths if p.startswith("/") and p.endswith(" (deleted)")}
    return live, gone


@needs_criu
def test_images_name_everything_the_tree_uses(workdir):
    (workdir / "data.txt").write_bytes(b"hello\n")
    (workdir / "shared.bin").write_bytes(b"m" * 8192)
    (workdir / "ipc").mkdir()
    (workdir / "tree.py").write_text(TREE)
    shm = f"/dev/shm/llmuxd-test-{os.getpid()}-{workdir.name}"
    p = start(["setsid", sys.executable, str(workdir / "tree.py"), str(workdir), shm], workdir)
    ready, before, pids = {}, {}, [p.pid]
    try:
        ready = wait_ready(p, workdir)
        pid, child = ready["pid"], ready["child"]
        pids = [pid, child, p.pid]
        before = {q: snapshot(q) for q in (pid, child)}
        print(f"criu dump: {dump(pid, workdir / 'images'):.2f} s")
    finally:
        reap(p, pids)
        keep = Path(shm + ".keep")
        if keep.exists():  # every link_remap.N CRIU made is another name of this inode
            for other in Path("/dev/shm").iterdir():
                if other != keep and other.is_file() and os.path.samefile(other, keep):
                    other.unlink()
            keep.unlink()
        Path(shm).unlink(missing_ok=True)

    needs = timed_read(workdir / "images")
    w = str(workdir)

    # the tree
    assert needs.root_pid == pid and needs.pidns is False
    procs = {q.pid: q for q in needs.processes}
    assert set(procs) == {pid, child}
    assert procs[child].ppid == pid and procs[pid].sid == pid and procs[child].sid == pid
    for q in (pid, child):
        assert sorted(procs[q].threads) == before[q]["tasks"] and len(before[q]["tasks"]) == 2
        assert procs[q].comm == before[q]["comm"]
        assert procs[q].exe == before[q]["exe"]
        assert procs[q].state == "alive"

    # files, cross-checked against /proc/<pid>/fd, maps and cwd
    by_path = {(f.path, f.remap): f for f in needs.files}
    assert len(by_path) == len(needs.files), "one entry per path"
    for q in (pid, child):
        mine = [f for f in needs.files if q in f.pids]
        fd_live, fd_gone = split_deleted(before[q]["fd"].values())
        assert fd_live == {f.path for f in mine if "fd" in f.kinds and f.remap is None}
        assert fd_gone == {f.path for f in mine if "fd" in f.kinds and f.remap}
        map_live, map_gone = split_deleted(before[q]["maps"])
        assert map_live == {f.path for f in mine if "mmap" in f.kinds and f.remap is None}
        assert map_gone == {f.path for f in mine if "mmap" in f.kinds and f.remap}
        assert [f.path for f in mine if "cwd" in f.kinds] == [before[q]["cwd"]] == [w]
        assert [f.path for f in mine if "exe" in f.kinds] == [before[q]["exe"]]
        assert [f.path for f in mine if "root" in f.kinds] == ["/"]

    data = by_path[(f"{w}/data.txt", None)]
    assert data.kinds == ["fd"] and data.size == 6 and data.flags[0] & os.O_ACCMODE == os.O_RDONLY
    assert data.mode == os.stat(workdir / "data.txt").st_mode and not data.is_dir and data.ftype == "reg"
    assert not data.append_only
    log = by_path[(f"{w}/tree.log", None)]
    assert log.append_only and log.size is None and log.kinds == ["fd"] and log.pids == sorted([pid, child])
    shared = by_path[(f"{w}/shared.bin", None)]
    assert set(shared.kinds) == {"fd", "mmap"} and shared.size == 8192 and not shared.append_only
    cwd = by_path[(w, None)]
    assert cwd.kinds == ["cwd"] and cwd.is_dir and cwd.ftype == "dir"
    exe = by_path[(before[pid]["exe"], None)]
    assert {"exe", "mmap"} <= set(exe.kinds) and exe.build_id and len(exe.build_id) == 40
    assert exe.size == os.stat(exe.path).st_size
    assert by_path[(f"{w}/ghost.txt", "ghost")].size == 3
    assert set(by_path[(shm, "linked")].kinds) == {"fd", "mmap"}
    assert not any(f.path.startswith("/memfd:") for f in needs.files)
    assert {f.path for f in needs.needed_files()} == {f.path for f in needs.files if f.remap is None}

    # sockets
    assert [(s.path, s.type, s.state, s.deleted) for s in needs.unix_sockets] == \
        [(f"{w}/ipc/ctl.sock", "stream", "listen", False)]
    assert needs.abstract_unix_sockets == [f"llmuxd-test-{pid}"]
    inet = {(s.proto, s.state, s.local_addr, s.local_port, s.remote_addr, s.remote_port) for s in needs.inet_sockets}
    port = ready["port"]
    assert ("tcp", "listen", "127.0.0.1", port, "0.0.0.0", 0) in inet
    est = [s for s in needs.inet_sockets if s.state == "established"]
    client_port = next(s.local_port for s in est if s.remote_port == port)
    assert {(s.local_port, s.remote_port) for s in est} == {(client_port, port), (port, client_port)}
    assert len(est) == 2 and needs.tcp_established and all(s.remote_addr == "127.0.0.1" for s in est)
    assert [(s.local_addr, s.local_port) for s in needs.listening()] == [("127.0.0.1", port)]
    assert all(s.pids == sorted([pid, child]) for s in needs.inet_sockets)

    # remaps: the ghost's content is in the images; the link_remap file lived next to the deleted file
    ghosts = [r for r in needs.remaps if r.type == "ghost"]
    assert [r.path for r in ghosts] == [f"{w}/ghost.txt"]
    assert ghosts[0].ghost_image in dict(needs.image_files)
    linked = [r for r in needs.remaps if r.type == "linked"]
    assert linked and all(r.path == shm for r in linked)
    assert all(r.link_path and Path(r.link_path).parent == Path("/dev/shm")
               and Path(r.link_path).name.startswith("link_remap.") for r in linked)
    assert len(needs.remaps) == len(ghosts) + len(linked)

    # fds not read here are reported, never fatal; in-image types are only counted
    assert [(u.pid, u.type) for u in needs.unknown] == [(pid, "INOTIFY"), (child, "INOTIFY")]
    links = [t for q in (pid, child) for t in before[q]["fd"].values()]
    assert needs.fd_types["PIPE"] == sum(t.startswith("pipe:") for t in links) == 4
    assert needs.fd_types["MEMFD"] == sum(t.startswith("/memfd:") for t in links) == 4  # mmap dups the fd
    assert needs.fd_types["INETSK"] == 6 and needs.fd_types["UNIXSK"] == 4
    assert sum(needs.fd_types.values()) == len(links)

    # image sizes
    sizes = dict(needs.image_files)
    assert "pstree.img" in sizes and "files.img" in sizes
    assert needs.pages_bytes == sum(s for n, s in sizes.items() if n.startswith("pages-")) > 0
    assert sizes == {e.name: e.stat().st_size for e in (workdir / "images").iterdir()}

    # JSON round trip
    assert ImageNeeds.from_dict(json.loads(json.dumps(needs.to_dict()))) == needs


@needs_criu
def test_pid_namespace_tree_reports_inner_pids(workdir):
    (workdir / "tree.py").write_text(NS_TREE)
    p = start(["unshare", "--pid", "--fork", "setsid", sys.executable, str(workdir / "tree.py"), str(workdir)], workdir)
    pids = [p.pid]
    try:
        inner = wait_ready(p, workdir)
        outer = int(Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()[0])
        outer_child = int(Path(f"/proc/{outer}/task/{outer}/children").read_text().split()[0])
        pids = [outer_child, outer, p.pid]
        assert Path(f"/proc/{outer}/status").read_text().split("NSpid:")[1].split()[:2] == [str(outer), "1"]
        print(f"criu dump (pidns): {dump(outer, workdir / 'images'):.2f} s")
    finally:
        reap(p, pids)

    needs = timed_read(workdir / "images")
    assert inner == {"pid": 1, "child": 2}
    assert needs.pidns is True and needs.root_pid == 1
    assert [(q.pid, q.ppid, q.threads) for q in needs.processes] == [(1, 0, [1]), (2, 1, [2])]
    assert [f.path for f in needs.files if "cwd" in f.kinds] == [str(workdir)]
    assert [f.path for f in needs.files if f.append_only] == [str(workdir / "tree.log")]


@pytest.mark.skipif(not _pycriu(), reason="needs pycriu")
def test_missing_or_broken_images(workdir):
    with pytest.raises(ImageError, match="no such directory"):
        read_images(workdir / "nope")
    with pytest.raises(ImageError, match="inventory.img: missing"):
        read_images(workdir)
    (workdir / "inventory.img").write_bytes(b"\x00garbage\xff" * 4)
    with pytest.raises(ImageError, match="inventory.img: cannot decode"):
        read_images(workdir)
