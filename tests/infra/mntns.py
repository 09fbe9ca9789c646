"""Docker-like "host namespaces, own filesystem" containers for tests (stdlib and llmuxd's /proc
reader).

The shape imitated is::

    docker run --pid=host --network=host --ipc=host \\
        -v HOST_CKPT:/tmp/llmux-checkpoints -v HOST_HF:/root/.cache/huggingface IMAGE

with the host's own root filesystem as IMAGE: a container shares the host's PID, network, IPC
and UTS namespaces but has its own MOUNT namespace whose root is an overlayfs (lower = the host's
``/``, read-only; upper = a fresh directory on disk), with fresh tmpfs on /tmp, /dev/shm and /run,
a fresh procfs, /sys and /dev bound from the host, and the given bind mounts. Nothing one container
writes is seen by the host or by another container, except through the bound folders. Two
containers of this kind "of the same image" are what a CRIU checkpoint made in one and restored in
the other needs (see docs/measured.md).

How it is built (``start()``; everything in the new mount namespace, nothing on the host)::

    unshare --mount --propagation private -- /bin/sh -c SCRIPT     # becomes the keeper
      mount -t overlay -o lowerdir=/,upperdir=BASE/upper,workdir=BASE/work overlay BASE/root
      mount -t proc proc BASE/root/proc
      mount --rbind /sys BASE/root/sys;  mount --rbind /dev BASE/root/dev
      mount -t tmpfs ... BASE/root/{tmp,dev/shm,run}
      mkdir -p BASE/root/DEST; mount --rbind HOST BASE/root/DEST      # each bind
      cd BASE/root; pivot_root . .; umount -l .                      # the host tree is gone
      exec sleep infinity                                            # the keeper

BASE is ``/var/tmp/llmuxd-mntns/NAME`` (``$LLMUXD_MNTNS_DIR``; on disk, never under /tmp, which
a container replaces). The keeper (``keeper_pid``) holds the namespace; commands run in it with
``nsenter -t KEEPER -m -r -w`` (mount namespace, root and cwd of the keeper), then ``cd`` and the
stdio redirections are done INSIDE by a small /bin/sh wrapper that execs the command (same PID).
``stop()`` kills every process whose mount namespace is the container's (by pidfd, re-checked
after pinning it), then the keeper; the namespace and its mounts die with the last of them; then
BASE is deleted. BASE/owner names the process that started it: start() reclaims (kills and
deletes) containers whose owner died without stopping them (``reclaim_stale()``).

Pitfalls handled here:

* ``nsenter --wd=DIR`` opens DIR in the HOST's view before entering (``cannot open DIR`` for a
  directory made inside): commands get ``-w`` (the keeper's cwd, ``/``) and ``cd`` inside.
* A process that CRIU will dump must hold no file opened through the HOST's mounts (measured:
  ``Can't lookup mount=27 for fd=1 path=/var/tmp/hostlog``; a host /dev/null happened to pass):
  ``spawn()`` opens stdin (/dev/null) and its log files inside. A file the host opens through
  ``path()`` (/proc/KEEPER/root/...) belongs to the container's mounts and dumps fine.
* overlayfs accepts an upper dir on the same ext4 as its lower ``/`` (the overlap check is only
  on the lower layers), so the upper layer is on disk, not in RAM.
* The lower layer is the host's root mount only (non-recursive): /proc, /sys, /dev, /tmp, /run are
  the bare directories of the ext4 and are mounted afresh.
* The lower layer is the LIVE host root: what the host changes under / later shows through in
  every container where that path was not written inside (the "image" is not frozen).
* Processes CRIU restores with ``--restore-detached`` are re-parented to the host's PID 1, which
  reaps them only every few seconds: a killed one stays a zombie for a while (``procfs.alive``
  treats zombies as dead; they hold no namespace).

Example::

    with MountContainer("a", binds=[(ckpt, "/tmp/llmux-checkpoints")]) as c:
        c.run([sys.executable, "-c", "print(1)"])
        p = c.spawn(["llmuxd", "serve"], stdout="/var/log/llmuxd/serve.log")
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Iterable, Sequence

from container import NAME_RE, Container, ContainerError, starttime
from llmuxd.isolation.procfs import alive

__all__ = [
    "MountContainer",
    "ContainerError",
    "available",
    "base_dir",
    "leftovers",
    "processes_in_ns",
    "reclaim_stale",
]

DEFAULT_BASE = "/var/tmp/llmuxd-mntns"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Runs as the keeper: builds the root in the new mount namespace, pivots into it, says "ready",
# then becomes `sleep infinity`. Arguments: BASE, then pairs HOST_PATH DEST_PATH.
_SETUP = r"""
set -eu
base=$1; shift
root=$base/root
mount -t overlay -o "lowerdir=/,upperdir=$base/upper,workdir=$base/work" "llmuxd-mntns" "$root"
mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --rbind /dev "$root/dev"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/dev/shm"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/tmp"
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$root/run"
while [ $# -ge 2 ]; do
    src=$1; dst=$root$2; shift 2
    if [ -d "$src" ]; then
        mkdir -p "$dst"
    else
        mkdir -p "${dst%/*}"; [ -e "$dst" ] || : >"$dst"
    fi
    mount --rbind "$src" "$dst"
done
cd "$root"
pivot_root . .
umount -l .
cd /
echo ready
exec sleep infinity </dev/null >/dev/null 2>&1
"""

# Runs every command inside: $1 cwd, $2 stdin, $3 stdout, $4 stderr ("" = keep what nsenter
# got, "&1" = same as stdout), then the command. Files are opened in the container (append).
_WRAP = r"""
cd "$1" || exit 126
in=$2 out=$3 err=$4; shift 4
if [ -n "$in" ]; then exec <"$in"; fi
if [ -n "$out" ]; then
    case $out in */*) mkdir -p -- "${out%/*}" ;; esac
    exec >>"$out"
fi
if [ "$err" = "&1" ]; then exec 2>&1
elif [ -n "$err" ]; then
    case $err in */*) mkdir -p -- "${err%/*}" ;; esac
    exec 2>>"$err"
