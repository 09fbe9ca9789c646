"""llmuxd's demo: several models behind one port, and a model checkpointed with CRIU and restored
in a new container.  Run through scripts/demo.sh (which sets everything up first).

llmuxd runs as the entrypoint of container A (examples/demo-config.json, vLLM simulator):

1. switching: cold start, a switch, wake from offload, sleep and wake through the control API;
2. `story` (discard + checkpoint): cold start, sleep (weights dropped, the whole process tree
   dumped by CRIU), a restore in A, then A is stopped and a NEW container B of the same image,
   sharing only the checkpoint folder and the HF cache with A, restores it.

The containers are the test suite's (tests/infra/mntns.py): each its own mount namespace whose
root is a fresh overlay over this machine's `/` with fresh /tmp, /dev/shm and /run, sharing the
host's PID and network namespaces, as `docker run --pid=host --network=host` does.  Everything
made (containers, mounts, processes, cgroups, the checkpoint) is removed at the end, also after
a failure, Ctrl-C or SIGTERM.  With --vllm, part 2 runs on the real vLLM CPU build instead
(scripts/setup-vllm.sh; minutes on a small machine) and part 1 is left out."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "infra")]
import entrypoint  # noqa: E402  (tests/infra: the container llmuxd is the entrypoint of)
import mntns  # noqa: E402
from harness import remove_cgroups  # noqa: E402

BIN = Path(sys.executable).parent
SIM_MODELS = {"chat": ("demo-org/tiny-chat", 1, 1 << 20), "code": ("demo-org/tiny-code", 2, 1 << 20),
              "story": ("demo-org/tiny-story", 3, 128 << 20)}
VLLM_VENV = os.environ.get("LLMUXD_VLLM_VENV", "/opt/llmuxd/vllm-venv")
VLLM_HF = os.environ.get("LLMUXD_VLLM_HF_HOME", "/opt/llmuxd/vllm-hf")
VLLM_ENV = {"VLLM_HOST_IP": "127.0.0.1", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
VLLM_ARGS = ["--host", "127.0.0.1", "--max-model-len", "256", "--kv-cache-memory-bytes", str(64 << 20),
             "--enforce-eager"]


def say(msg: str = "") -> None:
    print(msg, flush=True)


def row(label: str, secs: float, note: str = "") -> None:
    say(f"  {label:<56} {secs:7.2f} s  {note}".rstrip())


def mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=int(os.environ.get("LLMUXD_DEMO_PORT", "3000")),
                   help="llmuxd's port (default 3000, or $LLMUXD_DEMO_PORT)")
    p.add_argument("--model-ports", default="8001,8002,8003", help="chat,code,story ports (default 8001,8002,8003)")
    p.add_argument("--work", type=Path, default=ROOT / ".cache" / "demo",
                   help="models, checkpoint and logs (default .cache/demo)")
    p.add_argument("--load-seconds", type=float, default=5.0,
                   help="how long the simulated `story` takes to load at a cold start (default 5)")
    p.add_argument("--vllm", action="store_true", help="part 2 only, on the real vLLM CPU build")
    return p.parse_args()


class Demo:
    """The config, the shared folders, and the containers llmuxd runs in (one at a time)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work: Path = args.work.resolve()
        self.ckpt = self.work / "checkpoints"
        self.run = self.work / "run"  # this run's configs and, once each container is stopped, its logs
        self.hf = Path(VLLM_HF) if args.vllm else self.work / "hf"
        self.url = f"http://127.0.0.1:{args.port}"
        self.story = "qwen3-0.6b" if args.vllm else "story"
        self.env = VLLM_ENV if args.vllm else {}
        self.timeout = 900 if args.vllm else 120
        self.config = self._config()
        self.live: entrypoint.EntrypointContainer | None = None
        self.names: list[str] = []

    def _config(self) -> dict:
        a = self.args
        ports = [int(p) for p in a.model_ports.split(",")]
        config = json.loads((ROOT / "examples" / "demo-config.json").read_text())
        if a.vllm:
            config["models"] = {self.story: {
                "model_path": "Qwen/Qwen3-0.6B", "port": ports[-1], "enable_sleep_mode": False,
                "eviction": {"weights": "discard", "process": "checkpoint"}, "extra_args": VLLM_ARGS}}
            config["vllm_command"] = f"{VLLM_VENV}/bin/vllm"
            config["policy"].update(request_timeout_secs=900, startup_timeout_secs=900)
        else:
            for m, port in zip(config["models"].values(), ports):
                m["port"] = port
            config["models"]["story"]["extra_args"] = ["--sim-load-seconds", str(a.load_seconds)]
            config["vllm_command"] = str(BIN / "llmuxd-vllm-sim")
        config["port"] = a.port
        return config

    def prepare(self) -> None:
        for d in (self.ckpt, self.run):  # an earlier run's
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
        if self.args.vllm:
            if not (Path(VLLM_VENV) / "bin" / "vllm").exists():
                raise SystemExit(f"no vLLM in {VLLM_VENV}: run scripts/setup-vllm.sh first")
            return
        for repo, seed, size in SIM_MODELS.values():
            if not (self.hf / "hub" / f"models--{repo.replace('/', '--')}").exists():
                subprocess.run([BIN / "llmuxd-vllm-sim", "make-model", repo, "--seed", str(seed),
                                "--hf-home", self.hf, "--weights-bytes", str(size)], check=True,
                               stdout=subprocess.DEVNULL)

    # ---------------------------------------------------------------- containers

    def start(self, letter: str) -> None:
        name = f"llmuxd-demo-{letter.lower()}-{os.getpid()}"
        self.names.append(name)
        self.live = entrypoint.EntrypointContainer(name, self.ckpt, self.hf, self.config, self.run, self.env,
                                                   venv=sys.prefix)
        self.live.start(timeout=60)

    def stop(self) -> None:
        """Stop llmuxd (it stops its models), keep its logs in WORK/run/NAME, end the container."""
        c = self.live
        if c is None:
            return
        try:
            c.stop_daemon(120, kill_wait=10)
            c.copy_logs(self.run)
        finally:
            c.stop()  # safe to repeat: an interrupted stop() is done again by the next
            remove_cgroups(self.args.port)
            self.live = None

    def leftovers(self) -> list[str]:
        return [x for n in self.names for x in mntns.leftovers(n)]

    # ---------------------------------------------------------------- talking to llmuxd

    def chat(self, model: str, text: str) -> str:
        r = httpx.post(self.url + "/v1/chat/completions", timeout=self.timeout,
                       json={"model": model, "max_tokens": 8, "temperature": 0,
                             "messages": [{"role": "user", "content": text}]})
        if r.status_code != 200:
            raise SystemExit(f"request for {model} failed: {r.status_code} {r.text}")
        return r.json()["choices"][0]["message"]["content"].strip()

    def control(self, verb: str, model: str) -> dict:
        r = httpx.post(f"{self.url}/control/{verb}", json={"model": model}, timeout=self.timeout)
        if r.status_code != 200:
            raise SystemExit(f"{verb} {model} failed: {r.status_code} {r.text}")
        return r.json()

    def status(self, model: str) -> dict:
        return httpx.get(self.url + "/control/status", timeout=30).json()["models"][model]

    def timed_chat(self, model: str, text: str) -> tuple[str, float]:
        t = time.monotonic()
        answer = self.chat(model, text)
        return answer, time.monotonic() - t


