"""``llmuxd prepare-restore``: the restore unit's job before the daemon starts, with its log
on stderr.  The work itself is :func:`llmuxd.checkpoint.prepare.prepare_restore`."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import prepare
from ..log import setup_logging


def prepare_restore(config_path: Path) -> int:
    setup_logging("INFO")
    return prepare.prepare_restore(config_path)
