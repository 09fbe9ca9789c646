"""Log lines cannot be forged: what clients control (a model name, a request path, a D-Bus
sender) reaches the log only with its control characters escaped, on stderr and in the journal."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from llmuxd import log as llog

HOSTILE = "m1\r\n2030-01-01 00:00:00,000 INFO llmuxd.switcher: forged\x1b[2J\x07\u2028x\u202e\x00"


def _record(msg: str, *args, exc: bool = False, **extra) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError(f"bad model {HOSTILE}")
        except ValueError:
            exc_info = sys.exc_info()
    rec = logging.LogRecord("llmuxd.test", logging.WARNING, __file__, 10, msg, args, exc_info)
    rec.__dict__.update(extra)
    return rec


def test_escape():
    assert llog.escape("a\r\nb\tc\x1b[31md\x7f\x85e\u2028f\u202eg") == \
        "a\\r\\nb\\tc\\x1b[31md\\x7f\\x85e\\u2028f\\u202eg"
    assert llog.escape("a\nb\r\x1b", keep_newlines=True) == "a\nb\\r\\x1b"
    assert llog.escape("plain text, üñíçødé, \\ and quotes \"'") == "plain text, üñíçødé, \\ and quotes \"'"


def test_stderr_lines_cannot_be_forged():
    fmt = llog.SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = fmt.format(_record("unknown model %s", HOSTILE))
    assert "\n" not in out and "\r" not in out and "\x1b" not in out and "\x00" not in out
    assert out.endswith("unknown model m1\\r\\n2030-01-01 00:00:00,000 INFO llmuxd.switcher: forged"
                        "\\x1b[2J\\x07\\u2028x\\u202e\\x00")
    # A traceback keeps its lines, each indented: only the record's own line starts at column 0.
    out = fmt.format(_record("failed for %s", "m1", exc=True))
    lines = out.split("\n")
    assert len(lines) > 3 and lines[0].endswith("failed for m1")
    assert all(line.startswith("    ") for line in lines[1:]), lines
    assert "\r" not in out and "\x1b" not in out
    # The LF inside the exception's message stays a line break, but the "forged" line is indented.
    assert lines[-2:] == ["    ValueError: bad model m1\\r",
                          "    2030-01-01 00:00:00,000 INFO llmuxd.switcher: forged\\x1b[2J\\x07\\u2028x\\u202e\\x00"]


def test_setup_logging_uses_the_safe_formatter(monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        assert llog.setup_logging("INFO") == "stderr"
        (handler,) = root.handlers
        assert isinstance(handler.formatter, llog.SafeFormatter)
        buf = io.StringIO()
        handler.setStream(buf)
        logging.getLogger("llmuxd.test").warning("path %s", "/v1/x\r\nforged")
        assert buf.getvalue().count("\n") == 1 and "path /v1/x\\r\\nforged" in buf.getvalue()
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def test_journal_fields_are_escaped(monkeypatch):
    """Through python-systemd's own ``journal.send`` (only its socket write is replaced)."""
    journal = pytest.importorskip("systemd.journal")
    sent: list[tuple[str, ...]] = []
    monkeypatch.setattr(journal, "sendv", lambda *args: sent.append(args))
    handler = llog.JournalHandler()
    handler.emit(_record("refused %s", HOSTILE, exc=True, MODEL=HOSTILE, EVENT="state", DURATION_S="1.000"))
    (args,) = sent
    fields = dict(a.split("=", 1) for a in args)
    message = fields["MESSAGE"]
    assert message.startswith("refused m1\\r\\n2030") and "\n" not in message and "\x1b" not in message
    assert fields["MODEL"] == llog.escape(HOSTILE) and fields["EVENT"] == "state" and fields["DURATION_S"] == "1.000"
    assert fields["PRIORITY"] == "4" and fields["SYSLOG_IDENTIFIER"] == "llmuxd" and fields["LOGGER"] == "llmuxd.test"
    assert fields["CODE_LINE"] == "10" and fields["CODE_FILE"] == __file__
    exc = fields["EXCEPTION_TEXT"]
    assert exc.startswith("Traceback") and "\n" in exc and "\r" not in exc and "\x1b" not in exc
    assert not [a for a in args if "\x1b" in a or "\r" in a]


def test_a_models_output_follows_the_record_indented(monkeypatch):
    """The lines that explain a failure (``extra={"output": ...}``) come under the record's own
    line, each indented and escaped, on stderr and in the journal's MESSAGE: none can pass for a
    record of its own."""
    output = ["ERROR boom", HOSTILE]
    out = llog.SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s").format(
        _record("m1: cold start failed", output=output))
    lines = out.split("\n")
    assert lines[0].endswith("m1: cold start failed") and len(lines) == 3
    assert lines[1:] == ["    ERROR boom", "    " + llog.escape(HOSTILE)]
    journal = pytest.importorskip("systemd.journal")
    sent: list[tuple[str, ...]] = []
    monkeypatch.setattr(journal, "sendv", lambda *args: sent.append(args))
    llog.JournalHandler().emit(_record("m1: cold start failed", output=output))
    message = dict(a.split("=", 1) for a in sent[0])["MESSAGE"]
    assert message.split("\n") == ["m1: cold start failed", "    ERROR boom", "    " + llog.escape(HOSTILE)]
    assert "OUTPUT" not in dict(a.split("=", 1) for a in sent[0])
