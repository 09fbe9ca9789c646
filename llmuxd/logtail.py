"""The last lines of a model's own output, for the control API and the status page.

A model is named by its config key and its output is the file its backend writes: nothing a
client sends becomes part of a path.  The lines are read by :func:`llmuxd.modellog.tail` (no
link followed, a regular file only, its last 256 KiB and the newest rotated copy), with control
characters escaped and secrets redacted: the model's own (its secret options and environment)
and the daemon's (API keys, the control token)."""

from __future__ import annotations

import asyncio
import os
import stat

from . import modellog
from .errors import BadRequest
from .status import LogTail

MAX_LINES = 1000


class ModelLogs:
    def __init__(self, switcher):
        self.switcher = switcher
        cfg = switcher.config
        self._daemon_secrets = tuple(s for s in (*cfg.api_keys, cfg.control_token or "") if s)

    async def tail(self, model: str, lines: int) -> LogTail:
        """The last ``lines`` (1..MAX_LINES) lines of ``model``'s output, ready to show."""
        if not 1 <= lines <= MAX_LINES:
            raise BadRequest(f"lines must be between 1 and {MAX_LINES}", param="lines")
        backend = self.switcher.model(model).backend  # UnknownModel for a name not in the config
        path = backend.log_path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return LogTail(model=model, lines=[])
        except OSError as e:
            return LogTail(model=model, lines=[f"(llmuxd cannot read this model's log: {e.strerror or e})"])
        if not stat.S_ISREG(st.st_mode):  # never followed, never shown
            return LogTail(model=model, lines=["(llmuxd cannot read this model's log: not a regular file)"])
        secrets = (*backend.secrets(), *self._daemon_secrets)
        shown = await asyncio.to_thread(modellog.tail, path, lines, secrets=secrets)
        return LogTail(model=model, lines=shown)
