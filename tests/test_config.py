"""Config: llmux's config.json accepted unchanged; every kind of bad config refused with one
line per problem naming the field path, never a traceback."""

from __future__ import annotations

import json
import subprocess

import pytest

from harness import LLMUXD
from llmuxd.config import ConfigError, ProcessEviction, WeightsEviction, load_config, parse_config

# llmux's own example config, verbatim.
LLMUX_EXAMPLE = {
    "models": {
        "llama-7b": {"model_path": "meta-llama/Llama-2-7b-chat-hf", "port": 8001,
                     "eviction": {"weights": "offload", "process": "keep_running"},
                     "extra_args": ["--gpu-memory-utilization", "0.9"]},
        "mistral-7b": {"model_path": "mistralai/Mistral-7B-Instruct-v0.2", "port": 8002,
                       "eviction": {"weights": "discard", "process": "checkpoint"},
                       "extra_args": ["--gpu-memory-utilization", "0.9"]},
    },
    "checkpoint": {"criu_path": "criu", "cuda_plugin_dir": "/usr/lib/criu/", "images_dir": "/tmp/llmux-checkpoints",
                   "cuda_checkpoint_path": "cuda-checkpoint", "keep_images": True},
    "policy": {"policy_type": "fifo", "request_timeout_secs": 300, "drain_before_switch": True,
               "eviction": {"weights": "offload", "process": "keep_running"}},
    "port": 3000, "metrics_port": 9090, "admin_port": 3001, "warmup": False,
}

CHECKPOINT_EXAMPLE = {
    "models": {"qwen3-0.6b": {"model_path": "Qwen/Qwen3-0.6B", "port": 8001,
                              "eviction": {"weights": "discard", "process": "checkpoint"},
                              "checkpoint_path": "/tmp/llmux-checkpoints/qwen3-0.6b/images"}},
    "checkpoint": {"criu_path": "/usr/local/bin/criu", "cuda_plugin_dir": "/usr/lib/criu/",
                   "images_dir": "/tmp/llmux-checkpoints", "cuda_checkpoint_path": "/usr/local/bin/cuda-checkpoint",
                   "keep_images": True},
    "port": 3000,
}


def test_llmux_example_config_is_accepted_unchanged():
    c = parse_config(LLMUX_EXAMPLE)
    assert c.eviction_for("llama-7b").weights is WeightsEviction.OFFLOAD
    assert c.eviction_for("mistral-7b").process is ProcessEviction.CHECKPOINT
    assert c.policy.request_timeout_secs == 300 and c.port == 3000 and c.metrics_port == 9090
    assert c.checkpoint_dir_for("mistral-7b").as_posix() == "/tmp/llmux-checkpoints/mistral-7b/images"
    assert c.admin_port == 3001 and not any("admin_port" in n for n in c.ignored_settings())  # acted on


def test_checkpoint_example_config_and_defaults():
    c = parse_config(CHECKPOINT_EXAMPLE)
    assert c.checkpoint_dir_for("qwen3-0.6b").as_posix() == "/tmp/llmux-checkpoints/qwen3-0.6b/images"
    assert c.vllm_command == "vllm" and c.policy.drain_before_switch
    assert c.policy.request_timeout_secs == 300 and c.policy.startup_timeout_secs == 1800


def test_policy_eviction_is_the_default_and_legacy_sleep_levels_map():
    c = parse_config({"models": {"a": {"model_path": "x", "port": 8001}, "b": {"model_path": "x", "port": 8002,
                                                                            "sleep_level": 2}},
                      "policy": {"eviction": {"weights": "discard", "process": "stop"}}})
    assert str(c.eviction_for("a")) == "discard+stop"
    assert str(c.eviction_for("b")) == "discard+keep_running"


