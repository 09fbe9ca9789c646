"""``llmuxd prepare-restore``: run by the restore unit before the daemon starts.

It checks the config and every model's checkpoint folder, removes leftovers of dumps that never
finished, and reports what it found.  It never stops the daemon from starting: models whose
checkpoint cannot be used cold-start instead."""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import ConfigError, load_config
from .store import discover, remove_partials

log = logging.getLogger(__name__)


def prepare_restore(config_path: Path) -> int:
    try:
        config = load_config(config_path)
    except ConfigError as e:
        log.error("%s", e.render())
        return 1
    problems = 0
    for name, found in discover(config).items():
        fields = {"MODEL": name, "EVENT": "prepare_restore"}
        for leftover in remove_partials(found.path):
            log.warning("%s: removed the leftover of an unfinished dump: %s", name, leftover, extra=fields)
        if found.state == "valid":
            log.info("%s: %s at %s", name, found.detail, found.path, extra=fields)
        elif found.state == "invalid":
            problems += 1
            log.warning("%s: unusable checkpoint at %s: %s; the model will cold-start", name, found.path,
                        found.detail, extra=fields)
        else:
            log.info("%s: no checkpoint at %s", name, found.path, extra=fields)
    log.info("prepare-restore: %d model(s) checked, %d unusable checkpoint(s)", len(config.models), problems,
             extra={"EVENT": "prepare_restore"})
    return 0
