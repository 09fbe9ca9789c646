"""``llmuxd checkpoint MODEL``: start the model if needed, warm it up, checkpoint it (CRIU),
exit — the checkpoint machinery without a running daemon."""

from __future__ import annotations

import asyncio
from typing import Callable

from ..config import Config
from ..events import Listener
from ..isolation.reaper import reap_forever
from ..status import ModelStatus
from . import CommandError
from .standalone import standalone_model, tidy


async def checkpoint_model(config: Config, name: str, say: Callable[[str], None] = print,
                           events: Listener | None = None) -> ModelStatus:
    """Start the model if needed (cold start or restore), warm it up, checkpoint it, exit.
    ``say`` gets the progress lines, ``events`` the model's events (its phases as they happen);
    the model's status once checkpointed is the result."""
    model = standalone_model(config, name, force_checkpoint=True, events=events)
    reaper = asyncio.create_task(reap_forever())
    try:
        await model.wake()
        say(f"{name}: {model.last_wake_kind} in {model.last_wake_secs:.2f} s")
        await model.backend.canary()  # warm-up: one full request through the tree
        await model.sleep()
        if model.state.value != "checkpointed":
            raise CommandError(f"{name}: checkpoint failed: {model.last_error}")
        return model.status()
    finally:
        await model.stop()
        await model.close()
        tidy(model)
        reaper.cancel()
