"""``llmuxd restore MODEL [--detached]``: restore the model from its checkpoint and serve it
until a signal or its exit, or leave it running (``--detached``) for the next ``llmuxd serve``
to adopt — without a running daemon."""

from __future__ import annotations

import asyncio
import signal
from typing import Callable

from ..config import Config
from ..events import Listener
from ..isolation.reaper import reap_forever
from ..status import ModelStatus
from . import CommandError
from .standalone import standalone_model, tidy


async def restore_model(config: Config, name: str, detached: bool, restored: Callable[[ModelStatus], None],
                        events: Listener | None = None) -> None:
    """Restore ``name``; ``restored`` gets its status once it serves (``events``: the model's
    events, its phases as they happen).  Then leave it running (``detached``) or serve until
    SIGTERM/SIGINT or the tree's exit."""
    model = standalone_model(config, name, force_checkpoint=False, events=events)
    if model.state.value != "checkpointed":
        raise CommandError(f"{name}: no usable checkpoint at {model.checkpointer.path}: "
                           f"{model.last_error or model.checkpointer.found().detail}")
    reaper = asyncio.create_task(reap_forever())
    try:
        await model.wake()
        if model.last_wake_kind != "restore":
            await model.stop()
            raise CommandError(f"{name}: restore failed, cold-started instead (stopped again): {model.last_error}")
        restored(model.status())
        if detached:
            model.backend.expect_exit()
            return
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        exited = asyncio.ensure_future(model.backend.tree.wait())
        await asyncio.wait([exited, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        await model.stop()
    finally:
        await model.close()
        tidy(model)
        reaper.cancel()
