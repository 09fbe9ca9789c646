"""Checkpoint and restore of one model's process tree, around CRIU.

Every use of a checkpoint folder first applies the trust rule (:mod:`.trust`) and, with
``checkpoint.key_file``, checks the manifest's tag (:mod:`.seal`).

Dump: CUDA suspend (when the tree holds GPU state) -> CRIU dump of the tree, frozen through its
cgroup, into a private ``<checkpoint_path>.partial-<time>-<random>/`` (0700) -> the images made
0600, hashed (BLAKE3) and fsynced, several at a time, while the images are read and the saved
files (0600) copied and fsynced -> manifest written and fsynced, folders fsynced -> atomic
exchange into ``checkpoint_path`` (its folder fsynced) -> wait until the dumped tree is gone.
Nothing but what the dump wrote is synced (no machine-wide sync).  A crash at any point leaves
either the previous checkpoint or a ``.partial-`` folder that is never used.  CRIU is killed
after ``checkpoint.dump_timeout_secs``.

Phases timed (seconds, ``manifest.timings``): ``cuda_suspend``, ``criu_dump``; then, from CRIU's
end, ``digest_images`` (hashing and syncing the images) runs alongside ``read_images`` and
``save_files``, and ``manifest`` is the wall time of all three until the manifest's content is
known; ``write`` (manifest written, synced, exchanged into place) is only in what :meth:`dump`
returns (the manifest on disk cannot know it).

Restore: manifest read and checked -> image integrity (BLAKE3, several images at a time) -> put
back what the container lacks (confined, :mod:`.safefs`) -> check and preflight -> CRIU restore
into the model's cgroup (llmuxd is a child subreaper, so the restored root becomes its child),
killed with what it restored after ``checkpoint.restore_timeout_secs`` -> CUDA resume.  What
follows (health, wake sequence, canary) is the model's: ``llmuxd/model/checkpoint.py``.  Phases
timed (``Restored.seconds``, one after the other): ``read_manifest``, ``verify_images``,
``prepare``, ``criu_restore``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ..isolation.cgroups import Cgroup
from ..isolation.pidinit import RESTORED
from ..isolation.procfs import inner_pid, outlive_dirs, shm_files
from ..isolation.tree import ProcessTree
from ..isolation.xstate import XstateError, amx_here, give_back_amx
from .. import cuda as cudamod
from . import remaps, safefs
from .describe import describe_dump
from .digest import Growing
from .durable import Writeback, fsync_dir
from .criu import Criu, CriuError, CriuTimeout, error_lines
from .images import ImageError
from .manifest import DumpFacts
from .model import CudaInventory, Manifest
from .outcome import CheckpointFailed, GpuReleased, Restored
from .prepare import Prepared, Unusable, apply, check, check_images, preflight
from .store import (IMAGES, Found, Settings, discard, exchange, inspect, new_partial, quarantine,
                    remove_partials, write_manifest)
from .trust import Untrusted, check_tree, normalized

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, name: str, path: Path, criu: Criu, cgroup: Cgroup | None, work_dir: Path,
                 cuda: cudamod.SuspendChoice | None = None, settings: Settings | None = None,
                 on_step: Callable[[str], None] = lambda step: None):
        self.name = name
        self.on_step = on_step  # told each timed step as it begins (its name: the timings' key)
        self.path = normalized(path)
        self.settings = settings or Settings(self.path.parent)
        self.criu = criu
        self.cgroup = cgroup
        self.work_dir = normalized(work_dir)
        self.cuda = cuda or cudamod.SuspendChoice()  # the daemon's one choice, used when a tree holds GPU state
        self._placed: list[str] = []  # saved files the last restore attempt has in place
        self._transient: set[str] = set()  # of the manifest's saved files, those removed after a failure
        self._spawned: int | None = None  # the init this restore attempt started (namespaced restore)

    def _step(self, name: str) -> float:
        self.on_step(name)
        return time.monotonic()

    def found(self) -> Found:
        return inspect(self.name, self.path, self.settings)

    def discover(self) -> Found:
        """At start: remove unfinished dumps of our own, then say what the folder holds.  One that
        cannot be used is quarantined when it is ours and damaged, left exactly as it is when it
        fails the trust rule or its tag; ``detail`` then says which and why."""
        fields = {"MODEL": self.name, "EVENT": "discover"}
        try:
            for leftover in remove_partials(self.path, self.settings):
                log.warning("%s: removed the leftover of an unfinished dump: %s", self.name, leftover, extra=fields)
            found = self.found()
        except Exception as e:  # noqa: BLE001 - one model's checkpoint never stops the daemon
            found = Found(self.name, self.path, "refused", f"{type(e).__name__}: {e}", reason="internal")
        if found.state == "valid":
            log.info("%s: found %s at %s", self.name, found.detail, found.path, extra=fields)
            try:  # ours: private, also when an older llmuxd wrote it with the umask's modes
                safefs.secure_tree(str(found.path))
            except OSError:
                pass
        elif found.state != "none":
            what = "left in place"
            if found.state == "invalid":
                moved = self.quarantine()
                what = f"moved to {moved}" if moved else "could not be moved aside"
            found.detail = f"checkpoint at {found.path} not used ({found.reason}): {found.detail}; {what}"
            log.warning("%s: %s", self.name, found.detail, extra=fields)
        return found

    # -- dump ----------------------------------------------------------------------------------
    @staticmethod
    def _no_cuda(message: str) -> CheckpointFailed:
        return CheckpointFailed(message, reason="no_cuda")

    async def release_gpu(self, tree: ProcessTree) -> GpuReleased:
        """Suspend the CUDA state of the tree's GPU processes (the first step of a dump)."""
        gpu_pids = cudamod.gpu_processes(tree.pids())
        if not gpu_pids:
            return GpuReleased()
        cuda = self.cuda.require(f"processes {gpu_pids} hold", self._no_cuda)
        started = self._step("cuda_suspend")
        inner = [q for p in gpu_pids if (q := inner_pid(p)) is not None]
        needs = cudamod.gpu_bytes_of(gpu_pids)
        suspended = await cudamod.suspend_tree(gpu_pids, cuda)
        return GpuReleased(suspended, cuda, inner, needs, time.monotonic() - started)

    async def resume_gpu(self, released: GpuReleased) -> None:
        """Give a tree whose dump did not happen its GPU back."""
        if released.suspended:
            await cudamod.resume_tree(released.suspended, released.cuda)

    async def dump(self, tree: ProcessTree, facts: DumpFacts, released: GpuReleased | None = None) -> Manifest:
        """Dump the tree (after :meth:`release_gpu`, done here unless ``released`` says it was);
        returns the manifest.  On failure nothing that looks like a checkpoint is left behind,
        and the tree may still be running (after a CRIU failure, with its GPU given back).

        A tree in its own PID and mount namespaces is dumped from inside them (CRIU entered
        into the init's namespaces, dumping the server by its inner PID): no namespace or mount
        state goes into the images, and a restore needs a fresh pair of namespaces only."""
        server = tree.server_pid
        if server is None:
            raise CheckpointFailed("the model's process tree is gone", reason="gone")
        enter = tree.root_pid if tree.namespaced else None
        target = inner_pid(server) if enter else server
        facts = replace(facts, model=self.name, own_pidns=bool(enter))
        if not self.criu.available():
            raise CheckpointFailed(f"CRIU not found at {self.criu.path!r} (see `llmuxd doctor`)", reason="no_criu")
        try:
            key = self.settings.key()
            partial = new_partial(self.path, self.settings)
        except Untrusted as e:
            raise CheckpointFailed(f"checkpoint not written: {e}", reason="untrusted") from None
        except (OSError, safefs.Unsafe) as e:
            raise CheckpointFailed(f"checkpoint could not be written: {e}", reason="write") from None
        t: dict[str, float] = {}
        images = partial / IMAGES
        try:
            os.mkdir(images, 0o700)
            if released is None:
                released = await self.release_gpu(tree)
            if released.suspended:
                facts = replace(facts, cuda_pids=released.cuda_pids, cuda_bytes=released.cuda_bytes)
                t["cuda_suspend"] = released.seconds
            await asyncio.to_thread(self._before_dump, tree, facts.port)
            started = self._step("criu_dump")
            written = asyncio.Event()  # the disk writes the images out while CRIU writes them,
            growing = Growing()  # and their memory pages are hashed as they come
            writeback = asyncio.create_task(Writeback(images, growing).run(written))
            try:
                await self.criu.dump(target, images, freeze_cgroup=self.cgroup.path if self.cgroup else None,
                                     enter=enter, timeout=self.settings.dump_timeout)
            finally:
                written.set()
                await writeback
            t["criu_dump"] = time.monotonic() - started
            started = self._step("manifest")
            if released.suspended:
                facts = replace(facts, cuda=cudamod.gpu_inventory())
            log.debug("%s: %d MiB of the images hashed while CRIU wrote them", self.name, growing.hashed >> 20,
                      extra={"MODEL": self.name, "EVENT": "dump"})
            manifest = await asyncio.to_thread(describe_dump, images, partial, facts, t, growing)
            t["manifest"] = time.monotonic() - started
            manifest = manifest.model_copy(update={"timings": dict(t)})
            started = self._step("write")
            await asyncio.to_thread(write_manifest, partial, manifest, key)
            self.settings.check(self.path)  # still nobody else's folder at the destination
            exchange(partial, self.path)  # the old checkpoint (if any) is now at `partial`
            try:
                await asyncio.to_thread(fsync_dir, self.path.parent)
            except OSError as e:  # in place; only whether the exchange survives a crash is not known
                log.warning("%s: the folder of %s could not be synced: %s", self.name, self.path, e,
                            extra={"MODEL": self.name, "EVENT": "dump"})
            t["write"] = time.monotonic() - started
            manifest = manifest.model_copy(update={"timings": t})
        except CriuError as e:
            if isinstance(e, CriuTimeout):
                self._thaw()
            if released is not None:  # the tree lives on: give it its GPU back
                await self.resume_gpu(released)
            raise CheckpointFailed(str(e), reason="criu_dump") from None
        except Untrusted as e:
            raise CheckpointFailed(f"checkpoint not written: {e}", reason="untrusted") from None
        except (OSError, ImageError, safefs.Unsafe, safefs.DigestMismatch) as e:
            raise CheckpointFailed(f"checkpoint could not be written: {e}", reason="write") from None
        finally:  # the unfinished dump, or the previous checkpoint: off the event loop (GBs of files)
            await asyncio.to_thread(shutil.rmtree, partial, ignore_errors=True)
        return manifest

    def _before_dump(self, tree: ProcessTree, port: int) -> None:
        """Note what the tree holds that can outlive it, and clear the way for CRIU's link_remap.N
        names (see :mod:`.remaps`)."""
        tree.note_files()
        self.release_put_back()
        if gone := remaps.remove_stale(outlive_dirs(shm_files(tree.pids())), port):
            log.info("%s: removed stale link-remap files of earlier checkpoints: %s", self.name, ", ".join(gone),
                     extra={"MODEL": self.name, "EVENT": "dump"})

    def _thaw(self) -> None:
        """A CRIU killed while the cgroup was frozen leaves it frozen: thaw it."""
        if self.cgroup is not None:
            try:
                (self.cgroup.path / "cgroup.freeze").write_text("0")
            except OSError:
                pass

    # -- restore ---------------------------------------------------------------------------------
    async def _criu_restore(self, m: Manifest, tree: ProcessTree, stopped: bool) -> int:
        """CRIU restore; ``stopped``: the tree is left stopped (see :meth:`_give_back_amx`)."""
        images, work, timeout = self.path / IMAGES, self.work_dir, self.settings.restore_timeout
        if not m.own_pidns:  # dumped in the container's PID namespace
            root = await self.criu.restore(images, work, self.cgroup, timeout=timeout, leave_stopped=stopped)
            tree.adopt(root)
            return root
        # A fresh PID + mount namespace whose init runs criu restore, then adopts the tree.
        argv = await self.criu.restore_argv(images, work, leave_stopped=stopped)
        root = self._spawned = await tree.spawn(argv, dict(os.environ), restore_dir=work)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (work / RESTORED).exists():
            if not tree.running:
                raise CriuError("restore", error_lines(work / "restore.log"), work / "restore.log")
            if loop.time() > deadline:
                raise CriuTimeout("restore", f"not done after {timeout:g} s: killed", work / "restore.log")
            await asyncio.sleep(0.01)
        return root

    async def restore(self, tree: ProcessTree, port: int, served_name: str) -> Restored:
        """Verify, prepare and CRIU-restore a checkpoint of a server for ``served_name`` on
        ``port``.  Every failure is a CheckpointFailed, after what was restored is killed and what
        was put in place is removed."""
        started = self._step("read_manifest")
        found = await asyncio.to_thread(self.found)
        read_manifest = time.monotonic() - started
        if found.state != "valid" or found.manifest is None:
            raise CheckpointFailed(found.detail, reason=found.reason or "invalid", unusable=found.state == "invalid")
        m = found.manifest
        if m.port != port or m.served_name != served_name:
            # A restored server listens where it listened at the dump: it could only fail the
            # health check after startup_timeout_secs.
            raise CheckpointFailed(f"cannot restore here: the checkpoint serves {m.served_name!r} on port {m.port}, "
                                   f"the config {served_name!r} on port {port}", reason="environment")
        try:
            return await self._restore(found, found.manifest, tree, {"read_manifest": read_manifest})
        except CheckpointFailed:
            raise
        except Exception as e:  # noqa: BLE001 - never out of a restore but as CheckpointFailed
            log.exception("%s: restore failed", self.name, extra={"MODEL": self.name, "EVENT": "restore"})
            await self._kill(tree)
            self.clean_after_failure()
            raise CheckpointFailed(f"restore failed: {type(e).__name__}: {e}", reason="internal") from None

    def _work_folder(self) -> None:
        """CRIU's work folder (its log, pidfile, stats; llmuxd's restored marker): created 0700,
        reached without following links, by the same rule as a checkpoint folder (CRIU, as root,
        writes there through whatever it finds), emptied of what a restore writes."""
        work = str(self.work_dir)
        try:
            safefs.make_dir(work, mode=0o700)
            check_tree(self.work_dir, base=self.work_dir)
        except Untrusted as e:
            raise CheckpointFailed(f"cannot restore: CRIU's work folder is not safe: {e}", reason="untrusted") from None
        except (OSError, safefs.Unsafe) as e:
            raise CheckpointFailed(f"cannot restore: CRIU's work folder {work}: {e}", reason="environment") from None
        for name in (RESTORED, "restore.pid", "restore.log", "stats-restore"):  # files or links: never followed
            try:
                os.unlink(f"{work}/{name}")
            except (FileNotFoundError, IsADirectoryError):
                pass

    async def _restore(self, found: Found, m: Manifest, tree: ProcessTree, t: dict[str, float]) -> Restored:
        self._spawned = None
        self._work_folder()
        started = self._step("verify_images")
        problems = await asyncio.to_thread(check_images, found)
        t["verify_images"] = time.monotonic() - started
        if problems:
            raise CheckpointFailed("; ".join(problems), reason="corrupt", unusable=True)
        started = self._step("prepare")
        self._placed = []
        self._transient = {r.path for r in m.transient()}
        try:
            prepared: Prepared = await asyncio.to_thread(apply, found, self._placed)
        except Unusable as e:
            self.clean_after_failure()
            raise CheckpointFailed(str(e), reason="incomplete", unusable=True) from None
        except (safefs.Unsafe, OSError) as e:
            self.clean_after_failure()
            raise CheckpointFailed(f"cannot restore here: {e}", reason="environment") from None
        problems = await asyncio.to_thread(check, found, images=False)
        problems += preflight(found)
        if m.cuda or m.cuda_pids:
            problems += cudamod.check_restorable(_inventory(m.cuda), m.cuda_bytes or 0, cudamod.gpu_inventory())
        t["prepare"] = time.monotonic() - started
        if problems:
            self.clean_after_failure()
            raise CheckpointFailed("cannot restore here: " + "; ".join(problems), reason="environment")
        started = self._step("criu_restore")
        stopped = amx_here()  # the restored processes get their AMX right back before they run
        try:
            root = await self._criu_restore(m, tree, stopped)
        except CriuError as e:
            await self._kill(tree)
            self.clean_after_failure()
            timed_out = isinstance(e, CriuTimeout)
            raise CheckpointFailed(str(e), reason="timeout" if timed_out else "criu_restore",
                                   unusable=not timed_out) from None
        t["criu_restore"] = time.monotonic() - started
        if stopped:
            started = self._step("amx_right")
            try:
                await asyncio.to_thread(self._give_back_amx, tree)
            except XstateError as e:
                await self._kill(tree)
                self.clean_after_failure()
                raise CheckpointFailed(f"cannot restore here: {e}", reason="environment") from None
            t["amx_right"] = time.monotonic() - started
        return Restored(root, found, m, prepared.done, t)

    @staticmethod
    def _give_back_amx(tree: ProcessTree) -> None:
        """The right to use AMX is not in CRIU's images (isolation/xstate.py): each restored
        process, still stopped, asks for it again; then the tree runs."""
        pids = tree.workload_pids()
        give_back_amx(pids)
        for pid in pids:
            os.kill(pid, signal.SIGCONT)

    async def resume_cuda(self, m: Manifest, pids: list[int]) -> float:
        """After a restore: resume CUDA in the processes that were suspended at the dump
        (recorded by their PID in the tree's namespace, which the restore keeps)."""
        inner = set(m.cuda_pids)
        if not inner:
            return 0.0
        cuda = self.cuda.require("the checkpoint holds", self._no_cuda)
        started = self._step("cuda_resume")
        await cudamod.resume_tree([p for p in pids if inner_pid(p) in inner], cuda)
        return time.monotonic() - started

    async def kill_tree(self) -> None:
        if self.cgroup is not None and self.cgroup.exists():
            await self.cgroup.kill()

    async def _kill(self, tree: ProcessTree) -> None:
        """Kill whatever a failed restore started: the model's cgroup, and the init it spawned."""
        await self.kill_tree()
        if self._spawned is not None and tree.root_pid == self._spawned:
            await tree.kill(grace_secs=0)
        self._spawned = None

    def clean_after_failure(self) -> None:
        """Remove what the last restore attempt has in place that nobody else uses: the
        link-remap files and the saved files on per-container tmpfs (/dev/shm) — the next
        attempt puts them back.  Only those paths, and only while they are regular files."""
        for p in self._placed:
            if p in self._transient:
                safefs.unlink_regular(p)
        self._placed = []

    def release_put_back(self) -> None:
        """Before the model's tree is started afresh or dumped: what a put-back left in place for a
        restore that is not happening (its /dev/shm files and link_remap.N, marked by us, unheld) goes; a
        restore would put them back."""
        found = self.found()
        m = found.manifest
        if m is not None and (gone := remaps.remove_marked((r.path for r in m.transient()), m.port)):
            log.info("%s: removed what was put back for a restore that did not happen: %s", self.name,
                     ", ".join(gone), extra={"MODEL": self.name, "EVENT": "cold_start"})

    def quarantine(self) -> Path | None:
        try:
            dest = quarantine(self.path, self.settings)
        except (OSError, Untrusted) as e:
            log.error("%s: checkpoint at %s not moved aside: %s", self.name, self.path, e,
                      extra={"MODEL": self.name, "EVENT": "quarantine"})
            return None
        log.error("%s: checkpoint moved aside to %s", self.name, dest, extra={"MODEL": self.name, "EVENT": "quarantine"})
        return dest

    def discard(self) -> None:
        if not discard(self.path, self.settings):
            log.warning("%s: checkpoint at %s left in place: it fails the trust rule", self.name, self.path,
                        extra={"MODEL": self.name, "EVENT": "discard"})


def _inventory(inv: CudaInventory | None) -> dict | None:
    return inv.model_dump() if inv is not None else None
