"""Making a checkpoint durable before it takes its place, without a machine-wide sync.

A dump fsyncs what it wrote, and only that: every file CRIU wrote (in the images' digest pass,
:func:`llmuxd.checkpoint.manifest.digest_images`), every saved file, the manifest (and its tag),
then the folders holding them; after the exchange into place, the folder above.  Why ``fsync``
per file rather than ``syncfs(2)`` of the checkpoint's filesystem: syncfs also writes out
whatever else is dirty on that filesystem (a model's logs, a download in progress, another
model's files) and the dump would wait for it; per-file fsyncs run on the digest threads, each
right after its file is hashed, so the disk works while the other images are hashed.

Left alone, the images stay dirty in the page cache until the fsync (the kernel starts writing
them out by itself only past its background threshold, 10% of memory by default, or after 30 s),
which then waits for the whole write.  :class:`Writeback` starts the writeback of the images while CRIU is still writing
them (``sync_file_range(SYNC_FILE_RANGE_WRITE)``: asynchronous, nothing waits for it), so by the
time CRIU is done most of it is on disk and the fsyncs wait only for the rest.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import stat
from pathlib import Path
from typing import Callable

from .digest import Growing

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
SYNC_FILE_RANGE_WRITE = 2
MIN_STEP = 1 << 20  # a file is kicked again once it grew by this much
INTERVAL = 0.1  # seconds between passes while CRIU writes


def _libc_sync_file_range() -> Callable | None:
    try:
        f = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    f.restype = ctypes.c_int
    return f


_sync_file_range = _libc_sync_file_range()


def start_writeback(fd: int, offset: int = 0) -> None:
    """Start writing the file's dirty pages from ``offset`` on out now (asynchronously; nothing
    is waited for, and a filesystem without it just does nothing)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset & ~0xFFF, 0, SYNC_FILE_RANGE_WRITE)


def fsync_dir(path: Path | str) -> None:
    """Make the names in a folder durable (its entries, not the files' contents)."""
    fd = os.open(path, DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Writeback:
    """Start the writeback of what is being written into ``folder`` (our own dump folder: never
    a link followed, only regular files opened, read-only), pass after pass."""

    def __init__(self, folder: Path | str, growing: Growing | None = None):
        self.folder = str(folder)
        self.kicked: dict[str, int] = {}  # name -> size up to which writeback was started
        self.growing = growing  # and, given this, the images CRIU appends to are hashed as they grow

    def kick(self) -> None:
        try:
            dfd = os.open(self.folder, DIR_FLAGS)
        except OSError:
            return
        try:
            for name in os.listdir(dfd):
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except OSError:
                    continue
                done = self.kicked.get(name, 0)
                if not stat.S_ISREG(st.st_mode) or st.st_size - done < MIN_STEP:
                    continue
                try:
                    fd = os.open(name, READ_FLAGS, dir_fd=dfd)
                except OSError:
                    continue
                try:
                    start_writeback(fd, done)
                    if self.growing is not None and self.growing.wants(name):
                        self.growing.advance(fd, name, st)
                finally:
                    os.close(fd)
                self.kicked[name] = st.st_size
        finally:
            os.close(dfd)

    async def run(self, done: asyncio.Event) -> None:
        """Pass after pass until ``done`` is set; never raises (it only makes the fsyncs shorter)."""
        while not done.is_set():
            try:
                await asyncio.to_thread(self.kick)
            except OSError:
                return
            try:
                await asyncio.wait_for(done.wait(), INTERVAL)
            except asyncio.TimeoutError:
                pass
