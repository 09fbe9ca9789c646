"""The manifest kept with a checkpoint: everything a restore needs from the filesystem, derived
from the CRIU images (never from a list of paths), and the bytes of what a new container lacks.

Built right after ``criu dump`` while the dumped filesystem is still as the tree left it:

* every file the tree had open or mapped, every cwd, the exe of each process — classified by
  :class:`FsView` as shared / runtime / image / system:
    runtime files are saved byte-exact (``files/<sha256>``) with mode, owner and timestamps;
    runtime files opened O_WRONLY|O_APPEND (logs) are only re-created (CRIU does not check
    their size, and their old content is of no use to the process);
    image and shared files are recorded for a cheap check (size, mode, mtime, ELF build-id);
* the directories that bound unix sockets need (CRIU re-creates the sockets themselves);
* the ``link_remap.N`` files CRIU made (a restore consumes them: their bytes are saved);
* listening ports, PIDs and thread IDs, whether the tree has its own PID namespace;
* every image file's size and SHA-256, so corruption is caught before a restore is attempted.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import stat
import time
from pathlib import Path

from .fsview import FsView
from .images import ImageNeeds

VERSION = 1
CHUNK = 4 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


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


def _save(path: str, blobs: Path) -> dict:
    """Copy a file into the blob store (content-addressed); returns its record."""
    st = os.stat(path)
    tmp = blobs / f".in-{os.getpid()}"
    h = hashlib.sha256()
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        while chunk := src.read(CHUNK):
            h.update(chunk)
            dst.write(chunk)
    digest = h.hexdigest()
    os.replace(tmp, blobs / digest)
    return {"path": path, "sha256": digest, **_meta(st)}


def build(needs: ImageNeeds, images_dir: Path, blobs: Path, view: FsView, extra: dict) -> dict:
    """Classify what the images need, save what a new container lacks, and return the manifest."""
    blobs.mkdir(parents=True, exist_ok=True)
    saved, recreate, verify, dirs, problems = [], [], [], [], []
    for f in needs.needed_files():
        try:
            st = os.stat(f.path)
        except OSError as e:
            problems.append(f"{f.path}: {e.strerror} at dump time")
            continue
        origin = view.origin(f.path, st)
        if stat.S_ISDIR(st.st_mode):
            dirs.append({"path": f.path, "origin": origin, **_meta(st)})
        elif not stat.S_ISREG(st.st_mode) or origin == "system":
            verify.append({"path": f.path, "origin": "system", "kind": "exists"})
        elif f.append_only:  # a log: CRIU checks neither its size nor its content
            if origin == "runtime":
                recreate.append({"path": f.path, **_meta(st), "size": 0})
            else:
                verify.append({"path": f.path, "origin": origin, "kind": "exists"})
        elif origin == "runtime":
            saved.append({**_save(f.path, blobs), "kinds": f.kinds})
        else:
            verify.append({"path": f.path, "origin": origin, "kind": "file", "size": st.st_size,
                           "mode": stat.S_IMODE(st.st_mode), "mtime_ns": st.st_mtime_ns,
                           "build_id": f.build_id or (elf_build_id(f.path) if "mmap" in f.kinds or "exe" in f.kinds else None)})
    link_remaps = []
    for r in needs.remaps:
        if r.type == "linked" and r.link_path and os.path.exists(r.link_path):
            link_remaps.append(_save(r.link_path, blobs))
    socket_dirs = sorted({os.path.dirname(s.path) for s in needs.unix_sockets if not s.deleted})
    images = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
              for p in sorted(images_dir.iterdir()) if p.is_file() and p.suffix == ".img"}
    pids = sorted({t for p in needs.processes for t in [p.pid, *p.threads]})
    return {
        "version": VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "created_ts": time.time(),
        "host": {"kernel": platform.release(), "machine": platform.machine()},
        "epoch": view.epoch,
        "pidns": needs.pidns,
        "pids": pids,
        "listen": [{"addr": s.local_addr, "port": s.local_port, "proto": s.proto} for s in needs.listening()],
        "saved": saved,
        "recreate": recreate,
        "dirs": dirs,
        "socket_dirs": socket_dirs,
        "socket_paths": sorted(s.path for s in needs.unix_sockets if not s.deleted),
        "link_remaps": link_remaps,
        "verify": verify,
        "images": images,
        "dump_problems": problems,
        "needs": needs.to_dict(),
        **extra,
    }


def copy_blob(blobs: Path, record: dict, dest: Path | None = None) -> None:
    """Put a saved file back byte-exact, with its mode, owner and timestamps (atomically)."""
    dest = Path(dest or record["path"])
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.llmuxd-{os.getpid()}"
    shutil.copyfile(blobs / record["sha256"], tmp)
    os.chmod(tmp, record["mode"])
    try:
        os.chown(tmp, record["uid"], record["gid"])
    except PermissionError:
        pass
    os.utime(tmp, ns=(record["atime_ns"], record["mtime_ns"]))
    os.replace(tmp, dest)
