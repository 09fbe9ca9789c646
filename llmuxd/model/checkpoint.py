"""``checkpoint``: the tree is dumped by CRIU and ended; the next wake restores it.

An eviction for a switch frees the GPU first (weights asleep, CUDA state suspended) and
returns: the dump and the manifest then finish in the background while the next model wakes
(the model is ``dumping`` meanwhile; a wake or stop of it waits for the dump).  A dump that fails
there escalates to stop like any failed eviction; a crash leaves only a ``.partial-`` folder,
never used and removed at the next start.

:meth:`Checkpoint.restore` is the whole restore, top to bottom: verify the images, prepare what
they need, CRIU restore (those three in :class:`~llmuxd.checkpoint.checkpointer.Checkpointer`),
CUDA resume, health, the weights' wake sequence, the canary.  Any failure kills what was
restored and the model cold-starts instead (the checkpoint is kept, or quarantined when it is
damaged)."""

from __future__ import annotations

import asyncio
import logging
import time

from .. import redact
from ..backends.vllm import BackendError
from ..checkpoint.checkpointer import Checkpointer
from ..checkpoint.outcome import CheckpointFailed, GpuReleased
from ..checkpoint.manifest import DumpFacts
from ..checkpoint.store import Found
from ..config import ProcessEviction as Kind
from ..cuda import CudaError
from ..events import State
from ..status import DumpRecord, RestoreRecord, ReusedCheckpoint
from .eviction import ModelOps, ProcessEviction, TransitionError

log = logging.getLogger(__name__)