fi
exec "$@"
"""


def base_dir(name: str | None = None) -> Path:
    """Where containers keep their upper/work/root dirs: $LLMUXD_MNTNS_DIR or /var/tmp/llmuxd-mntns
    (with `name`: that container's own directory)."""
    b = Path(os.environ.get("LLMUXD_MNTNS_DIR") or DEFAULT_BASE)
    return b / name if name else b


def available() -> tuple[bool, str]:
    """Whether these containers can be made here: (True, description) or (False, reason)."""
    if os.geteuid() != 0:
        return False, "not root (mount namespaces and overlayfs need root)"
    for tool in ("unshare", "nsenter", "pivot_root", "mount", "umount", "sleep"):
        if shutil.which(tool) is None:
            return False, f"{tool} not found (util-linux / mount / coreutils)"
    try:
        fs = Path("/proc/filesystems").read_text()
    except OSError:
        fs = ""
    if "overlay" not in fs:
        r = subprocess.run(["modprobe", "overlay"], capture_output=True)
        if r.returncode != 0 and "overlay" not in Path("/proc/filesystems").read_text():
            return False, "no overlayfs in this kernel"
    if not hasattr(os, "pidfd_open"):
        return False, "os.pidfd_open missing (Python >= 3.9 on Linux >= 5.3 needed)"
    return True, f"overlay of / with upper dirs under {base_dir()}"


def _ns_of(pid: int | str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of `pid`'s mount namespace; None if gone, a zombie or a kernel thread."""
    try:
        st = os.stat(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def processes_in_ns(ns: tuple[int, int], exclude: Iterable[int] = ()) -> list[int]:
    """PIDs (thread-group leaders) whose mount namespace is `ns`, less `exclude`."""
    skip = set(exclude)
    return [p for p in _all_pids() if p not in skip and _ns_of(p) == ns]


def _namespaces_of(name: str) -> dict[tuple[int, int], list[int]]:
    """Live mount namespaces whose root overlay is container NAME's (found by its upperdir in
    mountinfo), with their processes. Works without the MountContainer object."""
    marker = f"upperdir={base_dir(name)}/upper,"
    seen: dict[tuple[int, int], bool] = {}
    found: dict[tuple[int, int], list[int]] = {}
    for pid in _all_pids():
        ns = _ns_of(pid)
        if ns is None:
            continue
        if ns not in seen:
            try:
                text = Path(f"/proc/{pid}/mountinfo").read_text()
            except OSError:
                continue
            seen[ns] = marker in text
        if seen[ns]:
            found.setdefault(ns, []).append(pid)
    return found


def leftovers(name: str) -> list[str]:
    """Everything a container NAME leaves behind on the host if not cleaned up (empty = clean):
    its directory and any process still in its mount namespace."""
    left = []
    d = base_dir(name)
    if d.exists() or d.is_symlink():
        left.append(str(d))
    for ns, pids in _namespaces_of(name).items():
        left.append(f"mount namespace {ns[1]} of {name}: pids {' '.join(map(str, sorted(pids)))}")
    return left


def _signal_ns_members(ns: tuple[int, int], sig: int, exclude: Iterable[int] = ()) -> list[int]:
    """Send `sig` to every process in mount namespace `ns` (except `exclude`). Each is pinned with
    a pidfd and its namespace checked again before the signal, so a reused PID is never hit."""
    hit = []
    for pid in processes_in_ns(ns, exclude):
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            if _ns_of(pid) != ns:
                continue
            signal.pidfd_send_signal(fd, sig)
            hit.append(pid)
        except OSError:
            pass
        finally:
            os.close(fd)
    return hit


def reclaim_stale(max_age: float = 60.0) -> list[str]:
    """Remove containers whose owner (the process that started them, recorded in BASE/owner) is
    gone, e.g. a test run killed with SIGKILL: kill the processes in their namespaces (by pidfd,
    as in stop()) and delete their directories. A directory without an owner file is taken only
    when older than `max_age` s (a start() in progress writes it first). Returns the names
    reclaimed. start() calls it."""
    reclaimed = []
    try:
        entries = list(base_dir().iterdir())
    except OSError:
        return reclaimed
    for d in entries:
        if not d.is_dir() or d.is_symlink() or not NAME_RE.match(d.name):
            continue
        try:
            pid, start = (d / "owner").read_text().split()
            if alive(int(pid)) and starttime(pid) == start:
                continue
        except (OSError, ValueError):
            try:
                if time.time() - d.stat().st_mtime < max_age:
                    continue
            except OSError:
                continue
        for ns in _namespaces_of(d.name):
            end = time.monotonic() + 5
            while processes_in_ns(ns) and time.monotonic() < end:
                _signal_ns_members(ns, signal.SIGKILL)
                time.sleep(0.02)
        if not _namespaces_of(d.name):
            shutil.rmtree(d, ignore_errors=True)
            reclaimed.append(d.name)
    return reclaimed


def repo_binds(repo: str) -> list[tuple[str, str]]:
    """A checkout under a folder that containers get afresh (/tmp, /run, /dev/shm) is not in the
    lower layer: bind it at its own path, as the nspawn containers do."""
    fresh = ("/tmp", "/run", "/dev/shm")
    return [(repo, repo)] if any(repo == f or repo.startswith(f + "/") for f in fresh) else []


class MountContainer(Container):
    """A container with its own mount namespace (overlay root over the host's /) sharing the
    host's PID, network, IPC and UTS namespaces.

    Attributes: ``name``, ``binds`` ([(host path, container path)]), ``workdir`` (default cwd of
    commands inside, made at start; ``/`` if None), ``env`` (base environment of commands
    inside: PATH, HOME=/root, LANG, TERM, plus the `env` given), ``base`` (host directory with
    upper/, work/ and root/), ``keeper_pid``, ``mnt_ns`` ((st_dev, st_ino) of the namespace),
    ``start_seconds``.
    """

    def __init__(
        self,
        name: str,
        binds: Iterable[tuple[str | os.PathLike, str | os.PathLike]] = (),
        workdir: str | None = None,
        *,
        env: dict[str, str] | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        super().__init__(name)
        self.binds = [(str(h), str(d)) for h, d in binds]
        for host, dest in self.binds:
            if not dest.startswith("/") or "/../" in dest + "/" or dest.rstrip("/") == "":
                raise ValueError(f"bad container path {dest!r} in binds")
        self.workdir = workdir
        self.env = {"PATH": DEFAULT_PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb"}
        if env:
            self.env.update(env)
        self.start_timeout = start_timeout
        self.base = base_dir(name)
        self.keeper: subprocess.Popen | None = None
        self.keeper_pid: int | None = None
        self.mnt_ns: tuple[int, int] | None = None
        self.start_seconds: float | None = None
        self._spawned: list[subprocess.Popen] = []
        self._made_base = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<MountContainer {self.name} keeper={self.keeper_pid}>"

    # ---------------------------------------------------------------- life cycle

    def start(self) -> "MountContainer":
        """Make the namespace and its root; returns when the keeper is in place.

        Raises ContainerError (with the setup script's stderr) after cleaning up on failure.
        """
        if self.keeper is not None:
            raise ContainerError(f"{self.name}: already started")
        ok, why = available()
        if not ok:
            raise ContainerError(f"cannot make mount-namespace containers here: {why}")
        for host, _ in self.binds:
            if not os.path.exists(host):
                raise ContainerError(f"{self.name}: bind source {host} does not exist")
        t0 = time.monotonic()
        self._track()
        try:
            reclaim_stale()
            if self.base.exists() or self.base.is_symlink():
                busy = _namespaces_of(self.name)
                if busy:
                    raise ContainerError(f"a container {self.name} is still running: {leftovers(self.name)}")
                shutil.rmtree(self.base)  # remains of a killed run
            self.base.mkdir(parents=True)
            self._made_base = True
            (self.base / "owner").write_text(f"{os.getpid()} {starttime(os.getpid())}\n")
            for sub in ("upper", "work", "root"):
                (self.base / sub).mkdir(mode=0o755)
            args = [str(self.base)]
            for host, dest in self.binds:
                args += [os.path.realpath(host), dest]
            self.keeper = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", _SETUP,
                 "llmuxd-mntns-setup", *args],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                close_fds=True, start_new_session=True, cwd="/",
                env={"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"},
            )
            self.keeper_pid = self.keeper.pid  # unshare execs sh, which execs sleep: one PID
            line, err = self._wait_ready(t0 + self.start_timeout)
            if line != "ready":
                raise ContainerError(
                    f"{self.name}: setup failed (rc {self.keeper.poll()}): {err.strip() or repr(line)}")
            self.mnt_ns = _ns_of(self.keeper_pid)
            if self.mnt_ns is None or self.mnt_ns == _ns_of("self"):
                raise ContainerError(f"{self.name}: keeper {self.keeper_pid} is not in a new mount namespace")
            if self.workdir:  # like `docker run -w`: made if missing
                r = self.run(["mkdir", "-p", "--", self.workdir], check=False, cwd="/", timeout=30)
                if r.returncode != 0:
                    raise ContainerError(f"{self.name}: cannot make workdir {self.workdir}: {r.stderr.strip()}")
            self.start_seconds = time.monotonic() - t0
            return self
        except BaseException:
            try:
                self.stop(grace=0)
            except Exception:
                pass
            raise

    def _wait_ready(self, deadline: float) -> tuple[str, str]:
        """The setup's first stdout line (or "" at EOF) and whatever it wrote to stderr."""
        assert self.keeper is not None and self.keeper.stdout and self.keeper.stderr
        out, err = b"", b""
        fds = {self.keeper.stdout.fileno(): "out", self.keeper.stderr.fileno(): "err"}
        try:
            while fds and b"\n" not in out:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ContainerError(f"{self.name}: setup did not finish in time: {err.decode(errors='replace')}")
                ready, _, _ = select.select(list(fds), [], [], left)
                for fd in ready:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        del fds[fd]
                    elif fds[fd] == "out":
                        out += chunk
                    else:
                        err += chunk
            if b"\n" not in out:  # setup exited: collect its stderr fully
                self.keeper.wait(5)
            else:
                # The keeper redirects its stdio to /dev/null right after "ready": drain stderr.
                end = time.monotonic() + 2
                while self.keeper.stderr.fileno() in fds and time.monotonic() < end:
                    r, _, _ = select.select([self.keeper.stderr.fileno()], [], [], 0.1)
                    if r:
                        chunk = os.read(r[0], 65536)
                        if not chunk:
                            break
                        err += chunk
        finally:
            self.keeper.stdout.close()
            self.keeper.stderr.close()
        return out.decode(errors="replace").split("\n", 1)[0].strip(), err.decode(errors="replace")

    def stop(self, grace: float = 2.0, timeout: float = 10.0) -> None:
        """Kill every process in the container (SIGTERM, then SIGKILL after `grace` s), then the
        keeper; the namespace and all its mounts go with the last process; delete the upper, work
        and root dirs. Safe to call more than once and after a start() that failed at any point.
        Raises ContainerError if something could not be cleaned up (after trying everything)."""
        with self._lock:
            errors: list[str] = []
            ns = self.mnt_ns
            keeper = self.keeper
            if ns is None and keeper is not None and keeper.poll() is None:
                ns = _ns_of(keeper.pid)  # half-done start: namespace made, not yet recorded
                if ns == _ns_of("self"):
                    ns = None
            keep = [keeper.pid] if keeper is not None and keeper.poll() is None else []
            if ns is not None:
                if grace > 0 and _signal_ns_members(ns, signal.SIGTERM, keep):
                    end = time.monotonic() + grace
                    while time.monotonic() < end and processes_in_ns(ns, keep):
                        self._reap()
                        time.sleep(0.02)
                end = time.monotonic() + timeout
                while processes_in_ns(ns, keep):
                    _signal_ns_members(ns, signal.SIGKILL, keep)
                    self._reap()
                    if time.monotonic() > end:
                        errors.append(f"processes survived SIGKILL: {processes_in_ns(ns, keep)}")
                        break
                    time.sleep(0.02)
            if keeper is not None:
                if keeper.poll() is None:
                    keeper.kill()
                try:
                    keeper.wait(timeout)
                except subprocess.TimeoutExpired:
                    errors.append(f"keeper {keeper.pid} did not exit")
                for f in (keeper.stdout, keeper.stderr):
                    if f is not None and not f.closed:
                        f.close()
            if ns is not None:
                # Anything that entered meanwhile (e.g. a run() racing with stop()).
                end = time.monotonic() + timeout
                while processes_in_ns(ns):
                    _signal_ns_members(ns, signal.SIGKILL)
                    self._reap()
                    if time.monotonic() > end:
                        errors.append(f"namespace still held by pids {processes_in_ns(ns)}")
                        break
                    time.sleep(0.02)
            self._reap()
            if self._made_base or (self.base.exists() and not _namespaces_of(self.name)):
                try:
                    shutil.rmtree(self.base)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    errors.append(f"could not remove {self.base}: {e}")
                self._made_base = False
            self.keeper = None
            self.keeper_pid = None
            self.mnt_ns = None
            self._untrack()
            if errors:
                raise ContainerError(f"{self.name}: cleanup incomplete: " + "; ".join(errors))

    def _reap(self) -> None:
        self._spawned = [p for p in self._spawned if p.poll() is None]

    def _stop_at_exit(self) -> None:
        self.stop(grace=0)

    # ---------------------------------------------------------------- state

    @property
    def started(self) -> bool:
        return self.keeper is not None

    @property
    def running(self) -> bool:
        return self.keeper is not None and self.keeper.poll() is None and _ns_of(self.keeper.pid) == self.mnt_ns

    def _need_keeper(self) -> int:
        if self.keeper_pid is None or self.mnt_ns is None:
            raise ContainerError(f"{self.name}: not started")
        if not self.running:
            raise ContainerError(f"{self.name}: keeper {self.keeper_pid} is gone")
        return self.keeper_pid

    def _root_pid(self) -> int:
        """The keeper: the container's root is /proc/KEEPER/root (a file opened through path()
        belongs to the container's mounts: CRIU inside can resolve it)."""
        return self._need_keeper()

    def pids(self) -> list[int]:
        """Processes now in the container (the keeper excluded)."""
        self._need_keeper()
        assert self.mnt_ns is not None
        return processes_in_ns(self.mnt_ns, [self.keeper_pid] if self.keeper_pid else [])

    def contains(self, pid: int) -> bool:
        """Whether `pid` is a live process in this container's mount namespace."""
        return self.mnt_ns is not None and _ns_of(pid) == self.mnt_ns and alive(pid)

    # ---------------------------------------------------------------- driving it

    def command(
        self,
        cmd: str | Sequence[str],
        *,
        cwd: str | None = None,
        stdin: str = "",
        stdout: str = "",
        stderr: str = "",
    ) -> list[str]:
        """The host argv that runs `cmd` inside (a string is run by /bin/sh -c). stdin/stdout/
        stderr name container paths opened inside ("" = keep the fd nsenter gets; stderr "&1" =
        same as stdout); stdout/stderr are opened for append."""
        keeper = self._need_keeper()
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else [str(a) for a in cmd]
        if not argv:
            raise ValueError("empty command")
        return ["nsenter", "-t", str(keeper), "-m", "-r", "-w", "--",
                "/bin/sh", "-c", _WRAP, "llmuxd-mntns-run",
                cwd or self.workdir or "/", stdin, stdout, stderr, *argv]

    def _env(self, env: dict[str, str] | None) -> dict[str, str]:
        e = dict(self.env)
        if env:
            e.update(env)
        return e

    def run(
        self,
        cmd: str | Sequence[str],
        check: bool = True,
        timeout: float | None = 120.0,
        *,
        input: str | bytes | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        text: bool = True,
    ) -> subprocess.CompletedProcess:
        """Run `cmd` inside and wait: a CompletedProcess with its exit code and captured stdout/
        stderr (host pipes: do not use this to start something CRIU will dump; see spawn()).
        A string is run by /bin/sh -c. `env` adds to the container's base environment."""
        argv = self.command(cmd, cwd=cwd)
        if isinstance(input, str) and not text:
            input = input.encode()
        r = subprocess.run(
            argv, input=input, stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True, text=text, timeout=timeout, env=self._env(env),
            close_fds=True, cwd="/",
        )
        r.args = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        if check and r.returncode != 0:
            raise subprocess.CalledProcessError(r.returncode, r.args, r.stdout, r.stderr)
        return r

    def spawn(
        self,
        cmd: str | Sequence[str],
        stdout: str | os.PathLike | int | IO | None = None,
        stderr: str | os.PathLike | int | IO | None = subprocess.STDOUT,
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> subprocess.Popen:
        """Start a long-running `cmd` inside; returns its Popen (the PID is the process's own:
        nsenter and the wrapper exec it).

        stdin is the container's /dev/null. `stdout`: a container path (str/PathLike; opened
        inside for append, its directory made), None (the container's /dev/null), or a file
        object / fd (one opened on the host's own paths makes the process undumpable; one
        opened through path() is fine). `stderr`:
        subprocess.STDOUT (default, same as stdout), a container path, None (/dev/null) or a host
        file. The process gets its own session and no other fds: it can be CRIU-dumped from
        inside (``criu dump -t PID --shell-job``). stop() kills it.
        """
        pass_out = pass_err = None
        if stdout is None:
            out = "/dev/null"
        elif isinstance(stdout, (str, os.PathLike)):
            out = os.fspath(stdout)
        else:
            out, pass_out = "", stdout
        if stderr == subprocess.STDOUT:
            err = "&1"
        elif stderr is None:
            err = "/dev/null"
        elif isinstance(stderr, (str, os.PathLike)):
            err = os.fspath(stderr)
        else:
            err, pass_err = "", stderr
        argv = self.command(cmd, cwd=cwd, stdin="/dev/null", stdout=out, stderr=err)
        p = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL,
            stdout=pass_out if pass_out is not None else subprocess.DEVNULL,
            stderr=pass_err if pass_err is not None else subprocess.DEVNULL,
            env=self._env(env), close_fds=True, start_new_session=True, cwd="/",
        )
        self._spawned.append(p)
        return p


if __name__ == "__main__":  # a quick manual check: python3 tests/infra/mntns.py [NAME]
    import sys

    ok, why = available()
    print(("available: " if ok else "NOT available: ") + why)
    if ok:
        name = sys.argv[1] if len(sys.argv) > 1 else f"mntns-selftest-{os.getpid()}"
        with MountContainer(name) as c:
            print(f"started {c.name} in {c.start_seconds:.3f} s, keeper {c.keeper_pid}")
            print(c.run("findmnt -rn -o TARGET,FSTYPE").stdout)
        print("leftovers:", leftovers(name) or "none")
