"""A model's output file, ``<log_dir>/<model>.log``: where it is, the lines llmuxd adds to it,
its rotation, and its last lines.

Every process of a model tree writes its stdout and stderr to this file, opened ``O_APPEND``.  A
file (not a pipe to llmuxd) because CRIU dumps and restores the tree with it: a regular file
opened ``O_WRONLY|O_APPEND`` is restored by path and CRIU checks neither its size nor its content.
That is also why rotation is copy-truncate: :func:`rotate` copies the file to ``<model>.log.1``
(older copies shift to ``.2`` ... ``.<keep>``) and empties it in place; the tree keeps its
descriptor, and ``O_APPEND`` puts its next line at the new end.  A line written in the instant
between the copy and the truncation is lost (as with logrotate's ``copytruncate``).

Before it starts, restores or wakes a tree, llmuxd appends a marker line
(``--- llmuxd: starting ...``); :func:`tail` with ``this_run`` returns only what the tree wrote
after the last one: the output that explains a failed start.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import time
from pathlib import Path
from typing import Iterable

from . import redact
from .log import escape

MARKER = "--- llmuxd: "
#: How much of a file :func:`tail` reads from its end.
TAIL_BYTES = 256 * 1024
#: A longer line is cut (a tail is for reading, not for archiving).
TAIL_LINE_CHARS = 500
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_APPEND_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC


def path_for(log_dir: str | os.PathLike, name: str) -> Path:
    """The output file of model ``name``."""
    return Path(log_dir) / f"{name}.log"


def rotated(path: Path, n: int) -> Path:
    """The ``n``-th rotated copy of ``path`` (1 is the newest)."""
    return path.with_name(f"{path.name}.{n}")


def mark(path: Path, what: str, *, create: bool = True) -> None:
    """Append the marker line ``--- llmuxd: <what> at <time>`` (after an empty line, so that it
    starts a line whatever the tree wrote last).  The file is private (a model may echo
    prompts): made 0600 in a 0700 folder; a symbolic link is never followed.  ``create=False``:
    only when the file exists (before a restore, which puts the file back itself)."""
    if create:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, _APPEND_FLAGS if create else _APPEND_FLAGS & ~os.O_CREAT, 0o600)
    except FileNotFoundError:
        if create:
            raise
        return
    try:
        os.write(fd, f"\n{MARKER}{what} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    finally:
        os.close(fd)


def _last_lines(path: Path, limit: int) -> tuple[list[str], bool]:
    """The lines in the last ``limit`` bytes of ``path`` (a cut first line left out), and
    whether that was the whole file.  ([], True) when there is no regular file."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError:
        return [], True
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return [], True
        start = max(0, st.st_size - limit)
        data = os.pread(fd, st.st_size - start, start)
    finally:
        os.close(fd)
    lines = data.decode("utf-8", "replace").splitlines()
    if start > 0 and lines:
        lines = lines[1:]
    return lines, start == 0


def tail(path: Path, lines: int = 20, *, this_run: bool = False, secrets: Iterable[str] = ()) -> list[str]:
    """The last ``lines`` non-blank lines of a model's output: from its file, and from the newest
    rotated copy when the file (just rotated) holds fewer.  ``this_run``: only those after the
    last marker line.  Each line has its control characters escaped, ``secrets`` and
    secret-looking values redacted (:func:`redact.text`), and is cut at TAIL_LINE_CHARS."""
    got: list[str] = []
    for p in (path, rotated(path, 1)):
        found, whole = _last_lines(p, TAIL_BYTES)
        if this_run:
            at = max((i for i, line in enumerate(found) if line.startswith(MARKER)), default=None)
            if at is not None:
                got = found[at + 1:] + got
                break
        got = found + got
        if not whole or sum(1 for line in got if line.strip()) >= lines:
            break
    secrets = list(secrets)
    out = [redact.text(escape(line.rstrip("\r")), secrets) for line in got if line.strip()]
    out = out[-lines:] if lines > 0 else []
    return [line if len(line) <= TAIL_LINE_CHARS else line[:TAIL_LINE_CHARS] + " [...]" for line in out]


def described(msg: str, path: Path, output: list[str]) -> str:
    """``msg`` followed by the output that explains it, or by where to look when there is none."""
    if not output:
        return f"{msg}; see {path}"
    return f"{msg}; its last output ({path}):\n" + "\n".join(output)


def _copy_range(src: int, dst: int, count: int) -> None:
    """The first ``count`` bytes of ``src`` to the start of ``dst`` (in the kernel where it can)."""
    pos = 0
    while pos < count:
        try:
            n = os.copy_file_range(src, dst, count - pos, pos, pos)
        except OSError:  # a file system without it
            data = os.pread(src, min(count - pos, 1 << 20), pos)
            n = os.pwrite(dst, data, pos) if data else 0
        if n == 0:
            return
        pos += n


def rotate(path: Path, keep: int, after: int) -> bytes:
    """Copy-truncate ``path``: shift ``.1``..``.<keep-1>`` up by one (``.<keep>`` is replaced),
    copy the file to ``.1`` (none with ``keep`` 0), empty it.  The bytes past ``after`` (what
    the caller has not read yet) are returned, so that nothing it follows is skipped.  A
    symbolic link or anything but a regular file is left alone (b"")."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return b""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        copy, tmp = None, None
        if keep > 0:
            for n in range(keep - 1, 0, -1):
                try:
                    os.rename(rotated(path, n), rotated(path, n + 1))
                except FileNotFoundError:
                    pass
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
            copy = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if copy is not None:
                _copy_range(fd, copy, after)
            rest, pos = bytearray(), after
            while chunk := os.pread(fd, 1 << 20, pos):
                if copy is not None:
                    os.pwrite(copy, chunk, pos)
                rest += chunk
                pos += len(chunk)
            os.ftruncate(fd, 0)
        except BaseException:
            if tmp is not None:  # no half copy left behind (a full disk, say)
                os.unlink(tmp)
            raise
        finally:
            if copy is not None:
                os.close(copy)
        if tmp is not None:
            os.rename(tmp, rotated(path, 1))
        return bytes(rest)
    finally:
        os.close(fd)


_LEVEL = re.compile(r"^(?:\([^)]{0,80}\)\s+)?(DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL)\b")
_PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "WARN": 4, "ERROR": 3, "CRITICAL": 2}


def priority(line: str) -> int:
    """The syslog priority a model's line says it has (vLLM's ``INFO 01-02 ...``, also after
    ``(APIServer pid=N)``); 6 (info) when it says none."""
    m = _LEVEL.match(line)
    return _PRIORITY[m.group(1)] if m else 6