def switching(d: Demo) -> None:
    say("1. Switching: one port, one awake model at a time")
    for label, model, text in (("request for chat (cold start)", "chat", "hello"),
                               ("request for chat (already awake)", "chat", "hello again"),
                               ("request for code (switch: chat offloaded, code cold)", "code", "def f():"),
                               ("request for chat (switch back: wake from offload)", "chat", "hello")):
        answer, secs = d.timed_chat(model, text)
        row(label, secs, f"-> {answer!r}")
    r = d.control("sleep", "chat")
    row("POST /control/sleep chat", r["duration_secs"], f"-> {r['state']}")
    r = d.control("wake", "code")
    row("POST /control/wake code (wake from discard)", r["duration_secs"], f"-> {r['state']}")
    d.control("sleep", "code")  # nothing awake: part 2's times are story's own


def checkpointing(d: Demo) -> dict:
    m, prompt, fig = d.story, "Once upon a time", {}
    say(("" if d.args.vllm else "2. ") + f"{m}: eviction discard + checkpoint (CRIU)")
    answer, fig["cold"] = d.timed_chat(m, prompt)
    row(f"request for {m} (cold start)", fig["cold"], f"-> {answer!r}")
    r = d.control("sleep", m)
    if r["state"] != "checkpointed":
        raise SystemExit(f"sleep {m} did not checkpoint: {r}")
    dump = d.status(m)["last_checkpoint"]
    fig.update(dump=r["duration_secs"], criu_dump=dump["seconds"].get("criu_dump", 0.0), images=dump["image_bytes"])
    row("sleep: weights dropped, whole process tree CRIU-dumped", fig["dump"], f"-> {r['state']}")
    say(f"  {'':<4}images {mib(dump['image_bytes'])}, without the weights; {dump['saved_files']} run-time files "
        "saved beside them")

    def restore(where: str, key: str) -> None:
        again, fig[key] = d.timed_chat(m, prompt)
        st = d.status(m)
        if st["last_wake_kind"] != "restore":
            raise SystemExit(f"{m} was not restored {where} ({st['last_wake_kind']}): {st['last_error']}")
        if again != answer:
            raise SystemExit(f"{m} answered {again!r} after the restore, {answer!r} before")
        fig[key + "_parts"] = st["last_restore"]["seconds"]
        row(f"request for {m} (restore {where})", fig[key], "-> same answer")

    restore("in container A", "here")
    r = d.control("sleep", m)
    row("sleep again (the checkpoint is kept and reused)", r["duration_secs"], f"-> {r['state']}")
    d.stop()
    say("  container A stopped; a new container B started: fresh writable layer, /tmp, /dev/shm, /run;")
    say("  it shares only the checkpoint folder and the HF cache with A")
    d.start("B")
    if d.status(m)["state"] != "checkpointed":
        raise SystemExit(f"container B does not see {m}'s checkpoint: {d.status(m)}")
    restore("in container B", "new")
    return fig


