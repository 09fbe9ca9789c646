"""What a CRIU dump needs from the filesystem it is restored into, read from the dump's images.

``read_images(dir)`` decodes the images of one ``criu dump`` (each image once, with ``pycriu``) and
returns an :class:`ImageNeeds`: the process tree, every regular file the tree has open, mapped, or
uses as exe, cwd or root, the named Unix sockets (their directories must exist), the TCP/UDP sockets
(their ports must be free), the ghost and link-remap entries, and any fd type not understood here.
Nothing is taken from a hard-coded list of paths: everything comes from the images.

Where the facts come from (CRIU 4.2 image format, checked against live trees):

* ``pstree.img``: pid, ppid, pgid, sid, threads; in a PID namespace these are the inner pids.
* ``inventory.img`` ``root_ids.pid_ns_id`` is CRIU's own PID namespace; ``ids-<pid>.img`` holds the
  task's.  They differ when the tree's root is the init of its own PID namespace.
* ``files.img``: one entry per open file description, keyed by ``id``: ``reg`` (path, open flags,
  size when CRIU will check it, mode, build-id as five little-endian u32), ``usk``, ``isk``, ...
* ``fdinfo-<files_id>.img`` (``files_id`` from ``ids-<pid>.img``): fd -> file id, per fd table.
* ``mm-<pid>.img``: ``exe_file_id``; each vma with VMA_FILE_PRIVATE/SHARED in ``status`` names
  its file in ``shmid``.  ``fs-<pid>.img``: ``cwd_id``/``root_id`` (directory reg entries).
* ``remap-fpath.img``: ``orig_id`` (the deleted file's reg entry), ``remap_type`` LINKED (``remap_id``
  is the reg entry of the ``link_remap.N`` hard link CRIU made next to it), GHOST (``remap_id`` names
  ``ghost-file-<id>.img``, content in the images) or PROCFS (a dead task's /proc file).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import quopri
import stat
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

O_ACCMODE, O_WRONLY, O_APPEND = 0o3, 0o1, 0o2000
VMA_FILE_PRIVATE, VMA_FILE_SHARED = 1 << 6, 1 << 7

SOCK_TYPES = {1: "stream", 2: "dgram", 3: "raw", 5: "seqpacket"}
TCP_STATES = {1: "established", 2: "syn_sent", 3: "syn_recv", 4: "fin_wait1", 5: "fin_wait2", 6: "time_wait",
              7: "close", 8: "close_wait", 9: "last_ack", 10: "listen", 11: "closing"}
PROTOS = {6: "tcp", 17: "udp", 136: "udplite"}
TASK_STATES = {1: "alive", 3: "zombie", 6: "stopped"}
REMAP_TYPES = {0: "linked", 1: "ghost", 2: "procfs", "LINKED": "linked", "GHOST": "ghost", "PROCFS": "procfs"}
#: fd types whose whole state is in the images: the filesystem has nothing to provide for them.
IN_IMAGE_FD_TYPES = {"PIPE", "EVENTFD", "EVENTPOLL", "SIGNALFD", "TIMERFD", "MEMFD", "NETLINKSK", "PIDFD"}
#: fd types this module reads (REG via files, sockets via unix_sockets / inet_sockets).
KNOWN_FD_TYPES = {"REG", "UNIXSK", "INETSK"} | IN_IMAGE_FD_TYPES


class ImageError(Exception):
    """The folder does not hold a readable CRIU dump."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@dataclass
class Process:
    pid: int
    ppid: int
    pgid: int
    sid: int
    threads: list[int]
    comm: str | None = None
    exe: str | None = None
    state: str | None = None  # "alive" | "zombie" | "stopped" (core-<pid>.img)


@dataclass
class FileNeed:
    path: str
    kinds: list[str]  # subset of "fd", "mmap", "exe", "cwd", "root"
    pids: list[int]
    flags: list[int]  # distinct open flags of the descriptions (mmaps: the mapping's file, often 0)
    append_only: bool  # every description is O_WRONLY|O_APPEND: CRIU does not check the size
    size: int | None  # the size CRIU will require (None: not checked)
    mode: int | None
    build_id: str | None  # hex, for ELF files
    is_dir: bool
    ftype: str | None  # "reg" | "dir" | "chr" | "blk" | "fifo" | "sock" | "lnk"
    remap: str | None = None  # None: must exist at path; "ghost" / "linked" / "procfs": deleted at dump


