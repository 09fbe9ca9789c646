"""Reading /proc/<pid>/stat, once, for everyone who needs a process's state or relatives."""

from __future__ import annotations

import os
import re
import stat as stat_mod
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
LINK_REMAP = re.compile(r"link_remap\.\d+")  # the hard link CRIU makes for a deleted file still linked elsewhere
Inode = tuple[int, int]  # (st_dev, st_ino)
DELETED = " (deleted)"


def held(pid: int | str) -> dict[Inode, str]:
    """The regular files a process has open or mapped, by inode, with the path it sees (a deleted
    one keeps its ' (deleted)' suffix)."""
    out: dict[Inode, str] = {}
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[4] != "0" and parts[5].startswith("/"):
                    major, minor = parts[3].split(":")
                    out[(os.makedev(int(major, 16), int(minor, 16)), int(parts[4]))] = parts[5].rstrip("\n")
    except (OSError, ValueError):
        pass
    try:
        fds = os.scandir(f"/proc/{pid}/fd")
    except OSError:
        return out
    with fds:
        for fd in fds:
            try:
                st = os.stat(fd.path)
                if stat_mod.S_ISREG(st.st_mode):
                    out[(st.st_dev, st.st_ino)] = os.readlink(fd.path)
            except OSError:
                pass
    return out


def shm_files(pids) -> dict[Inode, str]:
    """What of ``pids``' files can outlive them on disk: files in /dev/shm (shared-memory
    segments: vLLM's rings, the simulator's status block, semaphores) and deleted files, whose
    other names stay (glibc's sem_open maps a temporary name it then unlinks, keeping the real one;
    CRIU's link_remap.N are such names too)."""
    out: dict[Inode, str] = {}
    for pid in pids:
        for key, path in held(pid).items():
            if path.endswith(DELETED) or os.path.dirname(path) == SHM:
                out[key] = path
    return out


def held_inodes(keys: set[Inode]) -> set[Inode]:
    """Which of ``keys`` some live process on this machine still has open or mapped."""
    found: set[Inode] = set()
    for st in all_stats():
        if not st.zombie:
            found |= keys & held(st.pid).keys()
            if found == keys:
                break
    return found


def outlive_dirs(files: dict[Inode, str]) -> set[str]:
    """Where names of ``files`` (from :func:`shm_files`) can stay behind: /dev/shm, and the folders
    of its deleted files (their other names; CRIU makes its link_remap.N there)."""
    return {SHM} | {os.path.dirname(p.removesuffix(DELETED)) for p in files.values() if p.endswith(DELETED)}


def _names(files: dict[Inode, str]) -> dict[str, Inode]:
    """The names on disk of those inodes that llmuxd may remove: any in /dev/shm, and CRIU's
    ``link_remap.N`` next to a deleted file."""
    out = {}
    for d in sorted(outlive_dirs(files)):
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            if d != SHM and not LINK_REMAP.fullmatch(e.name):
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat_mod.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) in files:
                out[e.path] = (st.st_dev, st.st_ino)
    return out


def unlink_unheld(names: dict[str, Inode]) -> list[str]:
    """Unlink each path that is still the regular file of its recorded inode, unless a live
    process holds that inode; returns the paths removed."""
    busy = held_inodes(set(names.values())) if names else set()
    gone = []
    for path, key in names.items():
        if key in busy:
            continue
        try:
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == key and stat_mod.S_ISREG(st.st_mode):
                os.unlink(path)
                gone.append(path)
        except OSError:
            pass
    return gone


def release_files(files: dict[Inode, str]) -> list[str]:
    """Remove what a gone process tree left on disk that only it used: every name of an inode
    it held (``files``, from :func:`shm_files` taken while it lived) in /dev/shm, and CRIU's
    link_remap.N beside its deleted files — when no live process holds that inode.  A killed
    tree cannot remove these itself, and tmpfs is memory, never given back until the container
    ends; a checkpoint keeps its own copies (a restore puts them back).  Proof of ownership is
    the inode: a name re-made since by someone else is another inode and is left alone."""
    return unlink_unheld(_names(files)) if files else []


def unix_sockets(pids) -> set[str]:
    """Paths of the unix sockets ``pids`` have bound: their socket files outlive them (a killed
    process cannot unlink them; ZMQ's ipc:// sockets are such files)."""
    inodes: set[int] = set()
    netns_of = None
    for pid in pids:
        try:
            fds = os.scandir(f"/proc/{pid}/fd")
        except OSError:
            continue
        with fds:
            for fd in fds:
                try:
                    link = os.readlink(fd.path)
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(int(link[8:-1]))
                    netns_of = pid
    if not inodes:
        return set()
    return {path for ino, path in _unix_table(netns_of) if ino in inodes}


def _unix_table(pid: int | str = "self") -> list[tuple[int, str]]:
    """(socket inode, path) of the live unix sockets bound to a path in ``pid``'s network namespace."""
    out = []
    try:
        with open(f"/proc/{pid}/net/unix") as f:
            next(f, None)
            for line in f:
                parts = line.split(None, 7)
                if len(parts) == 8 and parts[7].startswith("/"):
                    out.append((int(parts[6]), parts[7].rstrip("\n")))
    except (OSError, ValueError):
        pass
    return out


def release_sockets(paths: set[str]) -> list[str]:
    """Remove those of ``paths`` that are socket files no live socket is bound to any more."""
    if not paths:
        return []
    bound = {path for _, path in _unix_table()}
    gone = []
    for path in sorted(paths - bound):
        try:
            if stat_mod.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
                gone.append(path)
        except OSError:
            pass
    return gone
