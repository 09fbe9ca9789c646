"""The models' own output, forwarded line by line with the model's name on each line.

Each model tree writes its stdout and stderr to ``<log_dir>/<model>.log`` (a file, so that CRIU
can checkpoint and restore the tree with it).  In a container, those lines belong in the
container's log too (``docker logs``).  This follower tails the files and writes each new line:

* to stdout as ``[<model>] <line>`` (the image's entrypoint shape: next to llmuxd's own stderr);
* or, with ``--journal``, to the journal with ``SYSLOG_IDENTIFIER=<model>`` and ``MODEL=<model>``
  (the systemd shape: ``journalctl -t <model>``; the journal reaches ``docker logs`` through
  llmuxd-console.service).

A file present when the follower starts is followed from its end (a restarted follower does not
repeat old lines); a file that appears later, is truncated or replaced (prepare-restore re-creates
logs) is followed from its start.  Polling (0.5 s): no inotify dependency, and it sees files on any
file system.  ``--exit-with-parent`` ends it when its parent (llmuxd, which the entrypoint execs
into) exits.

    python -m llmuxd.logfollow [--config /etc/llmux/config.json] [--log-dir DIR] [--journal]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable

DEFAULT_LOG_DIR = "/var/log/llmuxd"
MAX_LINE = 64 * 1024  # a longer line without a newline is written in pieces
_PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "WARN": 4, "ERROR": 3, "CRITICAL": 2}


def _settings(config_path: str | None) -> tuple[str, set[str] | None]:
    """(log_dir, model names) from the config; the models are None when it cannot be read
    (then every ``*.log`` in the folder is followed)."""
    try:
        with open(config_path or "/etc/llmux/config.json") as f:
            cfg = json.load(f)
        return str(cfg.get("log_dir") or DEFAULT_LOG_DIR), set(cfg.get("models") or {}) or None
    except (OSError, ValueError, AttributeError):
        return DEFAULT_LOG_DIR, None


class _File:
    __slots__ = ("path", "ino", "offset", "partial")

    def __init__(self, path: Path, ino: int, offset: int):
        self.path, self.ino, self.offset, self.partial = path, ino, offset, b""


class Follower:
    """Follows ``<log_dir>/<name>.log`` for the given names (all ``*.log`` when None) and hands
    each complete line to ``emit(name, line)``."""

    def __init__(self, log_dir: str | os.PathLike, names: set[str] | None, emit: Callable[[str, str], None]):
        self.dir = Path(log_dir)
        self.names = names
        self.emit = emit
        self.files: dict[str, _File] = {}
        self._first = True

    def _candidates(self) -> dict[str, Path]:
        if self.names is not None:
            return {n: self.dir / f"{n}.log" for n in self.names}
        try:
            return {p.stem: p for p in self.dir.glob("*.log") if p.is_file()}
        except OSError:
            return {}

    def poll(self) -> int:
        """Read what is new in every file; returns the number of lines emitted."""
        n = 0
        for name, path in self._candidates().items():
            try:
                st = path.stat()
            except OSError:
                continue
            f = self.files.get(name)
            if f is None or f.ino != st.st_ino or st.st_size < f.offset:
                start = st.st_size if (f is None and self._first) else 0
                f = self.files[name] = _File(path, st.st_ino, start)
            if st.st_size > f.offset:
                n += self._read(name, f)
        self._first = False
        return n

    def _read(self, name: str, f: _File) -> int:
        try:
            with open(f.path, "rb") as fh:
                fh.seek(f.offset)
                data = fh.read(8 << 20)
        except OSError:
            return 0
        f.offset += len(data)
        buf = f.partial + data
        *lines, f.partial = buf.split(b"\n")
        while len(f.partial) > MAX_LINE:
            lines.append(f.partial[:MAX_LINE])
            f.partial = f.partial[MAX_LINE:]
        n = 0
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            if line.strip():  # blank lines (separators in the log) are left out
                self.emit(name, line)
                n += 1
        return n

    def flush(self) -> None:
        """Emit what is left without a newline (at exit)."""
        for name, f in self.files.items():
            if f.partial:
                self.emit(name, f.partial.decode("utf-8", "replace"))
                f.partial = b""


def stdout_emitter(stream=None) -> Callable[[str, str], None]:
    out = stream or sys.stdout

    def emit(name: str, line: str) -> None:
        out.write(f"[{name}] {line}\n")
        out.flush()

    return emit


def journal_emitter() -> Callable[[str, str], None]:
    from systemd import journal  # systemd-python, a dependency of llmuxd

    def emit(name: str, line: str) -> None:
        level = line.split(" ", 1)[0].rstrip(":").upper()
        journal.send(line, SYSLOG_IDENTIFIER=name, MODEL=name, PRIORITY=str(_PRIORITY.get(level, 6)),
                     LLMUXD_MODEL_OUTPUT="1")

    return emit


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmuxd.logfollow", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="/etc/llmux/config.json", help="llmuxd's config (log_dir, model names)")
    ap.add_argument("--log-dir", help="the folder of <model>.log files (default: the config's log_dir)")
    ap.add_argument("--journal", action="store_true", help="write to the journal instead of stdout")
    ap.add_argument("--exit-with-parent", action="store_true", help="exit when the parent process exits")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between polls")
    args = ap.parse_args(argv)
    log_dir, names = _settings(args.config)
    follower = Follower(args.log_dir or log_dir, names, journal_emitter() if args.journal else stdout_emitter())
    parent = os.getppid()
    stop = False

    def on_signal(*_):
        nonlocal stop
        stop = True

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        while not stop:
            follower.poll()
            if args.exit_with_parent and os.getppid() != parent:
                follower.poll()
                break
            time.sleep(args.interval)
    except BrokenPipeError:
        return 0
    finally:
        try:
            follower.flush()
        except (BrokenPipeError, OSError):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
