"""Checkpoint and restore of one model's process tree, around CRIU.

Dump: CUDA suspend (when the tree holds GPU state) -> CRIU dump of the tree, frozen through its
cgroup, into ``<checkpoint_path>.partial-<time>/`` -> manifest and saved files -> sync -> atomic
exchange into ``checkpoint_path`` -> wait until the dumped tree is gone.  A crash at any point
leaves either the previous checkpoint or a ``.partial-`` folder that is never used.

Restore: image integrity -> put back what the container lacks -> check and preflight -> CRIU
restore into the model's cgroup (llmuxd is a child subreaper, so the restored root becomes its
child) -> CUDA resume.  What follows (health, wake sequence, canary) is the orchestrator's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..isolation.cgroups import Cgroup
from ..isolation.procfs import inner_pid
from ..isolation.tree import ProcessTree
from . import cuda as cudamod
from ..isolation.pidinit import RESTORED
from .criu import Criu, CriuError, error_lines
from .fsview import FsView
from .images import ImageError, read_images
from .manifest import build
from .prepare import Unusable, apply, check, check_images, preflight
from .store import BLOBS, IMAGES, MANIFEST, PARTIAL, Found, exchange, inspect, quarantine

log = logging.getLogger(__name__)


class CheckpointFailed(Exception):
    """A dump or restore did not happen.  ``unusable``: the checkpoint itself is damaged."""

    def __init__(self, message: str, *, reason: str, unusable: bool = False):
        super().__init__(message)
        self.reason = reason  # short, for the metric label
        self.unusable = unusable


@dataclass
class Restored:
    root_pid: int
    found: Found
    prepared: list[str]
    seconds: dict


class Checkpointer:
    def __init__(self, name: str, path: Path, criu: Criu, cgroup: Cgroup | None, work_dir: Path,
                 cuda: "cudamod.CudaCheckpointer | None" = None):
        self.name = name
        self.path = path
        self.criu = criu
        self.cgroup = cgroup
        self.work_dir = work_dir
        self.cuda = cuda

    def found(self) -> Found:
        return inspect(self.name, self.path)

    # -- dump ----------------------------------------------------------------------------------
    async def dump(self, tree: ProcessTree, extra: dict) -> dict:
        """Dump the tree; returns the manifest.  On failure nothing that looks like a checkpoint
        is left behind, and the tree may still be running.

        A tree in its own PID and mount namespaces is dumped from inside them (CRIU entered
        into the init's namespaces, dumping the server by its inner PID): no namespace or mount
        state goes into the images, and a restore needs a fresh pair of namespaces only."""
        tree_pids = tree.pids()
        server = tree.server_pid
        if server is None:
            raise CheckpointFailed("the model's process tree is gone", reason="gone")
        enter = tree.root_pid if tree.namespaced else None
        target = inner_pid(server) if enter else server
        extra = {**extra, "own_pidns": bool(enter)}
        if not self.criu.available():
            raise CheckpointFailed(f"CRIU not found at {self.criu.path!r} (see `llmuxd doctor`)", reason="no_criu")
        t = {}
        partial = self.path.parent / f"{self.path.name}{PARTIAL}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        images = partial / IMAGES
        suspended: list[int] = []
        try:
            images.mkdir(parents=True)
            started = time.monotonic()
            gpu_pids = cudamod.gpu_processes(tree_pids)
            if gpu_pids:
                if self.cuda is None:
                    raise CheckpointFailed(f"processes {gpu_pids} hold GPU state and no CUDA checkpoint "
                                           "(driver API or cuda-checkpoint) is available", reason="no_cuda")
                extra = {**extra, "cuda_pids": [inner_pid(p) for p in gpu_pids],
                         "cuda_bytes": cudamod.gpu_bytes_of(gpu_pids)}
                suspended = await cudamod.suspend_tree(gpu_pids, self.cuda)
                t["cuda_suspend"] = time.monotonic() - started
            started = time.monotonic()
            await self.criu.dump(target, images, freeze_cgroup=self.cgroup.path if self.cgroup else None,
                                 enter=enter)
            t["criu_dump"] = time.monotonic() - started
            started = time.monotonic()
            manifest = await asyncio.to_thread(self._manifest, images, partial, extra, bool(gpu_pids))
            t["manifest"] = time.monotonic() - started
            manifest["timings"] = t
            manifest["image_bytes"] = sum(r["size"] for r in manifest["images"].values())
            (partial / MANIFEST).write_text(json.dumps(manifest, indent=1))
            await asyncio.to_thread(os.sync)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            exchange(partial, self.path)  # the old checkpoint (if any) is now at `partial`
        except CriuError as e:
            if suspended:  # the tree lives on: give it its GPU back
                await cudamod.resume_tree(suspended, self.cuda)
            raise CheckpointFailed(str(e), reason="criu_dump") from None
        except (OSError, ImageError) as e:
            raise CheckpointFailed(f"checkpoint could not be written: {e}", reason="write") from None
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return manifest

    def _manifest(self, images: Path, partial: Path, extra: dict, cuda: bool) -> dict:
        needs = read_images(images)
        extra = {**extra, "model": self.name, "cuda": cudamod.gpu_inventory() if cuda else None}
        return build(needs, images, partial / BLOBS, FsView(), extra)

    # -- restore ---------------------------------------------------------------------------------
    async def _criu_restore(self, found: Found, tree: ProcessTree, timeout: float) -> int:
        images, work = found.path / IMAGES, self.work_dir
        if not found.manifest.get("own_pidns"):  # dumped in the container's PID namespace
            root = await self.criu.restore(images, work, self.cgroup)
            tree.adopt(root)
            return root
        # A fresh PID + mount namespace whose init runs criu restore, then adopts the tree.
        work.mkdir(parents=True, exist_ok=True)
        for name in (RESTORED, "restore.pid"):
            (work / name).unlink(missing_ok=True)
        root = await tree.spawn(await self.criu.restore_argv(images, work), dict(os.environ), restore_dir=work)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (work / RESTORED).exists():
            if not tree.running:
                raise CriuError("restore", error_lines(work / "restore.log"), work / "restore.log")
            if loop.time() > deadline:
                raise CriuError("restore", f"not done after {timeout:g} s", work / "restore.log")
            await asyncio.sleep(0.01)
        return root

    async def restore(self, tree: ProcessTree, timeout: float) -> Restored:
        t: dict = {}
        found = self.found()
        if found.state != "valid":
            raise CheckpointFailed(found.detail, reason="invalid", unusable=found.state == "invalid")
        started = time.monotonic()
        problems = await asyncio.to_thread(check_images, found)
        t["verify_images"] = time.monotonic() - started
        if problems:
            raise CheckpointFailed("; ".join(problems), reason="corrupt", unusable=True)
        started = time.monotonic()
        try:
            prepared = await asyncio.to_thread(apply, found)
        except Unusable as e:
            raise CheckpointFailed(str(e), reason="incomplete", unusable=True) from None
        problems = await asyncio.to_thread(check, found, images=False)
        problems += preflight(found)
        if found.manifest.get("cuda"):
            problems += cudamod.check_restorable(found.manifest["cuda"], found.manifest.get("cuda_bytes", 0),
                                                 cudamod.gpu_inventory())
        t["prepare"] = time.monotonic() - started
        if problems:
            self.clean_after_failure(found)
            raise CheckpointFailed("cannot restore here: " + "; ".join(problems), reason="environment")
        started = time.monotonic()
        try:
            root = await self._criu_restore(found, tree, timeout)
        except CriuError as e:
            await self.kill_tree()
            self.clean_after_failure(found)
            raise CheckpointFailed(str(e), reason="criu_restore", unusable=True) from None
        t["criu_restore"] = time.monotonic() - started
        return Restored(root, found, prepared, t)

    async def resume_cuda(self, found: Found, pids: list[int]) -> float:
        """After a restore: resume CUDA in the processes that were suspended at the dump
        (recorded by their PID in the tree's namespace, which the restore keeps)."""
        inner = set(found.manifest.get("cuda_pids") or [])
        if not inner:
            return 0.0
        if self.cuda is None:
            raise CheckpointFailed("the checkpoint holds CUDA state but no CUDA checkpoint is available here",
                                   reason="no_cuda")
        started = time.monotonic()
        await cudamod.resume_tree([p for p in pids if inner_pid(p) in inner], self.cuda)
        return time.monotonic() - started

    async def kill_tree(self) -> None:
        if self.cgroup is not None and self.cgroup.exists():
            await self.cgroup.kill()

    def clean_after_failure(self, found: Found) -> None:
        """Remove what a restore put in place that nobody else uses: the link-remap files and the
        saved files on per-container tmpfs (/dev/shm) — the next attempt puts them back."""
        m = found.manifest or {}
        for rec in [*m.get("link_remaps", []), *(r for r in m.get("saved", []) if r["path"].startswith("/dev/shm/"))]:
            try:
                os.unlink(rec["path"])
            except OSError:
                pass

    def quarantine(self) -> Path | None:
        try:
            dest = quarantine(self.path)
        except OSError:
            return None
        log.error("%s: checkpoint moved aside to %s", self.name, dest, extra={"MODEL": self.name, "EVENT": "quarantine"})
        return dest

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
