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
    assert c.policy.request_timeout_secs == 300 and c.startup_timeout_for("qwen3-0.6b") == 1800
    assert c.metrics_port == 9090 and c.unsupported_settings() == []  # llmux's default


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


# Configs shaped like llmux 0.9's own test configs (one model per eviction shape, metrics off,
# their own vllm_command), written here as test data.
def _llmux09(eviction: dict, **top) -> dict:
    return {"models": {"llama-8b": {"model_path": "NousResearch/Meta-Llama-3.1-8B-Instruct", "port": 8005,
                                    "eviction": eviction,
                                    "extra_args": ["--max-model-len", "4096", "--gpu-memory-utilization", "0.85",
                                                   "--enforce-eager"]}},
            "vllm_command": "/home/someone/.local/bin/vllm", "port": 3000, "metrics_port": 0, **top}


_CRIU = {"criu_path": "/opt/criu/criu", "cuda_plugin_dir": "/opt/criu/plugins/cuda/", "images_dir": "/tmp/llmux-checkpoints",
         "cuda_checkpoint_path": "cuda-checkpoint"}
_STORE = {"endpoint": "http://localhost:9200", "bucket": "llmux-checkpoints", "access_key": "the-access-key",
          "secret_key": "the-secret-key"}
LLMUX_09_CONFIGS = {
    "sleep": _llmux09({"weights": "offload", "process": "keep_running"}),
    "cudasuspend": _llmux09({"weights": "retain", "process": "cuda_suspend"}, checkpoint=_CRIU),
    "checkpoint": _llmux09({"weights": "discard", "process": "checkpoint"}, checkpoint=_CRIU),
    "s3": _llmux09({"weights": "discard", "process": "checkpoint"},
                   checkpoint={**_CRIU, "images_dir": "/dev/shm/llmux-checkpoints", "object_store": _STORE}),
    "startup": _llmux09({"weights": "discard", "process": "checkpoint"}, checkpoint=_CRIU, startup_timeout_secs=3600,
                        warmup=True),
}


@pytest.mark.parametrize("name", LLMUX_09_CONFIGS)
def test_llmux_0_9_configs_load(name):
    c = parse_config(LLMUX_09_CONFIGS[name])
    entry = LLMUX_09_CONFIGS[name]["models"]["llama-8b"]
    assert str(c.eviction_for("llama-8b")) == f"{entry['eviction']['weights']}+{entry['eviction']['process']}"
    assert c.metrics_port == 0 and c.models["llama-8b"].extra_args[-1] == "--enforce-eager"
    assert c.startup_timeout_for("llama-8b") == (3600 if name == "startup" else 1800)
    assert c.checkpoint_dir_for("llama-8b").parent.parent.as_posix() == (
        "/dev/shm/llmux-checkpoints" if name == "s3" else "/tmp/llmux-checkpoints")
    assert bool(c.unsupported_settings()) == (name == "s3")


def test_older_llmux_sleep_levels_load():
    """llmux 0.4-0.5: numeric sleep levels per model and in the policy (1-5)."""
    c = parse_config({"models": {"a": {"model_path": "x", "port": 8001, "sleep_level": 3},
                                 "b": {"model_path": "y", "port": 8002}},
                      "policy": {"sleep_level": 4, "policy_type": "cost_aware", "coalesce_window_ms": 2000},
                      "metrics_port": 9091, "admin_port": 3001})
    assert str(c.eviction_for("a")) == "retain+cuda_suspend" and str(c.eviction_for("b")) == "discard+checkpoint"
    assert any("policy_type" in n for n in c.ignored_settings())


def test_startup_timeout_the_model_then_the_top_level_then_the_policy():
    models = {"big": {"model_path": "x", "port": 8001, "startup_timeout_secs": 7200},
              "small": {"model_path": "y", "port": 8002}}
    c = parse_config({"models": models, "startup_timeout_secs": 600})
    assert c.startup_timeout_for("big") == 7200 and c.startup_timeout_for("small") == 600
    c = parse_config({"models": models, "policy": {"startup_timeout_secs": 900}})
    assert c.startup_timeout_for("big") == 7200 and c.startup_timeout_for("small") == 900
    with pytest.raises(ConfigError, match="startup_timeout_secs: also set as policy.startup_timeout_secs"):
        parse_config({"models": models, "startup_timeout_secs": 600, "policy": {"startup_timeout_secs": 900}})
    with pytest.raises(ConfigError, match="models.small.startup_timeout_secs: Input should be greater than 0"):
        parse_config({"models": {**models, "small": {**models["small"], "startup_timeout_secs": 0}}})


