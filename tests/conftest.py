from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path

import pytest

import leakcheck  # first: sets this run's marker in the environment every child inherits
from harness import ISSUED_PORTS, SIM, LlmuxdProcess, free_ports

MODELS = {"m1": ("test-org/tiny-a", 1), "m2": ("test-org/tiny-b", 2)}
_leak_check: list[leakcheck.LeakCheck] = []


@pytest.fixture(scope="session", autouse=True)
def no_leftovers(tmp_path_factory):
    """The run must leave nothing behind, whether its tests pass or fail: processes of llmuxd's
    world (daemons, simulators, criu, tree inits, anything in an llmuxd-* cgroup), cgroups,
    mounts, /dev/shm files, network namespaces.  Set up before anything else, torn down after
    everything else: what is new then is reported as an error of the run (with the test after
    which each thing was first seen), then cleaned up.  See leakcheck.py."""
    check = leakcheck.LeakCheck(tmp_path_factory.getbasetemp(), ISSUED_PORTS)
    _leak_check.append(check)
    yield check
    _leak_check.clear()
    left = check.leftovers()
    if left.unsure:
        warnings.warn(f"new and unused: {', '.join(left.unsure)} — maybe this run's, maybe another's (other "
                      f"llmuxd processes ran meanwhile, e.g. {check.others[0]!r}): left alone")
    if left:
        report = check.describe(left)
        unclean = check.clean(left)
        pytest.fail("the test run left these behind (now cleaned up" + (", except: " + "; ".join(unclean)
                    if unclean else "") + "):\n" + report, pytrace=False)


def pytest_runtest_logfinish(nodeid, location):
    if _leak_check:
        _leak_check[0].note(nodeid)


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory) -> Path:
    """A HuggingFace cache holding two tiny simulated models (different seeds)."""
    home = tmp_path_factory.mktemp("hf")
    for repo, seed in MODELS.values():
        subprocess.run([SIM, "make-model", repo, "--seed", str(seed), "--hf-home", str(home)], check=True,
                       capture_output=True)
    return home


@pytest.fixture
def sim_env(tmp_path, hf_home) -> dict[str, str]:
    env = dict(os.environ)
    home = tmp_path / "home"
    home.mkdir()
    env.update(HOME=str(home), HF_HOME=str(hf_home), HF_HUB_OFFLINE="1",
               LLMUXD_SIM_GPU_DIR=str(tmp_path / "gpu"))
    return env


def model_entry(name: str, port: int, weights="offload", process="keep_running", extra=()) -> dict:
    return {"model_path": MODELS.get(name, MODELS["m1"])[0], "port": port,
            "eviction": {"weights": weights, "process": process}, "extra_args": list(extra)}


@pytest.fixture
def make_daemon(tmp_path, sim_env):
    """Factory: ``make_daemon(models={name: entry}, **top_level)`` -> started LlmuxdProcess."""
    daemons: list[LlmuxdProcess] = []

    def make(models: dict | None = None, env: dict | None = None, start: bool = True, **top) -> LlmuxdProcess:
        ports = free_ports(4)
        if models is None:
            models = {"m1": model_entry("m1", ports[1]), "m2": model_entry("m2", ports[2])}
        config = {
            "models": models, "port": ports[0], "metrics_port": 0, "host": "127.0.0.1", "vllm_command": SIM,
            "log_dir": str(tmp_path / "logs"),
            "policy": {"request_timeout_secs": 60, "min_active_secs": 0, "startup_timeout_secs": 30},
        }
        for k, v in top.items():
            config[k] = {**config.get(k, {}), **v} if isinstance(v, dict) and k == "policy" else v
        workdir = tmp_path / f"llmuxd{len(daemons)}"
        workdir.mkdir()
        d = LlmuxdProcess(workdir, config, {**sim_env, **(env or {})})
        daemons.append(d)
        return d.start() if start else d

    yield make
    for d in daemons:
        d.stop()


@pytest.fixture(scope="session")
def expected(hf_home):
    """``expected(model, prompt, max_tokens)``: the answer the simulated model gives, computed from
    its weights file independently of any server (so a mixed-up or garbage answer is caught)."""
    from llmuxd.sim import model as simmodel

    digests = {}
    for name, (repo, _) in MODELS.items():
        snap = next((hf_home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots").iterdir())
        digests[name] = simmodel.weights_digest(simmodel.read_weights(snap))

    def answer(model: str, prompt: str | list, max_tokens: int = 16) -> str:
        text = simmodel.render_chat(prompt) if isinstance(prompt, list) else prompt
        return "".join(simmodel.generate(digests[model], text, max_tokens))

    return answer