@dataclass
class UnixSocket:
    """A named Unix socket.  Restore needs its directory, never the socket file.  Connections accepted
    on a listener carry the listener's path too (state "established")."""

    path: str
    type: str  # "stream" | "dgram" | "seqpacket"
    state: str  # "listen" | "established" | "close" ... (TCP state names, as the kernel reports)
    deleted: bool  # the socket file was unlinked before the dump
    pids: list[int]


@dataclass
class InetSocket:
    family: str  # "ipv4" | "ipv6"
    proto: str  # "tcp" | "udp" | ...
    state: str  # "listen" | "established" | "close" ...
    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int
    pids: list[int]


@dataclass
class Remap:
    type: str  # "linked" | "ghost" | "procfs" (or whatever newer CRIU calls it, lower-cased)
    path: str | None  # the original (deleted) path
    link_path: str | None = None  # linked: the link_remap.N hard link in the dumped filesystem
    ghost_image: str | None = None  # ghost: the image holding the content


@dataclass
class UnknownFd:
    pid: int
    fd: int
    type: str
    id: int


@dataclass
class ImageNeeds:
    root_pid: int
    pidns: bool
    processes: list[Process]
    files: list[FileNeed]
    unix_sockets: list[UnixSocket]
    abstract_unix_sockets: list[str]  # names without the leading NUL, escaped as by repr
    inet_sockets: list[InetSocket]
    remaps: list[Remap]
    tcp_established: bool
    unknown: list[UnknownFd]
    fd_types: dict[str, int]  # how many fds of each type the tree holds
    pages_bytes: int
    image_files: list[tuple[str, int]]

    def needed_files(self) -> list[FileNeed]:
        """Files that must exist at their path, with their size, mode and build-id."""
        return [f for f in self.files if f.remap is None]

    def listening(self) -> list[InetSocket]:
        return [s for s in self.inet_sockets if s.state == "listen"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageNeeds:
        return cls(
            **{k: d[k] for k in ("root_pid", "pidns", "abstract_unix_sockets", "tcp_established", "fd_types",
                                 "pages_bytes")},
            processes=[Process(**p) for p in d["processes"]], files=[FileNeed(**f) for f in d["files"]],
            unix_sockets=[UnixSocket(**s) for s in d["unix_sockets"]],
            inet_sockets=[InetSocket(**s) for s in d["inet_sockets"]], remaps=[Remap(**r) for r in d["remaps"]],
            unknown=[UnknownFd(**u) for u in d["unknown"]], image_files=[(n, s) for n, s in d["image_files"]])


def _abs(path: str | None) -> str | None:
    """CRIU keeps paths relative to the mount namespace root in places ('./x', 'x'): make them absolute."""
    if path is None:
        return None
    if path.startswith("./"):
        path = path[1:]
    return path if path.startswith("/") else "/" + path


def _ftype(mode: int | None) -> str | None:
    if mode is None:
        return None
    for name, test in (("reg", stat.S_ISREG), ("dir", stat.S_ISDIR), ("chr", stat.S_ISCHR), ("blk", stat.S_ISBLK),
                       ("fifo", stat.S_ISFIFO), ("sock", stat.S_ISSOCK), ("lnk", stat.S_ISLNK)):
        if test(mode):
            return name
    return None


def _addr(family: int, words: list[int]) -> str:
    raw = b"".join(struct.pack("<I", w) for w in words)  # kernel __be32 words read as host (LE) u32
    try:
        return str(ipaddress.ip_address(raw[:16] if family == 10 else raw[:4]))
    except ValueError:
        return raw.hex()


def _unix_name(name: Any) -> bytes:
    """pycriu gives unix socket names quoted-printable encoded ('/tmp/x.sock=00')."""
    if not name:
        return b""
    raw = quopri.decodestring(name.encode() if isinstance(name, str) else name)
    return raw if raw.startswith(b"\0") else raw.rstrip(b"\0")


class _Images:
    """Loads images from one folder, each at most once."""

    def __init__(self, d: Path):
        try:
            import pycriu  # noqa: F401
            from pycriu import images
        except ImportError as e:
            raise ImageError(f"pycriu is not importable: {e}") from e
        self._images = images
        self.dir = d
        self._cache: dict[str, list[dict]] = {}

    def entries(self, name: str, required: bool = False) -> list[dict]:
        if name not in self._cache:
            path = self.dir / name
            try:
                with open(path, "rb") as f, warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)  # pycriu on newer protobuf
                    self._cache[name] = self._images.load(f)["entries"]
            except FileNotFoundError:
                if required:
                    raise ImageError(f"{path}: missing: not a complete CRIU dump") from None
                self._cache[name] = []
            except Exception as e:  # bad magic, truncated protobuf ...
                raise ImageError(f"{path}: cannot decode: {type(e).__name__}: {e}") from e
        return self._cache[name]

    def one(self, name: str, required: bool = False) -> dict:
        e = self.entries(name, required)
        return e[0] if e else {}


