"""Putting back what a restore needs, and checking what cannot be put back.

``apply`` is idempotent and fast (a file already in place with the recorded size, mode, mtime
and owner is left alone) — it runs in the restore unit before the daemon starts, and again in
the daemon right before ``criu restore``.  It is confined (:mod:`.safefs`): the manifest is
untrusted input even from a trusted folder, so no link is followed, blobs must be regular files
hashing to their name, and nothing is removed that llmuxd did not put there.  ``check`` compares everything else the manifest lists with this
container; ``preflight`` adds what only matters at the moment of the restore (ports, PIDs).
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pydantic import BaseModel

from ..config import Config
from . import digest, remaps, safefs
from .fsview import container_epoch
from .manifest import elf_build_id
from .model import SavedFile
from .store import BLOBS, IMAGES, Found, Settings, inspect, remove_partials
from .trust import Untrusted, check_owned

log = logging.getLogger(__name__)


class Unusable(Exception):
    """The checkpoint itself is damaged (missing or corrupt parts): quarantine it."""


@dataclass
class Prepared:
    done: list[str] = field(default_factory=list)  # what was done, for the log
    placed: list[str] = field(default_factory=list)  # saved files now in place as our copies


def _in_place(rec: SavedFile) -> bool:
    st = safefs.lstat(rec.path)
    return st is not None and stat.S_ISREG(st.st_mode) and (
        st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime_ns, st.st_uid, st.st_gid
    ) == (rec.size, rec.mode & safefs.PERM, rec.mtime_ns, rec.uid, rec.gid)


def _blob_present(rec: SavedFile, blobs: int) -> None:
    try:
        st = os.stat(rec.blake3, dir_fd=blobs, follow_symlinks=False)
    except FileNotFoundError:
        raise Unusable(f"saved copy of {rec.path} is missing from the checkpoint") from None
    if not stat.S_ISREG(st.st_mode):
        raise Unusable(f"saved copy of {rec.path} (files/{rec.blake3}) is not a regular file")


def _put_back(rec: SavedFile, blobs: int, mark: Callable[[int], object] | None) -> None:
    try:
        src, st = safefs.open_regular(rec.blake3, blobs)
    except FileNotFoundError:
        raise Unusable(f"saved copy of {rec.path} is missing from the checkpoint") from None
    except safefs.Unsafe:
        raise Unusable(f"saved copy of {rec.path} (files/{rec.blake3}) is not a regular file") from None
    try:
        try:
            check_owned(Path(BLOBS) / rec.blake3, st, directory=False)
        except Untrusted as e:
            raise Unusable(f"saved copy of {rec.path}: {e}") from None
        if st.st_size != rec.size:
            raise Unusable(f"saved copy of {rec.path} is {st.st_size} bytes, {rec.size} recorded")
        try:
            safefs.put_file(rec.path, src, size=rec.size, blake3=rec.blake3, mode=rec.mode, uid=rec.uid,
                            gid=rec.gid, atime_ns=rec.atime_ns, mtime_ns=rec.mtime_ns,
                            marked=mark)
        except safefs.DigestMismatch as e:
            raise Unusable(str(e)) from None
    finally:
        os.close(src)


def apply(found: Found, placed: list[str] | None = None) -> Prepared:
    """Put saved files, directories, socket directories and link-remap files in place, confined
    (see :mod:`.safefs`).  Raises Unusable when the checkpoint lacks a saved file or holds a bad
    one, safefs.Unsafe or OSError when this container is in the way.  ``placed`` (also when it
    raises) lists the saved files that are in place as our copies."""
    m, out = found.manifest, Prepared(placed=placed if placed is not None else [])
    assert m is not None
    for d in m.dirs:
        if safefs.make_dir(d.path, mode=d.mode, uid=d.uid, gid=d.gid):
            out.done.append(f"created directory {d.path}")
    if m.blobs():
        try:
            blobs = safefs.open_dir(str(found.path / BLOBS))
        except (FileNotFoundError, safefs.Unsafe):
            raise Unusable(f"{found.path / BLOBS} is missing or not a directory") from None
        transient = {r.path for r in m.transient()}
        try:
            for rec in m.blobs():
                _blob_present(rec, blobs)  # a complete checkpoint, even where the file is in place
                if not _in_place(rec):
                    _put_back(rec, blobs, (lambda fd: remaps.mark(fd, m.port)) if rec.path in transient else None)
                    out.done.append(f"restored {rec.path} ({rec.size} bytes)")
                out.placed.append(rec.path)
        finally:
            os.close(blobs)
    for r in m.recreate:
        if safefs.create_empty(r.path, mode=r.mode, uid=r.uid, gid=r.gid):
            out.done.append(f"created empty {r.path}")
    for d in m.socket_dirs:
        if safefs.make_dir(d):
            out.done.append(f"created socket directory {d}")
    for p in m.socket_paths:  # CRIU replaces a stale socket, but fails on anything else there
        st = safefs.lstat(p)
        if st is not None and not stat.S_ISSOCK(st.st_mode):
            raise safefs.Unsafe(f"{p} is in the way of a unix socket the checkpoint binds (llmuxd does not "
                                "remove what it did not make)")
    return out


def check(found: Found, *, images: bool = True) -> list[str]:
    """What in this container differs from what the checkpoint needs (empty: nothing)."""
    m, problems = found.manifest, []
    assert m is not None
    for v in m.verify:
        try:
            st = os.stat(v.path)
        except OSError:
            problems.append(f"{v.path} ({v.origin}) is missing")
            continue
        if v.kind != "file":
            continue
        if (st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime_ns) != (v.size, v.mode, v.mtime_ns):
            problems.append(f"{v.path} ({v.origin}) differs: size {st.st_size} vs {v.size}, mode "
                            f"{stat.S_IMODE(st.st_mode):o} vs {v.mode or 0:o}, mtime {st.st_mtime_ns} vs {v.mtime_ns}")
        elif v.build_id and stat.S_ISREG(st.st_mode) and elf_build_id(v.path) not in (None, v.build_id):
            problems.append(f"{v.path} ({v.origin}) has another build-id")
    if images:
        problems += check_images(found)
    return problems


def check_images(found: Found, digester: digest.Digester | None = None) -> list[str]:
    """Every image present with its recorded size and BLAKE3, read without following links
    (several images at a time); nothing else CRIU could read in the images folder (no unlisted
    image, no link, FIFO or device, nothing writable by others)."""
    m, d = found.manifest, found.path / IMAGES
    assert m is not None
    try:
        dfd = safefs.open_dir(str(d))
    except (OSError, safefs.Unsafe) as e:
        return [f"{d} is missing or not a directory ({e})"]
    problems = []
    own = digester is None
    digester = digester or digest.Digester()
    try:
        for name in sorted(os.listdir(dfd)):
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            try:
                check_owned(d / name, st, directory=False)
            except Untrusted as e:
                problems.append(f"images folder entry {name}: {e.why}")
                continue
            if name.endswith(".img") and name not in m.images:
                problems.append(f"image {name} is not listed in the manifest")
        largest_first = sorted(m.images.items(), key=lambda item: -item[1].size)
        for found_problems in digester.map(lambda item: _check_image(dfd, item[0], item[1].size, item[1].blake3,
                                                                     digester), largest_first):
            problems += found_problems
    finally:
        os.close(dfd)
        if own:
            digester.close()
    return problems


def _check_image(dfd: int, name: str, size: int, blake3: str, digester: digest.Digester) -> list[str]:
    try:
        fd, st = safefs.open_regular(name, dfd)
    except FileNotFoundError:
        return [f"image {name} is missing"]
    except (OSError, safefs.Unsafe):
        return [f"image {name} is not a regular file"]
    try:
        if st.st_size != size:
            return [f"image {name} is {st.st_size} bytes, {size} recorded (truncated?)"]
        try:
            got = digester.hash_fd(fd, size)
        except OSError as e:
            return [f"image {name} cannot be read ({e.strerror or e})"]
        if os.fstat(fd).st_size != size:
            return [f"image {name} changed while it was verified"]
    finally:
        os.close(fd)
    return [] if got == blake3 else [f"image {name} is corrupt ({digest.ALGORITHM} differs)"]


def preflight(found: Found) -> list[str]:
    m, problems = found.manifest, []
    assert m is not None
    for lst in m.listen:
        if lst.proto != "tcp":
            continue
        fam = socket.AF_INET6 if ":" in lst.addr else socket.AF_INET
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((lst.addr, lst.port))
            except OSError:
                problems.append(f"port {lst.addr}:{lst.port} is in use")
    if not m.pidns and not m.own_pidns:  # in the container's PID namespace: every PID must be free
        taken = [p for p in m.pids if os.path.exists(f"/proc/{p}")]
        if taken:
            problems.append(f"PIDs {taken[:8]} of the checkpoint are taken")
    return problems


class ModelPrepared(BaseModel):
    """What ``prepare-restore`` found for one model (``--json`` prints the list)."""

    model: str
    path: str
    usable: bool  # no checkpoint, or one ready to restore; False: the model will cold-start
    detail: str = ""  # why it is not usable


class PrepareReport(BaseModel):
    """What ``prepare-restore`` found, model by model (``--json``; the log says it too)."""

    models: list[ModelPrepared]


def prepare_restore(config: Config) -> PrepareReport:
    """The restore unit's job: for every model, clean up unfinished dumps, put back what a
    restore needs, report what cannot be used.  Never fails the boot: models whose checkpoint
    is unusable cold-start."""
    container_epoch()  # the restore unit runs first in a new container: mark when it started
    settings = Settings.of(config)
    out = []
    for name in config.models:
        fields = {"MODEL": name, "EVENT": "prepare_restore"}
        try:
            ok, path, detail = _prepare_one(name, config.checkpoint_dir_for(name), settings, fields)
        except Exception as e:  # noqa: BLE001 - one model's checkpoint never stops the others
            ok, path, detail = False, config.checkpoint_dir_for(name), f"{type(e).__name__}: {e}"
        if not ok:
            log.warning("%s: checkpoint at %s cannot be used here: %s; the model will cold-start", name, path,
                        detail, extra=fields)
        out.append(ModelPrepared(model=name, path=str(path), usable=ok, detail=detail))
    log.info("prepare-restore: %d model(s) checked, %d checkpoint(s) not usable here", len(config.models),
             sum(not p.usable for p in out), extra={"EVENT": "prepare_restore"})
    return PrepareReport(models=out)


def _prepare_one(name: str, path: Path, settings: Settings, fields: dict) -> tuple[bool, Path, str]:
    for leftover in remove_partials(path, settings):
        log.warning("%s: removed the leftover of an unfinished dump: %s", name, leftover, extra=fields)
    found = inspect(name, path, settings)
    if found.state == "none":
        log.info("%s: no checkpoint at %s", name, found.path, extra=fields)
        return True, found.path, ""
    if found.state != "valid":
        return False, found.path, found.detail
    try:
        for action in apply(found).done:
            log.info("%s: %s", name, action, extra=fields)
        problems = check(found, images=False)
    except (Unusable, safefs.Unsafe, OSError) as e:
        problems = [str(e)]
    if problems:
        return False, found.path, "; ".join(problems)
    log.info("%s: %s at %s is ready to restore", name, found.detail, found.path, extra=fields)
    return True, found.path, ""
