"""The manifest kept with a checkpoint: everything a restore needs from the filesystem, derived
from the CRIU images (never from a list of paths), and the bytes of what a new container lacks.

Built right after ``criu dump`` while the dumped filesystem is still as the tree left it:

* every file the tree had open or mapped, every cwd, the exe of each process — classified by
  :class:`FsView` as shared / runtime / image / system:
    runtime files are saved byte-exact (``files/<blake3>``, holes kept as holes) with mode, owner
    and timestamps;
    runtime files opened O_WRONLY|O_APPEND (logs) are only re-created (CRIU does not check
    their size, and their old content is of no use to the process);
    image and shared files are recorded for a cheap check (size, mode, mtime, ELF build-id);
* the directories that bound unix sockets need (CRIU re-creates the sockets themselves);
* the ``link_remap.N`` files CRIU made (a restore consumes them: their bytes are saved);
* listening ports, PIDs and thread IDs, whether the tree has its own PID namespace;
* every image file's size and BLAKE3 digest (:mod:`.digest`), so corruption is caught before a
  restore is attempted;
* what the daemon knows of the model (:class:`DumpFacts`): its argv with secrets redacted, never
  its environment.

The result is the typed :class:`~.model.Manifest`, validated by the same contract that reads it
back; saved files are read without following a link and stored 0600 under their digest.
Everything written is fsynced (files, then their folders) instead of a machine-wide sync.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import redact
from . import digest, durable, safefs
from .fsview import FsView
from .images import ImageError, ImageNeeds
from .model import VERSION, Manifest, ManifestError, decode, is_path, is_target


@dataclass
class DumpFacts:
    """What the daemon knows about the dumped model, recorded in the manifest."""

    model: str
    eviction: str
    served_name: str
    port: int
    argv: list[str]
    canary: str | None
    sleep_level: int | None
    own_pidns: bool = False
    cuda: dict | None = None  # cuda.gpu_inventory()
    cuda_pids: list[int] = field(default_factory=list)
    cuda_bytes: dict[str, int] = field(default_factory=dict)


def digest_images(images_dir: Path, digester: digest.Digester,
                  growing: digest.Growing | None = None) -> dict[str, dict]:
    """Make what CRIU wrote in ``images_dir`` part of the checkpoint: every regular file there
    made 0600, hashed when it is an image (``*.img``: recorded with its size and BLAKE3) and
    fsynced — several files at a time, the largest first (it bounds the time), each file's
    writeback started before it is hashed so the disk works meanwhile — then the folder
    itself fsynced.  An image hashed while CRIU wrote it (``growing``) is only hashed on from
    where that stopped.  Returns the images' records by name."""
    dfd = os.open(images_dir, safefs.DIR_FLAGS)
    try:
        entries = []
        for name in os.listdir(dfd):
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                entries.append((st.st_size, name))
        entries.sort(reverse=True)

        def one(entry: tuple[int, str]) -> tuple[str, dict | None]:
            name = entry[1]
            fd, st = safefs.open_regular(name, dfd)
            try:
                durable.start_writeback(fd)
                os.fchmod(fd, 0o600)
                rec = None
                if name.endswith(".img"):
                    begun = growing.finish(fd, name, st, digester) if growing is not None else None
                    rec = {"size": st.st_size, "blake3": begun or digester.hash_fd(fd, st.st_size)}
                    if os.fstat(fd).st_size != st.st_size:
                        raise ImageError(f"{images_dir / name} changed while it was hashed")
                os.fsync(fd)
                return name, rec
            finally:
                os.close(fd)

        records = dict(digester.map(one, entries))
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return {name: rec for name, rec in sorted(records.items()) if rec is not None}


def elf_build_id(path: str) -> str | None:
    """The GNU build-id of an ELF file (hex), as CRIU records it; None for other files."""
    import struct

    try:
        with open(path, "rb") as f:
            ident = f.read(64)
            if ident[:4] != b"\x7fELF" or ident[4] != 2:  # 64-bit only (what CRIU checks here)
                return None
            end = "<" if ident[5] == 1 else ">"
            phoff, = struct.unpack_from(end + "Q", ident, 32)
            phentsize, phnum = struct.unpack_from(end + "HH", ident, 54)
            for i in range(phnum):
                f.seek(phoff + i * phentsize)
                p_type, _, p_offset, _, _, p_filesz = struct.unpack(end + "IIQQQQ", f.read(40))
                if p_type != 4:  # PT_NOTE
                    continue
                f.seek(p_offset)
                notes, pos = f.read(p_filesz), 0
                while pos + 12 <= len(notes):
                    namesz, descsz, ntype = struct.unpack_from(end + "III", notes, pos)
                    pos += 12
                    name = notes[pos:pos + namesz]
                    pos += (namesz + 3) & ~3
                    desc = notes[pos:pos + descsz]
                    pos += (descsz + 3) & ~3
                    if ntype == 3 and name.rstrip(b"\0") == b"GNU":
                        return desc.hex()
    except (OSError, struct.error):
        return None
    return None


def _meta(st: os.stat_result) -> dict:
    return {"mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
            "atime_ns": st.st_atime_ns, "mtime_ns": st.st_mtime_ns, "size": st.st_size}


