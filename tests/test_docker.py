"""The image users run, in the real Docker engine: the project's Dockerfile is built (FROM a
Debian base built here, standing in for vLLM's image: images cannot be pulled in CI) and the
cross-container restore test runs with `docker run`, `docker exec`, `docker stop` and `docker logs`:
container A cold-starts the model, serves it and checkpoints it; A is stopped; a NEW container B
of the same image restores it (not a cold start) and serves the same answer.

Both shapes, with the run lines read from docs/docker.md (tested as written: only the image, the
container name, the host folders and the ports differ; `--gpus all` is dropped, there is no GPU;
`--privileged` becomes its equivalent where the engine refuses it):
  * systemd as PID 1: A is stopped with `docker stop` and `checkpoint_on_stop`; B is woken with
    `docker exec B busctl call ... Wake`; `journalctl -u llmuxd` in B says it restored;
  * `--pid=host` with llmuxd as the entrypoint: A checkpoints on `/control/sleep`; B restores on
    `/control/wake`;
with the simulator (`llmuxd-vllm-sim`, installed in the image) and with the real vLLM CPU build
(its cached venv mounted read-only at the same path in both containers, like an image layer).
Also: B on an image that differs from A's (a second tag, one image-provided file changed) refuses
the checkpoint with the reason and cold-starts; the checkpoint is kept and restores in a container
of A's image.  `docker logs` shows llmuxd's log and the model's own lines with its name.

The Docker engine is the running one, or one started here and stopped again (tests/infra/docker.py);
every container and image made here is removed, whatever happens, and the engine's folders are
checked for mounts and cgroups left behind.  Times are printed (run with -s to see them).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from harness import REPO, free_ports
from llmuxd.sim import model as simmodel

sys.path.insert(0, str(Path(__file__).resolve().parent / "infra"))
import docker as dockerinfra  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.criu]

CKPT = "/tmp/llmux-checkpoints"
HF = "/root/.cache/huggingface"
CONFIG = "/etc/llmux/config.json"
MODEL = "qwen3-0.6b"
CHAT = [{"role": "user", "content": "What is CRIU?"}]
VLLM_VENV = os.environ.get("LLMUXD_VLLM_VENV", "/opt/llmuxd/vllm-venv")
VLLM_HF = os.environ.get("LLMUXD_VLLM_HF_HOME", "/opt/llmuxd/vllm-hf")
VLLM_ENV = {"VLLM_HOST_IP": "127.0.0.1", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
VLLM_ARGS = ["--host", "127.0.0.1", "--max-model-len", "256", "--kv-cache-memory-bytes", "67108864", "--enforce-eager"]
TIMES: dict[str, float] = {}


# -- the engine, the base image, the image ---------------------------------------------------------

@pytest.fixture(scope="module")
def engine():
    ok, why = dockerinfra.available()
    if not ok:
        pytest.fail(f"the Docker tests need a Docker engine: {why}")
    e = dockerinfra.Engine()
    t0 = time.monotonic()
    e.start()
    TIMES["engine start"] = time.monotonic() - t0
    try:
        yield e
    finally:
        left = e.stop()
        _report_times()
        assert not left, f"left behind: {left}"


def _report_times() -> None:
    if TIMES:
        print("\n[docker] " + "; ".join(f"{k} {v:.2f} s" for k, v in TIMES.items()))


@pytest.fixture(scope="module")
def base_image(engine) -> str:
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(REPO / "tests/infra/build-docker-base.sh")], capture_output=True, text=True,
                       env={**os.environ, "DOCKER": engine.cli, "DOCKER_BUILDKIT": "0"}, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    TIMES["base image"] = time.monotonic() - t0
    return r.stdout.strip().splitlines()[-1]


def build_context(dest: Path) -> Path:
    """The build context: what .dockerignore lets in, and a BUILD_EXTRA folder with the CA bundle
    pip needs on this network (used by the build stages only)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    for name in ("llmuxd", "packaging", "systemd", "dbus"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    extra = dest / "build-extra"
    extra.mkdir()
    ca = os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"
    if os.path.isfile(ca):
        shutil.copy2(ca, extra / "ca.crt")
    return dest


def build_args(base: str, **more: str) -> list[str]:
    args = {"BASE_IMAGE": base, "BUILD_EXTRA": "build-extra", "CUDA_CHECKPOINT_URL": "", **more}
    for k in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST"):
        if os.environ.get(k):
            args[k] = os.environ[k]
    out = []
    for k, v in args.items():
        out += ["--build-arg", f"{k}={v}"]
    return out


@pytest.fixture(scope="module")
def image(engine, base_image, tmp_path_factory) -> str:
    """The project's Dockerfile, built.  Its build stages are kept as cache under
    lmx-test-cache:* (like the base image); the image itself is removed at the end."""
    ctx = build_context(tmp_path_factory.mktemp("context"))
    args = build_args(base_image)
    common = ["build", "--network=host", "--force-rm", *args, str(ctx)]
    t0 = time.monotonic()
    for stage in ("cuda-checkpoint", "build"):
        tag = f"lmx-test-cache:{stage}"
        old = engine.docker("image", "inspect", "--format", "{{.Id}}", tag, check=False).stdout.strip()
        engine.docker(*common[:1], "--target", stage, "-t", tag, *common[1:], timeout=1200)
        new = engine.docker("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()
        if old and old != new:
            engine.docker("rmi", old, check=False)
    name = f"lmx-test:{engine.session.lower()}"
    engine.docker(*common[:1], "-t", name, *engine.label(), *common[1:], timeout=1200)
    TIMES["image build"] = time.monotonic() - t0
    return name


# -- the run lines of docs/docker.md ---------------------------------------------------------------

def doc_run_lines() -> dict[str, list[str]]:
    """{"systemd": argv, "entrypoint": argv} of the `docker run` lines in docs/docker.md."""
    text = (REPO / "docs" / "docker.md").read_text()
    lines = {}
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            if line.strip().startswith("docker run"):
                argv = shlex.split(line)
                lines["entrypoint" if "--pid=host" in argv else "systemd"] = argv
    assert set(lines) == {"systemd", "entrypoint"}, lines
    return lines


def test_doc_run_lines_have_what_the_shapes_need():
    lines = doc_run_lines()
    for argv in lines.values():
        assert "--privileged" in argv and "--network=host" in argv
        assert any(a.startswith("--shm-size=") for a in argv)  # vLLM's rings need more than 64 MB
        assert any(a.startswith("--stop-timeout=") for a in argv)  # checkpoint_on_stop needs time
        mounts = {a.split(":")[1] for a in argv if a.count(":") >= 1 and a.startswith("/") and ":/" in a}
        assert {CONFIG, CKPT, HF} <= mounts, mounts
    assert {"--cgroupns=private", "/run", "/run/lock"} <= set(lines["systemd"])


def run_argv(shape: str, engine, image: str, name: str, volumes: dict[str, str], env: dict[str, str] | None = None,
             extra_volumes: list[str] = ()) -> list[str]:
    """The documented line for `shape` with this test's image, name and host folders."""
    argv = doc_run_lines()[shape]
    assert argv[:3] == ["docker", "run", "-d"], argv
    out: list[str] = []
    it = iter(argv[3:-1])
    for a in it:
        if a == "--gpus":
            next(it)  # no GPU here
        elif a == "--privileged":
            out += engine.privileged_flags(image)
        elif a == "--name":
            out += ["--name", name]
            next(it)
        elif a == "-v":
            src, dst, *mode = next(it).split(":")
            out += ["-v", ":".join([volumes[dst], dst, *mode])]
        else:
            out.append(a)
    for k, v in (env or {}).items():
        out += ["-e", f"{k}={v}"]
    for v in extra_volumes:
        out += ["-v", v]
    return [*out, image]


# -- a container -----------------------------------------------------------------------------------

class Box:
    """One `docker run` of the image in one of the documented shapes."""

    def __init__(self, engine, shape: str, image: str, config: dict, dirs: dict[str, str],
                 env: dict[str, str] | None = None, extra_volumes: list[str] = ()):
        self.engine, self.shape, self.image = engine, shape, image
        self.name = f"lmx-dt-{shape[:3]}-{uuid.uuid4().hex[:6]}"
        self.url = f"http://127.0.0.1:{config['port']}"
        self.argv = run_argv(shape, engine, image, self.name, dirs, env, extra_volumes)
        self.id = ""

    def start(self, timeout: float = 180) -> "Box":
        t0 = time.monotonic()
        self.id = self.engine.run_container(self.argv)
        deadline = t0 + timeout
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            state = self.engine.docker("inspect", "-f", "{{.State.Status}}", self.name, check=False).stdout.strip()
            if state not in ("running", "created"):
                raise AssertionError(f"{self.name} is {state}:\n{self.logs()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no /health within {timeout} s:\n{self.logs()[-4000:]}")
            time.sleep(0.1)
        self.up_seconds = time.monotonic() - t0
        return self

    def logs(self) -> str:
        r = self.engine.docker("logs", self.name, check=False, timeout=60)
        return r.stdout + r.stderr

    def exec(self, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.engine.docker("exec", self.name, *cmd, check=False, timeout=timeout)

    def journal(self, *args: str) -> str:
        return self.exec("journalctl", "--no-pager", *args).stdout

    def stop(self) -> float:
        t0 = time.monotonic()
        self.engine.docker("stop", self.name, timeout=300)
        return time.monotonic() - t0

    def remove(self) -> None:
        """Stop it (llmuxd stops its models) if it still runs, remove it, and check that none of
        its processes, cgroups or mounts is left."""
        if not self.id:
            return
        try:
            running = self.engine.docker("inspect", "-f", "{{.State.Running}}", self.name, check=False).stdout.strip()
            if running == "true":
                self.engine.docker("stop", "-t", "60", self.name, check=False, timeout=120)
        finally:
            self.engine.remove(self.name)
        left = container_leftovers(self.id)
        assert not left, f"{self.name} left behind: {left}"

    def status(self) -> dict:
        return httpx.get(self.url + "/control/status", timeout=30).json()["models"][MODEL]


def container_leftovers(cid: str) -> list[str]:
    """Processes, cgroup folders and mounts of a removed container."""
    left = [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/docker/{cid}")]
    left += [str(p) for p in Path("/sys/fs/cgroup").glob(f"docker/{cid}")]
    left += [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines() if cid[:12] in line]
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if cid in (d / "cgroup").read_text():
                    left.append(f"pid {d.name} ({(d / 'comm').read_text().strip()})")
            except OSError:
                pass
    return left


def host_sysctls() -> dict[str, str]:
    """The machine-wide kernel variables a booted systemd's sysctl.d would set."""
    return {p.name: p.read_text().strip() for p in sorted(Path("/proc/sys/fs").glob("protected_*"))}


def chat_stream(url: str, max_tokens: int = 12, temperature: float | None = None) -> tuple[str, float]:
    """(the answer, seconds to its first token), streamed."""
    body = {"model": MODEL, "messages": CHAT, "max_tokens": max_tokens, "stream": True}
    if temperature is not None:
        body["temperature"] = temperature
    t0 = time.monotonic()
    first = None
    parts = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            assert "error" not in data, data
            delta = data["choices"][0]["delta"].get("content") or ""
            if delta and first is None:
                first = time.monotonic() - t0
            parts.append(delta)
    return "".join(parts), first if first is not None else time.monotonic() - t0


def control(url: str, what: str) -> dict:
    r = httpx.post(f"{url}/control/{what}", json={"model": MODEL}, timeout=900)
    return r.json()


def busctl_wake(box: Box) -> str:
    r = box.exec("busctl", "--timeout=900", "call", "io.llmux.Llmuxd1", "/io/llmux/Llmuxd1", "io.llmux.Llmuxd1",
                 "Wake", "s", MODEL, timeout=960)
    assert r.returncode == 0, (r.stdout, r.stderr, box.journal("-u", "llmuxd")[-3000:])
    return r.stdout


# -- the shared folders ----------------------------------------------------------------------------

def checkpoint_dir(base: Path) -> Path:
    """A root-owned 0700 folder (the checkpoint trust rule: root's, not group/other-writable)."""
    d = base / f"ckpt-{uuid.uuid4().hex[:6]}"
    d.mkdir(mode=0o700)
    os.chown(d, 0, 0)
    d.chmod(0o700)
    return d


@pytest.fixture(scope="module")
def sim_hf(tmp_path_factory):
    hf = tmp_path_factory.mktemp("hf")
    made = simmodel.make_model("Qwen/Qwen3-0.6B", 7, hf)
    digest = simmodel.weights_digest(simmodel.read_weights(Path(made.snapshot)))
    answer = "".join(simmodel.generate(digest, simmodel.render_chat(CHAT), 12))
    return hf, answer


@pytest.fixture(scope="module")
def vllm():
    r = subprocess.run(["bash", f"{REPO}/scripts/setup-vllm.sh"], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        pytest.fail("the real vLLM CPU build could not be set up:\n" + r.stdout[-2000:] + r.stderr[-2000:])
    return f"{VLLM_VENV}/bin/vllm"


def config(vllm_command: str, real: bool) -> dict:
    port, mport = free_ports(2)
    entry = {"model_path": "Qwen/Qwen3-0.6B", "port": mport,
             "eviction": {"weights": "discard", "process": "checkpoint"},
             "checkpoint_path": f"{CKPT}/{MODEL}/images"}
    if real:
        entry.update(enable_sleep_mode=False, extra_args=VLLM_ARGS)
    return {"models": {MODEL: entry},
            "checkpoint": {"images_dir": CKPT, "keep_images": True},
            "checkpoint_on_stop": True,
            "policy": {"startup_timeout_secs": 600, "request_timeout_secs": 900},
            "port": port, "metrics_port": 0, "host": "127.0.0.1", "vllm_command": vllm_command}


def write_config(base: Path, cfg: dict) -> str:
    p = base / f"config-{uuid.uuid4().hex[:6]}.json"
    p.write_text(json.dumps(cfg, indent=2))
    p.chmod(0o644)
    return str(p)


# -- the image -------------------------------------------------------------------------------------

def test_image_is_built_as_specified(engine, image):
    """No compiler, no build-time package-index settings or CA, a HEALTHCHECK, llmuxd and its
    simulator, CRIU 4.2 with pycriu, the units enabled; cuda-checkpoint left out (empty URL)."""
    r = engine.docker("run", "--rm", *engine.label(), "--network=host", "--entrypoint", "/bin/sh", image, "-c",
                      "for c in gcc cc c++ clang tcc; do command -v $c; done; "
                      "ls /tmp/build-extra /etc/pip.conf /root/.config/pip 2>&1; "
                      "llmuxd --help >/dev/null && command -v llmuxd-vllm-sim; criu --version | head -1; "
                      "/opt/llmuxd/venv/bin/python3 -c 'import pycriu.images, llmuxd.logfollow; print(\"pycriu ok\")'; "
                      "ls /usr/local/bin/cuda-checkpoint 2>&1; "
                      "ls /etc/systemd/system/multi-user.target.wants/ /etc/systemd/system/sysinit.target.wants/ "
                      "/etc/systemd/system/llmuxd.service.d/; "
                      "test -e /etc/systemd/system/llmuxd-logs.service || echo no follower unit")
    out = r.stdout + r.stderr
    assert not re.search(r"^/\S*/(gcc|cc|c\+\+|clang|tcc)$", out, re.M), out
    for path in ("/tmp/build-extra", "/etc/pip.conf", "/root/.config/pip", "/usr/local/bin/cuda-checkpoint"):
        assert f"cannot access '{path}'" in out, (path, out)
    assert "/usr/local/bin/llmuxd-vllm-sim" in out and "Version: 4.2" in out and "pycriu ok" in out, out
    for unit in ("llmuxd.service", "llmuxd-restore.service", "llmuxd-console.service", "container-env.conf"):
        assert unit in out, (unit, out)
    # llmuxd forwards the models' output itself: no follower unit (it would forward every line twice)
    assert "no follower unit" in out, out
    masked = engine.docker("run", "--rm", *engine.label(), "--network=host", "--entrypoint", "/bin/sh", image, "-c",
                           "readlink /etc/systemd/system/systemd-sysctl.service "
                           "/etc/systemd/system/systemd-modules-load.service /etc/systemd/system/systemd-udevd.service")
    assert masked.stdout.split() == ["/dev/null"] * 3, masked.stdout
    info = json.loads(engine.docker("image", "inspect", image).stdout)[0]["Config"]
    assert "/usr/local/bin/llmuxd-healthcheck" in " ".join(info["Healthcheck"]["Test"]), info["Healthcheck"]
    assert not [e for e in info["Env"] if e.startswith(("PIP_", "CURL_CA", "SSL_CERT"))], info["Env"]
    assert info["StopSignal"] == "SIGRTMIN+3" and info["Entrypoint"] == ["/usr/local/bin/llmuxd-entrypoint"]
    history = engine.docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout
    assert "build-extra" not in history and "PIP_" not in history and "ca.crt" not in history


def test_cuda_checkpoint_download_is_checked(engine, base_image, tmp_path):
    """The cuda-checkpoint stage keeps the file only when its SHA-256 is the pinned one (a file://
    URL here: no network but the package index)."""
    text = (REPO / "Dockerfile").read_text()
    url = re.search(r"^ARG CUDA_CHECKPOINT_URL=(\S+)$", text, re.M).group(1)
    sha = re.search(r"^ARG CUDA_CHECKPOINT_SHA256=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"https://github\.com/NVIDIA/cuda-checkpoint/raw/[0-9a-f]{40}/\S+", url), url
    assert re.fullmatch(r"[0-9a-f]{64}", sha), sha
    ctx = build_context(tmp_path / "ctx")
    fake = ctx / "build-extra" / "cuda-checkpoint"
    fake.write_bytes(b"\x7fELF not really cuda-checkpoint\n")
    import hashlib

    good = hashlib.sha256(fake.read_bytes()).hexdigest()
    common = ["build", "--network=host", "--force-rm", "--target", "cuda-checkpoint", *engine.label()]
    tag = f"lmx-test-cc:{engine.session.lower()}"
    bad = engine.docker(*common, *build_args(base_image, CUDA_CHECKPOINT_URL="file:///tmp/build-extra/cuda-checkpoint",
                                             CUDA_CHECKPOINT_SHA256="0" * 64), "-t", tag, str(ctx), check=False)
    assert bad.returncode != 0 and "FAILED" in bad.stdout + bad.stderr, bad.stdout[-2000:] + bad.stderr[-2000:]
    engine.docker(*common, *build_args(base_image, CUDA_CHECKPOINT_URL="file:///tmp/build-extra/cuda-checkpoint",
                                       CUDA_CHECKPOINT_SHA256=good), "-t", tag, str(ctx))
    r = engine.docker("run", "--rm", *engine.label(), "--network=host", tag, "sha256sum", "/out/cuda-checkpoint")
    assert r.stdout.split()[0] == good


# -- the success test ------------------------------------------------------------------------------

def _logs_show_llmuxd_and_the_model(box: Box, model_text: str, wait: float = 15) -> None:
    """`docker logs` has llmuxd's own lines and a line of the model's output containing
    `model_text`, with the model's name (the follower polls its log file: allow a moment)."""
    deadline = time.monotonic() + wait
    while True:
        logs = box.logs()
        if box.shape == "systemd":
            own = re.search(r"llmuxd\[\d+\]: llmuxd serving", logs)
            model_lines = [ln for ln in logs.splitlines() if re.search(rf" {re.escape(MODEL)}\[\d+\]: ", ln)]
        else:
            own = "llmuxd serving" in logs
            model_lines = [ln for ln in logs.splitlines() if ln.startswith(f"[{MODEL}] ")]
        if own and any(model_text in ln for ln in model_lines):
            return
        assert time.monotonic() < deadline, (model_text, model_lines[-20:] or logs[-3000:])
        time.sleep(0.5)


def _success_test(engine, shape: str, image: str, tmp: Path, hf: Path, cfg: dict, label: str,
                  env: dict | None = None, extra_volumes: list[str] = (), model_text: str = "",
                  answer: str | None = None) -> None:
    ckpt = checkpoint_dir(tmp)
    dirs = {CONFIG: write_config(tmp, cfg), CKPT: str(ckpt), HF: str(hf)}
    temperature = 0 if answer is None else None
    sysctls = host_sysctls()
    a = Box(engine, shape, image, cfg, dirs, env, extra_volumes)
    try:
        a.start()
        got, ttft = chat_stream(a.url, temperature=temperature)
        TIMES[f"{label} A up"] = a.up_seconds
        TIMES[f"{label} cold start -> first token"] = ttft
        if answer is not None:
            assert got == answer
        answer = got
        assert a.status()["last_wake_kind"] == "cold_start"
        if shape == "systemd":  # docker stop: systemd stops llmuxd, which checkpoints (checkpoint_on_stop)
            TIMES[f"{label} docker stop with checkpoint"] = a.stop()
        else:
            t0 = time.monotonic()
            r = control(a.url, "sleep")
            assert r["state"] == "checkpointed", (r, a.logs()[-4000:])
            TIMES[f"{label} /control/sleep (checkpoint)"] = time.monotonic() - t0
            a.stop()
        _logs_show_llmuxd_and_the_model(a, model_text)  # its start-up lines
        logs_a = a.logs()
        assert "checkpointed to /tmp/llmux-checkpoints/" in logs_a, logs_a[-4000:]
    finally:
        a.remove()
    assert (ckpt / MODEL / "images" / "manifest.json").is_file()
    assert host_sysctls() == sysctls  # a privileged systemd applies its sysctl.d machine-wide: masked
    b = Box(engine, shape, image, cfg, dirs, env, extra_volumes)
    try:
        b.start()
        assert b.status()["state"] == "checkpointed", b.logs()[-4000:]
        t0 = time.monotonic()
        if shape == "systemd":
            out = busctl_wake(b)
            assert out.startswith('sd "awake"'), out
        else:
            r = control(b.url, "wake")
            assert r["state"] == "awake", (r, b.logs()[-4000:])
        wake = time.monotonic() - t0
        st = b.status()
        assert st["last_wake_kind"] == "restore", (st, b.logs()[-4000:])
        got, ttft = chat_stream(b.url, temperature=temperature)
        assert got == answer
        TIMES[f"{label} B up"] = b.up_seconds
        TIMES[f"{label} restore (wake)"] = wake
        TIMES[f"{label} restore -> first token"] = wake + ttft
        if shape == "systemd":
            # `docker run -e` reaches llmuxd (and its models) under systemd too, verbatim.
            pid = b.exec("systemctl", "show", "-p", "MainPID", "--value", "llmuxd").stdout.strip()
            environ = b.exec("cat", f"/proc/{pid}/environ").stdout.split("\0")
            for k, v in (env or {}).items():
                assert f"{k}={v}" in environ, (k, v, [e for e in environ if e.startswith(k)])
            journal = b.journal("-u", "llmuxd")
            assert f"{MODEL}: restored from /tmp/llmux-checkpoints/{MODEL}/images" in journal, journal[-3000:]
        else:
            assert f"{MODEL}: restored from /tmp/llmux-checkpoints/{MODEL}/images" in b.logs()
        _logs_show_llmuxd_and_the_model(b, "/wake_up")  # the restored tree's own lines
        if shape == "systemd":  # the image's HEALTHCHECK (every 10 s)
            deadline = time.monotonic() + 30
            while (h := engine.docker("inspect", "-f", "{{.State.Health.Status}}", b.name).stdout.strip()) != "healthy":
                assert time.monotonic() < deadline, h
                time.sleep(1)
    finally:
        b.remove()


@pytest.mark.parametrize("shape", ["systemd", "entrypoint"])
def test_success_test_simulator(engine, image, sim_hf, tmp_path, shape):
    hf, answer = sim_hf
    cfg = config("llmuxd-vllm-sim", real=False)
    env = {"LLMUXD_DOCKER_TEST": 'a "quoted" $value \\ with a backslash'}
    _success_test(engine, shape, image, tmp_path, hf, cfg, f"sim/{shape}", env=env,
                  model_text="the vLLM simulator serving", answer=answer)


@pytest.mark.vllm
@pytest.mark.parametrize("shape", ["systemd", "entrypoint"])
def test_success_test_real_vllm(engine, image, vllm, tmp_path, shape):
    cfg = config(vllm, real=True)
    _success_test(engine, shape, image, tmp_path, Path(VLLM_HF), cfg, f"vllm/{shape}", env=VLLM_ENV,
                  extra_volumes=[f"{VLLM_VENV}:{VLLM_VENV}:ro"], model_text="Starting vLLM")


def test_restore_into_a_different_image_is_refused(engine, image, sim_hf, tmp_path):
    """B runs a second tag whose image differs from A's in one file the image provides: the
    restore is refused with the reason, B cold-starts, the checkpoint is kept, and a container of
    A's image still restores it."""
    hf, answer = sim_hf
    cfg = config("llmuxd-vllm-sim", real=False)
    cfg["checkpoint_on_stop"] = False  # B's cold-started model must not replace A's checkpoint
    ckpt = checkpoint_dir(tmp_path)
    dirs = {CONFIG: write_config(tmp_path, cfg), CKPT: str(ckpt), HF: str(hf)}
    a = Box(engine, "entrypoint", image, cfg, dirs)
    try:
        a.start()
        assert chat_stream(a.url)[0] == answer
        assert control(a.url, "sleep")["state"] == "checkpointed", a.logs()[-4000:]
        a.stop()
    finally:
        a.remove()
    manifest = json.loads((ckpt / MODEL / "images" / "manifest.json").read_text())
    target = next(v["path"] for v in manifest["verify"] if v["origin"] == "image" and v["kind"] == "file")
    other = f"lmx-test-other:{engine.session.lower()}"
    engine.docker("build", "--force-rm", *engine.label(), "-t", other, "-",
                  input=f'FROM {image}\nRUN touch -m -d "2001-01-01 00:00:00" {shlex.quote(target)}\n')
    b = Box(engine, "entrypoint", other, cfg, dirs)
    try:
        b.start()
        r = control(b.url, "wake")
        assert r["state"] == "awake", (r, b.logs()[-4000:])
        st = b.status()
        assert st["last_wake_kind"] == "cold_start", st
        assert "cannot restore here" in (st["last_error"] or "") and target in st["last_error"], st["last_error"]
        assert chat_stream(b.url)[0] == answer
        b.stop()
    finally:
        b.remove()
    assert (ckpt / MODEL / "images" / "manifest.json").is_file()  # kept: valid for A's image
    c = Box(engine, "entrypoint", image, cfg, dirs)
    try:
        c.start()
        assert control(c.url, "wake")["state"] == "awake"
        assert c.status()["last_wake_kind"] == "restore", c.logs()[-4000:]
    finally:
        c.remove()
