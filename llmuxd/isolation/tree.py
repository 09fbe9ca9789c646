"""A model's process tree: started in a session of its own, tracked, and killed as a whole.

The tree's root is the backend command; vLLM (and the simulator) fork an engine and helpers that
stay in the root's session, so the session id finds every member without a cgroup.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

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


class ProcessTree:
    """Spawns one command as the root of a new session and owns everything under it."""

    def __init__(self, name: str, log_path: Path):
        self.name = name
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def root_pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    async def spawn(self, argv: list[str], env: dict[str, str]) -> int:
        """Start ``argv``: own session, stdin /dev/null, stdout+stderr appended to the log file
        (O_APPEND: CRIU restores such files without a size check), no other inherited fds."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=fd,
                stderr=fd,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        finally:
            os.close(fd)
        return self.proc.pid

    def pids(self) -> list[int]:
        # Members outlive the root if it dies first: the session id still names them.
        return session_members(self.proc.pid) if self.proc else []

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    async def kill(self, grace_secs: float = 5.0) -> None:
        """SIGTERM the whole tree, SIGKILL what is left after ``grace_secs``; returns when
        no member is alive."""
        if self.proc is None:
            return
        sid = self.proc.pid
        self._signal_all(sid, signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_secs
        while session_members(sid) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        while members := session_members(sid):
            log.warning("%s: %d process(es) still alive after SIGTERM, sending SIGKILL", self.name, len(members))
            self._signal_all(sid, signal.SIGKILL)
            await asyncio.sleep(0.05)
        if self.proc.returncode is None:
            await self.proc.wait()

    @staticmethod
    def _signal_all(sid: int, sig: int) -> None:
        for pid in session_members(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
