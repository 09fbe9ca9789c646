"""The last lines of a model's own output, for the control API and the status page.

A model is named by its config key, and its log is ``<log_dir>/<model>.log`` as the backend
writes it: nothing a client sends becomes part of a path.  The file is opened without following
a symbolic link and must be a regular file; only its last ``MAX_BYTES`` are read.  Each line has
its control characters escaped (as llmuxd's own log lines) and its secrets redacted: the values
llmuxd knows (API keys, a model's ``--api-key``, secret-named environment variables) and
anything that looks like one (:func:`llmuxd.redact.text`)."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

from . import redact
from .config import Config
from .errors import BadRequest, UnknownModel
from .log import escape
from .status import LogTail

MAX_LINES = 1000
MAX_BYTES = 256 * 1024  # read from the end of the file at most
MAX_LINE_CHARS = 2000  # a longer line is cut (marked with …)


def _known_secrets(config: Config) -> list[str]:
    secrets = list(config.api_keys)
    if config.control_token:
        secrets.append(config.control_token)
    for m in config.models.values():
        for arg, shown in zip(m.extra_args, redact.argv(m.extra_args)):
            if shown != arg:  # a secret option's value (or --opt=value)
                secrets.append(arg.split("=", 1)[1] if arg.startswith("-") and "=" in arg else arg)
    secrets += [v for k, v in os.environ.items() if redact.secret_variable(k)]
    return sorted({s for s in secrets if s}, key=len, reverse=True)  # longest first


def read_tail(path: Path, lines: int, max_bytes: int = MAX_BYTES) -> list[str]:
    """The last ``lines`` non-blank lines of ``path`` (within its last ``max_bytes``), raw; []
    when there is no such file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return []
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path} is not a regular file")
        start = max(st.st_size - max_bytes, 0)
        f.seek(start)
        data = f.read(max_bytes)
    chunks = data.split(b"\n")
    if start > 0:
        chunks = chunks[1:]  # the first one is the end of a line that began before what was read
    text = [c.decode("utf-8", "replace").rstrip("\r") for c in chunks]
    return [t for t in text if t.strip()][-lines:] if lines > 0 else []


class ModelLogs:
    def __init__(self, config: Config):
        self.config = config
        self._secrets = _known_secrets(config)

    def path(self, model: str) -> Path:
        if model not in self.config.models:
            raise UnknownModel(model, list(self.config.models))
        return Path(self.config.log_dir) / f"{model}.log"

    def _shown(self, line: str) -> str:
        line = escape(redact.text(line, self._secrets))
        return line if len(line) <= MAX_LINE_CHARS else line[:MAX_LINE_CHARS] + "…"

    async def tail(self, model: str, lines: int) -> LogTail:
        """The last ``lines`` (1..MAX_LINES) lines of ``model``'s log, ready to show."""
        if not 1 <= lines <= MAX_LINES:
            raise BadRequest(f"lines must be between 1 and {MAX_LINES}", param="lines")
        path = self.path(model)
        try:
            raw = await asyncio.to_thread(read_tail, path, lines)
        except OSError as e:
            raw = [f"(llmuxd cannot read this model's log: {e.strerror or e})"]
        return LogTail(model=model, lines=[self._shown(line) for line in raw])
