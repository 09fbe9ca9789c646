"""A run-time file cache like vLLM's JIT compile caches: ``~/.cache/llmuxd-sim/<hash>/``.

The engine generates ``kernels.bin`` (deterministic bytes) when missing, else reuses it, and keeps
it open and mmapped for its whole life. Its content is checked on every request: a stand-in with
the right size but wrong bytes (e.g. zero-filled after a restore) makes the engine crash, as a
corrupted compiled kernel would.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import zlib
from pathlib import Path

log = logging.getLogger("llmuxd.sim.engine")

CACHE_VERSION = "1"
KERNEL_BYTES = 256 * 1024


class CorruptCache(Exception):
    """The mapped kernel file no longer has the generated content."""


def cache_dir(model: str, config_bytes: bytes) -> Path:
    """The per-model cache folder under the home directory."""
    key = hashlib.sha256(f"{model}\0{CACHE_VERSION}\0".encode() + config_bytes).hexdigest()[:16]
    return Path.home() / ".cache" / "llmuxd-sim" / key


def _generate(key: bytes) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < KERNEL_BYTES:
        out += hashlib.sha256(key + counter.to_bytes(8, "little")).digest()
        counter += 1
    return bytes(out[:KERNEL_BYTES])


class KernelCache:
    """The open, mmapped cache file of one engine."""

    def __init__(self, model: str, config_bytes: bytes) -> None:
        self.dir = cache_dir(model, config_bytes)
        self.path = self.dir / "kernels.bin"
        expected = _generate(self.dir.name.encode())
        self._crc = zlib.crc32(expected)
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._valid_on_disk():
            log.info("Using cached kernels from %s", self.path)
        else:
            log.info("Compiling kernels into %s", self.path)
            tmp = self.dir / f".kernels.{os.getpid()}.tmp"
            tmp.write_bytes(expected)
            os.replace(tmp, self.path)
            (self.dir / "meta.json").write_text(json.dumps({"model": model, "version": CACHE_VERSION}))
        self._file = open(self.path, "rb")
        self._map = mmap.mmap(self._file.fileno(), 0, prot=mmap.PROT_READ)

    def _valid_on_disk(self) -> bool:
        try:
            return zlib.crc32(self.path.read_bytes()) == self._crc
        except OSError:
            return False

    def check(self) -> None:
        """Raise CorruptCache if the mapped bytes differ from what was generated."""
        if zlib.crc32(self._map) != self._crc:
            raise CorruptCache(f"illegal instruction in cached kernel {self.path}")
