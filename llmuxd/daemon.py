"""The daemon: one Switcher (the controller) and the transports around it."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from aiohttp import web

from .api.auth import Access
from .api.http import ServerLog, build_admin_app, build_app, build_metrics_app
from .config import Config, ConfigError
from .checkpoint.fsview import container_epoch
from .isolation.cgroups import CgroupLayout, CgroupUnavailable
from .isolation.reaper import become_subreaper, reap_forever
from .logfollow import Forwarder
from .switcher import Switcher
from .systemd import Notifier

log = logging.getLogger(__name__)


def _cgroup_layout(config: Config) -> CgroupLayout | None:
    try:
        layout = CgroupLayout.detect(instance=str(config.port))
        layout.enter_supervisor()
    except (CgroupUnavailable, OSError) as e:
        log.warning("cgroup v2 not usable (%s): tracking model trees by process session instead", e)
        return None
    log.info("cgroups: llmuxd in %s/supervisor, model trees in %s/model-<name>", layout.base.path, layout.base.path)
    return layout


class Daemon:
    def __init__(self, config: Config, dbus: str = "auto", checkpoint_on_stop: bool = False):
        self.config = config
        self.access = Access.from_config(config)  # first: takes the token out of the environment
        self.dbus_mode = dbus
        self.checkpoint_on_stop = checkpoint_on_stop or config.checkpoint_on_stop
        self.cgroups: CgroupLayout | None = None
        self.switcher: Switcher | None = None
        self.notifier = Notifier()
        self.dbus = None
        self.outputs: Forwarder | None = None  # the models' output, forwarded to llmuxd's log
        self._runners: list[web.AppRunner] = []
        self._stop = asyncio.Event()

    async def start(self) -> None:
        become_subreaper()
        self._reaper = asyncio.create_task(reap_forever(), name="reaper")
        container_epoch()  # mark when this container started, before any model runs
        for note in self.config.ignored_settings():
            log.warning("config: %s (accepted for llmux compatibility, not acted on)", note)
        for warning in self.config.unsupported_settings():
            log.warning("config: %s", warning)
        self.cgroups = _cgroup_layout(self.config)
        self.switcher = Switcher(self.config, cgroups=self.cgroups)
        self.outputs = Forwarder([m.output_source() for m in self.switcher.models.values()],
                                 max_bytes=self.config.logs.max_bytes, keep=self.config.logs.keep)
        self.outputs.start()
        self.notifier.switcher = self.switcher
        self.switcher.add_listener(self.notifier)
        await self.switcher.adopt_running()
        self.switcher.start()
        admin = self.config.admin_port
        await self._serve(build_app(self.switcher, self.access, with_control=not admin), self.config.host,
                          self.config.port, "port")
        if admin:
            await self._serve(build_admin_app(self.switcher, self.access), self.config.admin_host, admin, "admin_port")
            log.info("control API on http://%s:%d (not on the main port)", self.config.admin_host, admin)
        if self.config.metrics_port:  # llmux's default 9090; 0: /metrics on the ports above only
            await self._serve(build_metrics_app(self.switcher), self.config.host, self.config.metrics_port,
                              "metrics_port")
            log.info("metrics on http://%s:%d/metrics", self.config.host, self.config.metrics_port)
        await self._start_dbus()
        log.info(
            "llmuxd serving %d model(s) on http://%s:%d: %s", len(self.config.models), self.config.host,
            self.config.port, ", ".join(f"{n} ({self.config.eviction_for(n)})" for n in self.config.models),
        )
        self.notifier.ready()
        self.notifier.start_watchdog()

    async def _start_dbus(self) -> None:
        if self.dbus_mode == "off":
            return
        from .api.dbus import DbusTransport, system_bus_available

        if self.dbus_mode == "auto" and not system_bus_available():
            log.info("D-Bus: no system bus here; D-Bus control is off (use --dbus session for development)")
            return
        bus = "system" if self.dbus_mode == "auto" else self.dbus_mode
        self.dbus = DbusTransport(self.switcher, bus=bus)
        await self.dbus.start()

    async def _serve(self, app: web.Application, host: str, port: int, key: str) -> None:
        # keepalive_timeout: aiohttp closes a connection that has not sent a complete request
        # head this long after connecting (or after its last response): a client trickling its
        # headers is dropped.  handler_cancellation: a client that goes away cancels its handler,
        # so its upstream request is aborted at once.
        runner = web.AppRunner(app, handle_signals=False, access_log=None, logger=ServerLog(),
                               keepalive_timeout=self.config.client_timeout_secs, handler_cancellation=True,
                               shutdown_timeout=15)
        await runner.setup()
        self._runners.append(runner)
        try:
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        except OSError as e:  # which setting names the port that cannot be had
            raise OSError(e.errno, f"{key} {port} on {host}: {os.strerror(e.errno) if e.errno else e}") from None

    def request_stop(self) -> None:
        self._stop.set()

    async def run_until_stopped(self) -> None:
        loop = asyncio.get_running_loop()
        # SIGRTMIN+3: the image's STOPSIGNAL (for systemd), also delivered in entrypoint mode.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGRTMIN + 3):
            loop.add_signal_handler(sig, self.request_stop)
        await self._stop.wait()

    async def stop(self) -> None:
        log.info("stopping: closing listeners and stopping every model")
        self.notifier.stopping()
        keepalive = asyncio.create_task(self._extend_stop_timeout())
        try:
            if self.switcher is not None:  # open streams end now, with an error frame
                self.switcher.revoke_all("llmuxd is shutting down")
            for runner in self._runners:
                await runner.shutdown()
            if self.switcher is not None:
                if self.checkpoint_on_stop:
                    await self.switcher.checkpoint_all()
                await self.switcher.close()
            if self.dbus is not None:
                await self.dbus.stop()
            for runner in self._runners:
                await runner.cleanup()
            if self.cgroups is not None:
                self.cgroups.cleanup()
        finally:
            if self.outputs is not None:  # last: what the trees wrote while they stopped
                self.outputs.stop()
            keepalive.cancel()
            self.notifier.stop_watchdog()
            if getattr(self, "_reaper", None):
                self._reaper.cancel()
        log.info("stopped")

    async def _extend_stop_timeout(self) -> None:
        """While a long stop (checkpoints, slow backends) is in progress, keep systemd from
        killing us: EXTEND_TIMEOUT_USEC every 10 s, each granting 30 s more."""
        while True:
            self.notifier.extend_timeout(30)
            await asyncio.sleep(10)


async def serve(config: Config, **options) -> None:
    try:
        daemon = Daemon(config, **options)
    except ConfigError as e:
        print(e.render(), file=sys.stderr)
        raise SystemExit(2) from None
    try:
        await daemon.start()
        await daemon.run_until_stopped()
    finally:
        await daemon.stop()
