"""BLAKE3 digests of what a checkpoint holds: its CRIU images and its saved files.

Why BLAKE3 (the ``blake3`` package, bindings to the reference Rust implementation): a restore
verifies every image before CRIU reads it and a dump hashes every image it wrote, so the digest's
throughput is on the critical path of both.  SHA-256 runs about 1.6 GB/s on one core; BLAKE3
runs about 3x that on one core, releases the GIL, and hashes one large input on several threads
(``max_threads=AUTO``: a rayon pool of one thread per CPU), so the images of a checkpoint are
hashed at memory speed.  Digests are 256 bits, written as 64 lowercase hex digits.

Reading is what is left (on the H200 host one thread reads the page cache at 8.7 GB/s, eight at
50 GB/s: docs/measured.md): a file's data is read in large chunks (``CHUNK``), several chunks of
one file at a time on a pool of reader threads (``os.preadv`` into reused buffers: the kernel's
copies run in parallel, and nothing is mapped, so an I/O error or a file truncated meanwhile is
an ``OSError``, never a SIGBUS that would end the daemon), and fed to one hasher in order.  Holes
(``SEEK_DATA``/``SEEK_HOLE``) are not read: they are hashed as the zeros they read as, from one
zero buffer, so a digest is always that of the file's logical content.

:class:`Digester` holds the threads and buffers of one operation (a dump, a verification) and
hands them back when it is closed.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator

import blake3

ALGORITHM = "BLAKE3"
CHUNK = 4 << 20  # one read
_ZEROS = memoryview(bytes(CHUNK))  # holes are hashed from this (calloc'd: never touched but by reads)
SMALL = 1 << 20  # below this a file is hashed on the calling thread, its data in one read


class ShortRead(OSError):
    """A file ended before the size it was read for."""


def new():
    """A BLAKE3 hasher that hashes one large update on several threads."""
    return blake3.blake3(max_threads=blake3.blake3.AUTO)


PARALLEL_FROM = 4  # CPUs: below this a file is read on one thread


def threads() -> int:
    """Reader threads for one operation: the CPUs this process may run on, at most 16 — or 1
    below PARALLEL_FROM CPUs.  Parallel reads pay only once hashing on every CPU outruns one
    reader (~9 GB/s from the page cache); on 2 CPUs BLAKE3 is the bottleneck and extra reader
    threads only compete with it (measured: 2.06 GB/s on one thread, 1.5-1.9 GB/s on 2-4)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return 1 if n < PARALLEL_FROM else min(16, n)


def extents(fd: int, size: int) -> Iterator[tuple[int, int, bool]]:
    """``(start, end, is_data)`` covering ``[0, size)`` in order: data where the file has data,
    holes where it has none.  A filesystem without SEEK_DATA is all data."""
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole up to the end
                data = size
            else:  # no SEEK_DATA here
                yield pos, size, True
                return
        data = min(data, size)
        if data > pos:
            yield pos, data, False
            pos = data
            if pos >= size:
                return
        try:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
        except OSError:
            hole = size
        hole = min(max(hole, pos + 1), size)
        yield pos, hole, True
        pos = hole


def update_zeros(h, n: int) -> None:
    """Feed ``n`` zero bytes (a hole) to hasher ``h``."""
    while n > 0:
        k = min(n, CHUNK)
        h.update(_ZEROS[:k])
        n -= k