def test_metrics_port_defaults_to_llmux_9090_and_0_turns_the_listener_off():
    base = {"models": {"a": {"model_path": "x", "port": 8001}}}
    assert parse_config(base).metrics_port == 9090
    assert parse_config({**base, "metrics_port": 0}).metrics_port == 0
    with pytest.raises(ConfigError) as e:
        parse_config({"models": {"a": {"model_path": "x", "port": 9090}}})
    assert "models.a.port: 9090 is llmuxd's metrics_port (the default)" in e.value.render()
    parse_config({"models": {"a": {"model_path": "x", "port": 9090}}, "metrics_port": 0})
    with pytest.raises(ConfigError, match=r"metrics_port: 9090 is llmuxd's own port \(the default; set metrics_port"):
        parse_config({**base, "port": 9090})


def test_object_store_is_accepted_validated_and_said_to_be_unsupported(tmp_path):
    c = parse_config(LLMUX_09_CONFIGS["s3"])
    assert c.checkpoint.object_store.region == "us-east-1"  # llmux's default
    [warning] = c.unsupported_settings()
    assert "checkpoint.object_store" in warning and "not supported yet" in warning and "stay local" in warning
    assert "the-secret-key" not in warning and "the-access-key" not in warning
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLMUX_09_CONFIGS["s3"]))
    r = subprocess.run([LLMUXD, "check-config", "--config", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert f"  warning: {warning}" in r.stdout.splitlines()
    assert "the-secret-key" not in r.stdout + r.stderr
    # As llmux: endpoint, bucket and both keys are required; a bad secret is not repeated back.
    store = {k: v for k, v in _STORE.items() if k != "bucket"}
    with pytest.raises(ConfigError, match="checkpoint.object_store.bucket: Field required"):
        parse_config({**c.model_dump(mode="json", exclude_none=True), "checkpoint": {"object_store": store}})
    with pytest.raises(ConfigError) as e:
        parse_config({"models": {"a": {"model_path": "x", "port": 8001}},
                      "checkpoint": {"object_store": {**_STORE, "secret_key": 123456789}}})
    assert "checkpoint.object_store.secret_key: Input should be a valid string" in e.value.render()
    assert "123456789" not in e.value.render()


def test_keys_of_other_llmux_versions_are_refused_with_what_to_do():
    with pytest.raises(ConfigError) as e:
        parse_config({"models": {"a": {"model_path": "x", "port": 8001, "gpu_memory_utilization": 0.8}},
                      "vllm_logging": True})
    text = e.value.render()
    assert "models.a.gpu_memory_utilization: unknown key (llmux 0.1-0.2's; give vLLM the flag in extra_args: " \
           "--gpu-memory-utilization)" in text
    assert "vllm_logging: unknown key (llmux 0.1-0.2's" in text
    with pytest.raises(ConfigError, match="models.a.wake: unknown key \\(llmux 2's hook scripts are not supported"):
        parse_config({"models": {"a": {"port": 8001, "model_path": "x", "wake": "./wake.sh"}}})


def test_daemon_warns_about_object_store_at_start_and_names_a_taken_metrics_port(make_daemon, tmp_path):
    d = make_daemon(checkpoint={"images_dir": str(tmp_path / "ck"), "object_store": _STORE})
    assert "checkpoint.object_store (bucket 'llmux-checkpoints'): not supported yet" in d.log()
    assert "the-secret-key" not in d.log() and "the-access-key" not in d.log()
    # A metrics_port that cannot be had: start-up fails, naming the setting; no traceback.
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d2 = make_daemon(metrics_port=port, start=False)
        d2.config_path.write_text(json.dumps(d2.config))
        r = subprocess.run([LLMUXD, "serve", "--config", str(d2.config_path)], capture_output=True, text=True,
                           timeout=60, env=d2.env)
    assert r.returncode != 0
    assert f"metrics_port {port} on 127.0.0.1" in r.stderr and "Traceback" not in r.stderr, r.stderr
