"""The daemon: one Switcher (the controller) and the transports around it."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from .api.http import build_app, build_metrics_app
from .config import Config
from .switcher import Switcher

log = logging.getLogger(__name__)


class Daemon:
    def __init__(self, config: Config):
        self.config = config
        self.switcher = Switcher(config)
        self._runners: list[web.AppRunner] = []
        self._stop = asyncio.Event()

    async def start(self) -> None:
        for note in self.config.ignored_settings():
            log.warning("config: %s (accepted for llmux compatibility, not acted on)", note)
        self.switcher.start()
        await self._serve(build_app(self.switcher), self.config.port)
        if self.config.metrics_port:
            await self._serve(build_metrics_app(self.switcher), self.config.metrics_port)
        log.info(
            "llmuxd serving %d model(s) on http://%s:%d: %s", len(self.config.models), self.config.host,
            self.config.port, ", ".join(f"{n} ({self.config.eviction_for(n)})" for n in self.config.models),
        )

    async def _serve(self, app: web.Application, port: int) -> None:
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        self._runners.append(runner)
        await web.TCPSite(runner, self.config.host, port, reuse_address=True).start()

    def request_stop(self) -> None:
        self._stop.set()

    async def run_until_stopped(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self._stop.wait()

    async def stop(self) -> None:
        log.info("stopping: closing listeners and stopping every model")
        for runner in self._runners:
            await runner.shutdown()
        await self.switcher.close()
        for runner in self._runners:
            await runner.cleanup()
        log.info("stopped")


async def serve(config: Config) -> None:
    daemon = Daemon(config)
    try:
        await daemon.start()
        await daemon.run_until_stopped()
    finally:
        await daemon.stop()
