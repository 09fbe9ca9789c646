"""Where a model's checkpoint lives and whether it is complete.

A checkpoint is a folder (the model's ``checkpoint_path``) holding the CRIU images, the files a
restore must put back, and ``manifest.json``.  It is written into a sibling temporary folder and
renamed into place as a whole, so a folder at ``checkpoint_path`` with a manifest is complete by
construction; partial dumps are left under ``<checkpoint_path>.partial-*`` and never used.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import Config

MANIFEST = "manifest.json"
IMAGES = "criu"  # the CRIU images
BLOBS = "files"  # saved files, by SHA-256
PARTIAL = ".partial-"
QUARANTINE = ".quarantine-"


@dataclass
class Found:
    model: str
    path: Path
    state: str  # "none" | "valid" | "invalid"
    detail: str
    manifest: dict | None = None


def partials(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + PARTIAL + "*")) if path.parent.is_dir() else []


def inspect(model: str, path: Path) -> Found:
    if not path.exists():
        return Found(model, path, "none", "no checkpoint")
    mf = path / MANIFEST
    try:
        manifest = json.loads(mf.read_text())
    except FileNotFoundError:
        return Found(model, path, "invalid", f"{mf} is missing: not a complete checkpoint")
    except (OSError, ValueError) as e:
        return Found(model, path, "invalid", f"{mf} is unreadable: {e}")
    if not isinstance(manifest, dict) or manifest.get("model") != model:
        return Found(model, path, "invalid", f"{mf} does not describe model {model!r}")
    if manifest.get("version") != 1:
        return Found(model, path, "invalid", f"{mf} has manifest version {manifest.get('version')!r}, not 1")
    return Found(model, path, "valid", f"checkpoint of {manifest.get('created', '?')}", manifest)


def discover(config: Config) -> dict[str, Found]:
    """The checkpoint state of every model (all models: a checkpoint may exist whatever the
    current policy says)."""
    return {name: inspect(name, config.checkpoint_dir_for(name)) for name in config.models}


def quarantine(path: Path) -> Path:
    """Move an unusable checkpoint aside (kept for inspection, never used again)."""
    dest = path.parent / f"{path.name}{QUARANTINE}{time.strftime('%Y%m%d-%H%M%S')}"
    os.rename(path, dest)
    return dest


def exchange(a: Path, b: Path) -> None:
    """Atomically swap two paths (renameat2 RENAME_EXCHANGE); b may not exist (plain rename)."""
    if not b.exists():
        os.rename(a, b)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(b))


def remove_partials(path: Path) -> list[Path]:
    gone = partials(path)
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone
