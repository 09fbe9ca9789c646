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
from .config import Config, ConfigError, ProcessEviction
from .checkpoint.fsview import container_epoch
from .errors import ConfigRefused, LlmuxdError
from .events import Listener, State
from .isolation.cgroups import CgroupLayout, CgroupUnavailable
from .isolation.reaper import become_subreaper, reap_forever
from .logfollow import Forwarder
from .reload import ConfigSource
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


async def adopt_running(switcher: Switcher) -> None:
    """After a restart: adopt the model trees still running in their cgroups, or stop them;
    never two backends for one model, never more than one model awake."""
    if switcher.cgroups is None:
        return
    for name, cg in switcher.cgroups.existing_models().items():
        pids = cg.procs()
        if not pids:
            cg.remove()
        elif name not in switcher.models:
            log.warning("stopping tree of unconfigured model %r (pids %s)", name, pids)
            await cg.kill()
            cg.remove()
        elif await switcher.models[name].adopt(pids) and switcher.models[name].state is State.AWAKE:
            if switcher.active is None:
                switcher.active = name
            else:  # two awake: keep the first, evict the other
                await switcher.models[name].sleep()


async def checkpoint_all(switcher: Switcher) -> None:
    """At shutdown: put every running model whose process eviction is `checkpoint` to sleep
    (that is: checkpoint it), so the next llmuxd — in this container or a new one — restores it."""
    for name, m in list(switcher.models.items()):
        if m.eviction.process is ProcessEviction.CHECKPOINT and m.state in (State.AWAKE, State.ASLEEP):
            log.info("checkpointing %s before stopping", name, extra={"MODEL": name, "EVENT": "checkpoint_on_stop"})
            try:
                await switcher.sleep(name)
            except Exception as e:  # noqa: BLE001 - stopping goes on
                log.error("checkpoint of %s at stop failed: %s", name, e)


class Daemon(Listener):
    def __init__(self, config: Config, dbus: str = "auto", checkpoint_on_stop: bool = False,
                 source: ConfigSource | None = None):
        self.config = config
        self.source = source  # the config file, re-read by a reload
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
        self._reloads: set[asyncio.Task] = set()

    async def start(self) -> None:
        become_subreaper()
        self._reaper = asyncio.create_task(reap_forever(), name="reaper")
        container_epoch()  # mark when this container started, before any model runs
        for note in self.config.ignored_settings():
            log.warning("config: %s (accepted for llmux compatibility, not acted on)", note)
        for warning in self.config.unsupported_settings():
            log.warning("config: %s", warning)
        self.cgroups = _cgroup_layout(self.config)
        self.switcher = Switcher(self.config, cgroups=self.cgroups, source=self.source)
        self.outputs = Forwarder([m.output_source() for m in self.switcher.models.values()],
                                 max_bytes=self.config.logs.max_bytes, keep=self.config.logs.keep)
        self.outputs.start()
        self.notifier.switcher = self.switcher
        self.switcher.add_listener(self.notifier)
        self.switcher.add_listener(self)  # (reload_done)
        await adopt_running(self.switcher)
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
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)  # systemctl reload (ExecReload=kill -HUP)
        await self._stop.wait()

    def request_reload(self) -> None:
        """SIGHUP: reload the config file; the outcome is logged (and told to systemd)."""
        if self.switcher is None:
            return
        task = asyncio.create_task(self._reload(), name="reload")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    def reload_done(self, result: str) -> None:
        """The models' output is forwarded for the models a reload leaves (their secrets too)."""
        if self.outputs is not None and self.switcher is not None:
            self.outputs.follower.follow([m.output_source() for m in self.switcher.models.values()])

    async def _reload(self) -> None:
        try:
            await self.switcher.reload()
        except ConfigRefused:
            pass  # the reload said why
        except LlmuxdError as e:
            log.warning("SIGHUP: no reload: %s", e.message, extra={"EVENT": "reload"})
        except Exception:  # noqa: BLE001 - logged by the switcher's worker
            pass

    async def stop(self) -> None:
        log.info("stopping: closing listeners and stopping every model")
        self.notifier.stopping()
        keepalive = asyncio.create_task(self._extend_stop_timeout())
        try:
            for task in list(self._reloads):
                task.cancel()
            if self.switcher is not None:  # open streams end now, with an error frame
                self.switcher.revoke_all("llmuxd is shutting down")
            for runner in self._runners:
                await runner.shutdown()
            if self.switcher is not None:
                if self.checkpoint_on_stop:
                    await checkpoint_all(self.switcher)
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
