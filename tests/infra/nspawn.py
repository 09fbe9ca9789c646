"""Boot real systemd-nspawn containers for tests (stdlib and llmuxd's /proc reader).

A booted container has a real systemd as PID 1, a real D-Bus system bus, real journald and a real
cgroup v2 tree, from the image that ``tests/infra/build-image.sh`` builds. How and why it is done
this way, for machines where PID 1 is not systemd, with hybrid cgroups and no machined:

* nspawn runs with ``--volatile=overlay`` (a fresh RAM writable layer over the shared image tree
  at every boot), ``--register=no --keep-unit`` and ``--capability=all``, with
  ``SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 SYSTEMD_SECCOMP=0 SYSTEMD_NSPAWN_API_VFS_WRITABLE=1``
  (CRIU needs all three);
* it is launched from its own cgroup ``nspawn-NAME`` in every cgroup hierarchy (made under the
  caller's cgroup there), else nspawn puts ``payload``/``supervisor`` at the root and two
  containers collide;
* ``/run/systemd/machines/NAME`` (NAME=, LEADER=, CLASS=container) is written by hand so that
  ``systemctl -M``, ``busctl -M`` and ``systemd-run -M`` reach the container's own systemd/bus;
* ``journalctl -M`` does not work without machined: ``journalctl --root=/proc/LEADER/root``.

Never creates /run/systemd/system on the host. ``stop()`` removes everything ``start()`` made, even
after a failed or half-done start.

Example::

    with Container("t1", binds=[(repo, repo)]) as c:
        c.run(["criu", "check"])
        c.systemctl("is-system-running")
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable, Sequence

import container
from container import ContainerError
from llmuxd.isolation.procfs import alive

__all__ = [
    "Container",
    "ContainerError",
    "available",
    "default_image_dir",
    "image_info",
    "cgroup_dirs",
    "leftovers",
]

DEFAULT_IMAGE_DIR = "/var/cache/llmuxd-test/image"
IMAGE_STAMP = "etc/llmuxd-test-image"
MACHINES_DIR = Path("/run/systemd/machines")
NSPAWN_RUN_DIR = Path("/run/systemd/nspawn")
CGROUP_ROOT = Path("/sys/fs/cgroup")
NSPAWN_ENV = {
    "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1",
    "SYSTEMD_SECCOMP": "0",
    "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "1",
}


def default_image_dir() -> str:
    """The image tree: $LLMUXD_TEST_IMAGE or /var/cache/llmuxd-test/image."""
    return os.environ.get("LLMUXD_TEST_IMAGE") or DEFAULT_IMAGE_DIR


def image_info(image_dir: str | os.PathLike | None = None) -> dict[str, str] | None:
    """The image's stamp (key, built, systemd, python, criu, ...), or None if not built."""
    p = Path(image_dir or default_image_dir()) / IMAGE_STAMP
    try:
        text = p.read_text()
    except OSError:
        return None
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def available(image_dir: str | os.PathLike | None = None) -> tuple[bool, str]:
    """Whether containers can be booted here: (True, description) or (False, reason)."""
    image = Path(image_dir or default_image_dir())
    if os.geteuid() != 0:
        return False, "not root (systemd-nspawn needs root)"
    for tool in ("systemd-nspawn", "systemctl", "systemd-run", "busctl", "journalctl"):
        if shutil.which(tool) is None:
            return False, f"{tool} not found (apt-get install systemd-container; tests/infra/build-image.sh does it)"
    if not any(t == "cgroup2" for _, t, _ in _cgroup_mounts()):
        return False, "no cgroup2 hierarchy mounted under /sys/fs/cgroup"
    info = image_info(image)
    if info is None:
        return False, f"test image not built at {image} (run tests/infra/build-image.sh)"
    if not (image / "usr/lib/systemd/systemd").exists() and not (image / "lib/systemd/systemd").exists():
        return False, f"{image} has no systemd"
    return True, f"image {image} (key {info.get('key')}, systemd {info.get('systemd')}, criu {info.get('criu')})"


# ----------------------------------------------------------------------------------------------
# cgroups


