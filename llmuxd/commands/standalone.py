"""A model outside the daemon, for ``llmuxd checkpoint``, ``restore`` and ``validate``: the
daemon's own Model state machine, built for one model of the config.

It uses the daemon's own cgroup layout (``llmuxd-<port>`` or the service cgroup) without
moving the command into it, so a tree left running by ``restore --detached`` is adopted by the
next ``llmuxd serve``."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from ..checkpoint.fsview import container_epoch
from ..config import Config, Eviction, ProcessEviction, WeightsEviction
from ..errors import UnknownModel
from ..events import Listener
from ..isolation.cgroups import CgroupLayout, CgroupUnavailable
from ..isolation.reaper import become_subreaper
from . import CommandError

if TYPE_CHECKING:
    from ..model import Model


def _daemon_running(config: Config) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", config.port)) == 0


def known_model(config: Config, name: str) -> None:
    """UnknownModel unless ``name`` is a model of ``config``."""
    if name not in config.models:
        raise UnknownModel(name, list(config.models))


def standalone_model(config: Config, name: str, *, force_checkpoint: bool = False,
                     events: Listener | None = None) -> Model:
    """Model ``name`` of ``config``, ready to wake, with this process as the subreaper of its
    trees; ``events`` hears its events.  ``force_checkpoint``: its process eviction becomes
    ``checkpoint`` (weights ``retain`` becomes ``discard``).  UnknownModel for an unknown model; CommandError when a
    daemon answers on the config's port (it owns the models: use ``llmuxd sleep``/``wake``)."""
    # Imported here: cli.py imports the commands' modules at every start (validate's defaults),
    # and the model (backends, checkpoint) takes half a second to import.
    from ..model import Model

    known_model(config, name)
    if _daemon_running(config):
        raise CommandError(f"llmuxd is running on port {config.port}: use `llmuxd sleep {name}` / "
                           f"`llmuxd wake {name}` instead")
    if force_checkpoint:
        ev = config.eviction_for(name)
        weights = ev.weights if ev.weights is not WeightsEviction.RETAIN else WeightsEviction.DISCARD
        m = config.models[name].model_copy(update={"eviction": Eviction(weights=weights,
                                                                        process=ProcessEviction.CHECKPOINT)})
        config = config.model_copy(update={"models": {**config.models, name: m}})
    become_subreaper()
    container_epoch()
    try:
        layout = CgroupLayout.detect(instance=str(config.port))
        cgroup = layout.model(name)
    except (CgroupUnavailable, OSError):
        cgroup = None
    return Model(name, config, events, cgroup=cgroup)


def tidy(model: Model) -> None:
    """Leave no empty cgroup behind: the model's, and the llmuxd-<port> base if nothing else
    (a daemon) uses it."""
    if model.cgroup is None or model.cgroup.populated():
        return
    model.cgroup.remove()
    try:
        model.cgroup.path.parent.rmdir()  # fails while a daemon (or another model) lives there
    except OSError:
        pass
