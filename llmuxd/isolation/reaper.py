"""Reaping orphans.  llmuxd is a child subreaper (so that trees CRIU restores become its
children); the price is that every orphan of a model tree re-parents to it too.  asyncio reaps
the children it started itself; this reaps the rest, so no zombie holds a PID (or a session or
process-group id, which keeps the PID number taken) — a restore needs those PIDs free."""

from __future__ import annotations

import asyncio
import ctypes
import os

from .procfs import all_stats

_own: set[int] = set()  # children asyncio waits for: never reaped here


def become_subreaper() -> None:
    """Orphans of our trees re-parent to us, not to PID 1: a tree CRIU restores (criu exits and
    leaves the restored root behind) becomes our child, tracked, never taken for a stray."""
    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def track(pid: int) -> None:
    _own.add(pid)


def untrack(pid: int) -> None:
    _own.discard(pid)


def reap_orphans() -> int:
    me, n = os.getpid(), 0
    for st in all_stats():
        if st.zombie and st.ppid == me and st.pid not in _own:
            try:
                os.waitpid(st.pid, os.WNOHANG)
                n += 1
            except ChildProcessError:
                pass
    return n


async def reap_forever(interval: float = 0.5) -> None:
    while True:
        await asyncio.to_thread(reap_orphans)
        await asyncio.sleep(interval)