class Checkpoint(ProcessEviction):
    kind = Kind.CHECKPOINT
    resting = State.CHECKPOINTED

    def __init__(self, model: ModelOps, checkpointer: Checkpointer, keep_images: bool, link_remaps: asyncio.Lock):
        super().__init__(model)
        self.checkpointer = checkpointer
        self.keep_images = keep_images
        #: Shared by every model of the daemon: a dump and a restore of two trees never overlap.
        #: Both use CRIU's link remaps in the shared /dev/shm, ``link_remap.N`` with N counted per
        #: dump, so alike trees need the same names (checkpoint/remaps.py): a dump whose name a
        #: restore has just put back fails, and a put-back finds the dump's in its way.
        self.link_remaps = link_remaps
        self.restored_from: float | None = None  # created_ts of the checkpoint the tree came from
        self.last_dump: DumpRecord | ReusedCheckpoint | None = None
        self.last_restore: RestoreRecord | None = None
        self._canary: str | None = None
        self._reuse = False  # this eviction reuses the images (decided once, before the weights)
        self._pending: tuple[DumpFacts, GpuReleased] | None = None  # a dump left for finish()

    # -- evict -----------------------------------------------------------------------------------
    async def before_weights(self) -> None:
        """The canary (one greedy answer) is taken while the model still serves; a restore must
        give the same answer.  Not needed when the images are reused (they were checked)."""
        self._reuse, self._canary = self.reusable(), None
        if not self._reuse:
            self.model.step("canary")
            self._canary = await self.model.backend.canary()

    def reusable(self) -> bool:
        """keep_images: the tree was restored from the checkpoint on disk and has not been
        restarted since, so the images still describe it — llmux's reuse: no new dump."""
        if not (self.keep_images and self.restored_from):
            return False
        found = self.checkpointer.found()
        return found.state == "valid" and found.manifest is not None and found.manifest.created_ts == self.restored_from

    async def evict(self, *, background: bool = False) -> State:
        m = self.model
        if self._reuse:
            log.info("%s: keep_images: reusing the checkpoint it was restored from", m.name,
                     extra={"MODEL": m.name, "EVENT": "checkpoint_reuse"})
            m.step("stop")
            await m.stop_tree()
            self.last_dump = ReusedCheckpoint()
            return self.resting
        facts = DumpFacts(model=m.name, eviction=str(m.eviction), served_name=m.backend.served_name, port=m.port,
                          argv=m.backend.argv(), canary=self._canary, sleep_level=m.sleep_level)
        released = await self.checkpointer.release_gpu(m.backend.tree)  # from here the GPU is free
        self._pending = (facts, released)
        return State.DUMPING if background else await self.finish()

    async def finish(self) -> State:
        """CRIU dump, manifest, and the end of the tree."""
        m = self.model
        assert self._pending is not None
        (facts, released), self._pending = self._pending, None
        m.backend.expect_exit()  # once dumped, the tree is ended (by us)
        async with self.link_remaps:  # from CRIU's link remaps to their removal with the tree
            try:
                manifest = await self.checkpointer.dump(m.backend.tree, facts, released)
            except CheckpointFailed:
                if m.backend.running:  # the dump failed before the end: the tree still serves
                    m.backend.unexpect_exit()
                raise
            m.step("stop")
            await m.stop_tree(grace_secs=0)  # dumped and stopped: kill it, wait until all is gone
        m.events.checkpoint_written(m.name, manifest.image_bytes)
        self.restored_from = None
        self.last_dump = DumpRecord(path=str(self.checkpointer.path), image_bytes=manifest.image_bytes,
                                    saved_files=len(manifest.saved),
                                    seconds={k: round(v, 4) for k, v in manifest.timings.items()})
        log.info("%s: checkpointed to %s (%d MiB of images, %d files saved)", m.name, self.checkpointer.path,
                 manifest.image_bytes >> 20, len(manifest.saved), extra={"MODEL": m.name, "EVENT": "checkpoint"})
        return self.resting

    # -- resume ----------------------------------------------------------------------------------
    def expected_kind(self) -> str:
        return "restore"

    async def resume(self) -> str:
        """Restore; when that fails, cold-start (a cold start that fails too leaves the model
        checkpointed while its checkpoint is still usable: it stays the way back)."""
        try:
            await self.restore()
            return "restore"
        except CheckpointFailed as e:
            self._restore_failed(e)
        try:
            await self.model.cold_start()
        except TransitionError:
            if self.checkpointer.found().state == "valid":
                self.model.set_state(State.CHECKPOINTED)
            raise
        return "cold_start"

    async def restore(self) -> None:
        """The restore sequence; any failure kills what was restored and raises CheckpointFailed."""
        m = self.model
        m.set_state(State.RESTORING)
        # Only into an existing file: the restore re-creates a missing one itself.
        m.backend.mark(f"restoring from {self.checkpointer.path}", create=False)
        async with self.link_remaps:  # the put-back's link remaps are consumed by CRIU's restore
            r = await self.checkpointer.restore(m.backend.tree, m.port, m.backend.served_name)  # verify, prepare, CRIU
        manifest = r.manifest
        t = dict(r.seconds)
        try:
            m.backend.watch_restored()
            t["cuda_resume"] = await self.checkpointer.resume_cuda(manifest, m.backend.pids())
            m.step("health")
            started = time.monotonic()
            await m.backend.wait_ready(m.config.startup_timeout_for(m.name))
            t["health"] = time.monotonic() - started
            started = time.monotonic()
            m.sleep_level = manifest.sleep_level
            await m.wake_weights()
            t["wake_sequence"] = time.monotonic() - started
            if manifest.canary is not None:
                m.step("canary")
                started = time.monotonic()
                answer = await m.backend.canary()
                t["canary"] = time.monotonic() - started
                if answer != manifest.canary:
                    raise CheckpointFailed(f"canary answer after restore {answer!r} differs from the one "
                                           f"recorded before the dump {manifest.canary!r}", reason="canary")
        except Exception as e:  # noqa: BLE001 - a restore fails as CheckpointFailed, never stuck in restoring
            await m.backend.stop(grace_secs=0)
            self.checkpointer.clean_after_failure()
            if isinstance(e, CheckpointFailed):
                raise
            reason = "wake" if isinstance(e, (BackendError, CudaError)) else "internal"
            raise CheckpointFailed(f"restored tree did not come up: {e}", reason=reason) from None
        self.last_restore = RestoreRecord(from_=str(r.found.path), created=manifest.created, prepared=len(r.prepared),
                                          seconds={k: round(v, 4) for k, v in t.items()})
        m.events.checkpoint_restored(m.name, manifest.image_bytes)
        log.info("%s: restored from %s (%s)", m.name, r.found.path, ", ".join(f"{k} {v:.3f}s" for k, v in t.items()),
                 extra={"MODEL": m.name, "EVENT": "restore", "DURATION_S": f"{sum(t.values()):.3f}"})
        if self.keep_images:
            self.restored_from = manifest.created_ts
        else:
            self.checkpointer.discard()

    def _restore_failed(self, e: CheckpointFailed) -> None:
        if e.unusable:
            moved = self.checkpointer.quarantine()
            what = f"checkpoint unusable, moved to {moved}" if moved else "checkpoint unusable"
        else:
            what = f"checkpoint kept at {self.checkpointer.path}"
        self.model.restore_failed(f"restore failed ({e.reason}): {e}; {what}; cold-starting instead", e.reason,
                                  self.model.backend.output_tail() or None)

    # -- around a tree that is not from this checkpoint -----------------------------------------
    def made_otherwise(self, found: Found) -> str | None:
        """Why the valid checkpoint ``found`` does not hold a tree of this model's settings (its
        command line differs: a restore would bring back the old settings), or None."""
        recorded = found.manifest.argv if found.manifest is not None else None
        if recorded is not None and recorded != redact.argv(self.model.backend.argv()):
            return f"the checkpoint at {found.path} was made with another command line: {' '.join(recorded)}"
        return None


    async def new_tree(self) -> None:
        """Before a cold start: no checkpoint describes the new tree, and what a put-back left
        for a restore that is not happening goes."""
        self.restored_from = None
        await asyncio.to_thread(self.checkpointer.release_put_back)
