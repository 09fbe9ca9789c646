"""Logging set-up: plain stderr lines; structured fields (MODEL=, EVENT=, DURATION_S=) ride
along in ``extra`` so a journald handler can pass them on."""

from __future__ import annotations

import logging
import sys


class JournalHandler(logging.Handler):
    """Sends records to journald with the UPPER_CASE ``extra`` fields as journal fields
    (MODEL=, EVENT=, DURATION_S=, ...), so ``journalctl MODEL=m1`` finds a model's events."""

    _PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def emit(self, record: logging.LogRecord) -> None:
        from systemd import journal

        try:
            fields = {k: str(v) for k, v in record.__dict__.items() if k.isupper()}
            if record.exc_info:
                fields["EXCEPTION_TEXT"] = logging.Formatter().formatException(record.exc_info)
            journal.send(
                record.getMessage(), PRIORITY=str(self._PRIORITY.get(record.levelno, 6)),
                LOGGER=record.name, SYSLOG_IDENTIFIER="llmuxd", CODE_FILE=record.pathname,
                CODE_LINE=record.lineno, CODE_FUNC=record.funcName, **fields,
            )
        except Exception:  # noqa: BLE001
            self.handleError(record)


def setup_logging(level: str = "INFO") -> str:
    """Log to journald (with structured fields) when stderr goes there, else to stderr.
    Returns where logs go."""
    from .systemd import stderr_is_journal

    root = logging.getLogger()
    root.handlers.clear()
    handler: logging.Handler
    if stderr_is_journal():
        handler = JournalHandler()
        where = "journald"
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        where = "stderr"
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return where
