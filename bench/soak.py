"""Soak run: three models switching under concurrent load for a long time, through a daemon
restart and a container change, with leak checks along the way (a test of endurance, not a
benchmark of speed).

  .venv/bin/python bench/soak.py [--sim] [--switches 60] [--clients 6] [--report soak.json]
  .venv/bin/python bench/soak.py --vllm [--switches 200] [--report soak-vllm.json]
                                     # real vLLM CPU build; runs scripts/setup-vllm.sh first (cached)

Options: ``--check-every N`` (leak check every N switches, default 25), ``--max-tokens`` (8),
``--prompts`` (5), ``--keep DIR`` (copy the daemon's and the models' logs and the report there).
Needs root, CRIU (/usr/local/bin/criu) and mount-namespace containers (tests/infra/mntns.py).

What it does
------------
* Models: m1 ``discard + checkpoint``, m2 ``offload + keep_running``, m3 ``discard +
  keep_running``; ``checkpoint.keep_images: false`` (every sleep of m1 is a new CRIU dump of a tree
  that was itself restored) and ``checkpoint_on_stop: true``; ``policy.min_active_secs: 0``.
  ``--sim``: llmuxd's vLLM simulator (``.venv/bin/llmuxd-vllm-sim``) with three simulated models
  in a fresh HF cache (``llmuxd-vllm-sim make-model``, as tests/conftest.py does) and its simulated
  GPU's lease folder on the container's /run (``LLMUXD_SIM_GPU_DIR``: bookkeeping of the
  simulator, kept out of the /tmp and /dev/shm checks).  ``--vllm``: vLLM's CPU build
  (/opt/llmuxd/vllm-venv, HF cache /opt/llmuxd/vllm-hf; llmuxd-test/tiny-a, llmuxd-test/tiny-b,
  Qwen/Qwen3-0.6B) with the environment and arguments tests/test_vllm.py uses.
* The daemon runs in a mount-namespace container as the image's entrypoint does
  (packaging/entrypoint.sh; config at /etc/llmux/config.json; the checkpoint folder and the HF
  cache bound in): tests/infra/entrypoint.py's ``EntrypointContainer``, as the cross-container
  tests use it.
  Phases: container A, up to 40 % of the switches; a daemon restart in A (m1 made awake, llmuxd
  stopped with SIGTERM — m1 is checkpointed at stop — and the entrypoint spawned again); up to
  70 %; a container change (m1 awake, llmuxd stopped with SIGTERM, container A stopped, a new
  container B with the same checkpoint folder and HF cache); the rest in B.
* Load: K concurrent official ``openai`` clients (odd ones stream), ``temperature=0``; client i
  in round r asks model (i + r) % 3 with prompt (3 i + r) % P.  Every answer must equal that
  model's own greedy answer, taken before the load straight from its backend's port.
* Switches are counted from the daemon's ``switched A -> B in S s (KIND)`` lines.
* Checks (each finding has a kind; a run passes only with none), with the load paused and every
  model at rest: files in the container's /tmp and /dev/shm that no process holds open or mapped
  (those a checkpointed m1 will need on restore, and those in the own temporary folder of a model
  whose tree lives, excepted); the checkpoint folder (no partial or
  quarantined folder, m1's images exactly while m1 is checkpointed, nothing else); llmuxd's open
  fds (within a small bound of the first check of each daemon lifetime); the llmuxd-<port>
  cgroups (processes only for models awake or asleep, llmuxd alone in supervisor); processes of
  models that are stopped or checkpointed; zombies; the container's mount count (constant) and
  the PID/mount namespaces of the model trees (one each per live tree); llmuxd's RSS (flat: last
  <= first * 1.15 + 16 MiB in each daemon lifetime); every switch to m1 after its first start is
  a restore; ``llmuxd_eviction_escalations_total`` and ``llmuxd_restore_failures_total`` are 0; the
  daemon's log has no traceback and no ERROR line.  After each daemon stop: exit status 0, no
  process left in the model cgroups, the cgroups removed, m1's checkpoint in place.

A leak is reported once, at the check that first saw it.  Exit status 0 only if there were no
wrong answers, no request errors and no findings.

vLLM leaves files in its temporary folder at every start (``vllm_dist_<hex>``, 2423 bytes, unheld
even while the tree lives; ZMQ ipc sockets, one unbound while the tree lives, the others once
vLLM's API server force-kills its engine on SIGTERM).  Each tree's TMPDIR is its own folder
(``/tmp/llmuxd-tree-<port>``), which llmuxd empties once the tree is gone: files there are the live
tree's, and the check wants the folder empty once it is not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "infra"))
import mntns  # noqa: E402
import procscan  # noqa: E402
from entrypoint import CKPT, EntrypointContainer  # noqa: E402
from procscan import bound_unix_paths, cgroup_procs, read  # noqa: E402

from llmuxd.isolation import procfs  # noqa: E402
from llmuxd.isolation.cgroups import cgroup2_mount, own_cgroup  # noqa: E402

VENV = Path(sys.prefix)
SIM = str(VENV / "bin" / "llmuxd-vllm-sim")
VLLM_VENV = os.environ.get("LLMUXD_VLLM_VENV", "/opt/llmuxd/vllm-venv")
VLLM_HF = os.environ.get("LLMUXD_VLLM_HF_HOME", "/opt/llmuxd/vllm-hf")
# As tests/test_vllm.py runs vLLM's CPU build.
VLLM_ARGS = ["--host", "127.0.0.1", "--max-model-len", "256", "--kv-cache-memory-bytes", "67108864", "--enforce-eager"]
VLLM_ENV = {"VLLM_HOST_IP": "127.0.0.1", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}

MODELS = {  # name: (HF repo, simulator seed, eviction)
    "m1": ("llmuxd-test/tiny-a", 1, ("discard", "checkpoint")),
    "m2": ("llmuxd-test/tiny-b", 2, ("offload", "keep_running")),
    "m3": ("Qwen/Qwen3-0.6B", 3, ("discard", "keep_running")),
}
NAMES = list(MODELS)
AT_REST = {"awake", "asleep", "stopped", "checkpointed", "suspended"}
LIVE = {"awake", "asleep", "suspended"}  # a process tree exists
SWITCHED = re.compile(r" INFO \S+: switched (\S+) -> (\S+) in ([0-9.]+) s \((\w+)\)")
MODEL_LINE = re.compile(r"^\[(" + "|".join(map(re.escape, MODELS)) + r")\] ")
FD_SLACK = 24  # fds over the lifetime's first check still "flat" (keep-alive connections come and go)
RSS_FACTOR, RSS_SLACK = 1.15, 16 << 20
MAX_ERRORS = 20  # request errors after which the run gives up (each is a failure anyway)


def free_port() -> int:
    """A free port below the kernel's ephemeral range: while a model is checkpointed its port is
    unbound, and a port the kernel hands out (bind to port 0, as other programs and test runs on
    the machine do) could be taken meanwhile — the restore would then be refused, rightly, but
    for a reason outside what the soak tests."""
    low = int((read("/proc/sys/net/ipv4/ip_local_port_range") or "32768").split()[0])
    while True:
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    v = sorted(values)
    return v[max(0, math.ceil(q / 100 * len(v)) - 1)]


def cmdline(pid: int) -> str:
    return (procscan.cmdline(pid) or f"[{pid}]")[:200]


def cgroup2_root() -> Path:
    root = cgroup2_mount()
    if root is None:
        raise RuntimeError("no cgroup v2 hierarchy mounted")
    return root


# -- findings ---------------------------------------------------------------------------------

@dataclass
class Lifetime:
    container: str
    pid: int
    fd_first: int | None = None
    fd_last: int | None = None
    rss_first: int | None = None
    rss_last: int | None = None
    rss_samples: list[int] = field(default_factory=list)
    checks: int = 0


@dataclass
class Soak:
    args: argparse.Namespace
    backend: str
    config: dict
    ckpt: Path
    keep: Path | None
    findings: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, where, what)
    switches: list[tuple[str, str, float, str, str]] = field(default_factory=list)  # from, to, secs, kind, container
    m1_dumps: int = 0
    m1_restores: int = 0
    m1_started: bool = False
    log_warnings: int = 0
    model_tracebacks: int = 0
    requests: int = 0
    checked: int = 0
    wrong: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    refs: dict[tuple[str, str], str] = field(default_factory=dict)
    lifetimes: list[Lifetime] = field(default_factory=list)
    mount_baseline: dict[str, int] = field(default_factory=dict)
    cgroup_bases: set[Path] = field(default_factory=set)
    events: dict = field(default_factory=dict)
    checks_run: int = 0
    seen: set = field(default_factory=set)

    def find(self, kind: str, where: str, what: str, key: str | None = None) -> None:
        """Record a finding once: the same ``key`` (default: the text) seen again by a later check
        is the same leak, not a new one."""
        key = (kind, key or what)
        if key in self.seen:
            return
        self.seen.add(key)
        self.findings.append((kind, where, what))
        print(f"  FINDING [{kind}] {where}: {what}", flush=True)

    # -- the log ------------------------------------------------------------------------------
    def take_log(self, c: EntrypointContainer) -> None:
        for line in c.follow().splitlines():
            if MODEL_LINE.match(line):
                if "Traceback" in line:
                    self.model_tracebacks += 1
                continue
            if m := SWITCHED.search(line):
                src, dst, secs, kind = m.group(1), m.group(2), float(m.group(3)), m.group(4)
                self.switches.append((src, dst, secs, kind, c.name))
                if dst == "m1":
                    if self.m1_started and kind != "restore":
                        self.find("m1_not_restored", c.name,
                                  f"switch {len(self.switches)} to m1 was a {kind}, not a restore: {line.strip()}")
                    self.m1_started = True
            if re.search(r" INFO \S+: m1: checkpointed to ", line):
                self.m1_dumps += 1
            if re.search(r" INFO \S+: m1: restored from ", line):
                self.m1_restores += 1
            if "Traceback" in line or " ERROR " in line:
                self.find("log", c.name, line.strip()[:300])
            elif " WARNING " in line:
                self.log_warnings += 1

    @property
    def n_switches(self) -> int:
        return len(self.switches)


def status(c: EntrypointContainer) -> dict:
    return httpx.get(c.url + "/control/status", timeout=60).json()


def control(c: EntrypointContainer, verb: str, model: str, timeout: float) -> dict:
    r = httpx.post(f"{c.url}/control/{verb}", json={"model": model}, timeout=timeout)
    if r.status_code != 200:
        raise RuntimeError(f"/control/{verb} {model}: {r.status_code} {r.text[:500]}")
    return r.json()


def wait_at_rest(c: EntrypointContainer, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = status(c)
        if st["switching"] is None and not st["queue_depth"] and all(
                m["state"] in AT_REST and not m["in_flight"] for m in st["models"].values()):
            return st
        if time.monotonic() > deadline:
            raise RuntimeError(f"{c.name}: models not at rest after {timeout} s: "
                               + json.dumps({n: m["state"] for n, m in st["models"].items()}))
        time.sleep(0.1)


def tmpfs_dev(path: Path) -> int:
    return os.stat(path).st_dev


def held_inodes(pids: set[int]) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of every file the processes have open or mapped."""
    held = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            fds = []
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            held.add((st.st_dev, st.st_ino))
        for line in (read(f"/proc/{pid}/maps") or "").splitlines():
            parts = line.split(None, 5)
            if len(parts) >= 5 and parts[4] != "0":
                major, minor = parts[3].split(":")
                held.add((os.makedev(int(major, 16), int(minor, 16)), int(parts[4])))
    return held


