"""A model's process tree: started in a session (and, where possible, a cgroup) of its own,
tracked, and killed as a whole.

vLLM (and the simulator) fork an engine and helpers that stay in the root's session, so without
a cgroup the session id finds every member; with a cgroup, membership is exact and nothing can
escape the kill (a tree found outside its cgroup, as CRIU may restore one, is moved back in, and
listed and killed as a whole meanwhile).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from . import reaper
from .cgroups import Cgroup, own_cgroup
from .procfs import Inode, alive as _alive, all_stats, inner_pid, release_files, release_sockets, shm_files, unix_sockets

log = logging.getLogger(__name__)


def namespace_members(pid: int) -> list[int]:
    """PIDs of all live processes in the PID namespace that ``pid`` lives in."""
    try:
        ns = os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return []
    out = []
    for st in all_stats():
        try:
            if not st.zombie and os.readlink(f"/proc/{st.pid}/ns/pid") == ns:
                out.append(st.pid)
        except OSError:
            continue
    return sorted(out)


def session_members(sid: int) -> list[int]:
    """PIDs of all live processes whose session id is ``sid`` (zombies excluded)."""
    return sorted(st.pid for st in all_stats() if st.session == sid and not st.zombie)


class ProcessTree:
    """Spawns one command as the root of a new session and owns everything under it."""

    def __init__(self, name: str, log_path: Path, cgroup: Cgroup | None = None, *,
                 pid_namespace: bool = False, block_io_uring: bool = False, first_pid: int | None = None):
        self.name = name
        self.log_path = log_path
        self.cgroup = cgroup
        self.pid_namespace = pid_namespace
        self.block_io_uring = block_io_uring
        self.first_pid = first_pid
        self.root_pid: int | None = None
        self._launcher: int | None = None  # `unshare`, parent of the namespace init
        self._proc: asyncio.subprocess.Process | None = None
        self._exited: asyncio.Future[int] | None = None
        self._files: dict[Inode, str] = {}  # what it held that can outlive it on disk (note_files)
        self._sockets: set[str] = set()  # the unix socket files it bound

    @property
    def running(self) -> bool:
        return self._exited is not None and not self._exited.done()

    @property
    def returncode(self) -> int | None:
        return self._exited.result() if self._exited is not None and self._exited.done() else None

    def wrap(self, argv: list[str], restore_dir: Path | None = None) -> list[str]:
        """The command line that runs ``argv`` with this tree's isolation (see pidinit.py);
        with ``restore_dir``, ``argv`` is a `criu restore` that brings the tree back."""
        init = [sys.executable, "-m", "llmuxd.isolation.pidinit", "--stdio", str(self.log_path)]
        if not self.block_io_uring:
            init.append("--no-seccomp")
        if not self.pid_namespace:
            return argv if not self.block_io_uring else [*init, "--exec", "--", *argv]
        if restore_dir is not None:
            init += ["--restore", str(restore_dir)]
        elif self.first_pid:
            init += ["--first-pid", str(self.first_pid)]
        return ["unshare", "--pid", "--fork", "--mount", "--mount-proc", *init, "--", *argv]

    @property
    def namespaced(self) -> bool:
        """The root is the init of the tree's own PID namespace."""
        return self.pid_namespace and self.root_pid is not None and inner_pid(self.root_pid) == 1

    @property
    def server_pid(self) -> int | None:
        """The process CRIU dumps: the namespace init's child (the server), else the root."""
        if not self.namespaced:
            return self.root_pid
        try:
            children = Path(f"/proc/{self.root_pid}/task/{self.root_pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    async def spawn(self, argv: list[str], env: dict[str, str], restore_dir: Path | None = None) -> int:
        """Start ``argv``: own session (and cgroup, and PID and mount namespaces), stdin
        /dev/null, stdout+stderr appended to the log file (O_APPEND: CRIU restores such files
        without a size check), no other fds.  Returns the root's PID."""
        argv = self.wrap(argv, restore_dir)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # never through a link planted at its name; private (a model may echo prompts)
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        procs_file = None
        if self.cgroup is not None:
            self.cgroup.create()
            procs_file = str(self.cgroup.path / "cgroup.procs")

        def join_cgroup() -> None:  # runs in the child between fork and exec
            with open(procs_file, "w") as f:
                f.write("0")

        try:
            self._proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=fd, stderr=fd, env=env,
                start_new_session=True, close_fds=True, preexec_fn=join_cgroup if procs_file else None,
            )
        finally:
            os.close(fd)
        launcher = self._proc.pid
        reaper.track(launcher)
        done = asyncio.ensure_future(self._proc.wait())
        done.add_done_callback(lambda _f: reaper.untrack(launcher))
        if not self.pid_namespace:
            self.root_pid, self._launcher, self._exited = launcher, None, done
            return launcher
        # The tree is the namespace's init and below: track the init, not its launcher.
        self._launcher = launcher
        init = await self._child_of(launcher, done)
        if init is None:  # the launcher died before forking: report its status as the tree's
            self.root_pid, self._exited = launcher, done
            return launcher
        self.adopt(init, launcher_done=done)
        return init

    @staticmethod
    async def _child_of(pid: int, done: asyncio.Future, timeout: float = 10.0) -> int | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not done.done() and loop.time() < deadline:
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                children = []
            if children:
                return int(children[0])
            await asyncio.sleep(0.002)
        return None

    def adopt(self, root_pid: int, launcher_done: asyncio.Future | None = None) -> None:
        """Track a running tree by its root's pidfd: a namespace init we launched, a tree left by
        an earlier llmuxd, or one CRIU restored (then our child: we are a child subreaper)."""
        self.root_pid = root_pid
        if launcher_done is None:
            self._proc = self._launcher = None
        reaper.track(root_pid)  # reaped by us below, when its pidfd says it is gone
        loop = asyncio.get_running_loop()
        self._exited = loop.create_future()
        try:
            pidfd = os.pidfd_open(root_pid)
        except ProcessLookupError:
            self._exited.set_result(-1)
            return
        self._contain()

        def gone() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            code = -1
            try:  # reap it if it is ours (child subreaper)
                pid, status = os.waitpid(root_pid, os.WNOHANG)
                if pid:
                    code = os.waitstatus_to_exitcode(status)
            except ChildProcessError:
                pass
            reaper.untrack(root_pid)
            if launcher_done is not None:  # `unshare` exits with its child's status right after
                asyncio.ensure_future(self._finish_from(launcher_done, code))
            elif not self._exited.done():
                self._exited.set_result(code)

        loop.add_reader(pidfd, gone)

    async def _finish_from(self, launcher_done: asyncio.Future, fallback: int) -> None:
        try:
            code = await asyncio.wait_for(asyncio.shield(launcher_done), 2)
        except asyncio.TimeoutError:
            code = fallback
        if not self._exited.done():
            self._exited.set_result(code)

    def workload_pids(self) -> list[int]:
        """The tree's processes other than the namespace init llmuxd runs it under (and that
        init's launcher): the server and what it started, or restored."""
        if self.namespaced and self.root_pid:
            return sorted(p for p in namespace_members(self.root_pid) if p != self.root_pid)
        return self.pids()

    def pids(self) -> list[int]:
        members: set[int] = set()
        if self.cgroup is not None and self.cgroup.exists():
            members.update(self.cgroup.procs())
            if not self._escaped(members):
                return sorted(members)
            # Part of the tree lives outside its cgroup (see _contain): find it as below as well.
        # Members outlive the root if it dies first: the session id still names them.  (In a PID
        # namespace the init leads the session; its launcher `unshare` stays outside it.)
        if not self.root_pid:
            return sorted(members)
        if self.namespaced:  # exact: everything in the tree's PID namespace (sessions may differ)
            members.update(namespace_members(self.root_pid))
        elif not members or _alive(self.root_pid):  # a dead root's PID (its session id) may be reused
            members.update(session_members(self.root_pid))
        if self._launcher and _alive(self._launcher):
            members.add(self._launcher)
        return sorted(members)

    def _escaped(self, in_cgroup: set[int]) -> bool:
        """Whether the root (or, in a PID namespace, the server under its init) is alive outside
        the tree's cgroup: CRIU puts a restored tree back into the cgroups recorded at the dump,
        which are another cgroup's when the dumping llmuxd's layout differs (another port, another
        container) — a tree found there must still be listed, and killed, as a whole."""
        root = self.root_pid
        if not root or not _alive(root):
            return False
        if root not in in_cgroup:
            return True
        server = self.server_pid if self.pid_namespace else None
        return server is not None and server != root and _alive(server) and server not in in_cgroup

    def _contain(self) -> None:
        """Move a tree that lives outside its cgroup (a tree CRIU restored into the cgroup of the
        dump) into it, so that the cgroup holds the whole tree again: listing, adoption after a
        restart and cgroup.kill rely on that."""
        if self.cgroup is None or not self.cgroup.exists():
            return
        inside = set(self.cgroup.procs())
        if not self._escaped(inside):
            return
        where = own_cgroup(self.root_pid)
        for _ in range(5):  # members may fork while they are moved: until none is left outside
            outside = [p for p in self.pids() if p not in inside]
            if not outside:
                break
            for pid in outside:
                try:
                    self.cgroup.add(pid)
                except OSError:  # gone meanwhile
                    pass
            inside = set(self.cgroup.procs())
        log.warning("%s: the tree (root pid %d) was in cgroup %s, not in its own %s: moved into it", self.name,
                    self.root_pid, where, self.cgroup.path)

    async def wait(self) -> int:
        assert self._exited is not None
        return await asyncio.shield(self._exited)

    async def kill(self, grace_secs: float = 5.0) -> None:
        """SIGTERM the whole tree, SIGKILL what is left after ``grace_secs``; returns when no
        member is alive."""
        if self.root_pid is None:
            return
        self.note_files()
        self._signal_all(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_secs
        while self.pids() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.cgroup is not None and self.cgroup.exists():
            if grace_secs > 0 and self.cgroup.populated():
                log.warning("%s: processes left %g s after SIGTERM; killing cgroup %s", self.name, grace_secs,
                            self.cgroup.path)
            await self.cgroup.kill()
        while members := self.pids():
            log.warning("%s: %d process(es) still alive after SIGTERM, sending SIGKILL", self.name, len(members))
            self._signal_all(signal.SIGKILL)
            await asyncio.sleep(0.05)
        if self._exited is not None:
            # Shielded: a caller cancelled while waiting here must not cancel the tree's exit
            # status that wait() and a later kill() share.  Bounded: every member is gone, so
            # the root's exit is due at once; never hang a transition on it.
            try:
                await asyncio.wait_for(asyncio.shield(self._exited), 10)
            except asyncio.TimeoutError:
                log.error("%s: the tree's root %s is gone but its exit was not seen", self.name, self.root_pid)
        await self.release_files()

    def note_files(self) -> None:
        """Remember the files of the tree that can outlive it on disk (/dev/shm segments,
        semaphores, deleted files' other names: see procfs.shm_files; the unix socket files it
        bound).  Taken when it is ready,
        before a dump and before a kill, so that what a tree killed by SIGKILL (or by CRIU after
        its dump) could not remove is known once it is gone."""
        pids = self.pids()
        self._files.update(shm_files(pids))
        self._sockets |= unix_sockets(pids)

    async def release_files(self) -> list[str]:
        """Once the tree is gone: remove what it left of the files noted (those no live process
        holds).  Returns the paths removed."""
        files, self._files = self._files, {}
        sockets, self._sockets = self._sockets, set()
        gone = await asyncio.to_thread(release_files, files) if files else []
        gone += await asyncio.to_thread(release_sockets, sockets) if sockets else []
        if gone:
            log.info("%s: removed %d file(s) the ended tree left: %s", self.name, len(gone), ", ".join(gone))
        return gone

    def _signal_all(self, sig: int) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
