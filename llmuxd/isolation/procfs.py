"""Reading /proc/<pid>/stat, once, for everyone who needs a process's state or relatives."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


@dataclass(frozen=True)
class Stat:
    pid: int
    state: str  # R, S, D, Z, T, ...
    ppid: int
    pgrp: int
    session: int
    starttime: int  # clock ticks after boot

    @property
    def zombie(self) -> bool:
        return self.state == "Z"


def stat(pid: int | str) -> Stat | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces and parentheses: the fields start after the last ')'.
    f = text[text.rindex(")") + 2:].split()
    return Stat(int(text.split(" ", 1)[0]), f[0], int(f[1]), int(f[2]), int(f[3]), int(f[19]))


def all_stats() -> Iterator[Stat]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (st := stat(entry.name)) is not None:
            yield st


def alive(pid: int) -> bool:
    st = stat(pid)
    return st is not None and not st.zombie


def inner_pid(pid: int) -> int | None:
    """The PID a process has in its own (innermost) PID namespace (NSpid's last field)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    except OSError:
        pass
    return None


SHM = "/dev/shm"


def _files_of(pid: int | str) -> set[str]:
    """Paths a process has open or mapped (as it sees them; ' (deleted)' stripped)."""
    out: set[str] = set()
    try:
        for fd in os.scandir(f"/proc/{pid}/fd"):
            try:
                out.add(os.readlink(fd.path))
            except OSError:
                pass
    except OSError:
        pass
    try:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/"):
                out.add(parts[5])
    except OSError:
        pass
    return {p.removesuffix(" (deleted)") for p in out}


def shm_files(pids) -> set[str]:
    """The files directly in /dev/shm that any of ``pids`` has open or mapped (shared-memory
    segments: vLLM's rings, the simulator's status block, semaphores)."""
    out: set[str] = set()
    for pid in pids:
        out |= {p for p in _files_of(pid) if os.path.dirname(p) == SHM}
    return out


def shm_held(paths: set[str]) -> set[str]:
    """Which of ``paths`` some live process on this machine still has open or mapped."""
    held: set[str] = set()
    for st in all_stats():
        if not st.zombie:
            held |= paths & _files_of(st.pid)
            if held == paths:
                break
    return held


def release_shm(segments: set[str]) -> list[str]:
    """Remove the /dev/shm files among ``segments`` that nobody holds any more: what a process
    tree that had to be SIGKILLed could not remove itself (tmpfs is memory, never given back
    until the container ends).  A checkpoint keeps its own copies: a restore puts them back."""
    gone = []
    for path in sorted(segments - shm_held(segments)):
        try:
            if os.path.isfile(path) and not os.path.islink(path):
                os.unlink(path)
                gone.append(path)
        except OSError:
            pass
    return gone
