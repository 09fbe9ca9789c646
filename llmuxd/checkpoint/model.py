"""The manifest of a checkpoint as a typed, versioned contract (pydantic, strict, no extra keys).

Written in one place (:func:`encode`, from :func:`llmuxd.checkpoint.manifest.build`) and read in
one place (:func:`decode`, from :func:`llmuxd.checkpoint.store.inspect`).  A checkpoint folder is
untrusted input: every field a restore acts on is constrained here, so a planted or damaged
manifest is refused with the field at fault before anything is written:

* target paths (files put back, directories and socket directories created, files unlinked
  after a failed restore) are absolute, normalized (no ``..``, ``.``, ``//``, NUL) and never
  under /proc, /sys or /dev (except /dev/shm);
* blob names are BLAKE3 digests (64 lowercase hex), image names plain file names;
* modes are permission bits only where they are applied (set-id and sticky bits never are).

Version 3 records BLAKE3 digests (fields ``blake3``); versions 1 and 2 recorded SHA-256 and are
refused as made by an older llmuxd (such a checkpoint is not restored: the model cold-starts).
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from .images import ImageNeeds

VERSION = 3
OLDER = {1: "SHA-256 digests", 2: "SHA-256 digests"}  # what an older version differs in
MAX_BYTES = 256 << 20  # a manifest is a few MiB at most; larger is refused unread
_HEX64 = re.compile(r"[0-9a-f]{64}")
_IMAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_SYSTEM_TREES = ("/proc", "/sys", "/dev")
_WRITABLE_IN_SYSTEM = ("/dev/shm",)


class ManifestError(Exception):
    """The manifest is not a valid manifest of this llmuxd (the reason names the field)."""


def _digest(v: str) -> str:
    if not _HEX64.fullmatch(v):
        raise ValueError("not a BLAKE3 digest (64 lowercase hex digits)")
    return v


def _image_name(v: str) -> str:
    if not _IMAGE_NAME.fullmatch(v) or v in (".", ".."):
        raise ValueError("not a plain image file name")
    return v


def _abs_path(v: str) -> str:
    if not v.startswith("/") or v == "/":
        raise ValueError("not an absolute path")
    if "\0" in v or "//" in v or v.endswith("/"):
        raise ValueError("not a normalized path")
    if any(part in (".", "..") for part in v.split("/")[1:]):
        raise ValueError("not a normalized path ('.' or '..' in it)")
    return v


def _under(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree + "/")


def _target_path(v: str) -> str:
    _abs_path(v)
    if any(_under(v, t) for t in _SYSTEM_TREES) and not any(_under(v, t) and v != t for t in _WRITABLE_IN_SYSTEM):
        raise ValueError("a path under /proc, /sys or /dev (other than /dev/shm) is never written")
    return v


def is_path(path: str) -> bool:
    """Whether ``path`` is absolute and normalized (what the manifest records)."""
    try:
        _abs_path(path)
    except ValueError:
        return False
    return True


def is_target(path: str) -> bool:
    """Whether a restore may write, create or remove ``path`` (else it can only be checked)."""
    try:
        _target_path(path)
    except ValueError:
        return False
    return True


Digest = Annotated[str, AfterValidator(_digest)]
ImageName = Annotated[str, AfterValidator(_image_name)]
AbsPath = Annotated[str, AfterValidator(_abs_path)]  # only read (stat, build-id)
TargetPath = Annotated[str, AfterValidator(_target_path)]  # written, created or removed
Mode = Annotated[int, Field(ge=0, le=0o7777)]
Id = Annotated[int, Field(ge=0, le=2**32 - 1)]
Count = Annotated[int, Field(ge=0)]
Origin = Literal["shared", "runtime", "image", "system"]


class _Record(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class FileMeta(_Record):
    mode: Mode
    uid: Id
    gid: Id
    atime_ns: int
    mtime_ns: int
    size: Count


class SavedFile(FileMeta):
    """A file whose bytes are in the checkpoint (``files/<blake3>``), put back byte-exact."""

    path: TargetPath
    blake3: Digest
    kinds: list[Literal["fd", "mmap", "exe", "cwd", "root"]] = []


class RecreatedFile(FileMeta):
    """An append-only log: re-created empty."""

    path: TargetPath


class DirRecord(FileMeta):
    path: TargetPath
    origin: Origin


class Verified(_Record):
    """A file the new container must provide as it was (not saved)."""

    path: AbsPath
    origin: Origin
    kind: Literal["exists", "file"]
    size: Count | None = None
    mode: Mode | None = None
    mtime_ns: int | None = None
    build_id: Annotated[str, Field(pattern=r"^[0-9a-f]{2,128}$")] | None = None


class ImageRecord(_Record):
    size: Count
    blake3: Digest


class Listen(_Record):
    addr: str
    port: Annotated[int, Field(ge=0, le=65535)]
    proto: str


class Host(_Record):
    kernel: str
    machine: str


class Gpu(_Record):
    index: int
    name: str
    uuid: str
    memory_total: int | None
    memory_free: int | None
    memory_used: int | None


class CudaInventory(_Record):
    source: str
    driver_version: str | None
    cuda_version: str | None
    gpus: list[Gpu]


class Manifest(_Record):
    version: Literal[3]
    model: str
    created: str
    created_ts: float
    host: Host
    epoch: float
    pidns: bool
    own_pidns: bool
    pids: list[Annotated[int, Field(ge=1)]]
    listen: list[Listen]
    saved: list[SavedFile]
    recreate: list[RecreatedFile]
    dirs: list[DirRecord]
    socket_dirs: list[TargetPath]
    socket_paths: list[TargetPath]
    link_remaps: list[SavedFile]
    verify: list[Verified]
    images: dict[ImageName, ImageRecord]
    dump_problems: list[str]
    needs: ImageNeeds
    # what the daemon recorded about the model (argv redacted: no secrets, no environment)
    eviction: str
    served_name: str
    port: Annotated[int, Field(ge=1, le=65535)]
    argv: list[str]
    canary: str | None
    sleep_level: int | None
    cuda: CudaInventory | None
    cuda_pids: list[int] = []
    cuda_bytes: dict[str, Count] = {}
    timings: dict[str, float]
    image_bytes: Count

    def blobs(self) -> list[SavedFile]:
        """Every record whose bytes are in ``files/``."""
        return [*self.saved, *self.link_remaps]

    def transient(self) -> list[SavedFile]:
        """What a restore puts back that only the restored tree uses, on memory that is never
        given back until the container ends: CRIU's link_remap.N, the files in /dev/shm."""
        return [*self.link_remaps, *(r for r in self.saved if r.path.startswith("/dev/shm/"))]