def m1_manifest(ckpt: Path) -> dict | None:
    text = read(ckpt / "m1" / "images" / "manifest.json")
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def expected_while_checkpointed(manifest: dict | None) -> set[str]:
    """Files a checkpointed m1 needs in place on restore (prepare-restore puts them back at the
    entrypoint's start): saved, re-created and link-remap files.  Not the unix sockets its tree
    had bound: llmuxd removes those once the tree is gone (CRIU binds them again)."""
    if not manifest:
        return set()
    return {r["path"] for key in ("saved", "recreate", "link_remaps") for r in manifest.get(key, [])}


def container_processes(c: EntrypointContainer) -> list[int]:
    return c.c.pids()


def model_cgroup_base(c: EntrypointContainer) -> Path | None:
    cg = own_cgroup(c.pid)
    if cg is None or not cg.endswith("/supervisor"):
        return None
    return cgroup2_root() / cg.lstrip("/").rsplit("/", 1)[0]


def check(soak: Soak, c: EntrypointContainer, st: dict, label: str) -> None:
    """Every leak check, on a daemon whose models are at rest and with no request in flight."""
    soak.checks_run += 1
    where = f"{c.name}#{c.lifetimes} {label} (switch {soak.n_switches})"
    models = st["models"]
    states = {n: m["state"] for n, m in models.items()}
    manifest = m1_manifest(soak.ckpt)
    life = soak.lifetimes[-1]
    assert life.pid == c.pid

    # llmuxd's fds and RSS
    nfd = len(os.listdir(f"/proc/{c.pid}/fd"))
    rss = next((int(ln.split()[1]) * 1024 for ln in (read(f"/proc/{c.pid}/status") or "").splitlines()
                if ln.startswith("VmRSS:")), 0)
    if life.fd_first is None:
        life.fd_first, life.rss_first = nfd, rss
    elif nfd > life.fd_first + FD_SLACK:
        soak.find("fds", where, f"llmuxd has {nfd} fds open, {life.fd_first} at the lifetime's first check",
                  key=f"{c.name}#{c.lifetimes}")
    life.fd_last, life.rss_last = nfd, rss
    life.rss_samples.append(rss)
    life.checks += 1

    # cgroups and processes
    base = model_cgroup_base(c)
    cg_pids: dict[str, list[int]] = {}
    if base is None:
        soak.find("cgroups", where, f"llmuxd is not in an llmuxd-<port>/supervisor cgroup: {own_cgroup(c.pid)}")
    else:
        soak.cgroup_bases.add(base)
        for d in sorted(p for p in base.iterdir() if p.is_dir()):
            pids = cgroup_procs(d, recursive=True)
            if d.name == "supervisor":
                if pids != [c.pid]:
                    soak.find("cgroups", where, f"supervisor holds {pids}, not only llmuxd {c.pid}: "
                              + "; ".join(f"{p} {cmdline(p)}" for p in pids if p != c.pid))
            elif d.name.startswith("model-") and d.name[6:] in models:
                cg_pids[d.name[6:]] = pids
            elif pids:
                soak.find("cgroups", where, f"cgroup {d} of no configured model holds {pids}")
        if pids := cgroup_procs(base, recursive=False):
            soak.find("cgroups", where, f"the base cgroup {base} itself holds {pids}")
    for name, state in states.items():
        pids = cg_pids.get(name, [])
        if state in LIVE and not pids:
            soak.find("cgroups", where, f"{name} is {state} but its cgroup holds no process")
        if state not in LIVE and pids:
            soak.find("processes", where, f"{name} is {state} yet its cgroup holds: "
                      + "; ".join(f"{p} {cmdline(p)}" for p in pids))
    tree_pids = [p for pids in cg_pids.values() for p in pids]
    in_container = container_processes(c)
    for p in set(tree_pids) | set(in_container):
        if (st := procfs.stat(p)) is not None and st.zombie:
            soak.find("processes", where, f"zombie {p} (parent {st.ppid}): {cmdline(p)}")
    extra = [p for p in in_container if p != c.pid]
    if extra:
        soak.find("processes", where, "in the container besides llmuxd: "
                  + "; ".join(f"{p} {cmdline(p)}" for p in extra))

    # namespaces and mounts
    own_pidns = os.stat(f"/proc/{c.pid}/ns/pid").st_ino
    own_mntns = os.stat(f"/proc/{c.pid}/ns/mnt").st_ino
    live = [n for n, s in states.items() if s in LIVE]
    for kind, own in (("pid", own_pidns), ("mnt", own_mntns)):
        per_model = {}
        for name, pids in cg_pids.items():
            nss = set()
            for p in pids:
                try:
                    nss.add(os.stat(f"/proc/{p}/ns/{kind}").st_ino)
                except OSError:
                    pass
            per_model[name] = nss - {own}
        total = set().union(*per_model.values()) if per_model else set()
        if len(total) != len(live) or any(len(v) != (1 if n in live else 0) for n, v in per_model.items()):
            soak.find("mounts", where, f"{kind} namespaces of the model trees: "
                      + ", ".join(f"{n}: {len(v)}" for n, v in per_model.items()) + f"; live trees: {live}")
    nmounts = len((read(f"/proc/{c.c.keeper_pid}/mountinfo") or "").splitlines())
    first = soak.mount_baseline.setdefault(c.name, nmounts)
    if nmounts != first:
        soak.find("mounts", where, f"the container has {nmounts} mounts, {first} at its first check",
                  key=f"{c.name} mount count {nmounts}")

    # files in the container's /tmp and /dev/shm that nobody holds
    expected = expected_while_checkpointed(manifest) if states.get("m1") == "checkpointed" else set()
    live_tmpdirs = tuple(f"/tmp/llmuxd-tree-{soak.config['models'][n]['port']}/" for n, s in states.items()
                         if s not in ("stopped", "checkpointed"))
    check_files(soak, c, set(tree_pids) | set(in_container), expected, where, live_tmpdirs)

    # the checkpoint folder
    check_ckpt(soak, states.get("m1"), where)

    # metrics
    metrics = httpx.get(c.url + "/metrics", timeout=30).text
    for line in metrics.splitlines():
        for metric, kind in (("llmuxd_eviction_escalations_total", "escalation"),
                             ("llmuxd_restore_failures_total", "restore_failure")):
            if line.startswith(metric + "{") and float(line.rsplit(" ", 1)[1]) != 0:
                soak.find(kind, where, line)
    print(f"  check {where}: states {states}, llmuxd fds {nfd}, RSS {rss / 2**20:.1f} MiB, mounts {nmounts}",
          flush=True)


