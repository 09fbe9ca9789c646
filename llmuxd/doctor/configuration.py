"""The configuration as the doctor sees it: the file, loaded without failing
(:func:`load_for_doctor`; a missing file at the default path is no error), and whether each
model's checkpoint folder and the key file pass the trust rule
(:func:`checkpoint_trust_facts`).  Their judgement: :func:`config_checks`,
:func:`checkpoint_checks` (pure)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from .report import NO, OK, WARN, Check


def load_for_doctor(config_path: Path | str | None) -> tuple[Config | None, dict[str, Any]]:
    """(config or None, facts about it).  A missing file at the default path is not an error."""
    path = Path(config_path) if config_path is not None else DEFAULT_CONFIG_PATH
    info: dict[str, Any] = {"path": str(path), "loaded": False, "problems": [], "missing_default": False}
    if not path.exists() and path == DEFAULT_CONFIG_PATH:
        info["missing_default"] = True
        return None, info
    try:
        config = load_config(path)
    except ConfigError as e:
        info["problems"] = e.problems
        return None, info
    info["loaded"] = True
    info["models"] = {n: str(config.eviction_for(n)) for n in config.models}
    return config, info


def checkpoint_trust_facts(config: Config | None) -> dict[str, Any]:
    """Whether each model's checkpoint folder and the key file pass the trust rule."""
    from ..checkpoint.seal import Unauthenticated
    from ..checkpoint.store import Settings
    from ..checkpoint.trust import Untrusted

    if config is None:
        return {"folders": {}, "key": None}
    settings = Settings.of(config)
    folders = {}
    for name in config.models:
        try:
            settings.check(config.checkpoint_dir_for(name))
            folders[name] = ""
        except Untrusted as e:
            folders[name] = str(e)
    key = None
    if settings.key_file is not None:
        try:
            settings.key()
            key = ""
        except (Untrusted, Unauthenticated, OSError, ValueError) as e:
            key = str(e)
    return {"folders": folders, "key": key, "key_file": str(settings.key_file or "")}


def config_checks(config: Config | None, config_info: dict[str, Any] | None) -> list[Check]:
    """The config file: loaded, missing at the default path, or wrong (required)."""
    checks: list[Check] = []
    add = checks.append
    ci = config_info or {}
    if ci.get("problems"):
        add(Check("config", "config", NO, f"{ci['path']}: " + "; ".join(ci["problems"]),
                  "fix the file (`llmuxd check-config`)", required=True))
    elif ci.get("missing_default"):
        add(Check("config", "config", WARN, f"no {ci['path']}: judged with default settings and no models",
                  "pass --config PATH"))
    elif config is not None:
        ev = ", ".join(f"{n}={e}" for n, e in ci.get("models", {}).items())
        add(Check("config", "config", OK, f"{ci.get('path')}: {len(config.models)} model(s): {ev}"))
    return checks


def checkpoint_checks(facts: dict[str, Any], config: Config | None) -> list[Check]:
    """One line per model's checkpoint folder, and one for the key file if there is one."""
    checks: list[Check] = []
    add = checks.append
    tr = facts.get("trust") or {"folders": {}, "key": None}
    for name, problem in tr["folders"].items():
        add(Check("checkpoints", f"folder of {name}", WARN if problem else OK,
                  problem or f"{config.checkpoint_dir_for(name)}: owned by root, not writable by others"))
    if tr["key"] is not None:
        add(Check("checkpoints", "key file", NO if tr["key"] else OK,
                  tr["key"] or f"{tr['key_file']}: checkpoints carry an HMAC-SHA256 tag"))
    return checks