def encode(m: Manifest) -> bytes:
    """The manifest's bytes as written (and as authenticated by the MAC)."""
    return json.dumps(m.model_dump(mode="json"), indent=1, sort_keys=True).encode() + b"\n"


def decode(data: bytes) -> Manifest:
    """Parse and validate; ManifestError names what is wrong (at most a few fields)."""
    if len(data) > MAX_BYTES:
        raise ManifestError(f"manifest is {len(data)} bytes, more than {MAX_BYTES}")
    try:
        head = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise ManifestError(f"manifest is not JSON: {e}") from None
    if not isinstance(head, dict):
        raise ManifestError("manifest is not a JSON object")
    version = head.get("version")
    if version != VERSION:
        older = OLDER.get(version) if isinstance(version, int) and not isinstance(version, bool) else None
        raise ManifestError(f"manifest version {version!r} is not {VERSION}"
                            + (f" (made by an older llmuxd, with {older}: not restored)" if older else ""))
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as e:
        raise ManifestError("invalid manifest: " + "; ".join(_problem(x) for x in e.errors()[:4])
                            + (f" (and {e.error_count() - 4} more)" if e.error_count() > 4 else "")) from None


def _problem(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    if not isinstance(got, (dict, list)) and err["type"] != "missing":
        msg += f" (got {str(got)[:80]!r})"
    return f"{loc}: {msg}"