def _same_dev_dir(p: Path, dev: int) -> bool:
    try:
        st = os.lstat(p)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_dev == dev


def check_files(soak: Soak, c: EntrypointContainer, pids: set[int], expected: set[str], where: str,
                live_tmpdirs: tuple[str, ...] = ()) -> None:
    """Files in the container's /tmp and /dev/shm that no process holds, except ``expected``
    ones and those in the own temporary folder (TMPDIR) of a model whose tree lives: that tree
    may use them by name (llmuxd empties the folder once the tree is gone)."""
    held = held_inodes(pids)
    bound = bound_unix_paths()
    for top in ("/tmp", "/dev/shm"):
        host_top = c.c.path(top)
        dev = tmpfs_dev(host_top)
        for dirpath, dirnames, filenames in os.walk(host_top):
            inner = "/" + os.path.relpath(dirpath, c.c.root)
            # a mount point below (the bound checkpoint folder) is not the container's tmpfs
            dirnames[:] = [d for d in dirnames if _same_dev_dir(Path(dirpath, d), dev)]
            for f in filenames:
                p = Path(dirpath, f)
                cpath = f"{inner.rstrip('/')}/{f}"
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                if st.st_dev != dev or cpath in expected or cpath.startswith(live_tmpdirs):
                    continue
                if (stat.S_ISSOCK(st.st_mode) and cpath in bound) or (st.st_dev, st.st_ino) in held:
                    continue
                what = "unix socket, bound by no process" if stat.S_ISSOCK(st.st_mode) else f"{st.st_size} bytes"
                soak.find("files", where, f"{cpath} ({what}) is held by no process", key=cpath)


