"""``llmuxd prepare-restore``: the restore unit's job before the daemon starts, with its log
on stderr.  The work itself is :func:`llmuxd.checkpoint.prepare.prepare_restore`."""

from __future__ import annotations

from ..checkpoint import prepare
from ..config import Config
from ..log import setup_logging


def prepare_restore(config: Config) -> prepare.PrepareReport:
    setup_logging("INFO")
    return prepare.prepare_restore(config)
