"""Reaping orphans.  llmuxd is a child subreaper (so that trees CRIU restores become its
children); the price is that every orphan of a model tree re-parents to it too.  asyncio reaps
the children it started itself; this reaps the rest, so no zombie holds a PID (or a session or
process-group id, which keeps the PID number taken) — a restore needs those PIDs free."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

_own: set[int] = set()  # children asyncio waits for: never reaped here


def track(pid: int) -> None:
    _own.add(pid)


def untrack(pid: int) -> None:
    _own.discard(pid)


def reap_orphans() -> int:
    me, n = os.getpid(), 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in _own:
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] == "Z" and int(fields[1]) == me:
            try:
                os.waitpid(int(entry.name), os.WNOHANG)
                n += 1
            except ChildProcessError:
                pass
    return n


async def reap_forever(interval: float = 0.5) -> None:
    while True:
        await asyncio.to_thread(reap_orphans)
        await asyncio.sleep(interval)
