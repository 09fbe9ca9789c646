"""Gather, judge, print: :func:`gather_facts` (every concern's facts), :func:`assess` (every
concern's checks, in report order), :func:`doctor_facts` (``--json``) and :func:`run_doctor`
(``llmuxd doctor``)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .. import cuda
from ..config import CheckpointConfig, Config, ProcessEviction
from .configuration import checkpoint_checks, checkpoint_trust_facts, config_checks, load_for_doctor
from .gpu import cuda_checks, cuda_facts
from .host import cgroup_checks, cgroup_facts, dbus_checks, dbus_facts, systemd_checks, systemd_facts
from .kernel import criu_checks, criu_facts, kernel_checks, kernel_facts
from .report import Check, exit_code, render


def gather_facts(config: Config | None, *, libcuda: str = cuda.LIBCUDA, nvml: str = cuda.LIBNVML,
                 nvidia_smi: str = "nvidia-smi") -> dict[str, Any]:
    ckpt = (config.checkpoint if config is not None else None) or CheckpointConfig()
    return {
        "criu": criu_facts(ckpt.criu_path),
        "cuda": cuda_facts(ckpt, libcuda, nvml, nvidia_smi),
        "cgroup": cgroup_facts(),
        "systemd": systemd_facts(),
        "dbus": dbus_facts(),
        "kernel": kernel_facts(),
        "trust": checkpoint_trust_facts(config),
    }


def assess(facts: dict[str, Any], config: Config | None, config_info: dict[str, Any] | None = None) -> list[Check]:
    """The facts judged against the configuration (pure): the checks in report order."""
    ckpt_models: list[str] = []
    suspend_models: list[str] = []
    if config is not None:
        ckpt_models = [n for n in config.models if config.eviction_for(n).process is ProcessEviction.CHECKPOINT]
        suspend_models = [n for n in config.models if config.eviction_for(n).process is ProcessEviction.CUDA_SUSPEND]
    return [*config_checks(config, config_info), *criu_checks(facts, ckpt_models),
            *cuda_checks(facts, ckpt_models, suspend_models), *cgroup_checks(facts), *systemd_checks(facts),
            *dbus_checks(facts), *checkpoint_checks(facts, config), *kernel_checks(facts, config)]


def doctor_facts(config_path: Path | str | None = None, **gather_kw: Any) -> dict[str, Any]:
    """Everything ``llmuxd doctor`` knows, machine-readable (``--json``): ``config``, ``facts``,
    ``checks`` and ``exit_code``."""
    config, info = load_for_doctor(config_path)
    facts = gather_facts(config, **gather_kw)
    checks = assess(facts, config, info)
    return {"config": info, "facts": facts, "checks": [asdict(c) for c in checks], "exit_code": exit_code(checks)}


def run_doctor(config_path: Path | str | None = None, as_json: bool = False) -> int:
    """``llmuxd doctor [--config PATH] [--json]``: print the report; 0 if llmuxd can run the
    configuration here, 1 if something it needs is missing."""
    result = doctor_facts(config_path)
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        checks = [Check(**c) for c in result["checks"]]
        print(render(checks, result["config"]["path"]))
    sys.stdout.flush()
    return result["exit_code"]