def _cgroup_mounts() -> list[tuple[Path, str, set[str]]]:
    """(mount point, fstype, super options) of the cgroup hierarchies under /sys/fs/cgroup."""
    out = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(rfields) < 3 or rfields[0] not in ("cgroup", "cgroup2"):
            continue
        mnt = Path(fields[4].replace("\\040", " "))
        if CGROUP_ROOT not in (mnt, *mnt.parents):
            continue
        out.append((mnt, rfields[0], set(rfields[2].split(","))))
    return out


def _own_cgroups(pid: int | str = "self") -> list[tuple[Path, str]]:
    """(hierarchy mount point, path of `pid`'s cgroup in it) for every mounted hierarchy."""
    by_ctrl: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        hid, ctrls, path = line.split(":", 2)
        by_ctrl["" if hid == "0" else ctrls] = path
    result = []
    for mnt, fstype, opts in _cgroup_mounts():
        if fstype == "cgroup2":
            path = by_ctrl.get("")
        else:
            path = None
            for ctrls, p in by_ctrl.items():
                if ctrls and set(ctrls.split(",")) <= opts:
                    path = p
                    break
        if path is not None:
            result.append((mnt, path))
    return result


def cgroup_dirs(name: str) -> list[Path]:
    """Where a container NAME started from this process has (or would have) its cgroups."""
    return [mnt / path.lstrip("/") / f"nspawn-{name}" for mnt, path in _own_cgroups()]


def _make_cgroups(name: str) -> list[Path]:
    dirs = []
    for d in cgroup_dirs(name):
        d.mkdir(exist_ok=True)
        dirs.append(d)
        # cgroup v1 cpuset: a new group has no cpus/mems, and then no task may join it.
        for f in ("cpuset.cpus", "cpuset.mems"):
            fp = d / f
            if fp.exists() and not fp.read_text().strip():
                fp.write_text((d.parent / f).read_text())
    return dirs


def _remove_cgroup_tree(top: Path, timeout: float = 5.0) -> list[str]:
    """rmdir `top` and everything below it, deepest first; returns what could not be removed."""
    if not top.is_dir():
        return []
    deadline = time.monotonic() + timeout
    while True:
        errors = []
        subdirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        for d in [*subdirs, top]:
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError as e:
                procs = ""
                try:
                    procs = (d / "cgroup.procs").read_text().split()
                except OSError:
                    pass
                errors.append(f"{d}: {e.strerror}" + (f" (pids {' '.join(procs)})" if procs else ""))
        if not errors or time.monotonic() > deadline:
            return errors
        time.sleep(0.1)


def leftovers(name: str) -> list[str]:
    """Everything a container NAME leaves behind on the host if not cleaned up (empty = clean)."""
    left = [str(d) for d in cgroup_dirs(name) if d.exists()]
    for p in (MACHINES_DIR / name, NSPAWN_RUN_DIR / "propagate" / name, NSPAWN_RUN_DIR / "unix-export" / name):
        if p.exists() or p.is_symlink():
            left.append(str(p))
    return left


# ----------------------------------------------------------------------------------------------


