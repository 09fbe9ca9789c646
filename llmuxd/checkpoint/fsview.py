"""How this container's filesystem is put together: which mount a path is on, whether that
mount is a shared volume, and when the container started.

A checkpoint restores in a NEW container only if the files the tree used are there.  Three kinds:
  shared   on a bind-mounted volume (the checkpoint folder, the HF cache, ...): the new container
           has the same file, so it is only verified;
  runtime  created or changed in this container (after its epoch, or on a per-container tmpfs
           such as /tmp, /dev/shm, /run): a new container lacks it, so its bytes are saved;
  image    everything else: provided by the image, so it is verified (a different image is
           refused, not restored into).
  system   /proc, /sys, /dev: provided by the kernel.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..isolation import procfs

SYSTEM_FS = {"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "mqueue", "securityfs", "debugfs",
             "tracefs", "pstore", "bpf", "configfs", "fusectl", "hugetlbfs", "binfmt_misc", "autofs", "nsfs"}
VOLATILE_FS = {"tmpfs", "ramfs"}
EPOCH_MARKER = Path("/run/llmuxd/epoch")


def _unescape(s: str) -> str:
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


@dataclass(frozen=True)
class Mount:
    point: str
    root: str  # the part of the source filesystem mounted here ("/" unless a bind of a subtree)
    fstype: str
    source: str
    dev: str = ""  # major:minor of the filesystem


def mounts() -> list[Mount]:
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        f, p = pre.split(), post.split()
        out.append(Mount(point=_unescape(f[4]), root=_unescape(f[3]), fstype=p[0], source=p[1] if len(p) > 1 else "",
                         dev=f[2]))
    return out


class FsView:
    def __init__(self, mount_list: list[Mount] | None = None, epoch: float | None = None):
        self.mounts = sorted(mount_list if mount_list is not None else mounts(), key=lambda m: len(m.point))
        self.epoch = container_epoch() if epoch is None else epoch

    def mount_of(self, path: str) -> Mount:
        best = self.mounts[0]
        for m in self.mounts:  # later (longer, or mounted on top) wins
            if path == m.point or path.startswith(m.point.rstrip("/") + "/"):
                best = m
        return best

    def _self_bind(self, m: Mount) -> bool:
        """A folder of the container's own root bound onto itself (systemd does that for
        ``LogsDirectory=``, ``ProtectSystem=`` and the like): not a volume."""
        root = next((x for x in self.mounts if x.point == "/"), None)
        return root is not None and m.root == m.point and bool(m.dev) and m.dev == root.dev

    def origin(self, path: str, st: os.stat_result | None) -> str:
        m = self.mount_of(path)
        if m.fstype in SYSTEM_FS or path.startswith(("/proc/", "/sys/")):
            return "system"
        if m.point != "/" and m.root != "/" and m.fstype not in VOLATILE_FS and not self._self_bind(m):
            return "shared"  # a bind of a host folder: a volume
        if m.fstype in VOLATILE_FS:
            return "runtime"
        if st is not None and max(st.st_ctime, st.st_mtime) >= self.epoch:
            return "runtime"
        return "image"


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0


def _pid1_start() -> float:
    return _boot_time() + procfs.stat(1).starttime / os.sysconf("SC_CLK_TCK")


def container_epoch() -> float:
    """When this container started.  The first llmuxd command in a container leaves a marker in
    /run (per-container); where PID 1 started well after the kernel booted it is the container's
    init (a booted container), and its start is earlier still."""
    try:
        EPOCH_MARKER.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(EPOCH_MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.close(fd)
    except FileExistsError:
        pass
    except OSError:
        return time.time()
    epoch = EPOCH_MARKER.stat().st_mtime
    try:
        pid1 = _pid1_start()
        if pid1 > _boot_time() + 60:
            epoch = min(epoch, pid1)
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    return epoch
