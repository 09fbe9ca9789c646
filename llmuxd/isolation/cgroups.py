"""cgroup v2 placement of model process trees.

Layout under llmuxd's base cgroup (its systemd service cgroup with ``Delegate=yes``, or a
``llmuxd-<port>`` child of its own cgroup when run without systemd):

    <base>/supervisor        llmuxd itself (a leaf: the base may not hold processes itself
                             once controllers are enabled below it)
    <base>/model-<name>      one model's whole process tree

A tree in its own cgroup can be listed (``cgroup.procs``), frozen by CRIU (``--freeze-cgroup``: a consistent
snapshot for CRIU), and killed with nothing escaping (``cgroup.kill``), and it is found again
after llmuxd restarts.  Works with a pure cgroup v2 mount (/sys/fs/cgroup) and with the hybrid
layout (cgroup2 at /sys/fs/cgroup/unified).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from pathlib import Path

from .procfs import release_files, shm_files

log = logging.getLogger(__name__)

SUPERVISOR = "supervisor"
MODEL_PREFIX = "model-"


class CgroupUnavailable(Exception):
    """cgroup v2 cannot be used here; the message says why."""


def cgroup2_mount() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted, or None."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    mounts = []
    for line in lines:
        pre, _, post = line.partition(" - ")
        if post.split()[:1] == ["cgroup2"]:
            mounts.append(Path(pre.split()[4]))
    # Prefer the canonical places; a container may show the host's as well.
    for preferred in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if preferred in mounts:
            return preferred
    return mounts[0] if mounts else None


def own_cgroup(pid: int | str = "self") -> str | None:
    """The process's cgroup v2 path (``0::/path`` line of /proc/PID/cgroup)."""
    try:
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:]
    except OSError:
        pass
    return None


def _events(cg: Path) -> dict[str, str]:
    out = {}
    for line in (cg / "cgroup.events").read_text().splitlines():
        k, _, v = line.partition(" ")
        out[k] = v
    return out


class Cgroup:
    """One cgroup directory."""

    def __init__(self, path: Path):
        self.path = path

    @property
    def name(self) -> str:
        return self.path.name

    def exists(self) -> bool:
        return (self.path / "cgroup.procs").exists()

    def create(self) -> "Cgroup":
        self.path.mkdir(exist_ok=True)
        return self

    def procs(self, recursive: bool = True) -> list[int]:
        pids: list[int] = []
        dirs = [self.path]
        while dirs:
            d = dirs.pop()
            try:
                pids += [int(p) for p in (d / "cgroup.procs").read_text().split()]
                if recursive:
                    dirs += [c for c in d.iterdir() if c.is_dir()]
            except FileNotFoundError:
                continue
        return sorted(pids)

    def populated(self) -> bool:
        try:
            return _events(self.path).get("populated") == "1"
        except FileNotFoundError:
            return False

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    async def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL every process in the cgroup and its descendants; wait until it is empty."""
        if not self.exists():
            return
        segments = shm_files(self.procs())
        try:
            (self.path / "cgroup.kill").write_text("1")
        except OSError as e:  # kernels < 5.14 have no cgroup.kill
            if e.errno not in (errno.ENOENT, errno.EACCES):
                raise
            for pid in self.procs():
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
        await self._wait(lambda: not self.populated(), timeout, "empty")
        if segments and (gone := await asyncio.to_thread(release_files, segments)):
            log.info("cgroup %s: removed %d shared-memory file(s) its killed processes left: %s", self.path,
                     len(gone), ", ".join(gone))

    def remove(self) -> None:
        try:
            for child in self.path.iterdir():
                if child.is_dir():
                    Cgroup(child).remove()
            self.path.rmdir()
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot remove cgroup %s: %s", self.path, e.strerror)

    async def _wait(self, done, timeout: float, what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not done():
            if loop.time() > deadline:
                raise TimeoutError(f"cgroup {self.path} not {what} after {timeout:g} s")
            await asyncio.sleep(0.01)


class CgroupLayout:
    """llmuxd's base cgroup: the supervisor leaf and one child per model."""

    def __init__(self, base: Path, owned_base: bool):
        self.base = Cgroup(base)
        self.owned_base = owned_base  # created by us (no systemd): removed at exit

    @classmethod
    def detect(cls, instance: str) -> "CgroupLayout":
        """Find or make the base cgroup.  Under systemd (``INVOCATION_ID`` set, Delegate=yes) the
        service cgroup is the base; otherwise a child ``llmuxd-<instance>`` of our own cgroup."""
        mount = cgroup2_mount()
        if mount is None:
            raise CgroupUnavailable("no cgroup v2 hierarchy is mounted")
        own = own_cgroup()
        if own is None:
            raise CgroupUnavailable("this process is not in a cgroup v2 hierarchy")
        here = mount / own.lstrip("/")
        if here.name == SUPERVISOR:  # restarted inside our own layout
            return cls(here.parent, owned_base=False)
        if os.environ.get("INVOCATION_ID") and not (here / "cgroup.subtree_control").exists():
            raise CgroupUnavailable(f"service cgroup {here} is missing")
        if os.environ.get("INVOCATION_ID") and os.access(here / "cgroup.procs", os.W_OK):
            return cls(here, owned_base=False)
        base = here / f"llmuxd-{instance}"
        try:
            base.mkdir(exist_ok=True)
        except OSError as e:
            raise CgroupUnavailable(f"cannot create {base}: {e.strerror}") from None
        return cls(base, owned_base=True)

    def enter_supervisor(self) -> None:
        """Move llmuxd itself into the supervisor leaf."""
        Cgroup(self.base.path / SUPERVISOR).create().add(os.getpid())

    def model(self, name: str) -> Cgroup:
        return Cgroup(self.base.path / f"{MODEL_PREFIX}{name}")

    def existing_models(self) -> dict[str, Cgroup]:
        """Model cgroups found under the base (left by an earlier llmuxd), by model name."""
        found = {}
        if self.base.exists():
            for d in self.base.path.iterdir():
                if d.is_dir() and d.name.startswith(MODEL_PREFIX):
                    found[d.name[len(MODEL_PREFIX):]] = Cgroup(d)
        return found

    def cleanup(self) -> None:
        """At exit: remove empty model cgroups; the base too if we made it."""
        for cg in self.existing_models().values():
            if not cg.populated():
                cg.remove()
        if self.owned_base:
            sup = Cgroup(self.base.path / SUPERVISOR)
            if sup.exists() and os.getpid() in sup.procs():
                try:  # leave the layout before removing it
                    Cgroup(self.base.path.parent).add(os.getpid())
                except OSError:
                    return
            sup.remove()
            self.base.remove()
