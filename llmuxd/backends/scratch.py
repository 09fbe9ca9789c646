"""Each model tree's own temporary folder: ``TMPDIR=/tmp/llmuxd-tree-<port>``.

vLLM leaves files in the temporary folder on every start (``vllm_dist_<hex>``, ZMQ ipc socket
files; on SIGTERM its API server force-kills the engine, which then cannot remove its own), so a
server that is started, stopped and restored for weeks fills ``/tmp`` file by file.  Files in a
shared ``/tmp`` cannot be told apart by who made them; files in a folder llmuxd made for one
tree (root's, 0700, reached without following a link) are that tree's, so once the tree is gone
the folder is emptied.  Python's ``tempfile`` and everything built on it (vLLM's ipc paths,
torch's caches) honour ``TMPDIR``.

The folder's path depends only on the model's port (one server per port on a machine, and a
checkpoint restores only for the port it was made for): a restored tree — in this container or a
new one, under this daemon or another — keeps using the path it had.  A checkpoint saves what the tree had open
there (``/tmp`` is per-container memory) and a restore puts it back.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from pathlib import Path

from ..checkpoint import safefs
from ..checkpoint.trust import Untrusted, check_tree

log = logging.getLogger(__name__)

BASE = "/tmp"


def folder(port: int) -> Path:
    """The temporary folder of the model served on ``port``."""
    return Path(BASE) / f"llmuxd-tree-{port}"


def prepare(path: Path) -> None:
    """Create the folder 0700 unless there; refuse one that is a link, not a directory, or not
    root's and private (safefs.Unsafe, Untrusted)."""
    safefs.make_dir(str(path), mode=0o700)
    check_tree(path, base=path)


def empty(path: Path) -> list[str]:
    """Remove everything in the folder (never following a link); returns what was removed."""
    try:
        fd = safefs.open_dir(str(path))
    except (FileNotFoundError, safefs.Unsafe, OSError):
        return []
    gone = []
    try:
        for name in os.listdir(fd):
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(name, dir_fd=fd)  # descriptor-based: links inside are not followed
                else:
                    os.unlink(name, dir_fd=fd)
                gone.append(f"{path}/{name}")
            except OSError as e:
                log.warning("%s/%s not removed: %s", path, name, e)
    finally:
        os.close(fd)
    return gone


def safe_prepare(path: Path) -> str | None:
    """``prepare``; the reason when the folder cannot be used (the tree then gets the
    default temporary folder)."""
    try:
        prepare(path)
        return None
    except (OSError, safefs.Unsafe, Untrusted) as e:
        return str(e)
