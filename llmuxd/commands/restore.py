"""``llmuxd restore MODEL [--detached]``: restore the model from its checkpoint and serve it
until a signal or its exit, or leave it running (``--detached``) for the next ``llmuxd serve``
to adopt — without a running daemon.  Its phases are shown on stderr as they happen."""

from __future__ import annotations

import asyncio
import signal
import sys

from ..config import Config
from ..isolation.reaper import reap_forever
from ..progress_view import Shown
from . import CommandError
from .standalone import standalone_model, tidy


async def restore_model(config: Config, name: str, detached: bool) -> int:
    shown = Shown(sys.stderr)
    model = standalone_model(config, name, force_checkpoint=False, events=shown)
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
        tidy(model)
        reaper.cancel()
        shown.close()
