"""What a test run leaves behind on the machine: processes, cgroups, mounts, /dev/shm files,
stray sockets and temporary folders in /tmp, and network namespaces that were not there when it started.

Used by conftest.py: a snapshot at session start, a quick scan after every test (to say which
test a leftover was first seen after), and at session end a report of everything new that this
run left, which is then cleaned up.

Several people may run the suite on one machine at the same time, so a leftover counts (and is
killed or removed) only when it can be tied to this run:

* a process, when its environment carries this run's marker (``LLMUXD_TEST_SESSION``, set in
  this process's environment at import and inherited by every daemon, backend, criu and restored
  tree), or it descends from this process, or it lives in a cgroup of this run;
* a cgroup (any hierarchy, any directory whose name contains ``llmuxd``), when it is
  ``llmuxd-<port>`` (or below one) for a port this run handed out and no process of another
  run (or older than this run) lives in it — a freed port is handed out again — or it held a
  process of this run when scanned;
* a mount, when it lies under this run's temporary directory (tests mount there only: a
  mount elsewhere may be anyone's, a container runtime's say);
* a /dev/shm entry, when no process outside this run holds it and it was created more than a
  few seconds ago (a file a concurrent restore just put back is not taken) — and only when no
  other run's llmuxd processes were seen meanwhile: a file name does not say who made it, so
  with others at work new /dev/shm files are only listed (a warning), never failed on or removed;
* in /tmp, a unix socket file bound by nobody (a model tree's ZMQ socket) or an
  ``llmuxd-tree-<port>`` folder (a model tree's temporary folder) for a port of this run — the
  former, as for /dev/shm, only when no other run's llmuxd processes were seen meanwhile;
* a network namespace (/run/netns), when it is new — and, as for /dev/shm, only when no other
  run's llmuxd processes were seen meanwhile (otherwise listed in a warning, left alone).
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "infra"))
# What reads the machine (no side effects: the soak run uses it too).
from procscan import (Proc, ancestors, bound_unix_paths, cgroup_hierarchies, cgroup_procs, mounts,  # noqa: E402
                      proc, processes, read)

MARK = "LLMUXD_TEST_SESSION"
TOKEN = os.environ.setdefault(MARK, f"{os.getpid()}-{uuid.uuid4().hex[:12]}")
_MARK_BYTES = f"{MARK}={TOKEN}".encode()

#: Commands that belong to llmuxd's world: the daemon, the simulator, CRIU, a tree's init.
COMMAND = re.compile(r"llmuxd|criu|pidinit")
CGROUP_NAME = re.compile(r"llmuxd")
PORT_CGROUP = re.compile(r"^llmuxd-(\d+)$")
TREE_TMPDIR = re.compile(r"^llmuxd-tree-(\d+)$")
SHM = Path("/dev/shm")
TMP = Path("/tmp")
NETNS_DIRS = (Path("/run/netns"), Path("/var/run/netns"))
SHM_MIN_AGE = 5.0  # seconds: younger unheld /dev/shm files may be a concurrent run's, mid-restore

# -- reading the machine ---------------------------------------------------------------------
def _marked(pid: int) -> bool:
    env = read(f"/proc/{pid}/environ", binary=True)
    return env is not None and _MARK_BYTES in env.split(b"\0")


def _marked_by_other(pid: int) -> bool:
    """Started by another run of this suite (its own marker)."""
    env = read(f"/proc/{pid}/environ", binary=True)
    return env is not None and any(v.startswith(f"{MARK}=".encode()) and v != _MARK_BYTES for v in env.split(b"\0"))


def cgroups(max_depth: int = 5) -> set[str]:
    """Every cgroup directory whose name contains ``llmuxd`` (and everything below one)."""
    found: set[str] = set()

    def walk(d: Path, depth: int, inside: bool) -> None:
        try:
            entries = [e for e in os.scandir(d) if e.is_dir(follow_symlinks=False)]
        except OSError:
            return
        for e in entries:
            mine = inside or bool(CGROUP_NAME.search(e.name))
            if mine:
                found.add(e.path)
            if mine or depth < max_depth:
                walk(Path(e.path), depth + 1, mine)

    for h in cgroup_hierarchies():
        walk(h, 1, False)
    return found


def _top(path: str) -> str:
    """The outermost directory of ``path`` whose name contains ``llmuxd``."""
    parts = Path(path).parts
    for i, part in enumerate(parts):
        if CGROUP_NAME.search(part):
            return str(Path(*parts[:i + 1]))
    return path


def shm_entries() -> set[str]:
    try:
        return {e.name for e in os.scandir(SHM)}
    except OSError:
        return set()


def tmp_entries() -> set[str]:
    try:
        return set(os.listdir(TMP))
    except OSError:
        return set()


def netns() -> set[str]:
    out = set()
    for d in {os.path.realpath(d) for d in NETNS_DIRS}:  # /var/run is /run, usually
        try:
            out |= {os.path.join(d, n) for n in os.listdir(d)}
        except OSError:
            pass
    return out


def _shm_holders(names: set[str], pids) -> dict[str, set[int]]:
    """Which of ``pids`` have /dev/shm/NAME open or mapped."""
    paths = {f"{SHM}/{n}": n for n in names}
    held: dict[str, set[int]] = {}
    if not paths:
        return held
    for pid in pids:
        seen = set()
        try:
            for fd in os.scandir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(fd.path)
                except OSError:
                    continue
                seen.add(target.removesuffix(" (deleted)"))
        except OSError:
            pass
        for line in (read(f"/proc/{pid}/maps") or "").splitlines():
            parts = line.split(None, 5)
            if len(parts) == 6:
                seen.add(parts[5].removesuffix(" (deleted)"))
        for p in seen & paths.keys():
            held.setdefault(paths[p], set()).add(pid)
    return held


# -- the check ---------------------------------------------------------------------------------
@dataclass
class Leftovers:
    processes: list[Proc] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)
    mounts: list[tuple[str, str, str, str]] = field(default_factory=list)
    shm: list[str] = field(default_factory=list)
    tmp: list[str] = field(default_factory=list)  # names directly in /tmp
    netns: list[str] = field(default_factory=list)
    unsure: list[str] = field(default_factory=list)  # maybe another run's: listed only, left alone

    def __bool__(self) -> bool:
        return bool(self.processes or self.cgroups or self.mounts or self.shm or self.tmp or self.netns)


class LeakCheck:
    def __init__(self, basetemp: Path, ports: set[int]):
        self.me = os.getpid()
        self.ports = ports  # handed out to this run's daemons and backends (live: it grows)
        self.basetemp = str(basetemp.resolve())
        self.procs0 = set(processes())
        self.cgroups0 = cgroups()
        self.mounts0 = mounts()
        self.shm0 = shm_entries()
        self.tmp0 = tmp_entries()
        self.netns0 = netns()
        self.first_seen: dict[object, str] = {}  # leftover key -> test after which it was first seen
        self.owned_cgroups: set[str] = set()  # seen holding a process of this run
        self.mine = ancestors(self.me)  # pytest and whatever started it
        self.others = [p.cmdline[:120] for p in processes().values() if self._foreign(p)][:3]

    # attribution
    def _ours(self, p: Proc) -> bool:
        if p.pid == self.me or p.key in self.procs0 or p.zombie:
            return False
        if not (COMMAND.search(p.cmdline) or p.in_cgroup(CGROUP_NAME)):
            return False
        return _marked(p.pid) or self.me in ancestors(p.pid)

    def _foreign(self, p: Proc) -> bool:
        """A live process of llmuxd's world that is not this run's (another run's, say)."""
        if p.pid in self.mine or p.zombie or not (COMMAND.search(p.cmdline) or p.in_cgroup(CGROUP_NAME)):
            return False
        return not (_marked(p.pid) or self.me in ancestors(p.pid))

    def _cgroup_ours(self, path: str, alien: set[str]) -> bool:
        """Seen holding a process of this run; or ``llmuxd-<port>`` (or below) for a port this run
        handed out, unless a process of someone else's lives in it (a port is reused once freed)."""
        top = _top(path)
        if top in self.owned_cgroups:
            return True
        m = PORT_CGROUP.match(Path(top).name)
        return bool(m) and int(m.group(1)) in self.ports and top not in alien

    def _scan(self) -> tuple[list[Proc], list[str]]:
        """This run's live processes of llmuxd's world and its new cgroups, now."""
        new_cgroups = sorted(cgroups() - self.cgroups0)
        home = {pid: path for path in new_cgroups for pid in cgroup_procs(path)}
        everyone = processes()
        procs = [p for p in everyone.values() if p.key not in self.procs0 and p.pid != self.me]
        ours = [p for p in procs if self._ours(p)]
        keys = {p.key for p in ours}
        if not self.others:
            self.others = [p.cmdline[:120] for p in procs if p.key not in keys and self._foreign(p)][:3]
        alien = set()  # llmuxd cgroups where a process of another run (or older than this run) lives
        for p in everyone.values():
            if p.pid in home and p.key not in keys and (p.key in self.procs0 or _marked_by_other(p.pid)):
                alien.add(_top(home[p.pid]))
        for p in ours:
            if p.pid in home and _top(home[p.pid]) not in alien:
                self.owned_cgroups.add(_top(home[p.pid]))
        owned = [c for c in new_cgroups if self._cgroup_ours(c, alien)]
        ours += [p for p in procs if p.key not in keys and not p.zombie and home.get(p.pid) in owned]
        return sorted(ours, key=lambda p: p.pid), owned

    def note(self, nodeid: str) -> None:
        """After each test: remember what is new and after which test it was first seen."""
        procs, cgs = self._scan()
        for p in procs:
            self.first_seen.setdefault(("proc", p.key), nodeid)
        for c in cgs:
            self.first_seen.setdefault(("cgroup", c), nodeid)
        for m in mounts() - self.mounts0:
            self.first_seen.setdefault(("mount", m), nodeid)
        for s in shm_entries() - self.shm0:
            self.first_seen.setdefault(("shm", s), nodeid)
        for t in tmp_entries() - self.tmp0:
            self.first_seen.setdefault(("tmp", t), nodeid)
        for n in netns() - self.netns0:
            self.first_seen.setdefault(("netns", n), nodeid)

    def _mount_ours(self, mnt: str) -> bool:
        return mnt == self.basetemp or mnt.startswith(self.basetemp + "/")

    def leftovers(self, settle: float = 5.0) -> Leftovers:
        """What this run left; waits up to ``settle`` seconds for trees that are still exiting."""
        deadline = time.monotonic() + settle
        while True:
            procs, cgs = self._scan()
            if not procs or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        left = Leftovers(processes=procs, cgroups=cgs)
        new_mounts = mounts() - self.mounts0
        left.mounts = sorted(m for m in new_mounts.elements() if self._mount_ours(m[0]))
        new_shm = shm_entries() - self.shm0
        if new_shm:
            ours = {p.pid for p in procs}
            others = [int(e.name) for e in os.scandir("/proc") if e.name.isdigit() and int(e.name) not in ours]
            held = _shm_holders(new_shm, others)
            now = time.time()
            for name in sorted(new_shm):
                try:
                    ctime = os.lstat(SHM / name).st_ctime
                except OSError:
                    continue
                if name not in held and now - ctime >= SHM_MIN_AGE:
                    if self.others:
                        left.unsure.append(f"/dev/shm/{name}")
                    else:
                        left.shm.append(name)
        for name in sorted(tmp_entries() - self.tmp0):
            if self._tmp_leftover(name):
                (left.unsure.append(f"/tmp/{name}") if self.others else left.tmp.append(name))
        for n in sorted(netns() - self.netns0):
            if self.others:
                left.unsure.append(f"network namespace {n}")
            else:
                left.netns.append(n)
        return left

    def _tmp_leftover(self, name: str) -> bool:
        """A unix socket file bound by nobody (a model tree's ZMQ socket), older than a moment,
        or the temporary folder llmuxd makes for a model port of this run (``llmuxd-tree-<port>``)."""
        try:
            st = os.lstat(TMP / name)
        except OSError:
            return False
        if stat.S_ISSOCK(st.st_mode):
            return time.time() - st.st_ctime >= SHM_MIN_AGE and f"{TMP}/{name}" not in bound_unix_paths()
        m = TREE_TMPDIR.match(name)
        return bool(m) and stat.S_ISDIR(st.st_mode) and int(m.group(1)) in self.ports

    def describe(self, left: Leftovers) -> str:
        def seen(key) -> str:
            t = self.first_seen.get(key)
            return f"  (first seen after {t})" if t else "  (appeared during the last test or at session end)"

        lines = []
        for p in left.processes:
            cg = next((ln.split(":", 2)[2] for ln in p.cgroups if ln.startswith("0::")), "?")
            lines.append(f"process {p.pid} (cgroup {cg}): {p.cmdline[:200]}{seen(('proc', p.key))}")
        for c in left.cgroups:
            lines.append(f"cgroup {c}{seen(('cgroup', c))}")
        for m in left.mounts:
            lines.append(f"mount {m[0]} ({m[2]} {m[3]}){seen(('mount', m))}")
        for s in left.shm:
            lines.append(f"/dev/shm/{s}{seen(('shm', s))}")
        for t in left.tmp:
            lines.append(f"/tmp/{t}{seen(('tmp', t))}")
        for n in left.netns:
            lines.append(f"network namespace {n}{seen(('netns', n))}")
        return "\n".join(lines)

    def clean(self, left: Leftovers) -> list[str]:
        """Kill the processes, remove the cgroups, mounts, files and namespaces; returns what
        could not be cleaned."""
        problems = []
        ours = {p.pid for p in left.processes}
        for c in left.cgroups:  # cgroup.kill takes whole trees, forks in flight included
            members = set(cgroup_procs(c))
            # Only while everything in it is ours: a freed port is handed out again, and another
            # run's daemon may have just made (or be spawning into) the same llmuxd-<port> layout.
            if not members or not members <= ours:
                continue
            try:
                Path(c, "cgroup.kill").write_text("1")
            except OSError:
                pass
        for p in left.processes:
            if proc(p.pid) is not None and proc(p.pid).start == p.start:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        alive = list(left.processes)
        while alive and time.monotonic() < deadline:
            _reap({p.pid for p in alive})
            alive = [p for p in alive if (q := proc(p.pid)) is not None and q.start == p.start and not q.zombie]
            time.sleep(0.05)
        problems += [f"process {p.pid} survived SIGKILL" for p in alive]
        for c in sorted(left.cgroups, key=lambda c: -c.count("/")):
            for _ in range(50):
                try:
                    os.rmdir(c)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    err = e.strerror
                    time.sleep(0.1)
            else:
                problems.append(f"cgroup {c}: {err}")
        for m in sorted(left.mounts, key=lambda m: -len(m[0])):
            r = subprocess.run(["umount", "-l", m[0]], capture_output=True, text=True)
            if r.returncode:
                problems.append(f"umount {m[0]}: {r.stderr.strip()}")
        for path in [SHM / name for name in left.shm] + [TMP / name for name in left.tmp]:
            try:
                os.unlink(path)
            except IsADirectoryError:
                subprocess.run(["rm", "-rf", "--one-file-system", str(path)])
            except FileNotFoundError:
                pass
            except OSError as e:
                problems.append(f"{path}: {e.strerror}")
        for n in left.netns:
            r = subprocess.run(["ip", "netns", "delete", Path(n).name], capture_output=True, text=True)
            if r.returncode and os.path.exists(n):
                problems.append(f"netns {n}: {r.stderr.strip()}")
        return problems


def _reap(pids: set[int]) -> None:
    """Leftovers re-parented to this process must not stay zombies."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
