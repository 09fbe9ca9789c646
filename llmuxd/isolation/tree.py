"""A model's process tree: started in a session (and, where possible, a cgroup) of its own,
tracked, and killed as a whole.

vLLM (and the simulator) fork an engine and helpers that stay in the root's session, so without
a cgroup the session id finds every member; with a cgroup, membership is exact and nothing can
escape the kill.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from . import reaper
from .cgroups import Cgroup

log = logging.getLogger(__name__)


def session_members(sid: int) -> list[int]:
    """PIDs of all live processes whose session id is ``sid`` (zombies excluded)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        # comm may contain spaces and parentheses: split after the last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(entry.name))
    return sorted(pids)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class ProcessTree:
    """Spawns one command as the root of a new session and owns everything under it."""

    def __init__(self, name: str, log_path: Path, cgroup: Cgroup | None = None, *,
                 pid_namespace: bool = False, block_io_uring: bool = False):
        self.name = name
        self.log_path = log_path
        self.cgroup = cgroup
        self.pid_namespace = pid_namespace
        self.block_io_uring = block_io_uring
        self.root_pid: int | None = None
        self._spawned_init = False  # root is `unshare`, the namespace init is its child
        self._proc: asyncio.subprocess.Process | None = None
        self._exited: asyncio.Future[int] | None = None

    @property
    def running(self) -> bool:
        return self._exited is not None and not self._exited.done()

    @property
    def returncode(self) -> int | None:
        return self._exited.result() if self._exited is not None and self._exited.done() else None

    def wrap(self, argv: list[str]) -> list[str]:
        """The command line that runs ``argv`` with this tree's isolation (see pidinit.py)."""
        if not self.pid_namespace:
            return argv
        from .pidinit import default_first_pid

        init = [sys.executable, "-m", "llmuxd.isolation.pidinit", "--first-pid", str(default_first_pid())]
        if not self.block_io_uring:
            init.append("--no-seccomp")
        return ["unshare", "--pid", "--fork", *init, "--", *argv]

    @property
    def init_pid(self) -> int | None:
        """The tree's topmost process to dump: the PID namespace's init, else the root."""
        if self.root_pid is None or not self._spawned_init:
            return self.root_pid
        try:
            children = Path(f"/proc/{self.root_pid}/task/{self.root_pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    async def spawn(self, argv: list[str], env: dict[str, str]) -> int:
        """Start ``argv``: own session (and cgroup, and PID namespace), stdin /dev/null,
        stdout+stderr appended to the log file (O_APPEND: CRIU restores such files without a
        size check), no other fds."""
        argv = self.wrap(argv)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
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
        self.root_pid = self._proc.pid
        self._spawned_init = self.pid_namespace
        reaper.track(self.root_pid)
        self._exited = asyncio.ensure_future(self._proc.wait())
        self._exited.add_done_callback(lambda _f, pid=self.root_pid: reaper.untrack(pid))
        return self.root_pid

    def adopt(self, root_pid: int) -> None:
        """Track a running tree that is not our child (left by an earlier llmuxd, or restored)."""
        self.root_pid = root_pid
        self._proc = None
        self._spawned_init = False
        reaper.track(root_pid)  # reaped by us below, when its pidfd says it is gone
        loop = asyncio.get_running_loop()
        self._exited = loop.create_future()
        try:
            pidfd = os.pidfd_open(root_pid)
        except ProcessLookupError:
            self._exited.set_result(-1)
            return

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
            if not self._exited.done():
                self._exited.set_result(code)

        loop.add_reader(pidfd, gone)

    def pids(self) -> list[int]:
        if self.cgroup is not None and self.cgroup.exists():
            return self.cgroup.procs()
        # Members outlive the root if it dies first: the session id still names them.  In a PID
        # namespace the init leads the session (the root is `unshare`, outside it).
        if not self.root_pid:
            return []
        leader = self.init_pid or self.root_pid
        members = set(session_members(leader))
        if _alive(self.root_pid):
            members.add(self.root_pid)
        return sorted(members)

    async def wait(self) -> int:
        assert self._exited is not None
        return await asyncio.shield(self._exited)

    async def kill(self, grace_secs: float = 5.0) -> None:
        """SIGTERM the whole tree, SIGKILL what is left after ``grace_secs``; returns when no
        member is alive."""
        if self.root_pid is None:
            return
        self._signal_all(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_secs
        while self.pids() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.cgroup is not None and self.cgroup.exists():
            if self.cgroup.populated():
                log.warning("%s: processes left after SIGTERM; killing cgroup %s", self.name, self.cgroup.path)
            await self.cgroup.kill()
        while members := self.pids():
            log.warning("%s: %d process(es) still alive after SIGTERM, sending SIGKILL", self.name, len(members))
            self._signal_all(signal.SIGKILL)
            await asyncio.sleep(0.05)
        if self._exited is not None:
            await self._exited

    def _signal_all(self, sig: int) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
