"""Logging set-up: plain stderr lines; structured fields (MODEL=, EVENT=, DURATION_S=) ride
along in ``extra`` so a journald handler can pass them on.

Log lines carry text that clients control (a model name, a path, a D-Bus sender), so every
line is made safe before it is written: control characters (CR, LF, ESC, ...), Unicode line
separators and bidirectional overrides become visible escapes (``\\r``, ``\\n``, ``\\x1b``,
``\\u2028``), so nobody can forge a log line or drive a terminal through llmuxd's log.  A
traceback keeps its own line breaks, but each of its lines is indented: a real record always
starts at the beginning of a line, with its timestamp.  So are the lines of a model's output
that explain a failure (``extra={"output": [lines]}``), under the record's own line.
"""

from __future__ import annotations

import logging
import re
import sys

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_UNSAFE_KEEP_LF = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(m: re.Match) -> str:
    c = m.group()
    if c in _NAMED:
        return _NAMED[c]
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"


def escape(text: str, keep_newlines: bool = False) -> str:
    """``text`` with every control character written as a visible escape; with
    ``keep_newlines``, line feeds stay (a traceback's lines) and everything else is escaped."""
    return (_UNSAFE_KEEP_LF if keep_newlines else _UNSAFE).sub(_escape_char, text)


def _indented(text: str) -> str:
    return "\n".join("    " + line for line in escape(text, keep_newlines=True).rstrip("\n").split("\n"))


def _output(record: logging.LogRecord) -> str:
    """The record's ``output`` lines (a model's, under the message), indented; "" if none."""
    lines = getattr(record, "output", None)
    return "\n" + "\n".join("    " + escape(str(line)) for line in lines) if lines else ""


class SafeFormatter(logging.Formatter):
    """A formatter whose output is one line per record (the message escaped), followed by the
    indented lines of a traceback or stack when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape(record.getMessage())
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        s = self.formatMessage(record) + _output(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            s += "\n" + _indented(record.exc_text)
        if record.stack_info:
            s += "\n" + _indented(self.formatStack(record.stack_info))
        return s


class JournalHandler(logging.Handler):
    """Sends records to journald with the UPPER_CASE ``extra`` fields as journal fields
    (MODEL=, EVENT=, DURATION_S=, ...), so ``journalctl MODEL=m1`` finds a model's events.
    MESSAGE and every field are escaped like the stderr lines; a traceback goes into its own
    field, EXCEPTION_TEXT, with its line breaks.  A record's ``output`` lines follow its message in
    MESSAGE, each on its own indented line."""

    _PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def fields(self, record: logging.LogRecord) -> dict[str, str | int]:
        """What :meth:`emit` sends: MESSAGE and the journal fields, all escaped (CODE_LINE is
        an int: ``journal.send`` formats it as one)."""
        fields: dict[str, str | int] = {k: escape(str(v)) for k, v in record.__dict__.items() if k.isupper()}
        if record.exc_info:
            fields["EXCEPTION_TEXT"] = escape(logging.Formatter().formatException(record.exc_info),
                                              keep_newlines=True)
        fields.update(
            MESSAGE=escape(record.getMessage()) + _output(record),
            PRIORITY=str(self._PRIORITY.get(record.levelno, 6)),
            LOGGER=escape(record.name), SYSLOG_IDENTIFIER="llmuxd", CODE_FILE=record.pathname,
            CODE_LINE=record.lineno, CODE_FUNC=record.funcName,
        )
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        from systemd import journal

        try:
            fields = self.fields(record)
            journal.send(fields.pop("MESSAGE"), **fields)
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
        handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        where = "stderr"
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return where
