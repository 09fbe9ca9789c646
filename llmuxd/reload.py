"""Reloading the configuration without a restart (``systemctl reload``, SIGHUP, ``llmuxd reload``,
``POST /control/reload``, D-Bus ``Reload``): what a new config file changes, and applying it.

The daemon re-reads the file it was started with (the command line's ``--host``/``--port`` still
win over it).  A file that is not a valid config is refused with the same reasons
``check-config`` gives, and the running configuration stays in force.  Otherwise, per model:

* **unchanged** (nothing that goes into its process or its eviction differs): untouched — its
  process, its checkpoint, its state, its requests;
* **removed**: out of service at once (a new request for it is an unknown model); requests
  waiting for it fail (``model_removed``); those in flight end first, as an eviction drains
  them; then its tree is stopped.  Its checkpoint stays on disk;
* **added**: available, stopped (or checkpointed, when its checkpoint folder holds a checkpoint
  made with its command line);
* **changed** (its own entry, its effective eviction or checkpoint folder, ``vllm_command``,
  ``backend_host``): the new settings apply once no tree of the old ones runs.  An awake model
  keeps serving with its old settings until its next eviction (a switch, a sleep), which stops
  it instead of evicting it per its policy; any other tree of it is stopped by the reload.  Its
  next wake cold-starts with the new settings (:meth:`llmuxd.model.Model.reconfigure`).

Global settings: those in :data:`LIVE` apply at once (read at each use); every other one is
fixed at start (the listeners, credentials, the HTTP server's limits, ``log_dir``, the
checkpoint and isolation settings): a new value is reported as needing a restart and the running
one is kept.  A reload runs in turn with the switches (one transition at a time)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .backends.vllm import pick_first_pid
from .config import CheckpointConfig, Config, ConfigError, parse_config, read_config_data
from .errors import ConfigRefused
from .status import ReloadResult

if TYPE_CHECKING:
    from .switcher import Switcher

log = logging.getLogger(__name__)

#: The global settings a reload applies at once.  ``vllm_command`` and ``backend_host`` reach
#: the models through their process (see "changed" above); the policy's settings are read at
#: each use.  Any other setting needs a restart.
LIVE = frozenset({
    "vllm_command", "backend_host", "warmup", "startup_timeout_secs",
    "policy.request_timeout_secs", "policy.drain_before_switch", "policy.min_active_secs",
    "policy.startup_timeout_secs", "policy.drain_timeout_secs", "policy.max_queued_requests",
    "policy.eviction", "policy.sleep_level",
    # llmux's scheduling settings, accepted and not acted on
    "policy.policy_type", "policy.coalesce_window_ms", "policy.amortization_factor", "policy.max_wait_secs",
    "policy.tick_interval_ms", "policy.min_quantum_ms",
})


@dataclass(frozen=True)
class NewConfig:
    config: Config  # what runs from now on: the file's, with the settings in ``held`` as they ran
    held: list[str]  # settings whose new value needs a restart


@dataclass(frozen=True)
class ConfigSource:
    """The config file the daemon was started with, and what its command line put over it."""

    path: Path
    overrides: dict[str, Any]

    def read(self, running: Config) -> NewConfig:
        """The file's config to run next to ``running``; raises ConfigError with every reason."""
        data = read_config_data(self.path)
        if isinstance(data, dict):
            data = {**data, **self.overrides}
        new = parse_config(data, str(self.path))  # the file's own problems, as check-config says them
        was, now = _globals(running), _globals(new)
        held = [k for k in sorted(was.keys() | now.keys()) if k not in LIVE and was.get(k) != now.get(k)]
        if not held:
            return NewConfig(new, [])
        for key in held:  # the running value, as it would be written in the file
            section, _, field = key.partition(".")
            if field:
                if not isinstance(data.get(section), dict):
                    data[section] = {}
                data[section] = {**data[section], field: was[key]}
            else:
                data[key] = was[key]
        return NewConfig(parse_config(data, f"{self.path} (with {', '.join(held)} as running: they need a "
                                            "restart to change)"), held)


