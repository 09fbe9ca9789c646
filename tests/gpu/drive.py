"""The GPU run's driver (started by tests/gpu/run.sh on the GPU machine): llmuxd in entrypoint mode
(`llmuxd serve --config ...`) with the GPU test backend as `vllm_command`, through

  A. container A (new mount namespace: fresh tmpfs /tmp, /dev/shm, ~/.cache, ~/.nv, ~/.triton):
     cold start of `ck` (discard + checkpoint) -> greedy canary -> sleep = vLLM sleep level 2,
     CUDA suspend (driver API, by llmuxd), CRIU dump -> llmuxd stopped, the namespace gone;
  B. container B (another new mount namespace, fresh tmpfs again; shared with A: only the HF cache
     and the checkpoint folder, both on disk): `ck` found checkpointed -> wake = CRIU restore,
     CUDA resume, wake_up, reload_weights, reset_prefix_cache -> canary identical;
  C. `sus` (retain + cuda_suspend) in B: cold start, suspend (state kept in host RAM), resume;
  D. GPU-memory preflight: a hog process takes nearly all free GPU memory; waking `sus`
     (resume) and `ck` (restore) is refused with the reason, nothing is left stuck; once the hog
     is gone both wake, answers identical;
  E. llmuxd B stopped: no process left holding the GPU.

Figures (and GPU memory after each step, from NVML) go to OUT/gpu-h200.json; a table to
OUT/gpu-h200.md (also: `python3 tests/gpu/drive.py --render RESULTS.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from llmuxd.isolation import procfs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "infra"))  # tests/infra (run.sh copies it)
import container  # noqa: E402

MIB = 1 << 20
PROMPT = "llmuxd canary: the capital of France is"
REPO_ID = "gpu-test/h200"
PORT, CK_PORT, SUS_PORT = 3900, 8101, 8102
STATE = Path("/var/lib/llmuxd-gpu")  # on disk: survives each container's tmpfs
HF, CKPT, LOGS = STATE / "hf", STATE / "ck", STATE / "logs"
HOME_CACHES = ("/root/.cache", "/root/.nv", "/root/.triton")

R: dict[str, Any] = {"steps": {}, "gpu_memory": [], "errors": [], "checks": {}}
OUT: Path = Path(".")
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.2f}s] {msg}", flush=True)


def save() -> None:
    (OUT / "gpu-h200.json").write_text(json.dumps(R, indent=1, default=str))
    (OUT / "gpu-h200.md").write_text(render(R))


def check(name: str, ok: bool, detail: Any = None) -> bool:
    R["checks"][name] = {"ok": bool(ok), **({"detail": detail} if detail is not None else {})}
    log(f"CHECK {'ok  ' if ok else 'FAIL'} {name}" + (f": {detail}" if detail is not None else ""))
    return ok


# -- GPU memory -------------------------------------------------------------------------------------
def mem(label: str) -> dict:
    from llmuxd import cuda

    inv = cuda.gpu_inventory() or {"gpus": [{}]}
    g = inv["gpus"][0]
    by_pid = cuda.gpu_memory_by_pid() or {}
    rec = {"step": label, "t": round(time.monotonic() - T0, 2),
           "used_mib": (g.get("memory_used") or 0) // MIB, "free_mib": (g.get("memory_free") or 0) // MIB,
           "by_pid_mib": {str(p): sum(v.values()) // MIB for p, v in by_pid.items()}}
    R["gpu_memory"].append(rec)
    log(f"GPU memory [{label}]: used {rec['used_mib']} MiB, free {rec['free_mib']} MiB, per pid {rec['by_pid_mib']}")
    return rec


def nvidia_holders(exclude: set[int]) -> list[dict]:
    """Processes with an fd or a mapping of /dev/nvidia* (self and `exclude` left out)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) in exclude or int(d) == os.getpid():
            continue
        try:
            fds = [os.readlink(f"/proc/{d}/fd/{f}") for f in os.listdir(f"/proc/{d}/fd")]
            held = any(x.startswith("/dev/nvidia") for x in fds) or "/dev/nvidia" in Path(f"/proc/{d}/maps").read_text()
            if held:
                out.append({"pid": int(d), "cmd": Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]})
        except OSError:
            continue
    return out