def read_images(images_dir: Path) -> ImageNeeds:
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise ImageError(f"{images_dir}: no such directory")
    img = _Images(images_dir)
    inventory = img.one("inventory.img", required=True)
    tree = img.entries("pstree.img", required=True)
    if not tree:
        raise ImageError(f"{images_dir / 'pstree.img'}: no processes")
    file_entries = {e["id"]: e for e in img.entries("files.img", required=True)}

    processes: list[Process] = []
    ids: dict[int, dict] = {}
    for t in tree:
        pid = t["pid"]
        ids[pid] = img.one(f"ids-{pid}.img")
        tc = img.one(f"core-{pid}.img").get("tc", {})
        processes.append(Process(pid=pid, ppid=t.get("ppid", 0), pgid=t.get("pgid", 0), sid=t.get("sid", 0),
                                 threads=list(t.get("threads", [pid])), comm=tc.get("comm"),
                                 state=TASK_STATES.get(tc.get("task_state"))))
    root_pid = tree[0]["pid"]
    criu_ns = inventory.get("root_ids", {}).get("pid_ns_id")
    root_ns = ids[root_pid].get("pid_ns_id")
    pidns = root_ns != criu_ns if criu_ns is not None and root_ns is not None else root_pid == 1

    files: dict[tuple[str, str | None], FileNeed] = {}
    # pycriu gives the enum by name ("LINKED"); a missing remap_type is LINKED (proto default)
    remapped = {r["orig_id"]: REMAP_TYPES.get(r.get("remap_type", 0), str(r.get("remap_type")).lower())
                for r in img.entries("remap-fpath.img")}

    def use(file_id: int, kind: str, pid: int) -> None:
        reg = file_entries.get(file_id, {}).get("reg")
        if reg is None:
            return
        path, remap = _abs(reg.get("name")), remapped.get(file_id)
        mode, flags = reg.get("mode"), reg.get("flags", 0)
        bid = reg.get("build_id")
        f = files.get((path, remap))
        if f is None:
            f = files[(path, remap)] = FileNeed(
                path=path, kinds=[], pids=[], flags=[], append_only=True, size=None, mode=mode,
                build_id=struct.pack(f"<{len(bid)}I", *bid).hex() if bid else None,
                is_dir=bool(mode is not None and stat.S_ISDIR(mode)), ftype=_ftype(mode), remap=remap)
        if kind not in f.kinds:
            f.kinds.append(kind)
        if pid not in f.pids:
            f.pids.append(pid)
        if kind in ("fd", "mmap") and flags not in f.flags:
            f.flags.append(flags)
        if kind != "fd" or not (flags & O_ACCMODE == O_WRONLY and flags & O_APPEND):
            f.append_only = False
        if reg.get("size") is not None:
            f.size = max(f.size or 0, reg["size"])

    # fd tables: one fdinfo image per files_id (or per pid in old images), shared by the pids using it
    per_id = inventory.get("fdinfo_per_id", False)
    tables: dict[str, list[int]] = {}
    for p in processes:
        key = str(ids[p.pid].get("files_id", p.pid)) if per_id else str(p.pid)
        tables.setdefault(key, []).append(p.pid)

    fd_types: dict[str, int] = {}
    unknown: list[UnknownFd] = []
    sock_pids: dict[int, list[int]] = {}
    for key, pids in tables.items():
        for fd in img.entries(f"fdinfo-{key}.img"):
            ftype = fd.get("type", "UND")
            fd_types[ftype] = fd_types.get(ftype, 0) + len(pids)
            for pid in pids:
                if ftype == "REG":
                    use(fd["id"], "fd", pid)
                elif ftype in ("UNIXSK", "INETSK"):
                    sock_pids.setdefault(fd["id"], [])
                    if pid not in sock_pids[fd["id"]]:
                        sock_pids[fd["id"]].append(pid)
                elif ftype not in KNOWN_FD_TYPES:
                    unknown.append(UnknownFd(pid=pid, fd=fd.get("fd", -1), type=ftype, id=fd.get("id", 0)))

    for p in processes:
        mm = img.one(f"mm-{p.pid}.img")
        if "exe_file_id" in mm:
            use(mm["exe_file_id"], "exe", p.pid)
            p.exe = _abs(file_entries.get(mm["exe_file_id"], {}).get("reg", {}).get("name"))
        for vma in mm.get("vmas", []):
            if vma.get("status", 0) & (VMA_FILE_PRIVATE | VMA_FILE_SHARED):
                use(vma["shmid"], "mmap", p.pid)  # memfd mappings name a MEMFD entry: ignored by use()
        fs = img.one(f"fs-{p.pid}.img")
        for kind in ("cwd", "root"):
            if f"{kind}_id" in fs:
                use(fs[f"{kind}_id"], kind, p.pid)

    unix_sockets, abstract, inet_sockets = [], [], []
    for file_id, pids in sock_pids.items():
        e = file_entries.get(file_id, {})
        if "usk" in e:
            u = e["usk"]
            name = _unix_name(u.get("name"))
            if name.startswith(b"\0"):
                abstract.append(repr(name[1:])[2:-1])
            elif name:
                path = os.fsdecode(name)
                if not path.startswith("/") and u.get("name_dir"):
                    path = os.path.join(u["name_dir"], path)
                unix_sockets.append(UnixSocket(path=_abs(path), type=SOCK_TYPES.get(u.get("type"), str(u.get("type"))),
                                               state=TCP_STATES.get(u.get("state"), str(u.get("state"))),
                                               deleted=bool(u.get("deleted", False)), pids=sorted(pids)))
        elif "isk" in e:
            s = e["isk"]
            fam = s.get("family", 2)
            inet_sockets.append(InetSocket(
                family="ipv6" if fam == 10 else "ipv4", proto=PROTOS.get(s.get("proto"), str(s.get("proto"))),
                state=TCP_STATES.get(s.get("state"), str(s.get("state"))),
                local_addr=_addr(fam, s.get("src_addr", [0])), local_port=s.get("src_port", 0),
                remote_addr=_addr(fam, s.get("dst_addr", [0])), remote_port=s.get("dst_port", 0), pids=sorted(pids)))

    remaps = []
    for r in img.entries("remap-fpath.img"):
        rtype = remapped[r["orig_id"]]
        orig = _abs(file_entries.get(r["orig_id"], {}).get("reg", {}).get("name"))
        remap = Remap(type=rtype, path=orig)
        rid = r.get("remap_id", 0) & 0x7FFFFFFF  # old images flag ghosts with bit 31
        if rtype == "linked":
            remap.link_path = _abs(file_entries.get(rid, {}).get("reg", {}).get("name"))
        elif rtype == "ghost":
            remap.ghost_image = f"ghost-file-{rid}.img"
        remaps.append(remap)

    image_files = sorted((p.name, p.stat().st_size) for p in images_dir.iterdir() if p.is_file())
    for f in files.values():
        f.pids.sort()
        f.flags.sort()
    return ImageNeeds(
        root_pid=root_pid, pidns=pidns, processes=processes,
        files=sorted(files.values(), key=lambda f: (f.path, f.remap or "")),
        unix_sockets=unix_sockets, abstract_unix_sockets=abstract, inet_sockets=inet_sockets, remaps=remaps,
        tcp_established=any(s.proto == "tcp" and s.state == "established" for s in inet_sockets),
        unknown=unknown, fd_types=fd_types,
        pages_bytes=sum(s for n, s in image_files if n.startswith("pages-") and n.endswith(".img")),
        image_files=image_files)