BAD = [
    ({"models": {"a": {"model_path": "x", "port": 8001, "colour": "red"}}}, ["models.a.colour: unknown key"]),
    ({"models": {"a": {"model_path": "x", "port": 8001}}, "prot": 3000}, ["prot: unknown key"]),
    ({"models": {"a": {"model_path": "x", "port": "8001"}}}, ["models.a.port: Input should be a valid integer"]),
    ({"models": {"a": {"model_path": "x", "port": 8001}}, "policy": {"request_timeout_secs": "soon"}},
     ["policy.request_timeout_secs:"]),
    ({"models": {"a": {"model_path": "x", "port": 8001, "eviction": {"weights": "forget"}}}},
     ["models.a.eviction.weights: must be one of retain|offload|discard"]),
    ({"models": {"a": {"model_path": "x", "port": 8001}, "b": {"model_path": "y", "port": 8001}}},
     ["models.b.port: 8001 is already used by model 'a'"]),
    ({"models": {"a": {"model_path": "x", "port": 3000}}}, ["models.a.port: 3000 is llmuxd's own port"]),
    ({"models": {"../etc": {"model_path": "x", "port": 8001}}}, ["models.../etc: model name '../etc' is not allowed"]),
    ({"models": {".hidden": {"model_path": "x", "port": 8001}}}, ["model name '.hidden' is not allowed"]),
    ({"models": {"a/b": {"model_path": "x", "port": 8001}}}, ["model name 'a/b' is not allowed"]),
    ({"models": {"a": {"port": 8001}}}, ["models.a.model_path: Field required"]),
    ({"models": {}}, ["models:"]),
    ([], ["(top level): Input should be a valid dictionary"]),
]


@pytest.mark.parametrize("data,expected", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_config_names_the_field(data, expected):
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    text = e.value.render()
    for line in expected:
        assert line in text, text


def test_several_problems_are_all_reported():
    with pytest.raises(ConfigError) as e:
        parse_config({"models": {"a": {"model_path": "x", "port": 3000, "bogus": 1}, "b/c": {"model_path": "x",
                                                                                          "port": 8001}}, "x": 1})
    assert len(e.value.problems) == 4, e.value.problems


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"models": {')
    with pytest.raises(ConfigError, match="not valid JSON: .* line 1"):
        load_config(bad)


@pytest.mark.parametrize("content", ['{"models": {"a": {"model_path": "x", "port": 3000, "k": 1}}}', "{nope"])
def test_serve_refuses_bad_config_without_traceback(tmp_path, content):
    path = tmp_path / "config.json"
    path.write_text(content)
    r = subprocess.run([LLMUXD, "serve", "--config", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert f"invalid configuration {path}" in r.stderr


def test_check_config_prints_what_it_read(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLMUX_EXAMPLE))
    r = subprocess.run([LLMUXD, "check-config", "--config", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "mistral-7b: mistralai/Mistral-7B-Instruct-v0.2 on port 8002, eviction discard+checkpoint" in r.stdout


def test_control_token_resolution(tmp_path, monkeypatch):
    """The systemd credential, then $LLMUXD_CONTROL_TOKEN, then the config; the variable is
    taken out of the environment (backends inherit it otherwise); a short token is refused."""
    from llmuxd.api.auth import resolve_control_token

    config = parse_config({**LLMUX_EXAMPLE, "control_token": "from-the-config-file"})
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.delenv("LLMUXD_CONTROL_TOKEN", raising=False)
    assert resolve_control_token(parse_config(LLMUX_EXAMPLE)) == (None, "none")
    assert resolve_control_token(config) == ("from-the-config-file", "config control_token")
    monkeypatch.setenv("LLMUXD_CONTROL_TOKEN", "from-the-environment\n")
    assert resolve_control_token(config) == ("from-the-environment", "$LLMUXD_CONTROL_TOKEN")
    import os
    assert "LLMUXD_CONTROL_TOKEN" not in os.environ
    (tmp_path / "control-token").write_text("from-the-credential\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    monkeypatch.setenv("LLMUXD_CONTROL_TOKEN", "from-the-environment")
    assert resolve_control_token(config) == ("from-the-credential", "systemd credential control-token")
    (tmp_path / "control-token").write_text("short")
    with pytest.raises(ConfigError, match="at least 16 characters"):
        resolve_control_token(config)
    with pytest.raises(ConfigError):
        parse_config({**LLMUX_EXAMPLE, "control_token": "short"})
