"""Figures, not a test: what a checkpoint's digests and saved-file copies cost here.

    python bench/hashing.py [--size-mib 256] [--dir /var/tmp]

1. Digests of one dense file in the page cache (what a dump hashes after CRIU wrote the images,
   and a restore verifies): SHA-256 (the digest llmuxd used before), BLAKE3 on one thread,
   BLAKE3 on every CPU (``max_threads=AUTO``) — each read in 4 MiB chunks, and on bytes already
   in memory (the hash alone) — and llmuxd's ``Digester.hash_fd`` (BLAKE3 on every CPU, reads
   on several threads from 4 CPUs on).
2. Copies of a sparse 256 MiB file holding 44 KiB of data (a /dev/shm ring as vLLM leaves it):
   byte for byte (plain read/write, with and without SHA-256), hole-aware without a digest, and
   llmuxd's ``safefs.copy_hashing`` (data extents only, BLAKE3 of the logical content: the holes
   hashed as zeros) — with how much the copy allocates.

Best of a few runs each; about 5-15 s.  Runs from the repository root or anywhere with llmuxd on
the path.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import blake3  # noqa: E402

from llmuxd.checkpoint import digest, safefs  # noqa: E402

CHUNK = 4 << 20


def best(fn, runs: int = 3) -> tuple[float, object]:
    out, secs = None, float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        out = fn()
        secs = min(secs, time.perf_counter() - started)
    return secs, out


def read_hashing(path: str, h) -> str:
    fd = os.open(path, os.O_RDONLY)
    buf = bytearray(CHUNK)
    view, pos = memoryview(buf), 0
    try:
        while n := os.preadv(fd, [view], pos):
            if h is not None:
                h.update(view[:n])
            pos += n
    finally:
        os.close(fd)
    return h.hexdigest() if h is not None else ""


def digests(folder: str, size: int) -> None:
    path = os.path.join(folder, "dense")
    with open(path, "wb") as f:
        block = os.urandom(CHUNK)
        for _ in range(size // CHUNK):
            f.write(block[:1] + os.urandom(15) + block[16:])  # not all alike, cheap to make
    read_hashing(path, None)  # in the page cache from here on
    with open(path, "rb") as f:
        data = f.read()
    mib = size / (1 << 20)
    rows = [
        ("read only (4 MiB preadv)", lambda: read_hashing(path, None)),
        ("SHA-256, read 4 MiB at a time", lambda: read_hashing(path, hashlib.sha256())),
        ("BLAKE3 1 thread, read 4 MiB at a time", lambda: read_hashing(path, blake3.blake3())),
        ("BLAKE3 all CPUs, read 4 MiB at a time",
         lambda: read_hashing(path, blake3.blake3(max_threads=blake3.blake3.AUTO))),
        ("SHA-256 of bytes in memory", lambda: hashlib.sha256(data).hexdigest()),
        ("BLAKE3 1 thread of bytes in memory", lambda: blake3.blake3(data).hexdigest()),
        ("BLAKE3 all CPUs of bytes in memory",
         lambda: blake3.blake3(data, max_threads=blake3.blake3.AUTO).hexdigest()),
        (f"llmuxd Digester.hash_fd ({digest.threads()} reader thread(s))", lambda: _digester(path, size)),
    ]
    print(f"digest of a {mib:.0f} MiB file in the page cache ({os.cpu_count()} CPUs):")
    results = {}
    for name, fn in rows:
        secs, out = best(fn, 2 if "SHA-256" in name else 3)
        results[name] = out
        print(f"  {name:44s} {secs * 1000:8.1f} ms  {size / secs / 1e9:6.2f} GB/s")
    assert results[rows[-1][0]] == results["BLAKE3 1 thread of bytes in memory"]
    os.unlink(path)


def _digester(path: str, size: int) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        with digest.Digester() as d:
            return d.hash_fd(fd, size)
    finally:
        os.close(fd)


def plain_copy(src: str, dst: str, h=None) -> None:
    with open(src, "rb", buffering=0) as i, open(dst, "wb", buffering=0) as o:
        while chunk := i.read(CHUNK):
            if h is not None:
                h.update(chunk)
            o.write(chunk)


def holes_only(src: str, dst: str) -> None:
    """Hole-aware, no digest: data extents with copy_file_range, the rest a truncate."""
    si, so = os.open(src, os.O_RDONLY), os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        size = os.fstat(si).st_size
        os.ftruncate(so, size)
        for start, end, data in digest.extents(si, size):
            pos = start
            while data and pos < end:
                pos += os.copy_file_range(si, so, end - pos, pos, pos)
    finally:
        os.close(si)
        os.close(so)


def llmuxd_copy(src: str, dst: str) -> str:
    si, so = os.open(src, os.O_RDONLY), os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        return safefs.copy_hashing(si, so, os.fstat(si).st_size)
    finally:
        os.close(si)
        os.close(so)


def copies(folder: str) -> None:
    src, dst = os.path.join(folder, "ring"), os.path.join(folder, "copy")
    size = 256 << 20
    with open(src, "wb") as f:
        f.truncate(size)
        for i in range(11):  # 11 x 4 KiB pages of data, spread out: about 45 KB
            f.seek(i * (size // 11))
            f.write(os.urandom(4096))
    print(f"copy of a sparse {size >> 20} MiB file, 44 KiB of data written in it "
          f"({os.stat(src).st_blocks * 512 // 1024} KiB allocated):")
    rows = [
        ("byte for byte (read/write)", lambda: plain_copy(src, dst)),
        ("byte for byte + SHA-256", lambda: plain_copy(src, dst, hashlib.sha256())),
        ("hole-aware, no digest (copy_file_range)", lambda: holes_only(src, dst)),
        ("llmuxd safefs.copy_hashing (BLAKE3 of all)", lambda: llmuxd_copy(src, dst)),
    ]
    for name, fn in rows:
        secs, _ = best(fn)
        print(f"  {name:44s} {secs * 1000:8.2f} ms  copy allocates {os.stat(dst).st_blocks * 512 // 1024:7d} KiB")
        os.unlink(dst)
    zeros = blake3.blake3(max_threads=blake3.blake3.AUTO)
    secs, _ = best(lambda: digest.update_zeros(zeros, size))
    print(f"  {'of which: BLAKE3 of 256 MiB of zeros':44s} {secs * 1000:8.2f} ms")
    os.unlink(src)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256, help="the dense file's size (default 256)")
    ap.add_argument("--dir", default=None, help="where the temporary files go (default: $TMPDIR or /tmp)")
    args = ap.parse_args()
    folder = tempfile.mkdtemp(prefix="llmuxd-bench-hashing-", dir=args.dir)
    try:
        print(f"blake3 {blake3.__version__}, Python {sys.version.split()[0]}, in {folder}")
        digests(folder, args.size_mib << 20)
        copies(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