def check_ckpt(soak: Soak, m1_state: str | None, where: str) -> None:
    for p in soak.ckpt.rglob("*"):
        if ".partial-" in p.name or ".quarantine-" in p.name:
            soak.find("checkpoint", where, f"left in the checkpoint folder: {p.relative_to(soak.ckpt)}")
    top = sorted(p.name for p in soak.ckpt.iterdir())
    if [n for n in top if n != "m1"]:
        soak.find("checkpoint", where, f"checkpoint folder holds {top}, expected only m1")
    m1 = soak.ckpt / "m1"
    inside = sorted(p.name for p in m1.iterdir()) if m1.is_dir() else []
    if [n for n in inside if n != "images"]:
        soak.find("checkpoint", where, f"m1's checkpoint folder holds {inside}, expected only images")
    has = (m1 / "images" / "manifest.json").is_file()
    if m1_state == "checkpointed" and not has:
        soak.find("checkpoint", where, "m1 is checkpointed but there is no m1/images/manifest.json")
    if m1_state != "checkpointed" and (m1 / "images").exists():
        soak.find("checkpoint", where, f"m1 is {m1_state} (keep_images false) but m1/images is still there")


# -- the load -----------------------------------------------------------------------------------

class Load:
    def __init__(self, soak: Soak, c: EntrypointContainer, prompts: list[str]):
        self.soak, self.c, self.prompts = soak, c, prompts
        self.go = asyncio.Event()
        self.go.set()
        self.stop = asyncio.Event()
        self.in_flight = 0
        self.rounds = 0

    async def client(self, i: int, api) -> None:
        soak, args = self.soak, self.soak.args
        r = 0
        while not self.stop.is_set():
            await self.go.wait()
            if self.stop.is_set():
                break
            model = NAMES[(i + r) % len(NAMES)]
            prompt = self.prompts[(3 * i + r) % len(self.prompts)]
            self.in_flight += 1
            try:
                if i % 2:
                    stream = await api.completions.create(model=model, prompt=prompt, max_tokens=args.max_tokens,
                                                          temperature=0, stream=True)
                    text = "".join([ch.choices[0].text async for ch in stream if ch.choices])
                else:
                    resp = await api.completions.create(model=model, prompt=prompt, max_tokens=args.max_tokens,
                                                        temperature=0)
                    text = resp.choices[0].text
            except Exception as e:  # noqa: BLE001 - every failure is counted, the load goes on
                soak.requests += 1
                soak.errors.append(f"client {i} round {r} {model}: {type(e).__name__}: {str(e)[:300]}")
                print(f"  REQUEST ERROR {soak.errors[-1]}", flush=True)
                if len(soak.errors) > MAX_ERRORS:
                    raise RuntimeError(f"more than {MAX_ERRORS} request errors: giving up") from None
                await asyncio.sleep(0.5)
            else:
                soak.requests += 1
                soak.checked += 1
                want = soak.refs[(model, prompt)]
                if text != want:
                    soak.wrong.append({"model": model, "prompt": prompt, "got": text, "want": want,
                                       "container": self.c.name, "switch": soak.n_switches})
                    print(f"  WRONG ANSWER {soak.wrong[-1]}", flush=True)
            finally:
                self.in_flight -= 1
            r += 1

    async def pause_and_check(self, label: str) -> None:
        self.go.clear()
        try:
            while self.in_flight:
                await asyncio.sleep(0.05)
            st = await asyncio.to_thread(wait_at_rest, self.c, self.soak.args.timeout)
            self.soak.take_log(self.c)
            await asyncio.to_thread(check, self.soak, self.c, st, label)
        finally:
            self.go.set()

    async def run(self, until: int) -> None:
        import openai

        soak, args = self.soak, self.soak.args
        life_start = soak.n_switches
        next_check = life_start + args.warmup if soak.lifetimes[-1].checks == 0 else soak.n_switches + args.check_every
        api = openai.AsyncOpenAI(base_url=self.c.url + "/v1", api_key="x", max_retries=0, timeout=args.timeout)
        clients = [asyncio.create_task(self.client(i, api)) for i in range(args.clients)]
        last_switch, progress = soak.n_switches, time.monotonic()
        try:
            while soak.n_switches < until:
                await asyncio.sleep(0.2)
                soak.take_log(self.c)
                if soak.n_switches != last_switch:
                    last_switch, progress = soak.n_switches, time.monotonic()
                elif time.monotonic() - progress > 2 * args.timeout:
                    raise RuntimeError(f"no switch for {2 * args.timeout:g} s: the soak is stuck")
                if any(t.done() for t in clients):
                    for t in clients:
                        if t.done() and t.exception():
                            raise t.exception()
                if self.c.proc.poll() is not None:
                    raise RuntimeError(f"llmuxd exited with {self.c.proc.returncode}")
                if next_check <= soak.n_switches < until:
                    await self.pause_and_check("interval")
                    next_check = soak.n_switches + args.check_every
        finally:
            self.stop.set()
            self.go.set()
            await asyncio.gather(*clients, return_exceptions=True)
            await api.close()
        soak.take_log(self.c)


