"""``llmuxd checkpoint MODEL``, ``llmuxd restore MODEL [--detached]`` and
``llmuxd inspect-checkpoint PATH``: the checkpoint machinery without a running daemon.

They use the daemon's own cgroup layout (``llmuxd-<port>`` or the service cgroup) without
moving themselves into it, so a tree left running by ``restore --detached`` is adopted by the
next ``llmuxd serve``."""

from __future__ import annotations

import asyncio
import signal
import socket
import stat
from pathlib import Path

from ..config import Config, Eviction, ProcessEviction, WeightsEviction
from ..isolation.cgroups import CgroupLayout, CgroupUnavailable
from ..isolation.reaper import reap_forever
from ..status import DumpRecord
from . import safefs
from .fsview import container_epoch
from .prepare import check
from .store import Settings, inspect
from .trust import normalized


class CommandError(Exception):
    pass


def _daemon_running(config: Config) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", config.port)) == 0


def _model(config: Config, name: str, force_checkpoint: bool):
    from ..daemon import become_subreaper
    from ..model import Model

    if name not in config.models:
        raise CommandError(f"unknown model {name!r}; known: {', '.join(config.models)}")
    if _daemon_running(config):
        raise CommandError(f"llmuxd is running on port {config.port}: use `llmuxd sleep {name}` / "
                           f"`llmuxd wake {name}` instead")
    if force_checkpoint:
        ev = config.eviction_for(name)
        weights = ev.weights if ev.weights is not WeightsEviction.RETAIN else WeightsEviction.DISCARD
        m = config.models[name].model_copy(update={"eviction": Eviction(weights=weights,
                                                                        process=ProcessEviction.CHECKPOINT)})
        config = config.model_copy(update={"models": {**config.models, name: m}})
    become_subreaper()
    container_epoch()
    try:
        layout = CgroupLayout.detect(instance=str(config.port))
        cgroup = layout.model(name)
    except (CgroupUnavailable, OSError):
        cgroup = None
    return Model(name, config, cgroup=cgroup)


def _tidy(model) -> None:
    """Leave no empty cgroup behind: the model's, and the llmuxd-<port> base if nothing else
    (a daemon) uses it."""
    if model.cgroup is None or model.cgroup.populated():
        return
    model.cgroup.remove()
    try:
        model.cgroup.path.parent.rmdir()  # fails while a daemon (or another model) lives there
    except OSError:
        pass


async def checkpoint_model(config: Config, name: str) -> int:
    """Start the model if needed (cold start or restore), warm it up, checkpoint it, exit."""
    model = _model(config, name, force_checkpoint=True)
    reaper = asyncio.create_task(reap_forever())
    try:
        await model.wake()
        print(f"{name}: {model.last_wake_kind} in {model.last_wake_secs:.2f} s")
        await model.backend.canary()  # warm-up: one full request through the tree
        await model.sleep()
        if model.state.value != "checkpointed":
            raise CommandError(f"{name}: checkpoint failed: {model.last_error}")
        lc = model.last_checkpoint
        print(f"{name}: checkpointed to {model.checkpointer.path} in {model.last_sleep_secs:.2f} s"
              + (f" ({lc.image_bytes >> 20} MiB of images, {lc.saved_files} files saved)"
                 if isinstance(lc, DumpRecord) else " (reused the images it was restored from)"))
        return 0
    finally:
        await model.stop()
        await model.close()
        _tidy(model)
        reaper.cancel()


async def restore_model(config: Config, name: str, detached: bool) -> int:
    model = _model(config, name, force_checkpoint=False)
    if model.state.value != "checkpointed":
        raise CommandError(f"{name}: no usable checkpoint at {model.checkpointer.path}: "
                           f"{model.last_error or model.checkpointer.found().detail}")
    reaper = asyncio.create_task(reap_forever())
    try:
        await model.wake()
        if model.last_wake_kind != "restore":
            await model.stop()
            raise CommandError(f"{name}: restore failed, cold-started instead (stopped again): {model.last_error}")
        secs = model.last_restore.seconds
        print(f"{name}: restored in {model.last_wake_secs:.2f} s ({', '.join(f'{k} {v:.3f}s' for k, v in secs.items())}); "
              f"serving on port {config.models[name].port}, root pid {model.backend.tree.root_pid}")
        if detached:
            model.backend.expect_exit()
            return 0
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        exited = asyncio.ensure_future(model.backend.tree.wait())
        await asyncio.wait([exited, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        await model.stop()
        return 0
    finally:
        await model.close()
        _tidy(model)
        reaper.cancel()


def _fmt_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def inspect_checkpoint(path: Path, verify_images: bool = False, key_file: Path | None = None) -> int:
    """The manifest in human form: what the checkpoint needs, what it saved, what this container
    lacks.  The folder must pass the same trust rule as for a restore (the sticky-directory
    exception applies above PATH itself)."""
    path = normalized(path)
    found = inspect(None, path, Settings(images_dir=path, key_file=key_file))
    if found.state == "none":
        raise CommandError(f"{path}: not a checkpoint (no such folder)")
    if found.state != "valid" or found.manifest is None:
        raise CommandError(f"{path}: not a usable checkpoint ({found.reason}): {found.detail}")
    m = found.manifest
    procs = m.needs.processes
    print(f"checkpoint {path}")
    print(f"  model {m.model} ({m.served_name}), eviction {m.eviction}, made {m.created} on kernel {m.host.kernel}")
    print(f"  images: {len(m.images)} files, {_fmt_size(sum(r.size for r in m.images.values()))}; "
          f"timings: {m.timings}")
    print(f"  processes: {len(procs)} ({', '.join(sorted({p.comm or '?' for p in procs}))}); "
          f"own PID namespace: {m.own_pidns or m.pidns}; {len(m.pids)} PIDs/TIDs")
    print(f"  listening: {', '.join(f'{x.addr}:{x.port}' for x in m.listen) or 'none'}")
    print(f"  canary: {m.canary!r}; CUDA state: {'yes' if m.cuda or m.cuda_pids else 'no'}")
    print(f"  saved (put back byte-exact): {len(m.saved)} files, {_fmt_size(sum(r.size for r in m.saved))}")
    for r in m.saved:
        print(f"    {r.path}  {_fmt_size(r.size)}  mode {r.mode:o}")
    for r in m.link_remaps:
        print(f"    {r.path}  (CRIU link_remap file)")
    print(f"  re-created empty (append-only logs): {len(m.recreate)}")
    for r in m.recreate:
        print(f"    {r.path}")
    print(f"  directories: {len(m.dirs)}; socket directories: {', '.join(m.socket_dirs) or 'none'}")
    by_origin: dict[str, int] = {}
    for v in m.verify:
        by_origin[v.origin] = by_origin.get(v.origin, 0) + 1
    print(f"  verified, not saved: {', '.join(f'{n} {k}' for k, n in sorted(by_origin.items()))}")
    missing = []
    for r in m.blobs():
        st = safefs.lstat(r.path)
        if st is None or (st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime_ns) != (r.size, r.mode & 0o777, r.mtime_ns):
            missing.append(r.path)
    print(f"in this container: {len(missing)} saved file(s) not in place (prepare-restore puts them back)")
    problems = check(found, images=verify_images)
    for p in problems:
        print(f"  PROBLEM: {p}")
    print("  restorable here" if not problems else f"  NOT restorable here: {len(problems)} problem(s)")
    return 0 if not problems else 1
