"""Files on tmpfs that llmuxd put there for a restore, and CRIU's ``link_remap.N``: marked as
llmuxd's, and removed once stale.

A dump makes a hard link ``link_remap.N`` beside every open file that was deleted but is still
linked elsewhere (glibc's named semaphores: the temporary name is unlinked, the real one stays);
a restore consumes it.  N comes from a counter of the dump, so trees alike get the same names,
and CRIU fails a dump when the name is taken (``Can't link remap to ...: File exists``).  One
left by an earlier run — a restore interrupted after the put-back, a daemon killed mid-dump —
would break every later dump of that model.

Proof of ownership: llmuxd marks each one it has (made by CRIU for its dump, or put back by it
for a restore) with the extended attribute ``trusted.llmuxd`` naming the model by its port —
only a process with CAP_SYS_ADMIN can set or read a ``trusted.*`` attribute, so nobody else can
plant one that passes for ours, and another llmuxd sharing the same /dev/shm never takes a file
it just put back for its own restore.  Before a dump, every ``link_remap.N`` marked for the model
in the folders where the dump will make its own that no live process holds is removed (a checkpoint keeps copies of its own:
a restore puts them back).  Unmarked ones are left alone: the dump then fails, loudly.

The same mark goes on the /dev/shm files a put-back writes (prepare-restore, or the daemon right
before CRIU): when the model is cold-started instead of restored, they are nobody's, and go.
"""

from __future__ import annotations

import os
import stat

from ..isolation.procfs import LINK_REMAP, Inode, unlink_unheld

MARK = "trusted.llmuxd"


def _value(port: int) -> bytes:
    """The mark's value names the model, by its port: two llmuxd sharing a /dev/shm (containers
    with the host's IPC namespace) never take each other's files, and one port has one model."""
    return f"llmuxd port {port}".encode()


def mark(fd_or_path: int | str, port: int) -> bool:
    """Mark a file as the model's on ``port``; False where the filesystem or our privileges refuse."""
    try:
        if isinstance(fd_or_path, int):
            os.setxattr(fd_or_path, MARK, _value(port))
        else:
            os.setxattr(fd_or_path, MARK, _value(port), follow_symlinks=False)
        return True
    except OSError:
        return False


def _marked(path: str, port: int) -> bool:
    try:
        return os.getxattr(path, MARK, follow_symlinks=False) == _value(port)
    except OSError:
        return False


def remove_stale(dirs: set[str], port: int) -> list[str]:
    """Remove the link_remap.N files in ``dirs`` marked for the model on ``port`` that no live
    process holds."""
    names = []
    for d in sorted(dirs):
        try:
            names += [e.path for e in os.scandir(d) if LINK_REMAP.fullmatch(e.name)]
        except OSError:
            continue
    return remove_marked(names, port)


def remove_marked(paths, port: int) -> list[str]:
    """Remove those of ``paths`` that are regular files marked for the model on ``port`` that no
    live process holds."""
    found: dict[str, Inode] = {}
    for path in paths:
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and _marked(path, port):
            found[path] = (st.st_dev, st.st_ino)
    return unlink_unheld(found)
