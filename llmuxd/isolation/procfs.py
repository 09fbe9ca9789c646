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
