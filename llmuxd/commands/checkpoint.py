"""``llmuxd checkpoint MODEL``: start the model if needed, warm it up, checkpoint it (CRIU),
exit — the checkpoint machinery without a running daemon.  Its phases are shown on stderr as
they happen (:mod:`llmuxd.progress_view`)."""

from __future__ import annotations

import asyncio
import sys

from ..config import Config
from ..isolation.reaper import reap_forever
from ..progress_view import Shown
from ..status import DumpRecord
from . import CommandError
from .standalone import standalone_model, tidy


async def checkpoint_model(config: Config, name: str) -> int:
    """Start the model if needed (cold start or restore), warm it up, checkpoint it, exit."""
    shown = Shown(sys.stderr)
    model = standalone_model(config, name, force_checkpoint=True, events=shown)
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
        tidy(model)
        reaper.cancel()
        shown.close()
