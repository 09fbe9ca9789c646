"""The status page (/ui) in a real headless Chromium against a real daemon on the simulator, and
the control API it reads (/control/status's recent transitions, /control/gpu,
/control/models/{name}/log, /control/access)."""

from __future__ import annotations

import asyncio
import json
import subprocess

import httpx

from browser import Browser, png_colors, png_pixels
from conftest import model_entry
from harness import REPO, SIM, free_ports
from llmuxd.events import State
from llmuxd.history import TransitionHistory

TOKEN = "ui-test-control-token-0123456789"
XSS = "<img src=x onerror=window.__xss=1>"
SECRET = "hf_uiTestSecretValue12345"
NOT_TRUSTED = {"X-Forwarded-For": "203.0.113.7"}  # through a proxy: no loopback trust


def run(coro):
    return asyncio.run(coro)


async def with_browser(tmp_path, scenario):
    workdir = tmp_path / "browser"
    workdir.mkdir()
    browser = Browser(workdir)
    try:
        await browser.start()
        return await scenario(browser)
    finally:
        await browser.close()


def card(model: str, what: str = "") -> str:
    return f"document.querySelector('.card[data-model=\"{model}\"]'){what}"


def complete(d, model: str) -> None:
    r = httpx.post(d.url + "/v1/completions", json={"model": model, "prompt": "hello", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200, r.text


def demo_daemon(make_daemon, tmp_path):
    """The demo's config (examples/demo-config.json: models, policies), on free ports, with its
    two simulated models made in an HF cache of the test's own."""
    demo = json.loads((REPO / "examples" / "demo-config.json").read_text())
    hf = tmp_path / "hf-demo"
    for seed, m in enumerate(demo["models"].values(), 1):
        subprocess.run([SIM, "make-model", m["model_path"], "--seed", str(seed), "--hf-home", str(hf)], check=True,
                       capture_output=True)
    ports = free_ports(len(demo["models"]))
    models = {name: {**m, "port": port} for (name, m), port in zip(demo["models"].items(), ports)}
    return make_daemon(models=models, env={"HF_HOME": str(hf)}, policy=demo["policy"])


def test_status_page_shows_live_state_switches_gpu_and_logs(make_daemon, tmp_path):
    d = demo_daemon(make_daemon, tmp_path)
    shot = tmp_path / "ui.png"

    async def scenario(b: Browser):
        await b.goto(d.url + "/ui")
        await b.wait_for("document.body.dataset.loaded === '1'", what="the page's first data")
        assert await b.wait_for(card("chat", "?.dataset.state") + " === 'stopped' && "
                                + card("code", "?.dataset.state") + " === 'stopped'")
        # Loopback without a token: the data, read-only.
        assert await b.evaluate("document.getElementById('mode').textContent") == "read-only"
        assert await b.evaluate("document.querySelectorAll('button[data-action]').length") == 0

        # Requests switch models: cold start of chat, then a switch chat -> code.
        await asyncio.to_thread(complete, d, "chat")
        await asyncio.to_thread(complete, d, "code")
        await b.wait_for(card("code", "?.dataset.state") + " === 'awake' && "
                         + card("chat", "?.dataset.state") + " === 'asleep'", what="code awake, chat asleep")
        assert await b.evaluate("document.getElementById('active').textContent") == "code"
        assert await b.evaluate(card("code", ".querySelector('.active-badge') !== null"))
        assert await b.evaluate(card("chat", ".querySelector('.active-badge') === null"))
        await b.wait_for("document.querySelector('#timeline .lane[data-lane=switches] "
                         ".block[data-kind=switch][data-model=code]') !== null", what="the switch on the timeline")
        assert await b.evaluate("document.querySelector('#timeline .lane[data-lane=code] "
                                ".block[data-kind=cold_start]') !== null")
        rows = await b.evaluate("[...document.querySelectorAll('#transitions tbody tr')].map(r => r.innerText)")
        switch_row = next(r for r in rows if "chat → code" in r)
        assert "switch" in switch_row and " s" in switch_row and "ok" in switch_row
        assert any("cold_start" in r and "code" in r for r in rows)

        # GPU memory: the simulator's budget, the awake model's share on its card.
        gpu = httpx.get(d.url + "/control/gpu").json()
        assert gpu["source"] == "simulator" and gpu["by_model"].keys() == {"code"}
        device = await b.wait_for("document.querySelector('#gpu .device')?.innerText")
        assert "simulated GPU" in device and "used of 1.0 GiB" in device
        assert "GPU memory" in await b.evaluate(card("code", ".innerText"))

        # Each model's log tail, one tab per model.
        await b.evaluate("document.querySelector('#log-tabs button[data-model=code]').click()")
        log = await b.wait_for("document.getElementById('log').dataset.model === 'code' && "
                               "document.getElementById('log').textContent", what="code's log")
        assert "the vLLM simulator serving demo-org/tiny-code" in log
        assert "demo-org/tiny-chat" not in log

        assert b.errors == [], b.errors
        await b.screenshot(shot)

    run(with_browser(tmp_path, scenario))
    print(f"screenshot: {shot}")
    data = shot.read_bytes()
    width, height, _ = png_pixels(data)
    assert width >= 800 and height >= 600
    assert png_colors(data) > 20  # text, badges, bars: not a blank page


def test_untrusted_text_is_shown_as_text_and_secrets_redacted(make_daemon, tmp_path):
    """A model's log line carrying markup (here: an argument the simulator echoes) renders as
    text; no element is made of it and no script of it runs.  A secret it prints is redacted."""
    ports = free_ports(1)
    d = make_daemon(models={"m1": model_entry("m1", ports[0], extra=["--hf-token", SECRET, "--ui-note", XSS])})
    assert d.control("wake", "m1").status_code == 200
    raw = (tmp_path / "logs" / "m1.log").read_text()
    assert XSS in raw and SECRET in raw  # the model did print both

    tail = httpx.get(d.url + "/control/models/m1/log?lines=200").json()
    assert any(XSS in line for line in tail["lines"])
    assert not any(SECRET in line for line in tail["lines"])
    assert any("--hf-token <redacted>" in line for line in tail["lines"])

    async def scenario(b: Browser):
        await b.goto(d.url + "/ui")
        text = await b.wait_for("document.getElementById('log').textContent.includes('Ignoring vLLM arguments') && "
                                "document.getElementById('log').textContent", what="the log line with the markup")
        assert XSS in text and SECRET not in text
        assert await b.evaluate("document.querySelectorAll('img').length") == 0
        assert await b.evaluate("document.querySelectorAll('#log *').length") == 0  # text only
        await asyncio.sleep(2)  # a few more polls: still nothing ran
        assert await b.evaluate("window.__xss === undefined")
        assert await b.evaluate("document.querySelectorAll('img').length") == 0
        assert b.errors == [], b.errors

    run(with_browser(tmp_path, scenario))


def test_control_buttons_need_the_token(make_daemon, tmp_path):
    d = make_daemon(control_token=TOKEN)

    async def scenario(b: Browser):
        # Loopback, no token: read-only; a change sent from the page is refused.
        await b.goto(d.url + "/ui")
        await b.wait_for(card("m1", "?.dataset.state") + " === 'stopped'")
        assert await b.evaluate("document.getElementById('mode').textContent") == "read-only"
        assert await b.evaluate("document.querySelectorAll('button[data-action]').length") == 0
        status = await b.evaluate("fetch('/control/wake', {method: 'POST', headers: {'Content-Type': "
                                  "'application/json'}, body: JSON.stringify({model: 'm1'})}).then(r => r.status)")
        assert status == 403
        assert d.status()["models"]["m1"]["state"] == "stopped"

        # Not trusted (through a proxy), no token: no data at all, no buttons.
        await b.send("Network.setExtraHTTPHeaders", headers=NOT_TRUSTED)
        await b.goto(d.url + "/ui")
        await b.wait_for("document.getElementById('conn').className.includes('down')", what="the refusal")
        text = await b.evaluate("document.body.innerText")
        assert "needs the control token" in text and "m1" not in text
        assert await b.evaluate("document.querySelectorAll('.card, button[data-action]').length") == 0

        # A wrong token: refused, still no buttons.
        await b.evaluate("document.getElementById('token').value = 'not-the-token-0123456789';"
                         "document.getElementById('token-form').requestSubmit()")
        await b.wait_for("document.body.innerText.includes('token was refused')", what="the wrong token refused")
        assert await b.evaluate("document.querySelectorAll('button[data-action]').length") == 0

        # The token: data, and the buttons, which work.
        await b.evaluate(f"document.getElementById('token').value = {json.dumps(TOKEN)};"
                         "document.getElementById('token-form').requestSubmit()")
        await b.wait_for("document.getElementById('mode').textContent === 'control'", what="control mode")
        await b.wait_for(card("m1", "?.querySelector('button[data-action=wake]')") + " != null")
        assert await b.evaluate("document.getElementById('token').value") == ""  # not left in the field
        await b.evaluate(card("m1", ".querySelector('button[data-action=wake]').click()"))
        await b.wait_for(card("m1", "?.dataset.state") + " === 'awake'", what="m1 woken by its button")
        assert d.status()["models"]["m1"]["state"] == "awake"
        await b.wait_for("document.querySelector('.block[data-kind=switch][data-model=m1]') !== null")
        await b.wait_for(card("m1", "?.querySelector('button[data-action=sleep]:not([disabled])')") + " != null")
        await b.evaluate(card("m1", ".querySelector('button[data-action=sleep]').click()"))
        await b.wait_for(card("m1", "?.dataset.state") + " === 'asleep'", what="m1 put to sleep by its button")
        assert "sleep m1: asleep" in await b.evaluate("document.getElementById('notice').textContent")
        assert not [e for e in b.errors if "403" not in e and "401" not in e], b.errors

    run(with_browser(tmp_path, scenario))


def test_page_and_api_headers_and_refusals(make_daemon, tmp_path):
    d = make_daemon(control_token=TOKEN)
    for path in ("/ui", "/ui/app.js", "/ui/app.css"):
        r = httpx.get(d.url + path, headers=NOT_TRUSTED)  # the files hold no data: served to anyone
        assert r.status_code == 200
        csp = r.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert httpx.get(d.url + "/ui").headers["Content-Type"].startswith("text/html")
    assert "<script" not in httpx.get(d.url + "/ui").text.replace('<script src="/ui/app.js" defer></script>', "")
    # The data is the control API's: not without the token from an untrusted peer.
    for path in ("/control/status", "/control/gpu", "/control/models/m1/log", "/control/access"):
        assert httpx.get(d.url + path, headers=NOT_TRUSTED).status_code == 403
        assert httpx.get(d.url + path, headers={**NOT_TRUSTED, "Authorization": "Bearer " + TOKEN}).status_code == 200
        assert httpx.get(d.url + path, headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code == 401
    access = lambda **h: httpx.get(d.url + "/control/access", headers=h).json()["control"]  # noqa: E731
    assert access() is True  # loopback, not a browser (curl, the CLI)
    assert access(**{"Sec-Fetch-Site": "same-origin"}) is False  # a browser: the token first
    assert access(**{"Sec-Fetch-Site": "same-origin", "Authorization": "Bearer " + TOKEN}) is True
    # A browser's change needs the token, from loopback too; curl's does not (as before).
    r = httpx.post(d.url + "/control/sleep", json={"model": "m1"}, headers={"Origin": "http://example.com"})
    assert r.status_code == 403
    assert httpx.post(d.url + "/control/sleep", json={"model": "m1"}).status_code == 200

    # Log tails: the name is looked up in the config, lines are bounded.
    assert httpx.get(d.url + "/control/models/ghost/log").status_code == 404
    for bad in ("0", "1001", "-1", "x", "1e3", "99999999999"):
        r = httpx.get(d.url + f"/control/models/m1/log?lines={bad}")
        assert r.status_code == 400 and r.json()["error"]["param"] == "lines", bad
    for target in ("/control/models/%2e%2e/log", "/control/models/..%2Fetc/log", "/control/models/m1%2F../log"):
        assert httpx.get(d.url + target).status_code in (400, 404), target
    assert httpx.get(d.url + "/control/models/m1/log").json() == {"model": "m1", "lines": []}  # never started
    # A log replaced by a symbolic link is not followed.
    (tmp_path / "logs").mkdir(exist_ok=True)
    (tmp_path / "logs" / "m1.log").symlink_to("/etc/passwd")
    lines = httpx.get(d.url + "/control/models/m1/log").json()["lines"]
    assert len(lines) == 1 and "cannot read" in lines[0] and "root:" not in lines[0]


def test_recent_transitions_record_kinds_durations_and_failures(make_daemon, tmp_path):
    ports = free_ports(2)
    bad = {**model_entry("m2", ports[1]), "model_path": "test-org/not-in-the-cache"}  # exits at start
    d = make_daemon(models={"m1": model_entry("m1", ports[0]), "bad": bad})
    assert d.control("wake", "m1").status_code == 200
    assert d.control("wake", "bad").status_code == 503
    assert d.control("wake", "m1").status_code == 200
    recs = d.status()["recent_transitions"]
    kinds = [(r["kind"], r["model"], r["ok"]) for r in recs]
    assert kinds == [("cold_start", "m1", True), ("switch", "m1", True),
                     ("sleep", "m1", True), ("cold_start", "bad", False), ("switch", "bad", False),
                     ("wake", "m1", True), ("switch", "m1", True)], kinds
    switch = recs[4]
    assert switch["from_model"] == "m1" and switch["duration_secs"] >= recs[3]["duration_secs"] > 0
    assert recs[3]["state"] == "stopped" and recs[5]["state"] == "awake"
    assert recs[1]["started_at"] <= recs[0]["started_at"]  # the switch began with (before) its cold start


def test_transition_history_is_bounded():
    h = TransitionHistory(keep=5)
    for i in range(20):
        h.state_changed("m", State.ASLEEP, State.WAKING)
        h.state_changed("m", State.WAKING, State.AWAKE)
    assert len(h.recent()) == 5 and all(r.kind == "wake" and r.ok for r in h.recent())
