"""Putting back what a restore needs, and checking what cannot be put back.

``apply`` is idempotent and fast (a file already in place with the recorded size, mode and mtime
is left alone) — it runs in the restore unit before the daemon starts, and again in the daemon
right before ``criu restore``.  ``check`` compares everything else the manifest lists with this
container; ``preflight`` adds what only matters at the moment of the restore (ports, PIDs).
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from pathlib import Path

from ..config import ConfigError, load_config
from .fsview import container_epoch
from .manifest import copy_blob, elf_build_id, sha256_file
from .store import BLOBS, IMAGES, Found, discover, remove_partials

log = logging.getLogger(__name__)


class Unusable(Exception):
    """The checkpoint itself is damaged (missing or corrupt parts): quarantine it."""


def apply(found: Found) -> list[str]:
    """Put saved files, directories, socket directories and link-remap files in place.
    Returns what was done; raises Unusable when the checkpoint lacks a saved file."""
    m, blobs, done = found.manifest, found.path / BLOBS, []
    for d in m["dirs"]:
        if not os.path.isdir(d["path"]):
            os.makedirs(d["path"], mode=d["mode"], exist_ok=True)
            done.append(f"created directory {d['path']}")
    for rec in [*m["saved"], *m["link_remaps"]]:
        if not (blobs / rec["sha256"]).is_file():
            raise Unusable(f"saved copy of {rec['path']} is missing from the checkpoint")
        try:
            st = os.stat(rec["path"])
            if (st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (rec["size"], rec["mode"], rec["mtime_ns"]):
                continue
        except FileNotFoundError:
            pass
        copy_blob(blobs, rec)
        done.append(f"restored {rec['path']} ({rec['size']} bytes)")
    for rec in m["recreate"]:
        if not os.path.exists(rec["path"]):
            os.makedirs(os.path.dirname(rec["path"]), exist_ok=True)
            fd = os.open(rec["path"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, rec["mode"])
            os.close(fd)
            done.append(f"created empty {rec['path']}")
    for d in m["socket_dirs"]:
        if not os.path.isdir(d):
            os.makedirs(d, exist_ok=True)
            done.append(f"created socket directory {d}")
    for p in m["socket_paths"]:  # CRIU unlinks a stale socket, but fails on anything else there
        try:
            if not stat.S_ISSOCK(os.lstat(p).st_mode):
                os.unlink(p)
                done.append(f"removed non-socket {p} in a socket's way")
        except FileNotFoundError:
            pass
    return done


def check(found: Found, *, images: bool = True) -> list[str]:
    """What in this container differs from what the checkpoint needs (empty: nothing)."""
    m, problems = found.manifest, []
    for v in m["verify"]:
        path = v["path"]
        try:
            st = os.stat(path)
        except OSError:
            problems.append(f"{path} ({v['origin']}) is missing")
            continue
        if v["kind"] != "file":
            continue
        if st.st_size != v["size"] or stat.S_IMODE(st.st_mode) != v["mode"] or st.st_mtime_ns != v["mtime_ns"]:
            problems.append(f"{path} ({v['origin']}) differs: size {st.st_size} vs {v['size']}, mode "
                            f"{stat.S_IMODE(st.st_mode):o} vs {v['mode']:o}, mtime {st.st_mtime_ns} vs {v['mtime_ns']}")
        elif v.get("build_id") and elf_build_id(path) not in (None, v["build_id"]):
            problems.append(f"{path} ({v['origin']}) has another build-id")
    if images:
        problems += check_images(found)
    return problems


def check_images(found: Found) -> list[str]:
    """Every image file present with its recorded size and SHA-256."""
    problems, d = [], found.path / IMAGES
    for name, rec in found.manifest["images"].items():
        p = d / name
        try:
            size = p.stat().st_size
        except OSError:
            problems.append(f"image {name} is missing")
            continue
        if size != rec["size"]:
            problems.append(f"image {name} is {size} bytes, {rec['size']} recorded (truncated?)")
        elif sha256_file(p) != rec["sha256"]:
            problems.append(f"image {name} is corrupt (SHA-256 differs)")
    return problems


def preflight(found: Found) -> list[str]:
    m, problems = found.manifest, []
    for lst in m["listen"]:
        if lst["proto"] != "tcp":
            continue
        fam = socket.AF_INET6 if ":" in lst["addr"] else socket.AF_INET
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((lst["addr"], lst["port"]))
            except OSError:
                problems.append(f"port {lst['addr']}:{lst['port']} is in use")
    if not m["pidns"] and not m.get("own_pidns"):  # in the container's PID namespace: every PID must be free
        taken = [p for p in m["pids"] if os.path.exists(f"/proc/{p}")]
        if taken:
            problems.append(f"PIDs {taken[:8]} of the checkpoint are taken")
    return problems


def prepare_restore(config_path: Path) -> int:
    """The restore unit's job: for every model, clean up unfinished dumps, put back what a
    restore needs, report what cannot be used.  Never fails the boot: models whose checkpoint
    is unusable cold-start."""
    try:
        config = load_config(config_path)
    except ConfigError as e:
        log.error("%s", e.render())
        return 1
    container_epoch()  # the restore unit runs first in a new container: mark when it started
    unusable = 0
    for name, found in discover(config).items():
        fields = {"MODEL": name, "EVENT": "prepare_restore"}
        for leftover in remove_partials(found.path):
            log.warning("%s: removed the leftover of an unfinished dump: %s", name, leftover, extra=fields)
        if found.state == "none":
            log.info("%s: no checkpoint at %s", name, found.path, extra=fields)
            continue
        if found.state == "valid":
            try:
                for action in apply(found):
                    log.info("%s: %s", name, action, extra=fields)
                problems = check(found, images=False)
            except (Unusable, OSError) as e:
                problems = [str(e)]
            if not problems:
                log.info("%s: %s at %s is ready to restore", name, found.detail, found.path, extra=fields)
                continue
            found.detail = "; ".join(problems)
        unusable += 1
        log.warning("%s: checkpoint at %s cannot be used here: %s; the model will cold-start", name,
                    found.path, found.detail, extra=fields)
    log.info("prepare-restore: %d model(s) checked, %d checkpoint(s) not usable here", len(config.models),
             unusable, extra={"EVENT": "prepare_restore"})
    return 0