def headline(d: Demo, fig: dict) -> None:
    what = "the real vLLM CPU build (a tiny model)" if d.args.vllm else "the vLLM simulator"
    weights = "" if d.args.vllm else f" (weights: {mib(SIM_MODELS['story'][2])})"
    say(f"\n{d.story} on {what}, eviction discard + checkpoint:")
    say(f"  {'cold start -> first answer':<42}{fig['cold']:7.2f} s")
    say(f"  {'sleep: drop the weights, CRIU dump':<42}{fig['dump']:7.2f} s   criu dump {fig['criu_dump']:.2f} s, "
        f"images {mib(fig['images'])}{weights}")
    for key, where in (("here", "same container"), ("new", "new container")):
        parts = fig[key + "_parts"]
        speed = fig["cold"] / fig[key]
        say(f"  {'restore -> first answer, ' + where:<42}{fig[key]:7.2f} s   "
            + (f"{speed:.1f}x faster" if speed >= 1.1 else "no faster than the cold start here")
            + f"; criu restore {parts.get('criu_restore', 0):.2f} s, weights reloaded {parts.get('wake_sequence', 0):.2f} s")
    if not d.args.vllm:
        say(f"(The simulator is told to take {d.args.load_seconds:g} s to load, standing in for vLLM's start-up that a "
            "restore skips:\n imports, engine set-up, profiling, CUDA graphs. The real thing: ./scripts/demo.sh --vllm)")


def not_in_image(paths: list[str]) -> list[str]:
    """Those of `paths` the containers do not see: their image is the root filesystem's own mount,
    plus the checkout where it is bound in (under /tmp, /run or /dev/shm: mntns.repo_binds)."""
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    bound = [host for host, _ in mntns.repo_binds(str(ROOT))]
    missing = []
    for p in map(os.path.realpath, paths):
        under = max((m for m in mounts + bound if p == m or p.startswith(m.rstrip("/") + "/")), key=len)
        if under != "/" and under not in bound:
            missing.append(f"{p} (on the mount {under})")
    return missing


def main() -> int:
    args = parse_args()
    d = Demo(args)
    ok, why = mntns.available()
    if not ok:
        raise SystemExit(f"the demo's containers cannot be made here: {why}")
    missing = not_in_image([str(ROOT), sys.prefix] + ([VLLM_VENV] if args.vllm else []))
    if missing:
        raise SystemExit("the demo's containers see the root filesystem only, not " + ", ".join(missing)
                         + ": clone into a folder of the root filesystem")

    def interrupted(signum, frame):  # SIGTERM stops the demo like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    d.prepare()
    say(f"llmuxd demo: models and checkpoint in {d.work}, configs and logs in {d.run}")
    rc = 0
    try:
        d.start("A")
        say(f"llmuxd on {d.url}, the entrypoint of container A, with models: "
            + ", ".join(d.config["models"]) + "\n")
        if not args.vllm:
            switching(d)
            say()
        headline(d, checkpointing(d))
    except KeyboardInterrupt:
        say("\ninterrupted")
        rc = 130
    except (SystemExit, RuntimeError, subprocess.CalledProcessError) as e:  # a step or a container failed
        say(f"\nFAILED: {e}" + (f"\n{e.stderr}" if isinstance(e, subprocess.CalledProcessError) else ""))
        rc = 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # the clean-up is not to be interrupted
            signal.signal(sig, signal.SIG_IGN)
        d.stop()
        shutil.rmtree(d.ckpt, ignore_errors=True)
        left = d.leftovers()
        say("\nCleaned up: containers, their mounts and processes, the checkpoint"
            + (f"; LEFT BEHIND: {left}" if left else "; nothing left behind."))
    return rc or (1 if left else 0)


if __name__ == "__main__":
    sys.exit(main())
