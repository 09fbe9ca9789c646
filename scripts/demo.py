"""The main job on the simulator: two simulated models behind one llmuxd port.

Cold start, a switch, sleep and wake through the control API, printing what happens and how
long it took.  Run through scripts/demo.sh (which sets everything up first)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WORK = ROOT / ".cache" / "demo"
PORT = int(os.environ.get("LLMUXD_DEMO_PORT", "3000"))


def say(msg: str) -> None:
    print(msg, flush=True)


def timed(label: str, fn):
    t = time.monotonic()
    r = fn()
    secs = time.monotonic() - t
    say(f"  {label:<52} {secs * 1000:8.1f} ms")
    return r


def main() -> int:
    WORK.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HOME=str(WORK / "hf"), HOME=str(WORK / "home"), LLMUXD_SIM_GPU_DIR=str(WORK / "gpu"))
    (WORK / "home").mkdir(exist_ok=True)
    for repo, seed in (("demo-org/tiny-chat", 1), ("demo-org/tiny-code", 2)):
        if not (WORK / "hf" / "hub" / f"models--{repo.replace('/', '--')}").exists():
            subprocess.run([BIN / "llmuxd-vllm-sim", "make-model", repo, "--seed", str(seed)], env=env, check=True,
                           stdout=subprocess.DEVNULL)
    config = json.loads((ROOT / "examples" / "demo-config.json").read_text())
    config.update(port=PORT, vllm_command=str(BIN / "llmuxd-vllm-sim"), log_dir=str(WORK / "logs"))
    (WORK / "config.json").write_text(json.dumps(config, indent=2))
    say(f"llmuxd demo: config {WORK / 'config.json'}, daemon log {WORK / 'llmuxd.log'}")

    log = open(WORK / "llmuxd.log", "wb")
    daemon = subprocess.Popen([BIN / "llmuxd", "serve", "--config", WORK / "config.json"], env=env,
                              stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{PORT}"
    try:
        for _ in range(200):
            if daemon.poll() is not None:
                raise SystemExit(f"llmuxd exited with {daemon.returncode}; see {WORK / 'llmuxd.log'}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        c = httpx.Client(base_url=url, timeout=120)

        def chat(model: str, text: str) -> str:
            r = c.post("/v1/chat/completions", json={"model": model, "max_tokens": 8,
                                                     "messages": [{"role": "user", "content": text}]})
            r.raise_for_status()
            return r.json()["choices"][0]["message"]["content"].strip()

        say(f"\nllmuxd on {url} with models: " + ", ".join(m["id"] for m in c.get("/v1/models").json()["data"]))
        say(f"\n  {'step':<52} {'took':>11}")
        a = timed("request for chat (cold start)", lambda: chat("chat", "hello"))
        timed("request for chat (already awake)", lambda: chat("chat", "hello again"))
        b = timed("request for code (switch: chat offloaded, code cold)", lambda: chat("code", "def f():"))
        timed("request for chat (switch back: wake from offload)", lambda: chat("chat", "hello"))
        s = timed("POST /control/sleep chat", lambda: c.post("/control/sleep", json={"model": "chat"}).json())
        w = timed("POST /control/wake code (wake from discard)", lambda: c.post("/control/wake", json={"model": "code"}).json())
        say(f"\n  answers: chat -> {a!r}; code -> {b!r}")
        say(f"  sleep reply: {s}\n  wake reply:  {w}\n")
        subprocess.run([BIN / "llmuxd", "status", "--url", url], check=True)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        say(f"\nllmuxd stopped (exit {daemon.returncode}); every backend stopped with it.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