def _pread_full(fd: int, buf: memoryview, offset: int) -> int:
    """Fill ``buf`` from ``offset``; returns how many bytes were read (fewer only at end of file)."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


class Digester:
    """Threads and buffers for hashing (and copying) the files of one checkpoint operation.

    ``chunks(fd, start, end)`` yields a file's data in order, read ahead on the reader threads;
    ``map(fn, items)`` runs per-file work on a second pool (a per-file task may wait for reads,
    so the two are kept apart: no task ever waits for its own pool).  ``threads=1`` reads on the
    calling thread only."""

    def __init__(self, n: int | None = None):
        self.n = n or threads()
        self._readers = ThreadPoolExecutor(self.n, thread_name_prefix="llmuxd-read") if self.n > 1 else None
        self._files: ThreadPoolExecutor | None = None
        self._background: ThreadPoolExecutor | None = None
        self._buffers: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._lock = threading.Lock()
        # files at a time, and chunks of one file in flight: at most files x (ahead + 1) buffers
        self.files = max(2, min(4, self.n // 2))
        self.ahead = max(2, min(8, self.n // 2))

    def __enter__(self) -> Digester:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for pool in (self._background, self._files, self._readers):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._buffers = queue.SimpleQueue()  # the memory goes with the operation

    def _buffer(self) -> bytearray:
        try:
            return self._buffers.get_nowait()
        except queue.Empty:
            return bytearray(CHUNK)

    def chunks(self, fd: int, start: int, end: int) -> Iterator[memoryview]:
        """The bytes of ``[start, end)`` in order, as views valid until the next one is asked for.
        ShortRead when the file ends before ``end``."""
        if end - start <= SMALL or self._readers is None:
            yield from self._chunks_here(fd, start, end)
            return
        pending: deque[tuple[bytearray, int, int, Future]] = deque()
        pos, held = start, None
        try:
            while pos < end or pending:
                while pos < end and len(pending) < self.ahead:
                    buf, n = self._buffer(), min(CHUNK, end - pos)
                    pending.append((buf, pos, n, self._readers.submit(_pread_full, fd, memoryview(buf)[:n], pos)))
                    pos += n
                if held is not None:
                    self._buffers.put(held)
                    held = None
                buf, at, n, fut = pending.popleft()
                held = buf
                if fut.result() != n:
                    raise ShortRead(errno.EIO, f"the file ended at {at + fut.result()} of {end} bytes")
                yield memoryview(buf)[:n]
        finally:
            if held is not None:
                self._buffers.put(held)
            for buf, _, _, fut in pending:  # wait: a read must not land in a buffer handed out again
                try:
                    fut.result()
                except Exception:  # noqa: BLE001 - the error that ended the reading is the one raised
                    pass
                self._buffers.put(buf)

    def _chunks_here(self, fd: int, start: int, end: int) -> Iterator[memoryview]:
        if end - start <= SMALL:
            data = os.pread(fd, end - start, start)
            if len(data) == end - start:
                yield memoryview(data)
                return
        buf = self._buffer()
        try:
            pos = start
            while pos < end:
                n = min(CHUNK, end - pos)
                got = _pread_full(fd, memoryview(buf)[:n], pos)
                if got != n:
                    raise ShortRead(errno.EIO, f"the file ended at {pos + got} of {end} bytes")
                yield memoryview(buf)[:n]
                pos += n
        finally:
            self._buffers.put(buf)

    def hash_fd(self, fd: int, size: int) -> str:
        """BLAKE3 of the first ``size`` bytes of ``fd`` (holes as zeros); ShortRead when shorter."""
        h = new()
        for start, end, data in extents(fd, size):
            if data:
                for chunk in self.chunks(fd, start, end):
                    h.update(chunk)
            else:
                update_zeros(h, end - start)
        return h.hexdigest()

    def background(self, fn: Callable, *args) -> Future:
        """Run ``fn(*args)`` on a thread of its own (it may use :meth:`map` and :meth:`chunks`)."""
        with self._lock:
            if self._background is None:
                self._background = ThreadPoolExecutor(1, thread_name_prefix="llmuxd-digest")
        return self._background.submit(fn, *args)

    def map(self, fn: Callable, items: list) -> list:
        """``[fn(x) for x in items]``, several at a time; the first exception is raised once all
        are done (none is left running)."""
        if len(items) <= 1 or self.n == 1:
            return [fn(x) for x in items]
        if self._files is None:
            with self._lock:
                if self._files is None:
                    self._files = ThreadPoolExecutor(self.files, thread_name_prefix="llmuxd-file")
        futures = [self._files.submit(fn, x) for x in items]
        results, error = [], None
        for f in futures:
            try:
                results.append(f.result())
            except BaseException as e:  # noqa: BLE001 - raised below, after every task has ended
                error = error or e
                results.append(None)
        if error is not None:
            raise error
        return results


class Growing:
    """Digests begun while the files are still being written: CRIU writes a tree's memory
    (``pages-*.img``, nearly all of a checkpoint's bytes) front to back, so each pass during the
    dump hashes what was appended since the last one, from the page cache it was just written to,
    and the dump's own hashing after CRIU only hashes the rest.  A file that is replaced or
    shrinks meanwhile starts over; :meth:`finish` gives a digest only for the same file (inode)
    hashed up to no further than its final size — anything else is hashed whole as before."""

    PATTERN = ("pages-", ".img")  # the files CRIU only appends to

    def __init__(self) -> None:
        self._state: dict[str, tuple[int, int, object]] = {}  # name -> (inode, bytes hashed, hasher)
        self.hashed = 0  # bytes hashed during the dump (for the figures)

    def wants(self, name: str) -> bool:
        return name.startswith(self.PATTERN[0]) and name.endswith(self.PATTERN[1])

    def advance(self, fd: int, name: str, st: os.stat_result) -> None:
        """Hash ``name`` (open as ``fd``) from where the last pass stopped to its current size."""
        ino, done, h = self._state.pop(name, (st.st_ino, 0, None))  # put back only when consistent
        if ino != st.st_ino or st.st_size < done or h is None:
            ino, done, h = st.st_ino, 0, new()
        while done < st.st_size:
            data = os.pread(fd, min(CHUNK, st.st_size - done), done)
            if not data:
                break
            h.update(data)
            done += len(data)
            self.hashed += len(data)
        self._state[name] = (ino, done, h)

    def finish(self, fd: int, name: str, st: os.stat_result, digester: "Digester") -> str | None:
        """The digest of the whole file, continuing the hashing begun during the dump; None when
        there is none to continue (then the caller hashes the file whole)."""
        ino, done, h = self._state.pop(name, (None, 0, None))
        if h is None or ino != st.st_ino or done > st.st_size:
            return None
        if done < st.st_size:
            for chunk in digester.chunks(fd, done, st.st_size):
                h.update(chunk)
        return h.hexdigest()
