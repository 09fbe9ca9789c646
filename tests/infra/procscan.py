"""Reading what runs on the machine from /proc, for the test run's leak check (tests/leakcheck.py)
and the soak run (bench/soak.py): pure functions, nothing done on import (leakcheck.py, when
imported, marks the test run in the environment that every child inherits, so the soak cannot
import it).  A process's own state, parent and start time: llmuxd.isolation.procfs.stat."""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def read(path: str | Path, binary: bool = False):
    """The file's content (text, or bytes with ``binary``), or None if it cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data if binary else data.decode(errors="replace")


def cmdline(pid: int | str) -> str:
    """The process's command line, its arguments joined by spaces ("" if none or gone)."""
    return (read(f"/proc/{pid}/cmdline", binary=True) or b"").replace(b"\0", b" ").decode(errors="replace").strip()


@dataclass(frozen=True)
class Proc:
    pid: int
    start: int  # clock ticks after boot: (pid, start) names one process for good
    ppid: int
    zombie: bool
    cmdline: str  # the command line, or [comm] for a kernel thread or a zombie
    cgroups: tuple[str, ...]  # "hierarchy-id:controllers:path" lines

    @property
    def key(self) -> tuple[int, int]:
        return (self.pid, self.start)

    def in_cgroup(self, name: re.Pattern) -> bool:
        """Whether a folder of one of its cgroup paths has a name that ``name`` matches."""
        return any(name.search(part) for line in self.cgroups for part in line.split(":", 2)[2].split("/"))


def proc(pid: int) -> Proc | None:
    stat = read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    f = stat[stat.rindex(")") + 2:].split()
    cgroups = tuple((read(f"/proc/{pid}/cgroup") or "").splitlines())
    return Proc(pid, int(f[19]), int(f[1]), f[0] == "Z", cmdline(pid) or f"[{stat.split('(', 1)[1].rsplit(')', 1)[0]}]",
                cgroups)


def processes() -> dict[tuple[int, int], Proc]:
    """Every process now, by (pid, start)."""
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (p := proc(int(entry.name))) is not None:
            out[p.key] = p
    return out


def ancestors(pid: int) -> set[int]:
    """``pid`` and its ancestors up to (not including) PID 1."""
    out, seen = set(), 0
    while pid > 1 and seen < 64:
        out.add(pid)
        st = read(f"/proc/{pid}/stat")
        if st is None:
            break
        pid = int(st[st.rindex(")") + 2:].split()[1])
        seen += 1
    return out


def cgroup_hierarchies() -> list[Path]:
    """Mount points of the cgroup hierarchies (v1 and v2) under /sys/fs/cgroup."""
    out = []
    for line in (read("/proc/self/mountinfo") or "").splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[:1] in (["cgroup"], ["cgroup2"]):
            mnt = Path(left.split()[4].replace("\\040", " "))
            if mnt == CGROUP_ROOT or CGROUP_ROOT in mnt.parents:
                out.append(mnt)
    return out


def cgroup_procs(path: str | Path, recursive: bool = False) -> list[int]:
    """The processes in cgroup ``path`` (with ``recursive``: and in every cgroup below it), sorted."""
    pids, dirs = [], [Path(path)]
    while dirs:
        d = dirs.pop()
        text = read(d / "cgroup.procs")
        if text is None:
            continue
        pids += [int(p) for p in text.split()]
        if recursive:
            try:
                dirs += [e for e in d.iterdir() if e.is_dir()]
            except OSError:
                pass
    return sorted(pids)


def mounts() -> Counter:
    """(mount point, root, fstype, source) of every mount in this mount namespace."""
    out: Counter = Counter()
    for line in (read("/proc/self/mountinfo") or "").splitlines():
        left, _, right = line.partition(" - ")
        lf, rf = left.split(), right.split()
        out[(lf[4], lf[3], rf[0] if rf else "", rf[1] if len(rf) > 1 else "")] += 1
    return out


def bound_unix_paths() -> set[str]:
    """The paths unix sockets of this network namespace are bound to now."""
    out = set()
    for line in (read("/proc/self/net/unix") or "").splitlines()[1:]:
        parts = line.split(None, 7)
        if len(parts) == 8 and parts[7].strip().startswith("/"):
            out.add(parts[7].strip())
    return out
