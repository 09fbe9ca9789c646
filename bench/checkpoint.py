"""Benchmark (figures, not a test): checkpoint and restore of one model through llmuxd.

Prints, as medians over N rounds measured in one run: cold start to first token, sleep with
discard + checkpoint (and the bare `criu dump` inside it), image size, restore to first token
(and the bare `criu restore` inside it), a switch between two checkpointed models to the new
one's first token (the old one's dump finishes in the background), sleep/wake with discard +
keep_running, and the ratios — restore vs cold start, llmuxd's overhead over bare CRIU, the switch
vs a restore alone.  ``--json PATH`` also writes the figures (what ``bench/run.py`` reads).

  .venv/bin/python bench/checkpoint.py [--rounds N]              # the simulator
  .venv/bin/python bench/checkpoint.py --vllm [--rounds N]       # real vLLM (CPU build;
                                                                     # scripts/setup-vllm.sh first)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str) -> None:
    for _ in range(400):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError("llmuxd did not come up")


def first_token(url: str, model: str = "bench") -> float:
    t = time.monotonic()
    with httpx.stream("POST", url + "/v1/completions", timeout=900,
                      json={"model": model, "prompt": "benchmark", "max_tokens": 8, "stream": True}) as r:
        for chunk in r.iter_raw():
            if chunk:
                return time.monotonic() - t
    raise RuntimeError("no token")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--vllm", action="store_true", help="real vLLM (CPU build) instead of the simulator")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llmuxd-bench-"))
    env = dict(os.environ, HF_HOME=str(work / "hf"), HOME=str(work / "home"), LLMUXD_SIM_GPU_DIR=str(work / "gpu"))
    (work / "home").mkdir()
    if args.vllm:
        venv = os.environ.get("LLMUXD_VLLM_VENV", "/opt/llmuxd/vllm-venv")
        env.update(HF_HOME=os.environ.get("LLMUXD_VLLM_HF_HOME", "/opt/llmuxd/vllm-hf"), VLLM_HOST_IP="127.0.0.1",
                   HF_HUB_OFFLINE="1")
        command, path = f"{venv}/bin/vllm", "Qwen/Qwen3-0.6B"
        extra = {"enable_sleep_mode": False, "extra_args": ["--host", "127.0.0.1", "--max-model-len", "256",
                                                             "--enforce-eager", "--kv-cache-memory-bytes", "67108864"]}
    else:
        subprocess.run([BIN / "llmuxd-vllm-sim", "make-model", "bench/model", "--seed", "5"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        command, path, extra = str(BIN / "llmuxd-vllm-sim"), "bench/model", {}
    port, mport, kport, oport = free_port(), free_port(), free_port(), free_port()
    config = {"models": {"bench": {"model_path": path, "port": mport, **extra,
                                   "eviction": {"weights": "discard", "process": "checkpoint"}},
                         "other": {"model_path": path, "port": oport, **extra,
                                   "eviction": {"weights": "discard", "process": "checkpoint"}},
                         "kr": {"model_path": path, "port": kport, **extra,
                                "eviction": {"weights": "discard", "process": "keep_running"}}},
              "checkpoint": {"criu_path": shutil.which("criu") or "/usr/local/bin/criu",
                             "images_dir": str(work / "ck"), "keep_images": False},
              "port": port, "metrics_port": 0, "host": "127.0.0.1", "vllm_command": command,
              "log_dir": str(work / "logs"), "policy": {"min_active_secs": 0, "startup_timeout_secs": 900}}
    (work / "config.json").write_text(json.dumps(config))
    log = open(work / "llmuxd.log", "wb")
    daemon = subprocess.Popen([BIN / "llmuxd", "serve", "--config", work / "config.json"], env=env,
                              stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    rows: dict[str, list[float]] = {k: [] for k in ("cold", "sleep", "dump", "image", "restore_ftt", "restore",
                                                    "criu_restore", "switch_ftt", "switch_restore",
                                                    "kr_sleep", "kr_wake")}
    phases: dict[str, list[dict]] = {"dump": [], "restore": []}  # each round's, as the status says them
    try:
        wait_up(url)
        c = httpx.Client(base_url=url, timeout=300)
        for _ in range(args.rounds):
            rows["cold"].append(first_token(url))
            st = c.get("/control/status").json()["models"]["bench"]
            assert st["last_wake_kind"] == "cold_start", st
            r = c.post("/control/sleep", json={"model": "bench"}).json()
            assert r["state"] == "checkpointed", r
            st = c.get("/control/status").json()["models"]["bench"]
            rows["sleep"].append(r["duration_secs"])
            rows["dump"].append(st["last_checkpoint"]["seconds"]["criu_dump"])
            rows["image"].append(st["last_checkpoint"]["image_bytes"] / 2**20)
            phases["dump"].append(st["last_checkpoint"]["seconds"])
            rows["restore_ftt"].append(first_token(url))
            st = c.get("/control/status").json()["models"]["bench"]
            assert st["last_wake_kind"] == "restore", st
            rows["restore"].append(st["last_wake_secs"])
            rows["criu_restore"].append(st["last_restore"]["seconds"]["criu_restore"])
            phases["restore"].append(st["last_restore"]["seconds"])
            # a switch between two checkpointed models: "other" awake (cold, or restored from the
            # last round), then "bench" asked for: other is released and dumped in the background
            # while bench restores
            first_token(url, "other")
            rows["switch_ftt"].append(first_token(url))
            st = c.get("/control/status").json()["models"]["bench"]
            assert st["last_wake_kind"] == "restore", st
            rows["switch_restore"].append(st["last_wake_secs"])
            # discard + keep_running: vLLM's own sleep level 2 and the wake sequence
            first_token(url, "kr")
            rows["kr_sleep"].append(c.post("/control/sleep", json={"model": "kr"}).json()["duration_secs"])
            rows["kr_wake"].append(c.post("/control/wake", json={"model": "kr"}).json()["duration_secs"])
            silent = {m: (v["escalations"], v["restore_failures"])
                      for m, v in c.get("/control/status").json()["models"].items()
                      if v["escalations"] or v["restore_failures"]}
            if silent:  # a benchmark of a fallback would be meaningless: fail, loudly
                raise SystemExit(f"escalations / failed restores during the benchmark: {silent}; "
                                 f"see {work / 'llmuxd.log'}")
            # The next round starts cold: a fresh daemon, and no checkpoint (the evictions above
            # dumped bench and other again).
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)
            shutil.rmtree(work / "ck")
            daemon = subprocess.Popen([BIN / "llmuxd", "serve", "--config", work / "config.json"], env=env,
                                      stdout=log, stderr=log, stdin=subprocess.DEVNULL)
            wait_up(url)
    except BaseException:
        keep = True
        raise
    else:
        keep = False
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        if keep:
            print(f"work folder kept for inspection: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    what = "real vLLM (CPU build, tiny Qwen3)" if args.vllm else "the simulator"
    print(f"\nllmuxd checkpoint/restore on {what}, median of {args.rounds} rounds (one run):\n")
    print(f"  {'cold start -> first token':<44} {med['cold']:8.3f} s")
    print(f"  {'sleep (discard + checkpoint), total':<44} {med['sleep']:8.3f} s")
    print(f"  {'  of which bare criu dump':<44} {med['dump']:8.3f} s")
    print(f"  {'image size':<44} {med['image']:8.1f} MiB")
    print(f"  {'restore -> first token':<44} {med['restore_ftt']:8.3f} s")
    print(f"  {'  restore transition (to serving)':<44} {med['restore']:8.3f} s")
    print(f"  {'  of which bare criu restore':<44} {med['criu_restore']:8.3f} s")
    print(f"  {'switch checkpointed -> checkpointed -> first token':<44} {med['switch_ftt']:8.3f} s")
    print(f"  {'  of which the restore transition':<44} {med['switch_restore']:8.3f} s")
    print(f"  {'sleep level 2 (discard + keep_running)':<44} {med['kr_sleep']:8.3f} s")
    print(f"  {'wake (wake_up, reload_weights, reset cache)':<44} {med['kr_wake']:8.3f} s")
    for kind, per_round in phases.items():
        keys = per_round[0].keys() if per_round else ()
        print(f"  {kind} phases: " + ", ".join(f"{k} {statistics.median(r[k] for r in per_round):.3f}" for k in keys))
    print(f"\n  restore-to-first-token / cold-start-to-first-token: {med['restore_ftt'] / med['cold']:.2f}")
    print(f"  discard wake / cold start:                          {med['kr_wake'] / med['cold']:.3f}")
    print(f"  llmuxd sleep / bare criu dump:                        {med['sleep'] / med['dump']:.2f}")
    print(f"  llmuxd restore / bare criu restore:                   {med['restore'] / med['criu_restore']:.2f}")
    print(f"  switch to first token / restore to first token:       {med['switch_ftt'] / med['restore_ftt']:.2f}")
    if args.json:
        ratios = {"restore_vs_cold": med["restore_ftt"] / med["cold"], "dump_vs_criu": med["sleep"] / med["dump"],
                  "restore_vs_criu": med["restore"] / med["criu_restore"],
                  "switch_vs_restore": med["switch_ftt"] / med["restore_ftt"]}
        args.json.write_text(json.dumps({"backend": what, "rounds": args.rounds, "median": med, "rows": rows,
                                         "phases": phases, "ratios": ratios}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
