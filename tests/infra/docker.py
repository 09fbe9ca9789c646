"""The real Docker engine for tests (stdlib and llmuxd's /proc reader): used as is when one
answers, otherwise started here (containerd, then dockerd) and stopped again by ``Engine.stop()``.

Started engine (no iptables on a test machine, so containers use ``--network=host``)::

    containerd                                   (only when /run/containerd/containerd.sock is dead)
    dockerd --iptables=false --ip6tables=false --ip-masq=false --bridge=none \\
            --containerd=/run/containerd/containerd.sock

The PIDs of what was started, and the test process that owns them, are kept in STATE_DIR
(``/run/llmuxd-test-docker``): a run killed before it could stop them leaves them to the next
run, which takes them over (and stops them at its end). One test session at a time holds
``STATE_DIR/lock``.

Everything a session creates is labelled ``lmx-test=<session>`` (containers and built images)
and removed by ``Engine.cleanup()``; what an earlier, killed session left is removed at start.
``Engine.stop()`` then stops the engine if it was started here and checks that no mount under
the engine's folders and no cgroup it made is left (``leftovers()``).

Privileges: a container that must run systemd or CRIU gets ``--privileged`` when the engine can
grant it, else the equivalent that a sandbox without CAP_SYS_RESOURCE accepts
(``--cap-add=ALL --cap-drop=SYS_RESOURCE`` and unconfined seccomp, AppArmor and /proc, /sys
paths). ``Engine.privileged_flags()`` detects which, once.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Sequence

from container import starttime, terminate
from llmuxd.isolation.procfs import alive

__all__ = ["Engine", "EngineError", "available"]

STATE_DIR = Path(os.environ.get("LLMUXD_TEST_DOCKER_STATE", "/run/llmuxd-test-docker"))
CONTAINERD_SOCK = "/run/containerd/containerd.sock"
LABEL = "lmx-test"
FALLBACK_PRIVILEGES = ["--cap-add=ALL", "--cap-drop=SYS_RESOURCE", "--security-opt", "seccomp=unconfined",
                       "--security-opt", "apparmor=unconfined", "--security-opt", "systempaths=unconfined"]
CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTAINER_ID = re.compile(r"^[0-9a-f]{64}$")


class EngineError(RuntimeError):
    """The Docker engine could not be found, started, driven or stopped cleanly."""


def _which(*names: str) -> str | None:
    for n in names:
        p = shutil.which(n) if "/" not in n else (n if os.access(n, os.X_OK) else None)
        if p:
            return p
    return None


def available() -> tuple[bool, str]:
    """Whether a Docker engine can be used or started here: (True, how) or (False, why)."""
    if os.geteuid() != 0:
        return False, "not root (starting dockerd and running privileged containers need root)"
    cli = _which("docker")
    if cli is None:
        return False, "no docker client (apt-get install docker.io; scripts/setup.sh --tests does it)"
    if _answers(cli):
        return True, "a running engine"
    if _which("dockerd", "/usr/sbin/dockerd") is None:
        return False, "no dockerd (apt-get install docker.io; scripts/setup.sh --tests does it)"
    return True, "dockerd started by the tests"


def _answers(cli: str, timeout: float = 10) -> bool:
    try:
        return subprocess.run([cli, "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                              timeout=timeout, env=_env()).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["DOCKER_BUILDKIT"] = "0"  # the legacy builder (no buildx/BuildKit here)
    env.pop("DOCKER_HOST", None) if env.get("DOCKER_HOST", "").startswith("ssh") else None
    return env


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def _cgroup_dirs() -> set[str]:
    """The 'docker' cgroup folders that exist now (v1 controllers and the unified hierarchy)."""
    found = set()
    try:
        for ctl in CGROUP_ROOT.iterdir():
            d = ctl / "docker"
            if d.is_dir():
                found.add(str(d))
    except OSError:
        pass
    for d in (CGROUP_ROOT / "docker", CGROUP_ROOT / "system.slice" / "docker.service"):
        if d.is_dir():
            found.add(str(d))
    return found


def _mounts_under(*prefixes: str) -> list[str]:
    out = []
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            target = line.split()[1].replace("\\040", " ")
            if any(target == p or target.startswith(p.rstrip("/") + "/") for p in prefixes):
                out.append(target)
    except OSError:
        pass
    return out


class Engine:
    """One test session's use of the Docker engine.

    ``start()`` takes the session lock, finds or starts the engine and removes what killed
    sessions left; ``docker(...)`` runs the client; ``cleanup()`` removes this session's
    containers and images; ``stop()`` cleans up, stops what ``start()`` started and releases the
    lock. ``session`` is the label value of everything this session creates.
    """

    def __init__(self, *, start_timeout: float = 90.0, log_dir: str | os.PathLike = "/var/log/llmuxd-test"):
        self.session = f"{os.getpid()}-{starttime(os.getpid())}-{uuid.uuid4().hex[:6]}"
        self.start_timeout = start_timeout
        self.log_dir = Path(log_dir)
        self.cli = _which("docker") or "docker"
        self.started: dict[str, int] = {}  # name -> pid of what this session (or a killed one) started
        self.data_root: str | None = None
        self.exec_root: str = "/var/run/docker"
        self._lock_fd: int | None = None
        self._priv: list[str] | None = None
        self._cgroups_before: set[str] = set()
        self._stopped_engine = False  # stop() stopped an engine started here (or by a killed session)
        self._mounts_before: set[str] = set()  # mounts under the engine's folders before it started

    # ------------------------------------------------------------------ life cycle

    def start(self) -> "Engine":
        ok, why = available()
        if not ok:
            raise EngineError(f"Docker is not usable here: {why}")
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(STATE_DIR / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            self._take_over_stale()
            if not _answers(self.cli):
                self._cgroups_before = _cgroup_dirs()
                self._mounts_before = set(_mounts_under(*self._engine_roots()))
                self._start_engine()
            info = json.loads(self.docker("info", "--format", "{{json .}}").stdout)
            self.data_root = info.get("DockerRootDir") or "/var/lib/docker"
            self.reclaim_stale()
            return self
        except BaseException:
            self.stop()
            raise

    def _take_over_stale(self) -> None:
        """A killed session's engine (its PIDs recorded in STATE_DIR) becomes ours to stop."""
        f = STATE_DIR / "started.json"
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            return
        for name, (pid, start) in rec.get("pids", {}).items():
            if alive(pid) and starttime(pid) == start:
                self.started[name] = pid
        self._cgroups_before = set(rec.get("cgroups_before", []))
        self._mounts_before = set(rec.get("mounts_before", []))
        if not self.started:
            f.unlink(missing_ok=True)

    def _record(self) -> None:
        rec = {"owner": os.getpid(), "pids": {n: (p, starttime(p)) for n, p in self.started.items()},
               "cgroups_before": sorted(self._cgroups_before), "mounts_before": sorted(self._mounts_before)}
        tmp = STATE_DIR / "started.json.tmp"
        tmp.write_text(json.dumps(rec))
        tmp.rename(STATE_DIR / "started.json")

    def _spawn(self, name: str, argv: list[str]) -> int:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                             close_fds=True)
        log.close()
        self.started[name] = p.pid
        self._record()
        return p.pid

    def _start_engine(self) -> None:
        dockerd = _which("dockerd", "/usr/sbin/dockerd")
        if dockerd is None:
            raise EngineError("no dockerd")
        # The client that comes with this engine, if there is one (same API version).
        for c in ("/usr/bin/docker",):
            if os.access(c, os.X_OK):
                self.cli = c
        t0 = time.monotonic()
        self._remove_stale_netns()
        if not self._containerd_answers():
            containerd = _which("containerd", "/usr/bin/containerd")
            if containerd is None:
                raise EngineError("no containerd")
            self._spawn("containerd", [containerd])
            self._wait(self._containerd_answers, t0 + self.start_timeout, "containerd", "containerd")
        self._spawn("dockerd", [dockerd, "--iptables=false", "--ip6tables=false", "--ip-masq=false", "--bridge=none",
                                f"--containerd={CONTAINERD_SOCK}"])
        self._wait(lambda: _answers(self.cli, timeout=5), t0 + self.start_timeout, "dockerd", "dockerd")

    def _remove_stale_netns(self) -> None:
        """dockerd binds the host's network namespace at <exec-root>/netns/default; a plain file left
        there by an engine that did not unmount it cleanly is taken as the binding, and every
        --network=host container then fails to start ("can't get final child's PID from pipe")."""
        default = Path(os.path.realpath(self.exec_root)) / "netns" / "default"
        if default.is_file() and not os.path.ismount(default):
            default.unlink()

    def _containerd_answers(self) -> bool:
        ctr = _which("ctr")
        if not os.path.exists(CONTAINERD_SOCK):
            return False
        if ctr is None:
            return True
        return subprocess.run([ctr, "--address", CONTAINERD_SOCK, "version"], capture_output=True,
                              timeout=10).returncode == 0

    def _wait(self, pred, deadline: float, what: str, name: str) -> None:
        while not pred():
            pid = self.started.get(name)
            if pid is not None and not alive(pid):
                raise EngineError(f"{what} exited during start-up: {self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise EngineError(f"{what} did not answer within {self.start_timeout:g} s: {self.log_tail(name)}")
            time.sleep(0.2)

    def log_tail(self, name: str, n: int = 30) -> str:
        try:
            return "\n".join((self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> list[str]:
        """Remove this session's containers and images, stop what was started here, release the
        lock. Returns what is left behind (empty = clean)."""
        left: list[str] = []
        try:
            if self.started.get("dockerd") or _answers(self.cli, timeout=5):
                try:
                    self.cleanup()
                except EngineError as e:
                    left.append(str(e))
            for name in ("dockerd", "containerd"):
                pid = self.started.get(name)
                if pid is None:
                    continue
                if not self._terminate(pid, name):
                    left.append(f"{name} pid {pid} did not stop")
                else:
                    self.started.pop(name)
                    self._stopped_engine = True
                    self._record()
            if not self.started:
                (STATE_DIR / "started.json").unlink(missing_ok=True)
                if self._stopped_engine:
                    self._unmount_engine_leftovers()
                    self._remove_engine_cgroups()
            left += self.leftovers()
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
        return left

    def _terminate(self, pid: int, name: str, grace: float = 30.0) -> bool:
        """Stop what this session (or a killed one) started: True once it is gone."""
        terminate(pid, grace, kill_wait=10)
        return not alive(pid)

    def _engine_roots(self) -> list[str]:
        return [os.path.realpath(p) for p in (self.data_root or "/var/lib/docker", self.exec_root, "/run/containerd",
                                               "/var/lib/containerd")]

    def _unmount_engine_leftovers(self) -> None:
        """Mounts a stopped engine leaves (dockerd keeps the host's network namespace bound at
        <exec-root>/netns/default)."""
        for m in sorted(set(_mounts_under(*self._engine_roots())) - self._mounts_before, key=len, reverse=True):
            subprocess.run(["umount", m], capture_output=True)
        self._remove_stale_netns()

    def _remove_engine_cgroups(self) -> None:
        """The cgroup folders of the engine's containers (empty once they are gone; a container's
        folders can outlive it: they are removed here too, the engine being stopped), and the
        'docker' folders the engine made."""
        for d in _cgroup_dirs():
            for sub in sorted((p for p in Path(d).iterdir() if p.is_dir() and CONTAINER_ID.match(p.name)),
                              key=lambda p: p.name):
                for x in sorted((q for q in sub.rglob("*") if q.is_dir()), key=lambda q: -len(q.parts)) + [sub]:
                    try:
                        x.rmdir()
                    except OSError:
                        pass
        for d in sorted(_cgroup_dirs() - self._cgroups_before, key=len, reverse=True):
            try:
                Path(d).rmdir()
            except OSError:
                pass

    def leftovers(self) -> list[str]:
        """What this session leaves on the host: its containers, a started engine still running,
        mounts under the engine's folders once it is stopped, cgroups the engine made."""
        left = []
        if _answers(self.cli, timeout=5):
            r = self.docker("ps", "-aq", "--filter", f"label={LABEL}={self.session}", check=False)
            left += [f"container {c}" for c in r.stdout.split()]
        for name, pid in self.started.items():
            if alive(pid):
                left.append(f"{name} pid {pid}")
        if self._stopped_engine and not self.started:
            left += [f"mount {m}" for m in sorted(set(_mounts_under(*self._engine_roots())) - self._mounts_before)]
            left += [f"cgroup {d}" for d in sorted(_cgroup_dirs() - self._cgroups_before)]
            left += [f"cgroup {p}" for d in _cgroup_dirs() for p in Path(d).iterdir()
                     if p.is_dir() and CONTAINER_ID.match(p.name)]
        return left

    # ------------------------------------------------------------------ the client

    def docker(self, *args: str, check: bool = True, timeout: float = 300, input: str | bytes | None = None,
               text: bool = True) -> subprocess.CompletedProcess:
        if args and args[0] in ("build", "run", "create"):
            self.ensure_host_network()
        try:
            r = subprocess.run([self.cli, *args], capture_output=True, timeout=timeout, input=input, text=text,
                               env=_env())
        except subprocess.TimeoutExpired as e:
            raise EngineError(f"docker {' '.join(args[:3])} ... timed out after {timeout:g} s") from e
        if check and r.returncode != 0:
            raise EngineError(f"docker {' '.join(args)} failed ({r.returncode}): {(r.stderr or '')[-3000:]}")
        return r

    def ensure_host_network(self) -> None:
        """dockerd binds the host's network namespace at <exec-root>/netns/default when the first
        --network=host container starts.  Something that unmounts it behind the engine's back (a
        clean-up of mounts it does not own) leaves every later --network=host container failing to
        start ("can't get final child's PID from pipe"): an engine started here is then restarted."""
        default = Path(os.path.realpath(self.exec_root)) / "netns" / "default"
        if not default.is_file() or os.path.ismount(default):
            return
        if not self.started.get("dockerd"):
            raise EngineError(f"{default} is no longer mounted: the running Docker engine cannot start "
                              "--network=host containers until it is restarted")
        for name in ("dockerd",):
            if self._terminate(self.started[name], name):
                self.started.pop(name)
        self._record()
        self._start_engine()

    def label(self) -> list[str]:
        return ["--label", f"{LABEL}={self.session}"]

    def privileged_flags(self, image: str) -> list[str]:
        """``--privileged`` when the engine grants it here, else the equivalent it accepts."""
        if self._priv is None:
            name = f"lmx-priv-probe-{uuid.uuid4().hex[:6]}"
            r = self.docker("run", "--rm", "--name", name, *self.label(), "--network=host", "--privileged",
                            "--entrypoint", "true", image, check=False, timeout=120)
            self.docker("rm", "-f", name, check=False)
            if r.returncode == 0:
                self._priv = ["--privileged"]
            else:
                r2 = self.docker("run", "--rm", "--name", name, *self.label(), "--network=host", *FALLBACK_PRIVILEGES,
                                 "--entrypoint", "true", image, check=False, timeout=120)
                self.docker("rm", "-f", name, check=False)
                if r2.returncode != 0:
                    raise EngineError(f"neither --privileged ({r.stderr.strip()[-500:]}) nor "
                                      f"{' '.join(FALLBACK_PRIVILEGES)} ({r2.stderr.strip()[-500:]}) is accepted")
                self._priv = list(FALLBACK_PRIVILEGES)
        return list(self._priv)

    # ------------------------------------------------------------------ clean-up

    def cleanup(self) -> None:
        """Remove this session's containers, then its images."""
        self._remove_labelled(f"{LABEL}={self.session}")

    def reclaim_stale(self) -> list[str]:
        """Remove containers and images of sessions whose test process is gone."""
        gone = []
        r = self.docker("ps", "-a", "--filter", f"label={LABEL}", "--format", f'{{{{.Label "{LABEL}"}}}}', check=False)
        r2 = self.docker("images", "--filter", f"label={LABEL}", "--format", "{{.ID}}", check=False)
        sessions = set(r.stdout.split())
        for img in set(r2.stdout.split()):
            ins = self.docker("image", "inspect", "--format", f'{{{{index .Config.Labels "{LABEL}"}}}}', img, check=False)
            sessions.update(ins.stdout.split())
        for s in sessions:
            try:
                pid, start = s.split("-")[:2]
                if alive(int(pid)) and starttime(int(pid)) == start:
                    continue
            except ValueError:
                pass
            self._remove_labelled(f"{LABEL}={s}")
            gone.append(s)
        return gone

    def _remove_labelled(self, label: str) -> None:
        ids = self.docker("ps", "-aq", "--filter", f"label={label}", check=False).stdout.split()
        if ids:
            self.docker("rm", "-f", "-v", *ids, check=False, timeout=120)
        imgs = self.docker("images", "-q", "--filter", f"label={label}", check=False).stdout.split()
        # Newest first (children before their parents); -f: an image under several tags.
        for img in dict.fromkeys(imgs):
            self.docker("rmi", "-f", img, check=False, timeout=120)
        left = self.docker("ps", "-aq", "--filter", f"label={label}", check=False).stdout.split()
        if left:
            raise EngineError(f"containers labelled {label} could not be removed: {left}")

    # ------------------------------------------------------------------ helpers

    def run_container(self, args: Sequence[str], timeout: float = 120) -> str:
        """``docker run -d`` with this session's label; returns the container id."""
        return self.docker("run", "-d", *self.label(), *args, timeout=timeout).stdout.strip()

    def remove(self, name: str) -> None:
        self.docker("rm", "-f", "-v", name, check=False, timeout=120)


if __name__ == "__main__":  # manual use: python3 tests/infra/docker.py start|stop
    import sys

    if sys.argv[1:] == ["start"]:
        e = Engine()
        e.start()
        e.started.clear()  # keep it running; the recorded PIDs are taken over by the next session
        os.close(e._lock_fd)
        print("engine ready")
    elif sys.argv[1:] == ["stop"]:
        e = Engine()
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        e._lock_fd = os.open(STATE_DIR / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(e._lock_fd, fcntl.LOCK_EX)
        e._take_over_stale()
        print("left:", e.stop())
    else:
        print("usage: docker.py start|stop", file=sys.stderr)
        sys.exit(2)