# -- phases ---------------------------------------------------------------------------------------

def references(soak: Soak, c: EntrypointContainer, prompts: list[str]) -> None:
    """Each model's own greedy answer to each prompt, straight from its backend's port."""
    for name in NAMES:
        control(c, "wake", name, soak.args.timeout)
        port = soak.config["models"][name]["port"]
        for prompt in prompts:
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=soak.args.timeout,
                           json={"model": name, "prompt": prompt, "max_tokens": soak.args.max_tokens,
                                 "temperature": 0})
            r.raise_for_status()
            soak.refs[(name, prompt)] = r.json()["choices"][0]["text"]
    soak.take_log(c)
    distinct = {n: len({soak.refs[(n, p)] for p in prompts}) for n in NAMES}
    print(f"  references taken ({len(soak.refs)}; distinct answers per model {distinct})", flush=True)


def end_of_lifetime(soak: Soak, c: EntrypointContainer, label: str) -> dict:
    """Final check of a daemon lifetime, then m1 made awake (so that checkpoint_on_stop dumps
    it), llmuxd stopped with SIGTERM and what it left checked."""
    st = wait_at_rest(c, soak.args.timeout)
    soak.take_log(c)
    check(soak, c, st, f"end of {label}")
    life = soak.lifetimes[-1]
    if life.rss_first is not None and life.rss_last > life.rss_first * RSS_FACTOR + RSS_SLACK:
        soak.find("rss", f"{c.name}#{c.lifetimes} end of {label}",
                  f"llmuxd's RSS grew from {life.rss_first / 2**20:.1f} to {life.rss_last / 2**20:.1f} MiB "
                  f"(more than x{RSS_FACTOR} + {RSS_SLACK >> 20} MiB)")
    control(c, "wake", "m1", soak.args.timeout)
    soak.take_log(c)
    base = model_cgroup_base(c)
    mark = len(c.log_text)
    rc, secs = c.stop_daemon(soak.args.timeout)
    soak.take_log(c)
    where = f"{c.name}#{c.lifetimes} after the daemon stopped ({label})"
    tail = c.log_text[mark:]
    dumped = "checkpointing m1 before stopping" in tail and bool(re.search(r" INFO \S+: m1: checkpointed to ", tail))
    info = {"stop_rc": rc, "stop_secs": round(secs, 3), "m1_checkpointed_at_stop": dumped}
    if rc != 0:
        soak.find("stop", where, f"llmuxd exited with {rc}")
    if not dumped:
        soak.find("stop", where, "m1 was awake but was not checkpointed at stop (checkpoint_on_stop)")
    if not (soak.ckpt / "m1" / "images" / "manifest.json").is_file():
        soak.find("checkpoint", where, "no m1/images/manifest.json after the stop")
    check_ckpt(soak, "checkpointed", where)
    deadline = time.monotonic() + 10
    while (left := [p for p in container_processes(c)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        soak.find("processes", where, "still in the container: " + "; ".join(f"{p} {cmdline(p)}" for p in left))
    if base is not None:
        if pids := cgroup_procs(base, recursive=True) if base.exists() else []:
            soak.find("processes", where, f"{base} still holds " + "; ".join(f"{p} {cmdline(p)}" for p in pids))
        if base.exists():
            soak.find("cgroups", where, f"{base} is still there after llmuxd stopped")
    # Only the files a checkpointed m1 needs may stay in /tmp and /dev/shm.
    check_files(soak, c, set(container_processes(c)), expected_while_checkpointed(m1_manifest(soak.ckpt)), where)
    return info


def first_m1_kind(soak: Soak, since: int) -> str | None:
    return next((s[3] for s in soak.switches[since:] if s[1] == "m1"), None)


def build_config(backend: str, port: int, mports: list[int], timeout: float) -> dict:
    models = {}
    for (name, (repo, _, (weights, process))), mport in zip(MODELS.items(), mports):
        m = {"model_path": repo, "port": mport, "eviction": {"weights": weights, "process": process}}
        if backend == "vllm":
            m.update(enable_sleep_mode=False, extra_args=list(VLLM_ARGS))
        models[name] = m
    return {
        "models": models,
        "checkpoint": {"criu_path": "/usr/local/bin/criu", "cuda_plugin_dir": "/usr/lib/criu/", "images_dir": CKPT,
                       "cuda_checkpoint_path": "/usr/local/bin/cuda-checkpoint", "keep_images": False},
        "checkpoint_on_stop": True,
        "port": port,
        "metrics_port": 0,
        "vllm_command": f"{VLLM_VENV}/bin/vllm" if backend == "vllm" else SIM,
        "host": "127.0.0.1",
        "policy": {"min_active_secs": 0, "startup_timeout_secs": timeout, "request_timeout_secs": timeout},
    }


def cleanup_cgroups(bases: set[Path], port: int) -> list[str]:
    """Kill whatever is left in llmuxd-<port> cgroups (after a failure) and remove them."""
    problems = []
    root = cgroup2_root()
    mine = root / (own_cgroup() or "/").lstrip("/") / f"llmuxd-{port}"
    for base in bases | {mine}:
        if not base.exists():
            continue
        for d in sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [base]:
            if cgroup_procs(d, recursive=True):
                try:
                    (d / "cgroup.kill").write_text("1")
                except OSError:
                    for pid in cgroup_procs(d, recursive=True):
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
            for _ in range(100):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    err = e.strerror
                    time.sleep(0.05)
            else:
                problems.append(f"cgroup {d}: {err}")
    return problems


def report(soak: Soak, wall: float) -> dict:
    kinds: dict[str, list[float]] = {}
    for _, _, secs, kind, _ in soak.switches:
        kinds.setdefault(kind, []).append(secs)
    by_kind: dict[str, int] = {}
    for kind, _, _ in soak.findings:
        by_kind[kind] = by_kind.get(kind, 0) + 1
    lifes = [{"container": lt.container, "pid": lt.pid, "checks": lt.checks,
              "fds_first": lt.fd_first, "fds_last": lt.fd_last,
              "rss_first_mib": round(lt.rss_first / 2**20, 2) if lt.rss_first else None,
              "rss_last_mib": round(lt.rss_last / 2**20, 2) if lt.rss_last else None,
              "rss_samples_mib": [round(x / 2**20, 1) for x in lt.rss_samples],
              "rss_flat": lt.rss_first is None or lt.rss_last <= lt.rss_first * RSS_FACTOR + RSS_SLACK}
             for lt in soak.lifetimes]
    measured = [lt for lt in soak.lifetimes if lt.rss_first is not None]
    rss_flat = all(x["rss_flat"] for x in lifes)
    out = {
        "backend": soak.backend,
        "clients": soak.args.clients,
        "target_switches": soak.args.switches,
        "switches": soak.n_switches,
        "switches_by_kind": {k: len(v) for k, v in sorted(kinds.items())},
        "cycles": soak.m1_restores,
        "m1_dumps": soak.m1_dumps,
        "m1_restores": soak.m1_restores,
        "requests": soak.requests,
        "answers_checked": soak.checked,
        "wrong_answers": len(soak.wrong),
        "wrong_answer_samples": soak.wrong[:5],
        "request_errors": len(soak.errors),
        "request_error_samples": soak.errors[:5],
        "checks": soak.checks_run,
        "leaks": len(soak.findings),
        "leaks_by_kind": by_kind,
        "findings": [{"kind": k, "where": w, "what": x} for k, w, x in soak.findings],
        "rss_start_mib": lifes[0]["rss_first_mib"] if measured else None,
        "rss_end_mib": next((x["rss_last_mib"] for x in reversed(lifes) if x["rss_last_mib"]), None),
        "rss_flat": rss_flat,
        "lifetimes": lifes,
        "transitions": {k: {"n": len(v), "p50_s": round(percentile(v, 50), 3), "p99_s": round(percentile(v, 99), 3)}
                        for k, v in sorted(kinds.items())},
        "log_warnings": soak.log_warnings,
        "model_output_tracebacks": soak.model_tracebacks,
        "restart": soak.events.get("restart", {"done": False}),
        "container_change": soak.events.get("container_change", {"done": False}),
        "final_stop": soak.events.get("final_stop", {"done": False}),
        "wall_secs": round(wall, 1),
    }
    out["ok"] = bool(
        soak.events.get("completed") and not soak.wrong and not soak.errors and not soak.findings and rss_flat
        and out["restart"].get("done") and out["container_change"].get("done"))
    return out


def print_table(r: dict) -> None:
    rows = [
        ("backend", r["backend"]),
        ("switches (target)", f"{r['switches']} ({r['target_switches']}): "
                              + ", ".join(f"{k} {v}" for k, v in r["switches_by_kind"].items())),
        ("cycles (m1 dump -> restore)", f"{r['cycles']} (dumps {r['m1_dumps']}, restores {r['m1_restores']})"),
        ("requests / answers checked", f"{r['requests']} / {r['answers_checked']}"),
        ("wrong answers", r["wrong_answers"]),
        ("request errors", r["request_errors"]),
        ("leak checks run", r["checks"]),
        ("leaks found", f"{r['leaks']} " + json.dumps(r["leaks_by_kind"])),
        ("llmuxd RSS start / end", f"{r['rss_start_mib']} / {r['rss_end_mib']} MiB "
                                   f"({'flat' if r['rss_flat'] else 'NOT flat'})"),
        ("daemon restart in A", "done" if r["restart"].get("done") else "NOT done"),
        ("container change A -> B", "done" if r["container_change"].get("done") else "NOT done"),
    ]
    for k, v in r["transitions"].items():
        rows.append((f"{k} p50 / p99", f"{v['p50_s']:.3f} / {v['p99_s']:.3f} s (n={v['n']})"))
    rows += [("wall time", f"{r['wall_secs']} s"), ("result", "PASS" if r["ok"] else "FAIL")]
    print()
    for k, v in rows:
        print(f"  {k:<30} {v}")
    print(flush=True)


async def phase(soak: Soak, c: EntrypointContainer, prompts: list[str], until: int) -> None:
    await Load(soak, c, prompts).run(until)


def new_lifetime(soak: Soak, c: EntrypointContainer) -> None:
    soak.lifetimes.append(Lifetime(c.name, c.pid))


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--sim", action="store_true", help="llmuxd's vLLM simulator (the default)")
    mode.add_argument("--vllm", action="store_true", help="the real vLLM CPU build")
    ap.add_argument("--switches", type=int, help="run until this many switches (default 60 --sim, 200 --vllm)")
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--check-every", type=int, default=25, help="leak check every N switches")
    ap.add_argument("--warmup", type=int, default=3, help="switches into each daemon lifetime before its first check")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--report", type=Path, help="write the report as JSON here")
    ap.add_argument("--keep", type=Path, help="copy the daemon's and the models' logs here")
    args = ap.parse_args()
    backend = "vllm" if args.vllm else "sim"
    args.switches = args.switches or (200 if backend == "vllm" else 60)
    args.timeout = 600.0 if backend == "vllm" else 120.0
    ok, why = mntns.available()
    if not ok:
        print(f"soak: mount-namespace containers not available: {why}", file=sys.stderr)
        return 2
    # A SIGTERM (a test's timeout, say) unwinds through the clean-up below.
    signal.signal(signal.SIGTERM, _terminate)

    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="llmuxd-soak-", dir="/var/tmp"))  # 0700, root's: a trusted folder
    ckpt = work / "ckpt"
    ckpt.mkdir(mode=0o700)
    env: dict[str, str] = {}
    if backend == "vllm":
        r = subprocess.run(["bash", str(REPO / "scripts" / "setup-vllm.sh")], capture_output=True, text=True,
                           timeout=3600)
        if r.returncode != 0:
            print("soak: scripts/setup-vllm.sh failed:\n" + r.stdout[-2000:] + r.stderr[-2000:], file=sys.stderr)
            return 2
        hf = Path(VLLM_HF)
        env.update(VLLM_ENV)
    else:
        hf = work / "hf"
        for repo, seed, _ in MODELS.values():
            subprocess.run([SIM, "make-model", repo, "--seed", str(seed), "--hf-home", str(hf)], check=True,
                           capture_output=True)
        env["LLMUXD_SIM_GPU_DIR"] = "/run/llmuxd-sim-gpu"
    port, *mports = free_port(), free_port(), free_port(), free_port()
    config = build_config(backend, port, mports, args.timeout)
    keep = args.keep
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
    soak = Soak(args, backend, config, ckpt, keep)
    prompts = [f"Soak prompt {j}: tell me about the number {j * 7 + 3}." for j in range(args.prompts)]
    p1, p2 = round(args.switches * 0.4), round(args.switches * 0.7)
    tag = f"llmuxd-soak-{os.getpid()}"
    containers: list[EntrypointContainer] = []
    problems: list[str] = []
    print(f"soak ({backend}): {args.switches} switches, {args.clients} clients; restart at {p1}, "
          f"container change at {p2}; work dir {work}", flush=True)
    try:
        a = EntrypointContainer(f"{tag}-a", ckpt, hf, config, work, env)
        containers.append(a)
        a.start()
        new_lifetime(soak, a)
        print(f"container A: llmuxd pid {a.pid}", flush=True)
        references(soak, a, prompts)
        asyncio.run(phase(soak, a, prompts, p1))

        # the daemon restart inside A
        print(f"restart of llmuxd in A at switch {soak.n_switches}", flush=True)
        info = end_of_lifetime(soak, a, "lifetime 1")
        since = soak.n_switches
        old_pid = a.pid
        a.spawn(args.timeout)
        new_lifetime(soak, a)
        st = status(a)
        info.update(done=a.pid != old_pid, old_pid=old_pid, new_pid=a.pid, at_switch=since,
                    m1_state_after=st["models"]["m1"]["state"])
        if st["models"]["m1"]["state"] != "checkpointed":
            soak.find("restart", f"{a.name}#2", f"m1 is {st['models']['m1']['state']} after the restart, "
                                                "not checkpointed")
        soak.events["restart"] = info
        asyncio.run(phase(soak, a, prompts, p2))
        info["m1_first_wake_kind"] = first_m1_kind(soak, since)

        # the container change A -> B
        print(f"container change A -> B at switch {soak.n_switches}", flush=True)
        info = end_of_lifetime(soak, a, "container A")
        a.follow()
        a.copy_logs(keep)
        a.stop()
        if left := mntns.leftovers(a.name):
            soak.find("container", a.name, f"left after stop: {left}")
        since = soak.n_switches
        b = EntrypointContainer(f"{tag}-b", ckpt, hf, config, work, env)
        containers.append(b)
        b.start()
        new_lifetime(soak, b)
        st = status(b)
        info.update(done=True, at_switch=since, m1_state_in_b=st["models"]["m1"]["state"])
        if st["models"]["m1"]["state"] != "checkpointed":
            soak.find("container_change", b.name, f"m1 is {st['models']['m1']['state']} in B, not checkpointed")
        soak.events["container_change"] = info
        asyncio.run(phase(soak, b, prompts, args.switches))
        info["m1_first_wake_kind"] = first_m1_kind(soak, since)
        if info["m1_first_wake_kind"] != "restore":
            soak.find("container_change", b.name, f"m1's first wake in B was {info['m1_first_wake_kind']}")

        print(f"final stop at switch {soak.n_switches}", flush=True)
        soak.events["final_stop"] = {"done": True, **end_of_lifetime(soak, b, "container B")}
        soak.events["completed"] = True
    except BaseException as e:  # noqa: BLE001 - reported, then cleaned up
        if isinstance(e, KeyboardInterrupt):
            soak.errors.append("interrupted")
        else:
            import traceback

            traceback.print_exc()
            soak.find("run", "soak", f"{type(e).__name__}: {str(e)[:1000]}")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the clean-up runs to its end
        for c in containers:
            try:
                if c.proc is not None and c.proc.poll() is None and c.c.running:
                    c.stop_daemon(min(args.timeout, 120))
                if c.c.running:
                    c.follow()
                    c.copy_logs(keep)
            except Exception as e:  # noqa: BLE001
                problems.append(f"{c.name}: {e}")
            try:
                c.stop()
            except Exception as e:  # noqa: BLE001
                problems.append(f"{c.name}: {e}")
        problems += cleanup_cgroups(soak.cgroup_bases, port)
        shutil.rmtree(work, ignore_errors=True)
    for p in problems:
        soak.find("cleanup", "soak", p)
    r = report(soak, time.monotonic() - t_start)
    print_table(r)
    if args.report:
        args.report.write_text(json.dumps(r, indent=2))
    if keep:
        (keep / "report.json").write_text(json.dumps(r, indent=2))
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
