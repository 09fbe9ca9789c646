"""The ``llmuxd`` command line as scripts use it: the real CLI as a subprocess against a real
daemon on the simulator; ``--json`` parsed into the daemon's own contracts; the exit status of
each kind of failure (bad usage or config, unreachable daemon, unknown model, no answer in
time, a failed operation); ``--version``."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest

import llmuxd
from conftest import model_entry
from harness import LLMUXD, free_ports
from llmuxd.checkpoint.prepare import PrepareReport
from llmuxd.cli.client import transition_timeout
from llmuxd.cli.exits import MEANING, ErrorReport, Exit
from llmuxd.cli.local import ConfigSummary
from llmuxd.commands.validate import ValidateReport
from llmuxd.config import parse_config
from llmuxd.status import Status, Transition


def llmuxd_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([LLMUXD, *args], capture_output=True, text=True, env=env, timeout=timeout)


def failed(r: subprocess.CompletedProcess, status: Exit, code: str) -> ErrorReport:
    """``r`` ran with --json and failed with ``status``: its ErrorReport (``code``), on stdout;
    the message on stderr too."""
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    report = ErrorReport.model_validate_json(r.stdout)
    assert report.error.code == code and report.error.exit_code == status, report
    assert f"llmuxd: {report.error.message.splitlines()[0]}" in r.stderr
    return report


def test_version():
    for flag in ("--version", "-V"):
        r = llmuxd_cli(flag)
        assert r.returncode == 0 and r.stdout == f"llmuxd {llmuxd.__version__}\n", r


def test_help_documents_every_exit_status():
    for argv in (["--help"], ["wake", "--help"]):
        r = llmuxd_cli(*argv)
        assert r.returncode == 0, r.stderr
        epilog = r.stdout[r.stdout.index("exit status:"):]
        for status, meaning in MEANING.items():
            assert f"  {int(status)}  {meaning.split()[0]}" in epilog, (status, epilog)
    assert set(MEANING) == set(Exit)


def test_client_commands_against_a_daemon(make_daemon):
    ports = free_ports(3)
    models = {"m1": model_entry("m1", ports[0]), "m2": model_entry("m2", ports[1]),
              # its server cannot start: the weights are not in the HF cache
              "broken": {**model_entry("m1", ports[2]), "model_path": "test-org/not-in-the-cache"}}
    d = make_daemon(models=models)
    cfg = ["--config", str(d.config_path)]

    r = llmuxd_cli("status", "--json", *cfg)
    assert r.returncode == 0, r.stderr
    st = Status.model_validate_json(r.stdout)
    assert st.active_model is None and list(st.models) == ["m1", "m2", "broken"]

    r = llmuxd_cli("wake", "m2", "--json", *cfg)
    assert r.returncode == 0, r.stderr
    woke = Transition.model_validate_json(r.stdout)
    assert (woke.model, woke.state) == ("m2", "awake") and woke.duration_secs > 0
    assert Status.model_validate_json(llmuxd_cli("status", "--json", *cfg).stdout).active_model == "m2"
    r = llmuxd_cli("sleep", "m2", "--json", *cfg)
    assert r.returncode == 0 and Transition.model_validate_json(r.stdout).state == "asleep", r.stderr
    r = llmuxd_cli("sleep", "m2", *cfg)  # text: what a person sees
    assert r.returncode == 0 and r.stdout == "m2: asleep (0.000 s)\n", r.stdout

    report = failed(llmuxd_cli("wake", "ghost", "--json", *cfg), Exit.UNKNOWN_MODEL, "model_not_found")
    assert "The model 'ghost' does not exist" in report.error.message
    r = llmuxd_cli("sleep", "ghost", *cfg)
    assert r.returncode == Exit.UNKNOWN_MODEL and r.stdout == "" and "does not exist" in r.stderr
    # a model whose start fails: the operation failed
    report = failed(llmuxd_cli("wake", "broken", "--json", *cfg), Exit.FAILED, "model_unavailable")
    assert "could not be started" in report.error.message
    st = Status.model_validate_json(llmuxd_cli("status", "--json", *cfg).stdout)
    assert st.models["broken"].state == "stopped" and st.models["broken"].last_error
    # --url wins over the config's address
    failed(llmuxd_cli("status", "--json", "--url", d.control_url, "--config", str(d.workdir / "missing.json")),
           Exit.USAGE, "invalid_config")  # a config named must be readable, with --url too
    r = llmuxd_cli("status", "--json", "--url", d.control_url + "/", *cfg)
    assert r.returncode == 0 and Status.model_validate_json(r.stdout).models["m2"].state == "asleep"


def test_unreachable_and_silent_daemons(tmp_path):
    closed = free_ports(1)[0]  # nothing listens there
    for argv in (["status"], ["wake", "m1"], ["sleep", "m1"]):
        r = llmuxd_cli(*argv, "--json", "--url", f"http://127.0.0.1:{closed}")
        report = failed(r, Exit.UNREACHABLE, "daemon_unreachable")
        assert f"cannot reach the daemon at http://127.0.0.1:{closed}" in report.error.message
    # a daemon that takes the connection and never answers: the client stops waiting at --timeout
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # never accepted: the kernel completes the connections, nobody answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        report = failed(llmuxd_cli("wake", "m1", "--json", "--url", url, "--timeout", "1"), Exit.TIMEOUT,
                        "client_timeout")
        assert report.error.message == (f"no answer from the daemon at {url} within 1 s; the wake goes on in the "
                                        "daemon (see `llmuxd status`)")
        r = llmuxd_cli("status", "--url", url, "--timeout", "1")
        assert r.returncode == Exit.TIMEOUT and r.stdout == "" and "no answer" in r.stderr


def test_bad_usage_and_bad_config(tmp_path):
    r = llmuxd_cli("wake")  # no model
    assert r.returncode == Exit.USAGE and "the following arguments are required: model" in r.stderr
    r = llmuxd_cli("status", "--timeout", "-1")
    assert r.returncode == Exit.USAGE and "not a positive number of seconds" in r.stderr
    r = llmuxd_cli("status", "--json", "--url", "ftp//nowhere")
    failed(r, Exit.USAGE, "bad_url")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"models": {"a": {"model_path": "x", "port": 3000}}, "port": 3000}))
    for argv in (["check-config"], ["status"], ["wake", "a"], ["checkpoint", "a"], ["restore", "a"],
                 ["validate", "a"], ["prepare-restore"]):
        report = failed(llmuxd_cli(*argv, "--json", "--config", str(bad)), Exit.USAGE, "invalid_config")
        assert report.error.problems == ["models.a.port: 3000 is llmuxd's own port"], report
        assert report.error.message.startswith(f"invalid configuration {bad}:")
    r = llmuxd_cli("serve", "--config", str(bad))
    assert r.returncode == Exit.USAGE and f"invalid configuration {bad}" in r.stderr and "Traceback" not in r.stderr


def test_offline_commands_json_and_exit_statuses(make_daemon, tmp_path):
    p = free_ports(1)
    d = make_daemon(models={"m1": model_entry("m1", p[0])}, start=False,
                    checkpoint={"images_dir": str(tmp_path / "ck")})
    d.config_path.write_text(json.dumps(d.config))
    cfg = ["--config", str(d.config_path)]

    r = llmuxd_cli("check-config", "--json", *cfg)
    assert r.returncode == 0, r.stderr
    summary = ConfigSummary.model_validate_json(r.stdout)
    assert summary.models["m1"].port == p[0] and summary.models["m1"].eviction.process == "keep_running"
    for argv in (["checkpoint", "ghost"], ["restore", "ghost"], ["validate", "ghost"]):
        report = failed(llmuxd_cli(*argv, "--json", *cfg, env=d.env), Exit.UNKNOWN_MODEL, "model_not_found")
        assert "The model 'ghost' does not exist. Known models: m1" == report.error.message
    failed(llmuxd_cli("validate", "m1", "--policies", "offload+nap", "--json", *cfg, env=d.env), Exit.USAGE,
           "invalid_request")
    failed(llmuxd_cli("inspect-checkpoint", str(tmp_path / "none"), "--json"), Exit.FAILED, "failed")
    failed(llmuxd_cli("restore", "m1", "--json", *cfg, env=d.env), Exit.FAILED, "failed")  # no checkpoint

    r = llmuxd_cli("prepare-restore", "--json", *cfg, env=d.env)
    assert r.returncode == 0, r.stderr
    prepared = PrepareReport.model_validate_json(r.stdout).models
    assert [(m.model, m.usable, Path(m.path)) for m in prepared] == [("m1", True, tmp_path / "ck" / "m1" / "images")]

    r = llmuxd_cli("validate", "m1", "--policies", "offload+keep_running", "--cycles", "1", "--json", *cfg,
                   env=d.env)
    assert r.returncode == 0, r.stdout + r.stderr
    report = ValidateReport.model_validate_json(r.stdout)
    assert report.ok and json.loads(r.stdout)["ok"] is True
    (run,) = report.runs
    assert run.policy == "offload+keep_running" and run.error is None
    (cycle,) = run.cycles
    assert cycle.state == "asleep" and cycle.wake_kind == "wake" and cycle.match
    assert cycle.before.rss_bytes > 0


def test_wake_and_sleep_wait_as_long_as_the_config_allows():
    """The default timeout of wake and sleep grows with the config's own timeouts."""
    def timeout_for(startup: float, process: str = "keep_running", **checkpoint) -> float:
        return transition_timeout(parse_config({
            "models": {"a": {"model_path": "x", "port": 8001, "eviction": {"weights": "discard", "process": process}}},
            "policy": {"startup_timeout_secs": startup, "drain_timeout_secs": 7}, "checkpoint": checkpoint}))

    assert timeout_for(1000) - timeout_for(100) == 900
    assert timeout_for(100) > 100 + 7
    with_checkpoints = timeout_for(100, "checkpoint", dump_timeout_secs=40, restore_timeout_secs=30)
    assert with_checkpoints - timeout_for(100) == 70
    assert transition_timeout(None) >= timeout_for(1800, "checkpoint")  # no config: the defaults, with checkpoints


@pytest.mark.parametrize("argv", [["doctor"], ["check-config"], ["status"], ["wake", "m"], ["sleep", "m"],
                                  ["checkpoint", "m"], ["restore", "m"], ["inspect-checkpoint", "p"],
                                  ["validate", "m"], ["prepare-restore"]])
def test_every_command_but_serve_takes_json(argv):
    from llmuxd.cli import build_parser

    assert build_parser().parse_args([*argv, "--json"]).json is True