def outer_pid(pids: list[int], inner: int | None) -> int | None:
    """The PID (as this process sees it) of the tree member whose PID in its own namespace is ``inner``."""
    return next((p for p in pids if procfs.inner_pid(p) == inner), None)


def cuda_state(pid: int) -> str:
    from llmuxd import cuda

    try:
        if not hasattr(cuda_state, "backend"):
            cuda_state.backend = cuda.DriverBackend()
        return cuda_state.backend.state(pid)
    except Exception as e:  # noqa: BLE001
        return f"error: {e}"


# -- containers -------------------------------------------------------------------------------------
CONTAINER_SH = r"""
set -e
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
for d in HOMECACHES; do mkdir -p "$d"; mount -t tmpfs -o mode=0755 tmpfs "$d"; done
cd /
exec "$@"
"""


class Container(container.Container):
    """llmuxd as the entrypoint of a new mount namespace (host PID and network namespaces, as
    `docker run --pid=host --network=host`), with fresh tmpfs on /tmp, /dev/shm and the home caches."""

    def __init__(self, name: str, config: Path, env: dict[str, str]):
        super().__init__(name)
        self.config, self.env = config, env
        self.log_path = OUT / f"llmuxd-{name}.log"
        self.url = f"http://127.0.0.1:{PORT}"
        self.proc: subprocess.Popen | None = None
        self.mntns = None

    def start(self) -> "Container":
        sh = CONTAINER_SH.replace("HOMECACHES", " ".join(HOME_CACHES))
        argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", sh, "container",
                sys.executable, "-m", "llmuxd", "serve", "--config", str(self.config), "--dbus", "off"]
        self.logf = open(STATE / f"llmuxd-{self.name}.log", "ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.logf, stderr=self.logf, env=self.env,
                                     start_new_session=True)
        return self

    @property
    def started(self) -> bool:
        return self.proc is not None

    def _root_pid(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            raise container.ContainerError(f"{self.name}: llmuxd is not running")
        return self.proc.pid

    def wait_up(self, timeout: float = 60) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llmuxd {self.name} exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    self.mntns = os.stat(f"/proc/{self.proc.pid}/ns/mnt").st_ino
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"llmuxd {self.name} not up in {timeout} s")

    def members(self) -> list[int]:
        pids = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    if os.stat(f"/proc/{d}/ns/mnt").st_ino == self.mntns and procfs.alive(int(d)):
                        pids.append(int(d))
                except OSError:
                    pass
        return pids

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM llmuxd, SIGKILL after `timeout` s (the namespace goes with its last process)."""
        container.terminate(self.proc, timeout)
        self.logf.close()
        return self.proc.returncode


def own_tmpfs(c: "Container") -> bool:
    """llmuxd runs in a mount namespace other than ours, with tmpfs on /tmp and /dev/shm that we do not see."""
    if c.mntns == os.stat("/proc/self/ns/mnt").st_ino:
        return False
    theirs = Path(f"/proc/{c.proc.pid}/mountinfo").read_text().splitlines()
    ours = Path("/proc/self/mountinfo").read_text().splitlines()

    def top(lines: list[str], point: str) -> str | None:  # the device of the mount on top at `point`
        found = [ln.split()[2] for ln in lines if ln.split()[4] == point and " - tmpfs " in ln]
        return found[-1] if found else None

    seen = {ln.split()[2] for ln in ours}
    return all(top(theirs, p) and top(theirs, p) not in seen for p in ("/tmp", "/dev/shm"))


# -- HTTP -------------------------------------------------------------------------------------------
def control(c: Container, verb: str, model: str, timeout: float = 300) -> tuple[int, dict, float]:
    import httpx

    t = time.monotonic()
    r = httpx.post(f"{c.url}/control/{verb}", json={"model": model}, timeout=timeout)
    secs = time.monotonic() - t
    try:
        body = r.json()
    except ValueError:
        body = {"text": r.text[:500]}
    log(f"/control/{verb} {model}: {r.status_code} in {secs:.3f} s: {json.dumps(body)[:400]}")
    return r.status_code, body, secs


def status(c: Container, model: str) -> dict:
    import httpx

    return httpx.get(f"{c.url}/control/status", timeout=30).json()["models"][model]


def first_token(c: Container, model: str, max_tokens: int = 8) -> tuple[float, float, str]:
    """Greedy completion through llmuxd, streamed: (seconds to the first token, to the last, text)."""
    import httpx

    t = time.monotonic()
    ttft, parts = None, []
    with httpx.stream("POST", c.url + "/v1/completions", timeout=600,
                      json={"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
                            "stream": True}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"completion {model}: {r.status_code} {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            frame = json.loads(line[6:])
            if "error" in frame:
                raise RuntimeError(f"completion {model}: {frame}")
            text = frame["choices"][0]["text"] if frame.get("choices") else ""
            if text and ttft is None:
                ttft = time.monotonic() - t
            parts.append(text)
    total = time.monotonic() - t
    text = "".join(parts)
    log(f"{model}: first token {ttft:.3f} s, whole answer {total:.3f} s: {text!r}")
    return ttft or total, total, text


def gpu_info(port: int, checksum: bool = False) -> dict:
    import httpx

    r = httpx.get(f"http://127.0.0.1:{port}/gpu/info" + ("?checksum=1" if checksum else ""), timeout=120)
    return r.json()


def step(name: str, **fig: Any) -> None:
    R["steps"].setdefault(name, {}).update(fig)
    save()


# -- the hog ----------------------------------------------------------------------------------------
HOG = r"""
import sys, time, torch
leave = int(sys.argv[1])
torch.zeros(1, device="cuda")
free, total = torch.cuda.mem_get_info()
n = max(0, free - leave)
x = torch.empty(n, dtype=torch.uint8, device="cuda")
torch.cuda.synchronize()
print("ready", n, torch.cuda.mem_get_info()[0], flush=True)
sys.stdin.read()
"""


def start_hog(leave: int) -> tuple[subprocess.Popen, int]:
    p = subprocess.Popen([sys.executable, "-c", HOG, str(leave)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    line = p.stdout.readline().split()
    if not line or line[0] != "ready":
        raise RuntimeError(f"hog did not start: {line}")
    log(f"hog pid {p.pid} holds {int(line[1]) // MIB} MiB; device free now {int(line[2]) // MIB} MiB")
    return p, int(line[1])


def stop_hog(p: subprocess.Popen) -> None:
    try:
        p.stdin.close()
        p.wait(30)
    except Exception:  # noqa: BLE001
        p.kill()
        p.wait()


# -- phases -----------------------------------------------------------------------------------------
def phase(name: str):
    def wrap(fn):
        def run(*a, **kw):
            log(f"=== {name}")
            try:
                return fn(*a, **kw)
            except Exception as e:  # noqa: BLE001
                R["errors"].append({"phase": name, "error": repr(e), "trace": traceback.format_exc()[-2000:]})
                log(f"!!! {name} failed: {e!r}\n{traceback.format_exc()}")
                save()
                return None
        return run
    return wrap


def setup(args: argparse.Namespace) -> dict[str, str]:
    for d in (HF, CKPT, LOGS):
        d.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HOME=str(HF), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    t = time.monotonic()
    snap = subprocess.run([sys.executable, "-m", "gpu.backend", "make-model", REPO_ID, "--hf-home", str(HF),
                           "--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab),
                           "--window", "2048", "--kv-bytes", str(args.kv_bytes), "--seed", "7"],
                          env=env, check=True, capture_output=True, text=True).stdout.strip()
    cfg = json.loads((Path(snap) / "config.json").read_text())
    wbytes = (Path(snap) / "model.safetensors").stat().st_size
    R["model"] = {"repo": REPO_ID, "snapshot": snap, "config": cfg, "weights_file_bytes": wbytes,
                  "make_model_secs": round(time.monotonic() - t, 2)}
    log(f"model written in {R['model']['make_model_secs']} s: {wbytes / 2**30:.2f} GiB of weights, "
        f"KV buffer {args.kv_bytes / 2**30:.2f} GiB")
    dev = ["--device", args.device] if args.device else []
    config = {
        "models": {
            "ck": {"model_path": REPO_ID, "port": CK_PORT, "eviction": {"weights": "discard", "process": "checkpoint"},
                   "extra_args": dev},
            "sus": {"model_path": REPO_ID, "port": SUS_PORT, "eviction": {"weights": "retain", "process": "cuda_suspend"},
                    "extra_args": dev},
        },
        # llmuxd's default runs each tree in its own PID namespace without its own /proc; CUDA
        # does not initialise there (first GPU run: cudaGetDeviceCount error 304): see probe_pidns.
        # (no io_uring filter either: it needs pidinit; this backend's asyncio loop uses epoll)
        "isolation": {"pid_namespace": args.pid_namespace, "block_io_uring": args.pid_namespace},
        "checkpoint": {"criu_path": args.criu, "images_dir": str(CKPT), "keep_images": True,
                       "cuda_checkpoint_path": "/nonexistent/cuda-checkpoint"},
        "port": PORT, "metrics_port": 0, "host": "127.0.0.1", "vllm_command": f"{sys.executable} -m gpu.backend",
        "log_dir": str(LOGS),
        "policy": {"request_timeout_secs": 600, "min_active_secs": 0, "startup_timeout_secs": 180},
    }
    (STATE / "config.json").write_text(json.dumps(config, indent=1))
    probe_pidns()
    R["config"] = config
    r = subprocess.run([sys.executable, "-m", "llmuxd", "doctor", "--config", str(STATE / "config.json")],
                       env=env, capture_output=True, text=True, timeout=120)
    R["doctor"] = (r.stdout + r.stderr)[-4000:]
    log("llmuxd doctor:\n" + R["doctor"])
    save()
    return env


def probe_pidns() -> None:
    """Does CUDA initialise in a PID namespace that sees the parent's /proc (llmuxd's tree shape),
    and with a /proc of its own?"""
    code = "import torch; print('cuda available:', torch.cuda.is_available(), torch.cuda.device_count())"
    variants = {"plain": [], "unshare --pid --fork (parent's /proc, as llmuxd's trees)": ["unshare", "--pid", "--fork"],
                "unshare --pid --fork --mount --mount-proc": ["unshare", "--pid", "--fork", "--mount", "--mount-proc"]}
    procs = {k: subprocess.Popen([*v, sys.executable, "-W", "ignore", "-c", code], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for k, v in variants.items()}
    R["probe_pidns"] = {}
    for k, p in procs.items():
        try:
            out, _ = p.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        R["probe_pidns"][k] = out.strip()[-300:]
        log(f"CUDA in {k}: {out.strip()[-300:]}")


@phase("A: cold start, canary, sleep = discard + CUDA suspend + CRIU dump")
def container_a(env: dict[str, str]) -> dict:
    mem("baseline")
    a = Container("A", STATE / "config.json", env).start()
    try:
        a.wait_up()
        check("A: llmuxd in a new mount namespace with its own tmpfs /tmp and /dev/shm", own_tmpfs(a),
              {"mntns": a.mntns, "driver_mntns": os.stat("/proc/self/ns/mnt").st_ino})
        ttft, total, text = first_token(a, "ck")
        st = status(a, "ck")
        R["canary"] = text
        check("A: canary is not degenerate", len(set(text.split())) > 2, text)
        info = gpu_info(CK_PORT, checksum=True)
        R["checksum_cold"] = info.get("checksum")
        check("A: engine on the GPU, decode step captured as a CUDA graph",
              info.get("device", "").startswith("cuda") and info.get("graph"), [info.get("device"), info.get("graph")])
        m = mem("ck awake (cold started)")
        step("cold_start", first_token_secs=round(ttft, 3), answer_secs=round(total, 3),
             transition_secs=st["last_wake_secs"], kind=st["last_wake_kind"], engine=info.get("timings"),
             engine_memory=info.get("memory", {}).get("loaded"), gpu_used_mib_after=m["used_mib"],
             graph=info.get("graph"), device=info.get("device_name"))
        # a second, non-streamed answer: identical
        _, _, again = first_token(a, "ck")
        check("A: canary repeatable", again == text)
        code, body, secs = control(a, "sleep", "ck")
        st = status(a, "ck")
        m = mem("ck checkpointed")
        check("A: sleep -> checkpointed", code == 200 and body.get("state") == "checkpointed", body)
        lc = st.get("last_checkpoint") or {}
        manifest = json.loads((CKPT / "ck" / "images" / "manifest.json").read_text())
        step("sleep_checkpoint", total_secs=round(secs, 3), transition_secs=st["last_sleep_secs"],
             phases=lc.get("seconds"), image_bytes=lc.get("image_bytes"), saved_files=lc.get("saved_files"),
             cuda_pids=manifest.get("cuda_pids"), cuda_bytes_recorded=manifest.get("cuda_bytes"),
             saved_paths=[s["path"] for s in manifest.get("saved", [])][:40],
             gpu_used_mib_after=m["used_mib"])
        text_log = Path(a.logf.name).read_text(errors="replace")
        lock = [ln for ln in text_log.splitlines() if "network lock" in ln]
        R["network_lock"] = lock[-1] if lock else None
        check("A: network lock chosen automatically (no iptables here)", bool(lock), lock[-1] if lock else None)
        return {}
    finally:
        rc = a.stop()
        time.sleep(0.5)
        left = a.members() if a.mntns else []
        check("A: llmuxd stopped cleanly, nothing left in its namespace", rc == 0 and not left, {"rc": rc, "left": left})
        mem("container A gone")


@phase("B: new container, restore + CUDA resume + reload, canary identical")
def container_b_restore(b: Container) -> None:
    st = status(b, "ck")
    check("B: ck found checkpointed at start", st["state"] == "checkpointed", st["state"])
    ttft, total, text = first_token(b, "ck")
    st = status(b, "ck")
    check("B: woken by restore", st["last_wake_kind"] == "restore", st["last_wake_kind"])
    check("B: canary identical after restore in a new container", text == R.get("canary"), [text, R.get("canary")])
    info = gpu_info(CK_PORT, checksum=True)
    check("B: weights bit-identical after reload", info.get("checksum") == R.get("checksum_cold"),
          [info.get("checksum"), R.get("checksum_cold")])
    m = mem("ck restored + reloaded")
    step("restore", first_token_secs=round(ttft, 3), answer_secs=round(total, 3), transition_secs=st["last_wake_secs"],
         phases=(st.get("last_restore") or {}).get("seconds"), engine=info.get("timings"),
         engine_memory=info.get("memory"), gpu_used_mib_after=m["used_mib"], graph=info.get("graph"))


@phase("C: retain + cuda_suspend")
def suspend_cycle(b: Container) -> None:
    ttft, total, text = first_token(b, "sus")  # evicts ck (keep_images: reuses its checkpoint)
    st = status(b, "sus")
    R["canary_sus"] = text
    check("C: sus canary equals ck's (same weights)", text == R.get("canary"), [text, R.get("canary")])
    info = gpu_info(SUS_PORT)
    m = mem("sus awake (cold started)")
    pid = outer_pid(st["pids"], info.get("engine_pid"))
    R["sus_engine_pid"] = pid
    log(f"sus engine: pid {pid} here, {info.get('engine_pid')} in its PID namespace; tree {st['pids']}")
    step("cold_start_sus", first_token_secs=round(ttft, 3), transition_secs=st["last_wake_secs"],
         engine=info.get("timings"), gpu_used_mib_after=m["used_mib"])
    ck = status(b, "ck")
    step("evict_ck_reuse", state=ck["state"], last_checkpoint=ck.get("last_checkpoint"), sleep_secs=ck["last_sleep_secs"])
    held = m["by_pid_mib"].get(str(pid))
    code, body, secs = control(b, "sleep", "sus")
    m = mem("sus suspended")
    check("C: suspended", body.get("state") == "suspended", body)
    check("C: engine holds no GPU memory while suspended", str(pid) not in m["by_pid_mib"], m["by_pid_mib"])
    check("C: engine CUDA state checkpointed", cuda_state(pid) == "checkpointed", cuda_state(pid))
    step("suspend", transition_secs=round(body.get("duration_secs", secs), 3), engine_gpu_mib_before=held,
         gpu_used_mib_after=m["used_mib"])
    code, body, secs = control(b, "wake", "sus")
    m = mem("sus resumed")
    _, _, text2 = first_token(b, "sus")
    check("C: canary identical after resume", text2 == text, [text2, text])
    step("resume", transition_secs=round(body.get("duration_secs", secs), 3), gpu_used_mib_after=m["used_mib"])


@phase("D: GPU memory preflight")
def preflight(b: Container) -> None:
    code, body, _ = control(b, "sleep", "sus")
    check("D: sus suspended again", body.get("state") == "suspended", body)
    pid = R.get("sus_engine_pid")
    hog, held = start_hog(leave=128 * MIB)
    try:
        m = mem("hog holds the GPU")
        code, body, secs = control(b, "wake", "sus")
        st = status(b, "sus")
        check("D: resume refused while the GPU lacks memory", code != 200 and st["state"] == "suspended",
              {"code": code, "state": st["state"], "error": st.get("last_error")})
        check("D: refused process not stuck (still checkpointed, resumable)", cuda_state(pid) == "checkpointed",
              cuda_state(pid))
        step("preflight_resume_refused", http_status=code, secs=round(secs, 3), state=st["state"],
             last_error=st.get("last_error"), hog_mib=held // MIB, free_mib=m["free_mib"])
        code, body, secs = control(b, "wake", "ck")
        st = status(b, "ck")
        said = [ln for ln in Path(b.logf.name).read_text(errors="replace").splitlines()
                if "restore failed" in ln and "ck" in ln]
        check("D: restore refused while the GPU lacks memory (then the cold start fails too); checkpoint kept",
              code != 200 and st["state"] == "checkpointed" and any("free memory" in ln for ln in said),
              {"code": code, "state": st["state"], "error": st.get("last_error"), "log": said[-1:]})
        step("preflight_restore_refused", http_status=code, secs=round(secs, 3), state=st["state"],
             last_error=st.get("last_error"), restore_error=said[-1][-400:] if said else None)
        check("D: nothing of ck left running after the refused restore", not status(b, "ck")["pids"],
              status(b, "ck")["pids"])
    finally:
        stop_hog(hog)
    mem("hog gone")
    code, body, secs = control(b, "wake", "sus")
    _, _, text = first_token(b, "sus")
    check("D: resume succeeds once memory is free; canary identical",
          code == 200 and text == R.get("canary_sus"), {"code": code, "text": text})
    check("D: sus engine running again (same process)", cuda_state(pid) == "running", cuda_state(pid))
    step("resume_after_preflight", transition_secs=round(body.get("duration_secs", secs), 3))
    ttft, total, text = first_token(b, "ck")  # evicts sus (suspend) then restores ck again
    st = status(b, "ck")
    check("D: second restore of the same images; canary identical",
          st["last_wake_kind"] == "restore" and text == R.get("canary"), {"kind": st["last_wake_kind"], "text": text})
    m = mem("ck restored again")
    # The request's first token also waits for the eviction of the active model (sus: CUDA
    # suspend): recorded apart, so that the restore itself can be compared with the first one.
    step("restore_2", first_token_secs=round(ttft, 3), transition_secs=st["last_wake_secs"],
         evicted_first="sus", eviction_secs=status(b, "sus").get("last_sleep_secs"),
         phases=(st.get("last_restore") or {}).get("seconds"), gpu_used_mib_after=m["used_mib"])


def main() -> int:
    global OUT
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    ap.add_argument("--criu", default="/opt/llmuxd-gpu/criu")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--kv-bytes", type=int, default=2 << 30)
    ap.add_argument("--device", default="cuda", help="the backend's --device ('' = cuda when available)")
    ap.add_argument("--pid-namespace", action=argparse.BooleanOptionalAction, default=True,
                    help="llmuxd's isolation.pid_namespace (default on, as in llmuxd)")
    ap.add_argument("--render", type=Path, help="only print the table of a results file")
    args = ap.parse_args()
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return 0
    OUT = args.out
    OUT.mkdir(parents=True, exist_ok=True)
    R["started"] = time.strftime("%Y-%m-%d %H:%M:%S")
    R["machine"] = {"kernel": platform.release(), "python": platform.python_version()}
    try:
        import torch

        R["machine"] |= {"torch": torch.__version__, "cuda": torch.version.cuda}
    except ImportError:
        pass
    from llmuxd import cuda

    R["machine"]["gpu"] = cuda.gpu_inventory()
    env = setup(args)
    container_a(env)
    b = None
    try:
        b = Container("B", STATE / "config.json", env).start()
        b.wait_up()
        check("B: llmuxd in a new mount namespace with its own tmpfs /tmp and /dev/shm", own_tmpfs(b),
              {"mntns": b.mntns, "driver_mntns": os.stat("/proc/self/ns/mnt").st_ino})
        container_b_restore(b)
        suspend_cycle(b)
        preflight(b)
    except Exception as e:  # noqa: BLE001
        R["errors"].append({"phase": "B", "error": repr(e), "trace": traceback.format_exc()[-2000:]})
        log(f"!!! B failed: {e!r}")
    finally:
        if b is not None:
            rc = b.stop()
            time.sleep(1)
            left = b.members() if b.mntns else []
            check("E: llmuxd B stopped cleanly, nothing left in its namespace", rc == 0 and not left,
                  {"rc": rc, "left": left})
    holders = nvidia_holders(set())
    check("E: no process left holding the GPU", not holders, holders)
    mem("end")
    R["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    R["wall_secs"] = round(time.monotonic() - T0, 1)
    save()
    failed = [k for k, v in R["checks"].items() if not v["ok"]]
    log(f"done in {R['wall_secs']} s; {len(R['checks']) - len(failed)} checks ok, failed: {failed}; errors: {len(R['errors'])}")
    return 0 if not failed and not R["errors"] else 1


# -- the table --------------------------------------------------------------------------------------
def _rest(s: dict) -> str:
    """A run that did not record the eviction apart: first token minus the restore transition."""
    r2 = s.get("restore_2") or {}
    if r2.get("first_token_secs") is None or r2.get("transition_secs") is None:
        return "?"
    return f"{r2['first_token_secs'] - r2['transition_secs']:.3f} (first token − transition; not recorded apart in this run)"


def render(r: dict) -> str:
    s = r.get("steps", {})

    def g(*path: str, fmt: str = "{:.3f} s") -> str:
        v: Any = s
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        return fmt.format(v) if isinstance(v, (int, float)) else "—"

    model = r.get("model", {})
    cfg = model.get("config", {})
    gpu = ((r.get("machine") or {}).get("gpu") or {}).get("gpus", [{}])[0]
    lines = [
        "# llmuxd on an H200: GPU test backend, checkpoint/restore and CUDA suspend",
        "",
        f"Run {r.get('started', '?')}, {gpu.get('name', '?')}, driver {((r.get('machine') or {}).get('gpu') or {}).get('driver_version', '?')}, "
        f"kernel {(r.get('machine') or {}).get('kernel', '?')}, torch {(r.get('machine') or {}).get('torch', '?')}. "
        f"Model: tests/gpu/model.py, hidden {cfg.get('hidden_size')}, {cfg.get('num_hidden_layers')} layers, vocab {cfg.get('vocab_size')}, "
        f"bf16 weights {model.get('weights_file_bytes', 0) / 2**30:.2f} GiB (safetensors in an HF cache), "
        f"KV buffer {cfg.get('kv_cache_bytes', 0) / 2**30:.2f} GiB, one decode step as a CUDA graph. One run, single figures.",
        "",
        "| step | figure |",
        "|---|---|",
        f"| cold start → first token (through llmuxd) | {g('cold_start', 'first_token_secs')} |",
        f"| cold start transition (spawn → /health) | {g('cold_start', 'transition_secs')} |",
        f"| engine: CUDA init / load weights / graph capture | {g('cold_start', 'engine', 'cuda_init')} / {g('cold_start', 'engine', 'load_weights')} / {g('cold_start', 'engine', 'graph_capture')} |",
        f"| sleep, discard + checkpoint (canary, sleep level 2, suspend, dump, manifest) | {g('sleep_checkpoint', 'transition_secs')} |",
        f"| of which engine sleep level 2 (free weights + KV) | {g('restore', 'engine', 'sleep_level2')} |",
        f"| of which CUDA suspend (driver API) | {g('sleep_checkpoint', 'phases', 'cuda_suspend')} |",
        f"| of which CRIU dump | {g('sleep_checkpoint', 'phases', 'criu_dump')} |",
        f"| of which manifest (images hashed + synced, alongside: images decoded, files saved) | {g('sleep_checkpoint', 'phases', 'manifest')} |",
        f"| within it: digest images / read images / save files (the first alongside the others) | {g('sleep_checkpoint', 'phases', 'digest_images')} / {g('sleep_checkpoint', 'phases', 'read_images')} / {g('sleep_checkpoint', 'phases', 'save_files')} |",
        f"| of which write (manifest written + synced, exchanged into place) | {g('sleep_checkpoint', 'phases', 'write')} |",
        f"| image size | {g('sleep_checkpoint', 'image_bytes', fmt='{:.0f}')} bytes |",
        f"| GPU memory recorded for the resume (CUDA context left after sleep level 2) | {json.dumps(s.get('sleep_checkpoint', {}).get('cuda_bytes_recorded'))} bytes |",
        f"| restore in a new container → first token | {g('restore', 'first_token_secs')} |",
        f"| restore transition | {g('restore', 'transition_secs')} |",
        f"| of which verify images / prepare / CRIU restore | {g('restore', 'phases', 'verify_images')} / {g('restore', 'phases', 'prepare')} / {g('restore', 'phases', 'criu_restore')} |",
        f"| of which CUDA resume | {g('restore', 'phases', 'cuda_resume')} |",
        f"| of which /health / wake sequence (wake_up + reload_weights + reset_prefix_cache) | {g('restore', 'phases', 'health')} / {g('restore', 'phases', 'wake_sequence')} |",
        f"| engine: wake_up (alloc + graph capture) / reload_weights | {g('restore', 'engine', 'wake_up')} / {g('restore', 'engine', 'reload_weights')} |",
        f"| second restore of the same images → first token (waits first for the eviction of the active model, sus: CUDA suspend) | {g('restore_2', 'first_token_secs')} |",
        f"| of which eviction of sus (suspend) | {g('restore_2', 'eviction_secs') if s.get('restore_2', {}).get('eviction_secs') is not None else _rest(s)} |",
        f"| second restore transition (first: {g('restore', 'transition_secs')}) | {g('restore_2', 'transition_secs')} |",
        f"| of which verify images / prepare / CRIU restore / CUDA resume / wake sequence | {g('restore_2', 'phases', 'verify_images')} / {g('restore_2', 'phases', 'prepare')} / {g('restore_2', 'phases', 'criu_restore')} / {g('restore_2', 'phases', 'cuda_resume')} / {g('restore_2', 'phases', 'wake_sequence')} |",
        f"| retain + cuda_suspend: suspend (engine held {g('suspend', 'engine_gpu_mib_before', fmt='{:.0f}')} MiB) | {g('suspend', 'transition_secs')} |",
        f"| retain + cuda_suspend: resume | {g('resume', 'transition_secs')} |",
        f"| resume refused by the preflight (hog holding the GPU) | {g('preflight_resume_refused', 'secs')} |",
        f"| restore refused by the preflight | {g('preflight_restore_refused', 'secs')} |",
        "",
        "GPU memory in use on the device (NVML) after each step:",
        "",
        "| after | used MiB | free MiB | per process MiB |",
        "|---|---|---|---|",
    ]
    for m in r.get("gpu_memory", []):
        lines.append(f"| {m['step']} | {m['used_mib']} | {m['free_mib']} | {m['by_pid_mib'] or ''} |")
    lines += ["", "Checks:", ""]
    for k, v in r.get("checks", {}).items():
        lines.append(f"- {'ok' if v['ok'] else '**FAILED**'}: {k}")
    if r.get("errors"):
        lines += ["", "Errors:", ""] + [f"- {e['phase']}: {e['error']}" for e in r["errors"]]
    if r.get("network_lock"):
        lines += ["", f"Network lock: `{r['network_lock'].strip()[-120:]}`"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