class Container(container.Container):
    """One booted systemd-nspawn container.

    Attributes: ``name``, ``image_dir``, ``binds``, ``ro_binds``, ``share_network``,
    ``process`` (the systemd-nspawn Popen), ``leader`` (host PID of the container's PID 1),
    ``boot_seconds`` (start() until is-system-running said running/degraded), ``state`` (what
    is-system-running said), ``log_path`` (nspawn's console output).
    """

    def __init__(
        self,
        name: str,
        image_dir: str | os.PathLike | None = None,
        binds: Iterable[tuple[str, str]] = (),
        share_network: bool = True,
        *,
        ro_binds: Iterable[tuple[str, str]] = (),
        extra_args: Sequence[str] = (),
        boot_timeout: float = 60.0,
        keep_log: bool = False,
    ) -> None:
        super().__init__(name)
        self.image_dir = Path(image_dir or default_image_dir())
        self.binds = [(str(h), str(d)) for h, d in binds]
        self.ro_binds = [(str(h), str(d)) for h, d in ro_binds]
        self.share_network = share_network
        self.extra_args = list(extra_args)
        self.boot_timeout = boot_timeout
        self.keep_log = keep_log
        self.process: subprocess.Popen | None = None
        self.leader: int | None = None
        self.boot_seconds: float | None = None
        self.state: str | None = None
        self.log_path: str | None = None
        self._log_file = None
        self._cgroups: list[Path] = []
        self._machine_file_written = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Container {self.name} leader={self.leader} image={self.image_dir}>"

    # ---------------------------------------------------------------- life cycle

    def nspawn_command(self) -> list[str]:
        cmd = [
            "systemd-nspawn",
            "-D", str(self.image_dir),
            "--volatile=overlay",
            "-M", self.name,
            "--register=no",
            "--keep-unit",
            "--capability=all",
            "--console=read-only",
            "--link-journal=no",
        ]
        if not self.share_network:
            cmd.append("--private-network")
        for opt, pairs in (("--bind", self.binds), ("--bind-ro", self.ro_binds)):
            for host, dest in pairs:
                cmd.append(f"{opt}={host}" if host == dest else f"{opt}={host}:{dest}")
        cmd += self.extra_args
        cmd.append("-b")
        return cmd

    def start(self, timeout: float | None = None) -> "Container":
        """Boot the container; returns when systemd says running or degraded.

        Raises ContainerError (with the tail of nspawn's output) on failure, after cleaning up.
        """
        timeout = self.boot_timeout if timeout is None else timeout
        if self.process is not None:
            raise ContainerError(f"{self.name}: already started")
        ok, why = available(self.image_dir)
        if not ok:
            raise ContainerError(f"cannot boot containers here: {why}")
        mf = MACHINES_DIR / self.name
        if mf.exists():
            old = _read_kv(mf).get("LEADER", "")
            if old.isdigit() and alive(int(old)):
                raise ContainerError(f"a machine {self.name} is already running (leader {old})")
        t0 = time.monotonic()
        self._track()
        try:
            # Stale remains of an earlier container of the same name (its cgroups are empty).
            for d in cgroup_dirs(self.name):
                _remove_cgroup_tree(d, timeout=0)
            self._cgroups = _make_cgroups(self.name)
            fd, self.log_path = tempfile.mkstemp(prefix=f"nspawn-{self.name}-", suffix=".log")
            self._log_file = os.fdopen(fd, "wb")
            env = dict(os.environ, **NSPAWN_ENV)
            env.pop("NOTIFY_SOCKET", None)
            env["LLMUXD_NSPAWN_CGROUP_PROCS"] = ":".join(str(d / "cgroup.procs") for d in self._cgroups)
            # A shell moves itself into the cgroups, then execs nspawn (no preexec_fn: safe with
            # threads in the caller).
            launcher = [
                "/bin/sh", "-c",
                'IFS=:; for f in $LLMUXD_NSPAWN_CGROUP_PROCS; do echo $$ >"$f" || exit 111; done; '
                'unset LLMUXD_NSPAWN_CGROUP_PROCS; exec "$@"',
                "nspawn-launcher",
            ]
            self.process = subprocess.Popen(
                launcher + self.nspawn_command(),
                stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
                env=env, start_new_session=True, close_fds=True,
            )
            deadline = t0 + timeout
            self.leader = self._wait_leader(deadline)
            self._write_machine_file()
            self.state = self._wait_running(deadline)
            self.boot_seconds = time.monotonic() - t0
            return self
        except BaseException as e:
            tail = self.log_tail()
            try:
                self.stop()
            except Exception:
                pass
            if isinstance(e, ContainerError):
                raise ContainerError(f"{e}\n--- nspawn output ---\n{tail}") from None
            raise

    def _check_nspawn(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            rc = self.process.returncode
            what = "could not join its cgroups" if rc == 111 else f"exited with {rc}"
            raise ContainerError(f"{self.name}: systemd-nspawn {what}")

    def _wait_leader(self, deadline: float) -> int:
        assert self.process is not None
        npid = self.process.pid
        while time.monotonic() < deadline:
            self._check_nspawn()
            try:
                children = Path(f"/proc/{npid}/task/{npid}/children").read_text().split()
            except OSError:
                children = []
            for c in children:
                try:
                    status = Path(f"/proc/{c}/status").read_text()
                except OSError:
                    continue
                m = re.search(r"^NSpid:\s+(.*)$", status, re.M)
                if m and m.group(1).split()[-1] == "1" and len(m.group(1).split()) > 1:
                    return int(c)
            time.sleep(0.02)
        raise ContainerError(f"{self.name}: no container PID 1 appeared in time")

    def _write_machine_file(self) -> None:
        MACHINES_DIR.mkdir(parents=True, exist_ok=True)
        tmp = MACHINES_DIR / f".#{self.name}.{os.getpid()}"
        tmp.write_text(f"NAME={self.name}\nLEADER={self.leader}\nCLASS=container\nROOT={self.image_dir}\n")
        os.replace(tmp, MACHINES_DIR / self.name)
        self._machine_file_written = True

    def _wait_running(self, deadline: float) -> str:
        state = "?"
        while time.monotonic() < deadline:
            self._check_nspawn()
            if not alive(self.leader):
                raise ContainerError(f"{self.name}: the container's PID 1 exited")
            try:
                r = subprocess.run(
                    ["systemctl", "-M", self.name, "is-system-running"],
                    capture_output=True, text=True, timeout=max(1.0, min(10.0, deadline - time.monotonic())),
                )
                state = r.stdout.strip() or r.stderr.strip()
            except subprocess.TimeoutExpired:
                state = "timeout"
            if state in ("running", "degraded"):
                return state
            time.sleep(0.05)
        raise ContainerError(f"{self.name}: not running after the timeout (is-system-running: {state})")

    def stop(self, timeout: float = 20.0) -> None:
        """Power the container off (SIGTERM to nspawn) and remove everything start() made.

        Safe to call more than once, and after a start() that failed at any point. Raises
        ContainerError if something could not be removed (after trying everything).
        """
        with self._lock:
            errors: list[str] = []
            p = self.process
            if p is not None and not container.terminate(p, timeout, kill_wait=5):
                errors.append(f"systemd-nspawn {p.pid} ignored SIGTERM for {timeout} s; killed")
                if p.poll() is None:
                    errors.append(f"systemd-nspawn {p.pid} survived SIGKILL")
            # The container's PID 1 normally ends with nspawn; if nspawn was killed it would not.
            if self.leader is not None and alive(self.leader):
                try:
                    os.kill(self.leader, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                for _ in range(100):
                    if not alive(self.leader):
                        break
                    time.sleep(0.05)
                else:
                    errors.append(f"container PID 1 ({self.leader}) did not exit")
            for d in self._cgroups or cgroup_dirs(self.name):
                errors += _remove_cgroup_tree(d)
            self._cgroups = []
            mf = MACHINES_DIR / self.name
            if self._machine_file_written or mf.exists():
                # Only our own file (a same-named running machine of someone else stays).
                leader = _read_kv(mf).get("LEADER", "")
                if not (leader.isdigit() and alive(int(leader)) and int(leader) != self.leader):
                    try:
                        mf.unlink()
                    except FileNotFoundError:
                        pass
                self._machine_file_written = False
            for sub in ("propagate", "unix-export"):
                d = NSPAWN_RUN_DIR / sub / self.name
                if d.is_dir() and not d.is_symlink():
                    shutil.rmtree(d, ignore_errors=True)
                elif d.exists() or d.is_symlink():
                    d.unlink(missing_ok=True)
                if d.exists():
                    errors.append(f"{d} could not be removed")
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
            if self.log_path and not self.keep_log:
                try:
                    os.unlink(self.log_path)
                except FileNotFoundError:
                    pass
            self.process = None
            self._untrack()
            if errors:
                raise ContainerError(f"{self.name}: cleanup incomplete: " + "; ".join(errors))

    # ---------------------------------------------------------------- state

    @property
    def started(self) -> bool:
        return self.process is not None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None and self.leader is not None and alive(self.leader)

    def _need_leader(self) -> int:
        if self.leader is None:
            raise ContainerError(f"{self.name}: not started")
        return self.leader

    def _root_pid(self) -> int:
        """The container's PID 1: its root is /proc/LEADER/root."""
        return self._need_leader()

    @property
    def bus_address(self) -> str:
        """D-Bus address of the container's system bus, usable from the host."""
        return f"unix:path=/proc/{self._need_leader()}/root/run/dbus/system_bus_socket"

    def log_tail(self, n: int = 40) -> str:
        """The last lines of nspawn's console output."""
        if not self.log_path:
            return ""
        try:
            if self._log_file is not None:
                self._log_file.flush()
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # ---------------------------------------------------------------- driving it

    def run(
        self,
        cmd: str | Sequence[str],
        check: bool = True,
        timeout: float | None = 120.0,
        *,
        input: str | bytes | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        properties: Sequence[str] = (),
        text: bool = True,
    ) -> subprocess.CompletedProcess:
        """Run `cmd` inside the container as a transient service (systemd-run -M NAME --wait
        --pipe --collect -q): a real unit under the container's systemd, its exit code and
        stdout/stderr come back (captured). A string is run by /bin/sh -c.

        The unit gets RuntimeMaxSec= so that it ends inside too when `timeout` expires. Note that
        --pipe hands the host's pipes to the process: what must later be CRIU-dumped has to be
        started differently (with files for stdio).
        """
        self._need_leader()
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        sr = ["systemd-run", "-M", self.name, "--wait", "--pipe", "--collect", "-q"]
        if timeout is not None:
            sr.append(f"--property=RuntimeMaxSec={int(timeout) + 5}")
        sr += [f"--property={p}" for p in properties]
        for k, v in (env or {}).items():
            sr.append(f"--setenv={k}={v}")
        if cwd:
            sr.append(f"--working-directory={cwd}")
        sr += ["--", *argv]
        if isinstance(input, str) and not text:
            input = input.encode()
        r = subprocess.run(
            sr, input=input, stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True, text=text, timeout=timeout,
        )
        if check and r.returncode != 0:
            raise subprocess.CalledProcessError(r.returncode, argv, r.stdout, r.stderr)
        return r

    def systemctl(self, *args: str, check: bool = False, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """`systemctl -M NAME --no-pager ARGS` (captured text; check=False by default)."""
        return self._host_tool(["systemctl", "-M", self.name, "--no-pager", *args], check, timeout)

    def busctl(self, *args: str, check: bool = False, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """`busctl -M NAME --no-pager ARGS` against the container's system bus."""
        return self._host_tool(["busctl", "-M", self.name, "--no-pager", *args], check, timeout)

    def _host_tool(self, argv: list[str], check: bool, timeout: float) -> subprocess.CompletedProcess:
        self._need_leader()
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise subprocess.CalledProcessError(r.returncode, argv, r.stdout, r.stderr)
        return r

    def journal(
        self,
        unit: str | None = None,
        *,
        json_output: bool = False,
        lines: int | None = None,
        args: Sequence[str] = (),
        timeout: float = 60.0,
    ) -> str | list[dict]:
        """The container's journal (of `unit`, or all): plain text (`-o short-precise`), or with
        json_output=True a list of entry dicts (`-o json`). Read from the host with
        journalctl --root=/proc/LEADER/root (journalctl -M needs machined)."""
        argv = ["journalctl", f"--root={self.root}", "--no-pager", "-o", "json" if json_output else "short-precise"]
        if unit:
            argv += ["-u", unit]
        if lines is not None:
            argv += ["-n", str(lines)]
        argv += list(args)
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise subprocess.CalledProcessError(r.returncode, argv, r.stdout, r.stderr)
        if not json_output:
            return r.stdout
        return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def _read_kv(path: Path) -> dict[str, str]:
    try:
        return dict(l.split("=", 1) for l in path.read_text().splitlines() if "=" in l)
    except OSError:
        return {}


if __name__ == "__main__":  # a quick manual check: python3 tests/infra/nspawn.py [NAME]
    import sys

    ok, why = available()
    print(("available: " if ok else "NOT available: ") + why)
    if ok:
        name = sys.argv[1] if len(sys.argv) > 1 else f"nspawn-selftest-{os.getpid()}"
        with Container(name) as c:
            print(f"booted {c.name} in {c.boot_seconds:.2f} s ({c.state}), leader {c.leader}")
            print(c.run(["cat", "/proc/1/comm"]).stdout.strip(), shlex.join(c.nspawn_command()))
        print("leftovers:", leftovers(name) or "none")