def _globals(config: Config) -> dict[str, Any]:
    """Every setting but the models, as JSON values, by dotted name (``policy.min_active_secs``)."""
    dump = config.model_dump(mode="json")
    if dump.get("checkpoint") is None:
        dump["checkpoint"] = CheckpointConfig().model_dump(mode="json")
    flat: dict[str, Any] = {}
    for key, value in dump.items():
        if key == "models":
            continue
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def model_view(config: Config, name: str) -> dict[str, Any]:
    """Everything that goes into model ``name``'s process or its eviction."""
    view = config.models[name].model_dump(mode="json")
    view.pop("sleep_level", None)  # in the effective eviction
    view.update(eviction=str(config.eviction_for(name)), checkpoint_path=str(config.checkpoint_dir_for(name)),
                vllm_command=config.vllm_command, backend_host=config.backend_host)
    return view


@dataclass(frozen=True)
class Plan:
    added: list[str]
    removed: list[str]
    changed: dict[str, list[str]]  # model -> what changed in its view
    unchanged: list[str]
    applied: list[str]  # global settings that change now


def plan(running: Config, new: Config, built: dict[str, Config] | None = None) -> Plan:
    """``built``: per model, the config it runs with, when not ``running`` (a model still awake
    with the settings an earlier reload changed): a model is changed or not next to those."""
    changed: dict[str, list[str]] = {}
    unchanged = []
    for name in (n for n in new.models if n in running.models):
        was, now = model_view((built or {}).get(name, running), name), model_view(new, name)
        if diff := [k for k in was if was[k] != now.get(k)]:
            changed[name] = diff
        else:
            unchanged.append(name)
    was, now = _globals(running), _globals(new)
    return Plan(added=[n for n in new.models if n not in running.models],
                removed=[n for n in running.models if n not in new.models], changed=changed, unchanged=unchanged,
                applied=[k for k in sorted(now) if was.get(k) != now[k]])


async def apply(switcher: Switcher, source: ConfigSource) -> ReloadResult:
    """Read ``source`` and apply it to ``switcher`` (run by its worker, between two transitions)."""
    started = time.monotonic()
    switcher.events.reload_started()
    outcome = "error"
    try:
        try:
            new = await asyncio.to_thread(source.read, switcher.config)
        except ConfigError as e:
            outcome = "refused"
            log.error("reload refused, the running configuration stays in force: %s: %s", e.path,
                      "; ".join(e.problems), extra={"EVENT": "reload"})
            raise ConfigRefused(e.render()) from None
        p = plan(switcher.config, new.config, {n: m.config for n, m in switcher.models.items()})
        switcher.config, switcher.policy = new.config, new.config.policy
        for name in p.removed:
            await switcher.remove_model(name)
            switcher.events.model_removed(name)
        for name in p.unchanged:
            switcher.models[name].use_config(new.config)
        for name in p.changed:
            await switcher.models[name].reconfigure(new.config)
        for name in p.added:
            taken = {m.backend.tree.first_pid for m in switcher.models.values()}
            model = switcher.add_model(name, pick_first_pid(list(new.config.models).index(name), taken))
            switcher.events.model_added(name, model.state)
        result = ReloadResult(
            config_path=str(source.path), added=p.added, removed=p.removed, changed=p.changed,
            unchanged=p.unchanged, restart_pending=[n for n in p.changed if switcher.models[n].restart_pending],
            applied=p.applied, needs_restart=new.held, duration_secs=time.monotonic() - started)
        log.info("reloaded %s in %.3f s: %s", source.path, result.duration_secs, result.summary(),
                 extra={"EVENT": "reload", "DURATION_S": f"{result.duration_secs:.3f}"})
        outcome = "ok"
        return result
    finally:
        switcher.events.reload_done(outcome)
