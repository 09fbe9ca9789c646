"""The OpenAI-compatible proxy against a real daemon and real simulator backends, through the
official ``openai`` client and curl."""

from __future__ import annotations

import json
import subprocess

import httpx
import openai
import pytest

CHAT = [{"role": "user", "content": "Say something about multiplexing."}]


@pytest.fixture
def daemon(make_daemon):
    return make_daemon(max_request_bytes=64 * 1024)


@pytest.fixture
def client(daemon):
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_list_has_openai_shape(client, daemon):
    models = client.models.list()
    assert [m.id for m in models.data] == ["m1", "m2"]
    raw = httpx.get(daemon.url + "/v1/models").json()
    assert raw["object"] == "list"
    assert set(raw["data"][0]) == {"id", "object", "created", "owned_by"} and raw["data"][0]["object"] == "model"


def test_chat_and_completions_cold_start_and_route_by_model(client, daemon, expected):
    r1 = client.chat.completions.create(model="m1", messages=CHAT, max_tokens=8)
    assert r1.model == "m1"
    assert r1.choices[0].message.content == expected("m1", CHAT, 8)
    r2 = client.completions.create(model="m2", prompt="Once upon a time", max_tokens=5)
    assert r2.choices[0].text == expected("m2", "Once upon a time", 5)
    assert expected("m1", "Once upon a time", 5) != expected("m2", "Once upon a time", 5)
    st = daemon.status()
    assert st["active_model"] == "m2"
    assert st["models"]["m1"]["state"] == "asleep" and st["models"]["m2"]["state"] == "awake"
    assert st["models"]["m1"]["last_wake_kind"] == "cold_start"


def test_streaming_is_relayed_frame_by_frame(client, expected):
    chunks = list(client.chat.completions.create(model="m1", messages=CHAT, max_tokens=6, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected("m1", CHAT, 6)
    assert len(chunks) >= 6


def test_stream_bytes_identical_to_backend(daemon):
    body = {"model": "m1", "prompt": "abc", "max_tokens": 4, "stream": True}
    via = httpx.post(daemon.url + "/v1/completions", json=body, timeout=30)
    port = daemon.config["models"]["m1"]["port"]
    direct = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30)
    assert via.headers["content-type"].startswith("text/event-stream")

    def normalise(t: str) -> list[str]:  # ids and timestamps differ per request, frames must not
        frames = [f for f in t.split("\n\n") if f]
        out = []
        for f in frames:
            if f == "data: [DONE]":
                out.append(f)
                continue
            d = json.loads(f[len("data: "):])
            d.pop("id", None), d.pop("created", None)
            out.append(json.dumps(d, sort_keys=True))
        return out

    assert normalise(via.text) == normalise(direct.text)
    assert via.text.endswith("data: [DONE]\n\n")


def test_embeddings(client):
    e = client.embeddings.create(model="m2", input="hello")
    assert len(e.data[0].embedding) > 8


def test_curl_chat(daemon, expected):
    out = subprocess.run(
        ["curl", "-sS", "-X", "POST", daemon.url + "/v1/chat/completions", "-H", "Content-Type: application/json",
         "-d", json.dumps({"model": "m2", "messages": CHAT, "max_tokens": 3})],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert json.loads(out)["choices"][0]["message"]["content"] == expected("m2", CHAT, 3)


def _error(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_errors_use_openai_envelope(daemon, client):
    url = daemon.url + "/v1/chat/completions"
    r = httpx.post(url, content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in _error(r)["message"]
    r = httpx.post(url, json={"messages": CHAT})
    assert r.status_code == 400 and _error(r)["param"] == "model"
    r = httpx.post(url, json=["model", "m1"])
    assert r.status_code == 400
    r = httpx.post(url, json={"model": "nope", "messages": CHAT})
    assert r.status_code == 404
    err = _error(r)
    assert err["code"] == "model_not_found" and "nope" in err["message"] and err["param"] == "model"
    r = httpx.post(url, json={"model": "m1", "messages": [{"role": "user", "content": "x" * 70_000}]})
    assert r.status_code == 413 and _error(r)["code"] == "payload_too_large"
    r = httpx.get(daemon.url + "/v1/nothing-here")
    assert r.status_code in (404, 405) and _error(r)
    # The SDK parses them too.
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=CHAT)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="", messages=CHAT)
    # Nothing was lost: no model was started by bad requests.
    assert all(m["state"] == "stopped" for m in daemon.status()["models"].values())


def test_served_model_name_from_extra_args_is_rewritten(make_daemon, expected):
    from conftest import model_entry
    from harness import free_ports

    p = free_ports(2)
    d = make_daemon(models={"m1": model_entry("m1", p[0], extra=["--served-model-name", "upstream-name"])})
    r = httpx.post(d.url + "/v1/completions", json={"model": "m1", "prompt": "q", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "upstream-name"  # the backend saw its own name
    assert r.json()["choices"][0]["text"] == expected("m1", "q", 3)
