"""Where a model's checkpoint lives, whether it can be trusted, and whether it is complete.

A checkpoint is a folder (the model's ``checkpoint_path``) holding the CRIU images (``criu/``),
the files a restore must put back (``files/<blake3>``), ``manifest.json`` and, when
``checkpoint.key_file`` is set, ``manifest.mac``.  It is written into a private sibling folder
(``<checkpoint_path>.partial-<random>``, 0700) and renamed into place as a whole, so a folder at
``checkpoint_path`` with a manifest is complete by construction; partial dumps are never used.

:func:`inspect` is the one reader: trust of the folder (see :mod:`.trust`), then the tag (with a
key), then the typed manifest (:mod:`.model`).  Its answer says what may be done with it:
``valid`` (restore it), ``invalid`` (ours and damaged: may be quarantined), ``refused`` (not
provably ours: left exactly as it is) or ``none``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..config import CheckpointConfig, Config
from . import safefs, seal
from .durable import fsync_dir
from .model import MAX_BYTES, Manifest, ManifestError, decode, encode
from .trust import Untrusted, base_for, check_inside, check_tree, normalized, owners

MANIFEST = "manifest.json"
MAC = "manifest.mac"
IMAGES = "criu"  # the CRIU images
BLOBS = "files"  # saved files, by BLAKE3
PARTIAL = ".partial-"
QUARANTINE = ".quarantine-"
CONTENTS = {MANIFEST: False, MAC: False, IMAGES: True, BLOBS: True}  # name -> is a directory


@dataclass(frozen=True)
class Settings:
    """The checkpoint settings every use of a checkpoint folder applies."""

    images_dir: Path
    key_file: Path | None = None
    dump_timeout: float = 600.0
    restore_timeout: float = 300.0

    @classmethod
    def of(cls, config: Config) -> Settings:
        ck = config.checkpoint or CheckpointConfig()
        return cls(Path(ck.images_dir), Path(ck.key_file) if ck.key_file else None, ck.dump_timeout_secs,
                   ck.restore_timeout_secs)

    def key(self) -> bytes | None:
        return seal.load_key(self.key_file) if self.key_file else None

    def check(self, path: Path) -> None:
        """The folder ``path`` (if it exists) and every folder above it."""
        check_tree(path, base_for(path, self.images_dir))

    def check_parent(self, path: Path) -> None:
        """The folders above ``path`` (where its partial and quarantined siblings live)."""
        check_tree(normalized(path).parent, base_for(path, self.images_dir))


State = Literal["none", "valid", "invalid", "refused"]


@dataclass
class Found:
    model: str | None
    path: Path
    state: State
    detail: str
    manifest: Manifest | None = None
    reason: str = ""  # the llmuxd_restore_failures_total{reason} label when not valid


def _read(path: Path, limit: int = MAX_BYTES) -> bytes:
    fd, st = safefs.open_regular(str(path))
    try:
        if st.st_size > limit:
            raise ManifestError(f"{path} is {st.st_size} bytes, more than {limit}")
        parts, n = [], 0
        while n <= limit and (chunk := os.read(fd, min(1 << 20, limit + 1 - n))):
            parts.append(chunk)
            n += len(chunk)
        if n > limit:
            raise ManifestError(f"{path} grew past {limit} bytes")
        return b"".join(parts)
    finally:
        os.close(fd)


def inspect(model: str | None, path: Path, settings: Settings) -> Found:
    """What the folder at ``path`` is, for ``model`` (None: any model)."""
    path = normalized(path)
    try:
        os.lstat(path)
    except FileNotFoundError:
        return Found(model, path, "none", "no checkpoint")
    except OSError as e:
        return Found(model, path, "refused", f"{path} cannot be examined: {e.strerror}", reason="untrusted")
    try:
        settings.check(path)
        check_inside(path, CONTENTS)
        key = settings.key()
    except Untrusted as e:
        return Found(model, path, "refused", str(e), reason="untrusted")
    try:
        data = _read(path / MANIFEST)
    except FileNotFoundError:
        return Found(model, path, "invalid", f"{path / MANIFEST} is missing: not a complete checkpoint",
                     reason="incomplete")
    except (OSError, safefs.Unsafe, ManifestError) as e:
        return Found(model, path, "invalid", f"{path / MANIFEST} is unreadable: {e}", reason="invalid_manifest")
    if key is not None:
        try:
            try:
                stored = _read(path / MAC, 4096)
            except FileNotFoundError:
                stored = None
            seal.verify(key, data, stored)
        except (seal.Unauthenticated, OSError, safefs.Unsafe, ManifestError) as e:
            return Found(model, path, "refused", f"{path}: {e}", reason="unauthenticated")
    try:
        manifest = decode(data)
    except ManifestError as e:
        return Found(model, path, "invalid", f"{path / MANIFEST}: {e}", reason="invalid_manifest")
    if model is not None and manifest.model != model:
        return Found(model, path, "invalid", f"{path / MANIFEST} describes model {manifest.model!r}, not {model!r}",
                     reason="invalid_manifest")
    return Found(model, path, "valid", f"checkpoint of {manifest.created}", manifest)


def _ours(p: Path) -> bool:
    """A folder llmuxd made: a real directory owned by root (or us)."""
    try:
        st = os.lstat(p)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid in owners()


def partials(path: Path) -> list[Path]:
    path = normalized(path)
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    return sorted(path.parent / n for n in names if n.startswith(path.name + PARTIAL))


def remove_partials(path: Path, settings: Settings) -> list[Path]:
    """Remove what unfinished dumps left next to ``path``: only in a trusted folder, only
    folders of our own."""
    try:
        settings.check_parent(path)
    except Untrusted:
        return []
    gone = [p for p in partials(path) if _ours(p)]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def new_partial(path: Path, settings: Settings) -> Path:
    """A fresh private (0700) folder next to ``path`` for a dump; the folders above it are
    created 0700 where missing.  Untrusted when they (or ``path``) fail the rule."""
    path = normalized(path)
    settings.check_parent(path)
    settings.check(path)
    fd = safefs.open_dir(str(path.parent), create=0o700)
    try:
        name = f"{path.name}{PARTIAL}{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(8)}"
        os.mkdir(name, 0o700, dir_fd=fd)
        os.chmod(name, 0o700, dir_fd=fd)
    finally:
        os.close(fd)
    return path.parent / name


def write_manifest(folder: Path, manifest: Manifest, key: bytes | None) -> None:
    """``manifest.json`` (and ``manifest.mac`` with a key) in ``folder``, each file fsynced, then
    the folder: what the folder holds is on disk before it is exchanged into place."""
    data = encode(manifest)
    files = {MANIFEST: data, **({MAC: (seal.tag(key, data) + "\n").encode()} if key is not None else {})}
    for name, content in files.items():
        fd = os.open(folder / name, safefs.NEW_FILE_FLAGS, 0o600)
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(folder)


def quarantine(path: Path, settings: Settings) -> Path:
    """Move an unusable checkpoint of our own aside (kept for inspection, never used again)."""
    path = normalized(path)
    settings.check(path)
    settings.check_parent(path)
    dest = path.parent / f"{path.name}{QUARANTINE}{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
    _renameat2(path, dest, 1)  # RENAME_NOREPLACE
    return dest


def discard(path: Path, settings: Settings) -> bool:
    """Remove a checkpoint of our own; a folder that fails the rule is left alone.  The folder is
    renamed aside at once (a partial name: no longer a checkpoint, and removed at the next start
    if this process ends first), then removed on a thread of its own: gigabytes of images are
    not removed on the way to serving."""
    path = normalized(path)
    try:
        settings.check(path)
    except Untrusted:
        return False
    if _ours(path):
        aside = path.parent / f"{path.name}{PARTIAL}discarded-{secrets.token_hex(8)}"
        try:
            os.rename(path, aside)
        except OSError:
            aside = path
        threading.Thread(target=shutil.rmtree, args=(aside,), kwargs={"ignore_errors": True},
                         name="llmuxd-discard", daemon=True).start()
    return True


def exchange(a: Path, b: Path) -> None:
    """Atomically swap two paths (renameat2 RENAME_EXCHANGE); b may not exist (plain rename)."""
    if not os.path.lexists(b):
        _renameat2(a, b, 1)
    else:
        _renameat2(a, b, 2)


def _renameat2(a: Path, b: Path, flags: int) -> None:
    """renameat2; RENAME_NOREPLACE (1) falls back to a checked rename where the filesystem lacks it."""
    libc = ctypes.CDLL(None, use_errno=True)
    AT_FDCWD = -100
    if libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), flags) != 0:
        e = ctypes.get_errno()
        if flags == 1 and e in (errno.EINVAL, errno.ENOSYS) and not os.path.lexists(b):
            os.rename(a, b)
            return
        raise OSError(e, os.strerror(e), str(b))
