"""The models' own output in llmuxd's log, line by line with the model's name, and the output
files kept from growing without end.

Each model tree writes to its file, ``<log_dir>/<model>.log`` (see :mod:`.modellog`: a file, so
that CRIU can dump and restore the tree with it).  The daemon follows those files in a thread of
its own (:class:`Forwarder`) and writes each new line:

* to the journal, when llmuxd's stderr goes there (systemd), with ``SYSLOG_IDENTIFIER=<model>``,
  ``MODEL=<model>`` and the line's own level as ``PRIORITY`` (``journalctl MODEL=<model>``,
  ``journalctl -t <model>``; in the image, the journal is also what ``docker logs`` shows);
* otherwise to stdout as ``[<model>] <line>``, next to llmuxd's own log on stderr (a terminal,
  the image's entrypoint shape: ``docker logs``).

Each line has its control characters escaped and secrets redacted before it leaves.  A file is
followed from its end when the daemon starts (a restart repeats nothing), and from its start when
it appears later, is replaced (prepare-restore re-creates it) or shrinks.  Once a file has grown
past ``logs.max_bytes``, it is rotated (copy-truncate, :func:`modellog.rotate`) right after its
lines were forwarded.  Polling (0.5 s): no inotify, any file system.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from . import modellog, redact
from .log import escape

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024  # a longer line without a newline is forwarded in pieces
READ_CHUNK = 8 << 20  # at most this much of a file per poll

Emit = Callable[[str, str], None]


@dataclass(frozen=True)
class Source:
    """A model's output file and the secrets that must not leave it (its argv's and
    environment's secret values, which :func:`redact.text` replaces)."""

    name: str
    path: Path
    secrets: tuple[str, ...] = ()


@dataclass
class _File:
    ino: int
    offset: int
    partial: bytes = field(default=b"")
    cannot_rotate: bool = False  # said once, until a rotation works again


class Follower:
    """Follows the sources' files and hands each complete, non-blank line to ``emit(name,
    line)``; rotates a file once it reaches ``max_bytes`` (0: never), keeping ``keep`` copies."""

    def __init__(self, sources: Sequence[Source], emit: Emit, *, max_bytes: int = 0, keep: int = 0):
        self.sources = list(sources)
        self.emit = emit
        self.max_bytes = max_bytes
        self.keep = keep
        self.files: dict[str, _File] = {}
        self._first = True

    def follow(self, sources: Sequence[Source]) -> None:
        """Follow ``sources`` from now on (a reload changed the models); a file not followed
        before is followed from its end, as at the start."""
        known = {src.name for src in self.sources}
        for src in sources:
            if src.name not in known:
                try:
                    st = os.lstat(src.path)
                except OSError:
                    continue  # made later: followed from its start
                self.files[src.name] = _File(st.st_ino, st.st_size)
        self.sources = list(sources)  # (one reference swapped: the polling thread sees one list or the other)

    def poll(self) -> int:
        """Forward what is new in every file (rotating those grown too big); returns the number
        of lines forwarded."""
        n = 0
        for src in self.sources:
            try:
                st = os.lstat(src.path)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):  # never follow a link planted where a log belongs
                continue
            f = self.files.get(src.name)
            if f is None or f.ino != st.st_ino or st.st_size < f.offset:
                f = self.files[src.name] = _File(st.st_ino, st.st_size if (f is None and self._first) else 0)
            if st.st_size > f.offset:
                n += self._read(src, f)
            if self.max_bytes and max(st.st_size, f.offset) >= self.max_bytes:
                n += self._rotate(src, f)
        self._first = False
        return n

    def _read(self, src: Source, f: _File) -> int:
        try:
            fd = os.open(src.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return 0
        try:
            data = os.pread(fd, READ_CHUNK, f.offset)
        finally:
            os.close(fd)
        f.offset += len(data)
        return self._lines(src, f, data)

    def _rotate(self, src: Source, f: _File) -> int:
        try:
            rest = modellog.rotate(src.path, self.keep, f.offset)
        except OSError as e:
            if not f.cannot_rotate:
                log.warning("%s: cannot rotate %s: %s", src.name, src.path, e.strerror or e,
                            extra={"MODEL": src.name, "EVENT": "log_rotate"})
            f.cannot_rotate = True
            return 0
        f.offset, f.cannot_rotate = 0, False
        return self._lines(src, f, rest)

    def _lines(self, src: Source, f: _File, data: bytes) -> int:
        *lines, f.partial = (f.partial + data).split(b"\n")
        while len(f.partial) > MAX_LINE:
            lines.append(f.partial[:MAX_LINE])
            f.partial = f.partial[MAX_LINE:]
        n = 0
        for raw in lines:
            if self._emit(src, raw):
                n += 1
        return n

    def _emit(self, src: Source, raw: bytes) -> bool:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        if not line.strip():  # blank lines (separators in the file) are left out
            return False
        self.emit(src.name, redact.text(escape(line), src.secrets))
        return True

    def flush(self) -> None:
        """Forward what is left without a newline (at the end)."""
        for src in self.sources:
            f = self.files.get(src.name)
            if f is not None and f.partial:
                self._emit(src, f.partial)
                f.partial = b""


def stdout_emitter(stream=None) -> Emit:
    def emit(name: str, line: str) -> None:
        out = stream or sys.stdout
        out.write(f"[{name}] {line}\n")
        out.flush()

    return emit


def journal_emitter() -> Emit:
    from systemd import journal  # systemd-python, a dependency of llmuxd

    def emit(name: str, line: str) -> None:
        journal.send(line, SYSLOG_IDENTIFIER=name, MODEL=name, PRIORITY=str(modellog.priority(line)),
                     LLMUXD_MODEL_OUTPUT="1")

    return emit


def default_emitter() -> Emit:
    """The journal when llmuxd's stderr goes there, else stdout (like llmuxd's own log)."""
    from .systemd import stderr_is_journal

    return journal_emitter() if stderr_is_journal() else stdout_emitter()


class Forwarder:
    """A :class:`Follower` polled by a thread of its own until :meth:`stop`."""

    def __init__(self, sources: Sequence[Source], *, max_bytes: int, keep: int, emit: Emit | None = None,
                 interval: float = 0.5):
        self.follower = Follower(sources, emit or default_emitter(), max_bytes=max_bytes, keep=keep)
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="model-output", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._poll()
            if self._stop.wait(self.interval):
                break
        self._poll()  # what the trees wrote while they were being stopped
        try:
            self.follower.flush()
        except OSError:
            pass

    def _poll(self) -> None:
        try:
            self.follower.poll()
        except BrokenPipeError:  # nobody reads stdout any more: nothing to forward to
            self._stop.set()
        except Exception:  # noqa: BLE001 - forwarding must never end for good on one bad moment
            log.exception("forwarding the models' output failed; retrying")

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
