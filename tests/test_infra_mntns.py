"""The mount-namespace container infrastructure itself (tests/infra/mntns.py): containers shaped
like ``docker run --pid=host --network=host --ipc=host -v ...`` (own mount namespace with a fresh
overlay over the host's /, host PID/net/IPC namespaces), and a CRIU checkpoint made in one
container restored in a NEW one that shares only the bound folders. Real, no mocks."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from llmuxd.isolation.procfs import alive

sys.path.insert(0, str(Path(__file__).resolve().parent / "infra"))
import mntns  # noqa: E402

REPO = str(Path(__file__).resolve().parents[1])
PY = f"{REPO}/.venv/bin/python"
CKPT = "/tmp/llmux-checkpoints"
HF = "/root/.cache/huggingface"


def _require_mntns() -> None:
    ok, why = mntns.available()
    if not ok:
        if os.environ.get("LLMUXD_REQUIRE_MNTNS") == "1":
            pytest.fail(f"mount-namespace containers required (LLMUXD_REQUIRE_MNTNS=1) but not available: {why}")
        pytest.skip(f"mount-namespace containers not available: {why}")


def _name(tag: str) -> str:
    return f"llmuxd-m-{tag}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def shared(tmp_path: Path) -> dict[str, Path]:
    """Host folders standing for the two shared volumes."""
    d = {"ckpt": tmp_path / "ckpt", "hf": tmp_path / "hf"}
    for p in d.values():
        p.mkdir()
    return d


def _binds(shared: dict[str, Path]) -> list[tuple[str, str]]:
    return [(str(shared["ckpt"]), CKPT), (str(shared["hf"]), HF), *mntns.repo_binds(REPO)]


def _stop_all(*containers: mntns.MountContainer) -> None:
    errors = []
    for c in containers:
        try:
            c.stop()
        except mntns.ContainerError as e:
            errors.append(str(e))
    assert not errors
    for c in containers:
        assert mntns.leftovers(c.name) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_filesystem_is_private_namespaces_are_the_hosts(shared: dict[str, Path]) -> None:
    _require_mntns()
    tag = uuid.uuid4().hex[:8]
    a = mntns.MountContainer(_name("a"), binds=_binds(shared))
    b = mntns.MountContainer(_name("b"), binds=_binds(shared))
    private = [f"/root/.cache/llmuxd-x-{tag}", f"/var/log/llmuxd/x-{tag}"]
    if not mntns.repo_binds(REPO):  # the checkout is in the lower layer: writes stay private
        private.append(f"{REPO}/.mntns-probe-{tag}")
    try:
        a.start()
        print(f"{a.name}: started in {a.start_seconds:.3f} s")
        assert a.keeper_pid and a.running and Path(f"/proc/{a.keeper_pid}/root").exists()
        # The repo and its venv come from the lower layer (the venv's python is /usr/bin/python3).
        r = a.run([PY, "-c", "import sys, llmuxd; print(sys.prefix)"], cwd=REPO)
        assert r.stdout.strip() == f"{REPO}/.venv"
        assert a.run("pwd", cwd=REPO).stdout.strip() == REPO
        assert a.run("pwd").stdout.strip() == "/"
        # Fresh, empty tmpfs on /tmp (bar the bound folder), /dev/shm and /run.
        for d in ("/tmp", "/dev/shm", "/run"):
            assert a.run(["stat", "-f", "-c", "%T", d]).stdout.strip() == "tmpfs", d
        assert a.run(["ls", "-A", "/dev/shm", "/run"]).stdout.split() == ["/dev/shm:", "/run:"]
        tmp_binds = sorted({"llmux-checkpoints"} | {d.split("/")[2] for d, _ in mntns.repo_binds(REPO) if d.startswith("/tmp/")})
        assert a.run(["ls", "-A", "/tmp"]).stdout.split() == tmp_binds
        # Exit codes and stdio come back.
        r = a.run("echo out; echo err >&2; exit 3", check=False)
        assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
        assert a.run(["cat"], input="piped").stdout == "piped"

        # Private writes: in the container's upper layer only.
        for p in private:
            a.run(["sh", "-c", 'mkdir -p "${1%/*}" && echo from-a >"$1"', "sh", p])
            assert a.run(["cat", p]).stdout == "from-a\n"
            assert a.path(p).read_text() == "from-a\n"
            assert not Path(p).exists(), f"{p} leaked to the host"
        # Shared folders: seen by the host.
        a.run(["sh", "-c", f"echo ckpt > {CKPT}/a-{tag}; mkdir -p {HF}/hub && echo hf > {HF}/hub/a-{tag}"])
        assert (shared["ckpt"] / f"a-{tag}").read_text() == "ckpt\n"
        assert (shared["hf"] / "hub" / f"a-{tag}").read_text() == "hf\n"

        # A second container, started afterwards: its own layer, the same shared folders.
        b.start()
        assert b.mnt_ns != a.mnt_ns and b.keeper_pid != a.keeper_pid
        for p in private:
            assert b.run(["test", "-e", p], check=False).returncode == 1, f"{p} leaked into {b.name}"
            assert not b.path(p).exists()
        assert b.run(["cat", f"{CKPT}/a-{tag}", f"{HF}/hub/a-{tag}"]).stdout == "ckpt\nhf\n"
        b.run(["sh", "-c", f"echo from-b > {CKPT}/b-{tag}"])
        assert a.run(["cat", f"{CKPT}/b-{tag}"]).stdout == "from-b\n"
        b.run(["sh", "-c", f"echo b-tmp > /tmp/t-{tag}"])
        assert a.run(["test", "-e", f"/tmp/t-{tag}"], check=False).returncode == 1

        # Host PID, network, IPC and UTS namespaces; own mount namespace.
        ns = {k: os.readlink(f"/proc/self/ns/{k}") for k in ("pid", "net", "ipc", "uts", "mnt")}
        inside = a.run("for k in pid net ipc uts mnt; do readlink /proc/self/ns/$k; done").stdout.split()
        assert inside[:4] == [ns["pid"], ns["net"], ns["ipc"], ns["uts"]]
        assert inside[4] != ns["mnt"] and inside[4] == os.readlink(f"/proc/{a.keeper_pid}/ns/mnt")
        p = a.spawn(["sleep", "1000"])
        _wait(lambda: Path(f"/proc/{p.pid}/cmdline").read_bytes() == b"sleep\x001000\x00", 5, "sleep")
        assert a.contains(p.pid) and not b.contains(p.pid) and p.pid in a.pids()
        assert a.run(["cat", f"/proc/{p.pid}/comm"]).stdout == "sleep\n"  # same PID inside and out
        assert b.run(["cat", f"/proc/{p.pid}/comm"]).stdout == "sleep\n"
        port = _free_port()
        server = (f"import socket; s = socket.create_server(('127.0.0.1', {port})); "
                  "c, _ = s.accept(); c.sendall(b'hello from ' + open('/etc/hostname', 'rb').read().strip()); c.close()")
        srv = a.spawn([PY, "-c", server], stdout="/var/log/server.log")

        def connects() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    connects.reply = s.recv(100)
                return True
            except OSError:
                return False

        _wait(connects, 10, f"the server inside on port {port}")
        assert connects.reply == b"hello from " + Path("/etc/hostname").read_bytes().strip()
        assert srv.wait(5) == 0
        assert a.run(["cat", "/var/log/server.log"]).stdout == ""
    finally:
        _stop_all(a, b)
    assert not a.running and not b.running
    with pytest.raises(mntns.ContainerError, match="not started"):
        a.run(["true"])


def test_spawn_then_stop_leaves_nothing(shared: dict[str, Path]) -> None:
    _require_mntns()
    c = mntns.MountContainer(_name("stop"), binds=_binds(shared), workdir="/var/lib/llmuxd")
    try:
        c.start()
        assert c.run("pwd").stdout == "/var/lib/llmuxd\n" and not Path("/var/lib/llmuxd").exists()
        serve = c.spawn(["sh", "-c", 'echo started in "$PWD"; exec sleep 1000'], stdout="/var/log/llmuxd/serve.log")
        # One that ignores SIGTERM (forces the SIGKILL path) and one that left its parent.
        stubborn = c.spawn(["sh", "-c", "trap '' TERM; while :; do sleep 1; done"], stdout=None)
        c.run("setsid sleep 1001 </dev/null >/dev/null 2>&1 &")
        _wait(lambda: c.path("/var/log/llmuxd/serve.log").exists()
              and c.path("/var/log/llmuxd/serve.log").read_text() == "started in /var/lib/llmuxd\n", 5, "serve.log")
        # Its stdio are files of the container, no host fd.
        inside = c.run(f"readlink /proc/{serve.pid}/fd/0 /proc/{serve.pid}/fd/1 /proc/{serve.pid}/fd/2 /proc/{serve.pid}/cwd")
        assert inside.stdout.split() == ["/dev/null", "/var/log/llmuxd/serve.log", "/var/log/llmuxd/serve.log",
                                         "/var/lib/llmuxd"]
        assert sorted(os.listdir(f"/proc/{serve.pid}/fd")) == ["0", "1", "2"]
        assert os.getsid(serve.pid) == serve.pid
        orphan = [p for p in c.pids() if Path(f"/proc/{p}/cmdline").read_bytes() == b"sleep\x001001\x00"]
        assert len(orphan) == 1
        pids = [serve.pid, stubborn.pid, orphan[0], c.keeper_pid]
        base = c.base
        assert base.is_dir() and (base / "upper/var/log/llmuxd/serve.log").exists()
        t0 = time.monotonic()
        c.stop(grace=0.5)
        print(f"{c.name}: stopped in {time.monotonic() - t0:.2f} s")
        assert [p for p in pids if alive(p)] == []
        assert serve.returncode is not None and stubborn.returncode == -signal.SIGKILL
        assert not base.exists()
        assert str(base) not in Path("/proc/self/mountinfo").read_text()
        assert mntns.leftovers(c.name) == []
        c.stop()  # again: harmless
        assert not c.running
    finally:
        _stop_all(c)


def test_failed_start_cleans_up(tmp_path: Path) -> None:
    _require_mntns()
    f = tmp_path / "a-file"
    f.write_text("x")
    name = _name("fail")
    # A file bound over a directory: the setup script fails after the overlay is mounted.
    c = mntns.MountContainer(name, binds=[(str(f), "/etc")])
    with pytest.raises(mntns.ContainerError, match="setup failed"):
        c.start()
    assert mntns.leftovers(name) == [] and not mntns.base_dir(name).exists()
    c.stop()
    with pytest.raises(mntns.ContainerError, match="does not exist"):
        mntns.MountContainer(name, binds=[(str(tmp_path / "missing"), "/mnt")]).start()
    assert mntns.leftovers(name) == []


def test_container_of_a_killed_owner_is_reclaimed() -> None:
    _require_mntns()
    name = _name("orphan")
    # An owner that starts a container with a running process, then dies by SIGKILL (no atexit).
    script = (f"import sys, os, signal; sys.path.insert(0, {str(Path(mntns.__file__).parent)!r}); import mntns; "
              f"c = mntns.MountContainer({name!r}).start(); p = c.spawn(['sleep', '1000']); "
              "print(c.keeper_pid, p.pid, flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert r.returncode == -signal.SIGKILL, r.stderr
    pids = [int(x) for x in r.stdout.split()]
    try:
        assert all(alive(p) for p in pids)
        assert len(mntns.leftovers(name)) == 2  # its directory and its namespace's processes
        assert name in mntns.reclaim_stale()
        assert mntns.leftovers(name) == []
        assert not any(alive(p) for p in pids)
    finally:
        mntns.reclaim_stale()
        for p in pids:  # only if reclaiming failed: these are our own processes, by pidfd
            try:
                fd = os.pidfd_open(p)
            except OSError:
                continue
            try:
                if Path(f"/proc/{p}/cmdline").read_bytes() in (b"sleep\x00infinity\x00", b"sleep\x001000\x00"):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
            finally:
                os.close(fd)


@pytest.mark.criu
def test_criu_checkpoint_restores_in_a_new_container(shared: dict[str, Path]) -> None:
    _require_mntns()
    if shutil.which("criu") is None:
        if os.environ.get("LLMUXD_REQUIRE_CRIU") == "1":
            pytest.fail("criu required (LLMUXD_REQUIRE_CRIU=1) but not found (packaging/install-criu.sh)")
        pytest.skip("criu not installed (packaging/install-criu.sh)")
    img = f"{CKPT}/img"
    host_img = shared["ckpt"] / "img"

    def log_tail(name: str, n: int = 40) -> str:
        try:
            return "\n".join((host_img / name).read_text(errors="replace").splitlines()[-n:])
        except OSError as e:
            return f"(no {name}: {e})"

    a = mntns.MountContainer(_name("cra"), binds=_binds(shared))
    b = mntns.MountContainer(_name("crb"), binds=_binds(shared))
    pid = None
    try:
        a.start()
        # Its log in the shared folder: a file every container has (CRIU checks size and path).
        p = a.spawn(["sleep", "1000"], stdout=f"{CKPT}/sleep.log")
        pid = p.pid
        _wait(lambda: Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\x001000\x00", 5, "sleep")
        a.run(["mkdir", "-p", img])
        t0 = time.monotonic()
        r = a.run(["criu", "dump", "-t", str(pid), "-D", img, "--shell-job", "-v4", "-o", "dump.log"], check=False)
        t_dump = time.monotonic() - t0
        assert r.returncode == 0, f"criu dump failed ({r.returncode}): {r.stderr}\n{log_tail('dump.log')}"
        assert p.wait(5) == -signal.SIGKILL  # CRIU kills the dumped tree; reaped: the PID is free
        a.stop()
        assert mntns.leftovers(a.name) == []

        b.start()
        t0 = time.monotonic()
        r = b.run(["criu", "restore", "-D", img, "--shell-job", "--restore-detached", "-v4", "-o", "restore.log"],
                  check=False)
        t_restore = time.monotonic() - t0
        assert r.returncode == 0, f"criu restore failed ({r.returncode}): {r.stderr}\n{log_tail('restore.log')}"
        print(f"criu dump {t_dump:.3f} s, restore {t_restore:.3f} s (pid {pid})")
        # The same PID (the PID namespace is the host's), running in the NEW container.
        assert alive(pid), f"restored pid {pid} is not running\n{log_tail('restore.log')}"
        assert Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\x001000\x00"
        assert b.contains(pid) and pid in b.pids()
        fds = b.run(f"readlink /proc/{pid}/fd/0 /proc/{pid}/fd/1 /proc/{pid}/cwd").stdout.split()
        assert fds == ["/dev/null", f"{CKPT}/sleep.log", "/"]
        time.sleep(0.2)
        assert alive(pid)
        fd = os.pidfd_open(pid)
        try:
            if b.contains(pid):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
        finally:
            os.close(fd)
        _wait(lambda: not alive(pid), 5, f"restored pid {pid} to die")
    finally:
        _stop_all(a, b)
    assert pid is None or not alive(pid)
