"""The controller: admits requests, queues switches, runs one transition at a time.

Every verb a transport offers (proxying a request, sleep, wake, reload, status) is a method
here; the HTTP API and D-Bus only translate.  All transitions run in one worker task, in arrival
order (:mod:`.jobs`), so control calls, request-driven switches and reloads (:mod:`.reload`)
never interleave, and a switch continues when the client that caused it goes away.

Admission rules (one model awake at a time, all models share one GPU):
* a request for the awake model is served at once, unless that model is being evicted;
* otherwise it waits (up to ``request_timeout_secs``) for its model's activation; concurrent
  requests for one model share one activation;
* when an activation completes, every request waiting for that model is admitted *before* the
  worker can look at the next switch, so the next eviction drains them first (no thrash loop);
* a freshly woken model stays awake ``min_active_secs`` before a switch may evict it;
* at most ``max_queued_requests`` wait at a time; more are refused (429);
* an eviction drains at most ``drain_timeout_secs``: the requests still in flight then have
  their :class:`Lease` revoked (the proxy ends them: an SSE error frame for a stream), so a
  stalled stream or a client that stopped reading never freezes the switches behind it.

Each lease's :class:`Route` carries the model's :class:`Upstream`, its kept-alive connections
for the current awake period.  The switcher closes it when it evicts the model (after the
drain, before ``model.sleep()``: no connection into the model's tree is left to be dumped with
it), and whenever the model leaves its awake state otherwise (backend died, stopped); the next
admission gets a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import AsyncIterator

from . import reload
from .config import CheckpointConfig, Config
from .cuda import SuspendChoice
from .errors import (
    Evicted, ModelRemoved, NotSupported, QueueTimeout, ShuttingDown, SwitchFailed, TooManyRequests,
    UnknownModel,
)
from .events import Events, Listener, State, phase
from .history import TransitionHistory
from .isolation.cgroups import CgroupLayout
from .jobs import Job, Jobs
from .lease import Lease, Route
from .metrics import Metrics
from .model import Model, TransitionError
from .progress import Tracker
from .status import ReloadResult, Status, Switching, Transition
from .upstream import Upstream

log = logging.getLogger(__name__)

#: After the drain deadline, how long revoked requests get to end before the eviction goes on.
REVOKE_GRACE_SECS = 5.0


class Switcher(Listener):
    def __init__(self, config: Config, metrics: Metrics | None = None, cgroups: CgroupLayout | None = None,
                 source: reload.ConfigSource | None = None):
        self.config = config
        self.source = source  # where `reload` reads the config
        self.policy = config.policy
        self.metrics = metrics or Metrics(list(config.models))
        self.cgroups = cgroups
        self.history = TransitionHistory()
        self.progress = Tracker()  # where each transition is
        self.events = Events([self.metrics, self, self.history, self.progress])  # shared with every Model
        # The CUDA suspend backend: chosen once (on first use) for every model.
        self.cuda = SuspendChoice((config.checkpoint or CheckpointConfig()).cuda_checkpoint_path)
        self.link_remaps = asyncio.Lock()  # one dump or restore at a time (model/checkpoint.py says why)
        self.models: dict[str, Model] = {}
        self._removed: dict[str, Model] = {}  # models a reload removed, until their tree is stopped
        self._reload: Job | None = None  # a reload waiting for its turn
        self._active: str | None = None
        self._switching: tuple[str | None, str] | None = None
        self._evicting: str | None = None
        self._leases: dict[str, set[Lease]] = {}  # per model, ever (a removed one's may outlive it)
        self._routes: dict[str, Route] = {}  # per model awake now: its route, with an open Upstream
        self._in_flight: dict = {}  # per model: its llmuxd_requests_in_flight child
        self._idle: dict[str, asyncio.Event] = {}
        self._waiting: dict[str, list[asyncio.Future]] = {}
        for name in config.models:
            self.add_model(name)
        self._activation: dict[str, Job] = {}
        self.jobs = Jobs()  # the transitions, one at a time

    def add_listener(self, listener: Listener) -> None:
        self.events.add(listener)

    @property
    def active(self) -> str | None:
        return self._active

    @active.setter
    def active(self, name: str | None) -> None:
        if name != self._active:
            self._active = name
            self._announce()

    @property
    def switching(self) -> tuple[str | None, str] | None:
        return self._switching

    @switching.setter
    def switching(self, value: tuple[str | None, str] | None) -> None:
        if value != self._switching:
            self._switching = value
            self._announce()

    def _announce(self) -> None:
        self.events.active_changed(self._active, self._switching)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self.jobs.start()

    async def close(self) -> None:
        """Stop taking work, fail what waits, stop every model tree."""
        await self.jobs.close()
        for name, futs in self._waiting.items():
            self._settle(name, ShuttingDown("llmuxd is shutting down"))
        for name in list(self._routes):
            self._drop_upstream(name)
        models = [*self.models.values(), *self._removed.values()]
        await asyncio.gather(*(m.stop() for m in models), return_exceptions=True)
        await asyncio.gather(*(m.close() for m in models), return_exceptions=True)

    # -- the request path --------------------------------------------------------------------
    def model(self, name: str) -> Model:
        try:
            return self.models[name]
        except KeyError:
            raise UnknownModel(name, list(self.models)) from None

    @contextlib.asynccontextmanager
    async def serving(self, name: str) -> AsyncIterator[Lease]:
        """Hold the model awake for the duration of one request; the lease says when the
        controller needs it back first."""
        lease = await self.admit(name)
        try:
            yield lease
        finally:
            self._release(lease)

    async def admit(self, name: str) -> Lease:
        """:meth:`serving` without the context manager: the caller must :meth:`release` the lease."""
        self.model(name)
        return await self._admit(name)

    def release(self, lease: Lease) -> None:
        self._release(lease)

    def _admissible(self, name: str) -> bool:
        return self.active == name and self.models[name].state is State.AWAKE and self._evicting != name

    async def _admit(self, name: str) -> Lease:
        if self.jobs.closing:
            raise ShuttingDown("llmuxd is shutting down")
        if self._admissible(name):
            return self._take(name)
        limit = self.policy.max_queued_requests
        if self.queue_depth >= limit:
            raise TooManyRequests(f"{limit} requests are already waiting for their models; try again later",
                                  model=name)
        started = time.monotonic()
        fut = asyncio.get_running_loop().create_future()
        self._waiting[name].append(fut)
        self.metrics.queued.labels(name).inc()
        self._request_activation(name)
        try:
            done, _ = await asyncio.wait({fut}, timeout=self.policy.request_timeout_secs)
        except asyncio.CancelledError:  # the client went away; the switch goes on without it
            self._forget(name, fut)
            raise
        self.metrics.queue_wait.labels(name).observe(time.monotonic() - started)
        if not done:
            self._forget(name, fut)
            raise QueueTimeout(
                f"timed out after {self.policy.request_timeout_secs:g} s waiting for model '{name}'", model=name
            )
        return fut.result()  # the lease taken on admission, or raises the activation's error

    def _forget(self, name: str, fut: asyncio.Future) -> None:
        """A waiter gives up: drop its place, or hand back the admission it just got."""
        if fut in self._waiting[name]:
            self._waiting[name].remove(fut)
            self.metrics.queued.labels(name).dec()
        elif fut.done() and not fut.cancelled() and fut.exception() is None:
            self._release(fut.result())
        fut.cancel()

    @property
    def queue_depth(self) -> int:
        return sum(len(w) for w in self._waiting.values())

    def _take(self, name: str) -> Lease:
        route = self._routes.get(name)
        if route is None or route.upstream.closed:  # the first admission of this awake period
            backend = self.models[name].backend
            upstream = Upstream(backend.url, self.policy.upstream_read_timeout_secs)
            route = self._routes[name] = Route(backend.url, backend.served_name, upstream)
        lease = Lease(name, route)
        self._leases[name].add(lease)
        self._idle[name].clear()
        self._in_flight[name].inc()
        return lease

    def _release(self, lease: Lease) -> None:
        leases = self._leases[lease.model]
        if lease not in leases:
            return
        leases.remove(lease)
        self._in_flight[lease.model].dec()
        if not leases:
            self._idle[lease.model].set()

    async def _close_upstream(self, name: str) -> None:
        """Close the model's kept-alive connections (and open no more) before it is evicted."""
        route = self._routes.pop(name, None)
        if route is not None:
            await route.upstream.aclose()

    def _drop_upstream(self, name: str) -> None:
        route = self._routes.pop(name, None)
        if route is not None:
            route.upstream.close_now()

    def revoke(self, name: str, reason: Evicted) -> int:
        """Revoke every lease held on ``name``; returns how many."""
        leases = list(self._leases[name])
        for lease in leases:
            lease.revoke(reason)
        return len(leases)

    def revoke_all(self, message: str) -> None:
        """At shutdown: end every request in flight now, instead of waiting for it."""
        for name in [*self.models, *self._removed]:
            self.revoke(name, Evicted(message, model=name))

    def _settle(self, name: str, error: Exception | None) -> None:
        """Admit (error None) or fail every request waiting for ``name``."""
        waiting, self._waiting[name] = self._waiting[name], []
        for fut in waiting:
            self.metrics.queued.labels(name).dec()
            if fut.done():
                continue
            if error is None:
                fut.set_result(self._take(name))
            else:
                fut.set_exception(error)

    # -- control verbs ------------------------------------------------------------------------
    def request_done(self, name: str, outcome: str, seconds: float) -> None:
        """A proxied request for ``name`` ended after ``seconds`` (``outcome``: the status code,
        ``evicted``, ``client_closed``...): llmuxd_requests_total, llmuxd_request_duration_seconds."""
        self.metrics.request_done(name, outcome, seconds)

    async def wake(self, name: str) -> Transition:
        return await self.queue_wake(name)

    async def sleep(self, name: str) -> Transition:
        return await self.queue_sleep(name)

    def queue_wake(self, name: str) -> Awaitable[Transition]:
        """Queue the activation of ``name`` now (joining one already queued) and return its
        outcome to await; UnknownModel or ShuttingDown at once."""
        self.model(name)
        return asyncio.shield(self._request_activation(name).done)

    def queue_sleep(self, name: str) -> Awaitable[Transition]:
        """Queue the eviction of ``name`` now; as :meth:`queue_wake`."""
        self.model(name)
        return asyncio.shield(self.jobs.put(f"sleep {name}", lambda: self._sleep_job(name)).done)

    async def reload(self) -> ReloadResult:
        """Re-read the config file and apply it (``reload.py``), in turn with the transitions.  A
        reload asked for while another one waits for its turn is that one."""
        if self.source is None:
            raise NotSupported("llmuxd was not started from a config file: there is nothing to reload")
        if self._reload is None:
            self._reload = self.jobs.put("reload", self._reload_job)
            log.info("reload of %s asked for; it runs in turn with the transitions", self.source.path,
                     extra={"EVENT": "reload"})
        return await asyncio.shield(self._reload.done)

    def status(self) -> Status:
        models = {name: m.status().model_copy(update={"in_flight": len(self._leases[name]), "waiting": len(
            self._waiting[name]), "progress": self.progress.of(name)}) for name, m in self.models.items()}
        switching = Switching(from_=self.switching[0], to=self.switching[1]) if self.switching else None
        return Status(active_model=self.active, switching=switching, queue_depth=self.queue_depth, models=models,
                      recent_transitions=self.history.recent(), event_seq=self.progress.seq)

    # -- the jobs ----------------------------------------------------------------------------------
    def _request_activation(self, name: str) -> Job:
        job = self._activation.get(name)
        if job is None:
            job = self._activation[name] = self.jobs.put(f"activate {name}", lambda: self._activate_job(name))
        return job

    async def _activate_job(self, name: str) -> Transition:
        model = self.model(name)  # (a reload may have removed it since)
        previous = self.active
        started = time.monotonic()
        try:
            if self.active == name and model.state is State.AWAKE:
                result = Transition(model=name, state=model.state.value, duration_secs=0.0)
            else:
                self.switching = (previous, name)
                # The evicted models' dumps finish in the background; after this model's wake
                # when that is a restore, which would otherwise wait for them (link remaps).
                woken = asyncio.Event()
                after = woken if model.state in (State.CHECKPOINTED, State.DUMPING) else None
                try:
                    if self.active is not None:
                        await self._evict(self.active, for_switch=True, start_after=after)
                    for other in self.models.values():  # one model on the GPU at a time
                        if other.name != name and other.state is State.AWAKE:
                            await self._evict(other.name, for_switch=True, start_after=after)
                    try:
                        await model.wake()
                    except TransitionError as e:
                        raise SwitchFailed(f"model '{name}' could not be started: {e}", model=name) from None
                finally:
                    woken.set()
                self.active = name
                secs = time.monotonic() - started
                self.metrics.switches.labels(previous or "", name, "ok").inc()
                self.metrics.switch_seconds.labels(name, model.last_wake_kind or "").observe(secs)
                log.info(
                    "switched %s -> %s in %.3f s (%s)", previous, name, secs, model.last_wake_kind,
                    extra={"MODEL": name, "EVENT": "switch", "DURATION_S": f"{secs:.3f}"},
                )
                result = Transition(model=name, state=model.state.value, duration_secs=secs)
        except Exception as e:
            self.metrics.switches.labels(previous or "", name, "error").inc()
            self._activation.pop(name, None)
            self._settle(name, e if isinstance(e, SwitchFailed) else SwitchFailed(str(e), model=name))
            raise
        finally:
            self.switching = None
        # Admit everyone who waited for this model before anything else can run.
        self._activation.pop(name, None)
        self._settle(name, None)
        return result

    async def _sleep_job(self, name: str) -> Transition:
        secs = await self._evict(name, for_switch=False)
        m = self.models[name]
        return Transition(model=name, state=m.state.value, duration_secs=secs, last_error=m.last_error)

    async def _evict(self, name: str, *, for_switch: bool, start_after: asyncio.Event | None = None) -> float:
        model = self.model(name)
        if model.state is not State.AWAKE:
            if self.active == name:
                self.active = None
            return 0.0
        if for_switch and model.awake_since is not None:
            remaining = self.policy.min_active_secs - (time.monotonic() - model.awake_since)
            if remaining > 0:
                await asyncio.sleep(remaining)
        self._evicting = name
        try:
            if self.policy.drain_before_switch:
                with phase(self.events, name, "drain", model.eviction.process.value):
                    await self._drain(name)
            # No kept-alive connection may go into the eviction (a checkpoint would dump it).
            await self._close_upstream(name)
            # a switch waits for the GPU, not the dump
            return await model.sleep(background=for_switch, start_after=start_after)
        finally:
            self._evicting = None
            if self.active == name:
                self.active = None

    async def _drain(self, name: str) -> None:
        """Wait for ``name``'s requests to end, at most ``drain_timeout_secs``; then revoke what
        is left and give it ``REVOKE_GRACE_SECS`` to end.  The eviction goes on either way."""
        deadline = self.policy.drain_timeout_secs
        try:
            await asyncio.wait_for(self._idle[name].wait(), deadline)
            return
        except TimeoutError:
            pass
        n = self.revoke(name, Evicted(
            f"model '{name}' is being evicted and this request was still running after the drain deadline "
            f"({deadline:g} s)", model=name))
        log.warning("%s: %d request(s) still in flight after the drain deadline (%g s): ending them", name, n,
                    deadline, extra={"MODEL": name, "EVENT": "drain_timeout"})
        try:
            await asyncio.wait_for(self._idle[name].wait(), REVOKE_GRACE_SECS)
        except TimeoutError:
            log.error("%s: %d revoked request(s) did not end within %g s; evicting anyway", name,
                      len(self._leases[name]), REVOKE_GRACE_SECS, extra={"MODEL": name, "EVENT": "drain_timeout"})

    # -- reload ---------------------------------------------------------------------------------------
    async def _reload_job(self) -> ReloadResult:
        self._reload = None  # from now on a reload asked for is a new one: the file may have changed again
        return await reload.apply(self, self.source)

    def add_model(self, name: str, first_pid: int | None = None) -> Model:
        """Make model ``name`` of ``self.config`` available (at start, or added by a reload)."""
        self.models[name] = Model(name, self.config, self.events, self.cgroups.model(name) if self.cgroups else None,
                                  self.cuda, self.link_remaps, first_pid)
        if name not in self._leases:
            self._leases[name], self._idle[name], self._waiting[name] = set(), asyncio.Event(), []
            self._idle[name].set()
        self._in_flight[name] = self.metrics.in_flight.labels(name)
        return self.models[name]

    async def remove_model(self, name: str) -> None:
        """A reload removed ``name``: new requests for it are refused at once (unknown model), those
        waiting for it fail, those in flight end first (as an eviction drains them), then its tree
        is stopped.  Its checkpoint stays on disk."""
        model = self._removed[name] = self.models.pop(name)
        self._activation.pop(name, None)  # (its job, already queued, finds the model gone)
        self._settle(name, ModelRemoved(name))
        await self._drain(name)
        await self._close_upstream(name)
        await model.stop()
        await model.close()
        del self._removed[name]
        if model.cgroup is not None and not model.cgroup.populated():
            model.cgroup.remove()
        log.info("%s: removed from the configuration; stopped", name, extra={"MODEL": name, "EVENT": "reload"})

    # -- the models' events ------------------------------------------------------------------
    def state_changed(self, model: str, old: State, new: State) -> None:
        if new is not State.AWAKE:  # gone or going without an eviction of ours (its backend died...)
            self._drop_upstream(model)
        if new is State.STOPPED and self.active == model:
            self.active = None
