"""The commands that run here, without a daemon: ``serve`` (the daemon itself), ``check-config``,
``prepare-restore``, ``checkpoint``, ``restore``, ``inspect-checkpoint``, ``validate``,
``doctor``.  Each is one call into :mod:`llmuxd.commands` (or the daemon, the doctor) and prints
its typed result as text or, with ``--json``, as JSON (:mod:`.output`).  Heavy modules are
imported inside the commands: every ``llmuxd`` invocation imports this one."""

from __future__ import annotations

import argparse
import asyncio
import sys

from pydantic import BaseModel

from ..config import load_config
from ..status import DumpRecord, EvictionPolicy, ModelStatus
from .exits import Exit
from .output import emit, progress


def cmd_serve(args: argparse.Namespace) -> int:
    from ..api.dbus import DbusStartError
    from ..daemon import serve
    from ..log import setup_logging
    from ..reload import ConfigSource

    config = load_config(args.config)
    updates = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if updates:
        config = config.model_copy(update=updates)
    setup_logging(args.log_level)
    try:
        asyncio.run(serve(config, dbus=args.dbus, checkpoint_on_stop=args.checkpoint_on_stop,
                          source=ConfigSource(args.config, updates)))
    except (OSError, DbusStartError) as e:
        print(f"llmuxd: cannot serve: {e}", file=sys.stderr)
        return Exit.FAILED
    except KeyboardInterrupt:
        pass
    return Exit.OK


class ConfiguredModel(BaseModel):
    model_path: str
    port: int
    eviction: EvictionPolicy


class ConfigSummary(BaseModel):
    """What ``check-config`` read (``--json``); no secrets (tokens, keys) in it."""

    path: str
    models: dict[str, ConfiguredModel]
    notes: list[str]  # llmux settings accepted but not acted on
    warnings: list[str]  # llmux settings accepted but not supported yet (checkpoint.object_store)


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    summary = ConfigSummary(path=str(args.config), notes=config.ignored_settings(),
                            warnings=config.unsupported_settings(), models={
        n: ConfiguredModel(model_path=m.model_path, port=m.port, eviction=EvictionPolicy(
            weights=config.eviction_for(n).weights.value, process=config.eviction_for(n).process.value))
        for n, m in config.models.items()})
    emit(args, summary, "\n".join([
        f"{summary.path}: ok, {len(config.models)} model(s)",
        *(f"  {n}: {m.model_path} on port {m.port}, eviction {config.eviction_for(n)}"
          for n, m in config.models.items()),
        *(f"  note: {note}" for note in summary.notes),
        *(f"  warning: {warning}" for warning in summary.warnings)]))
    return Exit.OK


def cmd_prepare_restore(args: argparse.Namespace) -> int:
    from ..commands.prepare_restore import prepare_restore

    emit(args, prepare_restore(load_config(args.config)), None)  # text: the log, on stderr
    return Exit.OK


def _run(args: argparse.Namespace, coro_fn):
    """Run an offline command's coroutine on the config, with warnings (only) logged."""
    from ..log import setup_logging

    config = load_config(args.config)
    setup_logging("WARNING")
    return asyncio.run(coro_fn(config))


def render_checkpointed(st: ModelStatus) -> str:
    lc = st.last_checkpoint
    return (f"{st.name}: checkpointed to {st.checkpoint_path} in {st.last_sleep_secs:.2f} s"
            + (f" ({lc.image_bytes >> 20} MiB of images, {lc.saved_files} files saved)"
               if isinstance(lc, DumpRecord) else " (reused the images it was restored from)"))


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from ..commands.checkpoint import checkpoint_model
    from ..progress_view import Shown

    shown = Shown(sys.stderr)  # the model's phases as they happen
    try:
        st = _run(args, lambda c: checkpoint_model(c, args.model, progress(args), events=shown))
    finally:
        shown.close()
    emit(args, st, render_checkpointed(st))
    return Exit.OK


def render_restored(st: ModelStatus) -> str:
    secs = st.last_restore.seconds if st.last_restore else {}
    phases = ", ".join(f"{k} {v:.3f}s" for k, v in secs.items())
    return (f"{st.name}: restored in {st.last_wake_secs:.2f} s ({phases}); serving on port {st.port}, "
            f"root pid {st.pid}")


def cmd_restore(args: argparse.Namespace) -> int:
    from ..commands.restore import restore_model
    from ..progress_view import Shown

    shown = Shown(sys.stderr)  # the model's phases as they happen

    def restored(st: ModelStatus) -> None:
        shown.close()
        emit(args, st, render_restored(st))

    try:
        _run(args, lambda c: restore_model(c, args.model, args.detached, restored=restored, events=shown))
    finally:
        shown.close()
    return Exit.OK


def cmd_inspect_checkpoint(args: argparse.Namespace) -> int:
    from ..commands.inspect_checkpoint import inspect_checkpoint, render

    report = inspect_checkpoint(args.path, args.verify_images, args.key_file)
    emit(args, report, render(report))
    return Exit.OK if report.restorable else Exit.FAILED


def cmd_validate(args: argparse.Namespace) -> int:
    from ..commands.validate import render, validate

    report = _run(args, lambda c: validate(c, args.model, args.policies.split(","), args.cycles))
    emit(args, report, render(report))
    return Exit.OK if report.ok else Exit.FAILED


def cmd_doctor(args: argparse.Namespace) -> int:
    from ..doctor import run_doctor

    return run_doctor(args.config, as_json=args.json)