def _save(path: str, blobs: int, digester: digest.Digester | None) -> dict:
    """Copy a file into the blob store (content-addressed by BLAKE3, 0600, fsynced; holes stay
    holes); returns its record.  The file is opened without following a link at its last
    component and must be a regular file."""
    src, st = safefs.open_regular(path)
    try:
        tmp = f".in-{secrets.token_hex(16)}"
        out = os.open(tmp, safefs.NEW_FILE_FLAGS, 0o600, dir_fd=blobs)
        try:
            try:
                name = safefs.copy_hashing(src, out, st.st_size, digester)
                os.fchmod(out, 0o600)
                os.fsync(out)
            finally:
                os.close(out)
            os.rename(tmp, name, src_dir_fd=blobs, dst_dir_fd=blobs)
        except BaseException:
            os.unlink(tmp, dir_fd=blobs)
            raise
    finally:
        os.close(src)
    return {"path": path, "blake3": name, **_meta(st)}


def _each(fn: Callable, items: list) -> list:
    return [fn(x) for x in items]


def build(needs: ImageNeeds, images: Callable[[], dict[str, dict]], blobs_dir: Path, view: FsView,
          facts: DumpFacts, digester: digest.Digester | None = None) -> Manifest:
    """Classify what the images need, save what a new container lacks (``blobs_dir`` fsynced
    once they are in it), and return the manifest (validated by the same contract that reads it
    back).  ``images()`` gives the images' records (:func:`digest_images`, which may run
    meanwhile: it is called last)."""
    os.mkdir(blobs_dir, 0o700)
    blobs = os.open(blobs_dir, safefs.DIR_FLAGS)
    try:
        m = _build(needs, images, blobs, view, facts, digester)
        os.fsync(blobs)
        return m
    finally:
        os.close(blobs)


def _build(needs: ImageNeeds, images_of: Callable[[], dict[str, dict]], blobs: int, view: FsView,
           facts: DumpFacts, digester: digest.Digester | None) -> Manifest:
    to_save, recreate, verify, dirs, problems = [], [], [], [], []
    for f in needs.needed_files():
        if not is_path(f.path):
            problems.append(f"{f.path!r}: not a normalized absolute path, not recorded")
            continue
        try:
            st = os.stat(f.path)
        except OSError as e:
            problems.append(f"{f.path}: {e.strerror} at dump time")
            continue
        origin = view.origin(f.path, st)
        if not is_target(f.path):  # "/", /proc, /sys, /dev: never written by a restore
            verify.append({"path": f.path, "origin": "system", "kind": "exists"})
        elif stat.S_ISDIR(st.st_mode):
            dirs.append({"path": f.path, "origin": origin, **_meta(st)})
        elif not stat.S_ISREG(st.st_mode) or origin == "system":
            verify.append({"path": f.path, "origin": "system", "kind": "exists"})
        elif f.append_only:  # a log: CRIU checks neither its size nor its content
            if origin == "runtime":
                recreate.append({"path": f.path, **_meta(st), "size": 0})
            else:
                verify.append({"path": f.path, "origin": origin, "kind": "exists"})
        elif origin == "runtime":
            to_save.append(f)
        else:
            verify.append({"path": f.path, "origin": origin, "kind": "file", "size": st.st_size,
                           "mode": stat.S_IMODE(st.st_mode), "mtime_ns": st.st_mtime_ns,
                           "build_id": f.build_id or (elf_build_id(f.path) if "mmap" in f.kinds or "exe" in f.kinds else None)})
    remapped = [r.link_path for r in needs.remaps
                if r.type == "linked" and r.link_path and is_target(r.link_path) and os.path.exists(r.link_path)]
    paths = [f.path for f in to_save] + remapped  # saved several at a time (each file's chunks in order)
    records = (digester.map if digester is not None else _each)(lambda p: _save(p, blobs, digester), paths)
    saved = [{**rec, "kinds": f.kinds} for rec, f in zip(records, to_save)]
    link_remaps = records[len(to_save):]
    sockets = [s.path for s in needs.unix_sockets if not s.deleted and is_target(s.path)]
    socket_dirs = sorted({os.path.dirname(p) for p in sockets} - {"/"})
    pids = sorted({t for p in needs.processes for t in [p.pid, *p.threads]})
    images = images_of()
    record = {
        "version": VERSION,
        "model": facts.model,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "created_ts": time.time(),
        "host": {"kernel": platform.release(), "machine": platform.machine()},
        "epoch": view.epoch,
        "pidns": needs.pidns,
        "own_pidns": facts.own_pidns,
        "pids": pids,
        "listen": [{"addr": s.local_addr, "port": s.local_port, "proto": s.proto} for s in needs.listening()],
        "saved": saved,
        "recreate": recreate,
        "dirs": dirs,
        "socket_dirs": socket_dirs,
        "socket_paths": sorted(set(sockets)),
        "link_remaps": link_remaps,
        "verify": verify,
        "images": images,
        "dump_problems": problems,
        "needs": needs.to_dict(),
        "eviction": facts.eviction,
        "served_name": facts.served_name,
        "port": facts.port,
        "argv": redact.argv(facts.argv),  # never a secret, never the environment
        "canary": facts.canary,
        "sleep_level": facts.sleep_level,
        "cuda": facts.cuda,
        "cuda_pids": facts.cuda_pids,
        "cuda_bytes": facts.cuda_bytes,
        "timings": {},
        "image_bytes": sum(r["size"] for r in images.values()),
    }
    try:
        return decode(json.dumps(record).encode())
    except ManifestError as e:  # something the dumped tree used cannot be recorded safely
        raise ImageError(f"the dump cannot be described by a valid manifest: {e}") from None
