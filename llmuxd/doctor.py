"""``llmuxd doctor``: what this machine can and cannot do for llmuxd, in plain words.

One line per item, ``OK`` / ``WARN`` / ``NO``, with the reason and, where there is one, the fix.
The facts are gathered first (:func:`gather_facts`, which runs ``criu check``, loads libcuda and
NVML if present, tries a cgroup, asks the system bus), then judged against the configuration
(:func:`assess`, pure).  The exit status is 1 only when something the configuration needs is
missing (e.g. a model whose process eviction is ``checkpoint`` and no usable CRIU); a machine
without GPU, systemd or D-Bus still runs llmuxd, with those parts off, and exits 0.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import cuda
from .checkpoint.criu import criu_has_nftables, kernel_has_nf_tables, network_lock_method
from .config import DEFAULT_CONFIG_PATH, CheckpointConfig, Config, ConfigError, ProcessEviction, load_config
from .api.dbus import bus_socket_paths, system_bus_address
from .isolation.cgroups import cgroup2_mount, own_cgroup

OK, WARN, NO = "OK", "WARN", "NO"
CRIU_MIN = (4, 2)
DBUS_POLICY = "io.llmux.Llmuxd1.conf"
DBUS_POLICY_DIRS = ("/usr/share/dbus-1/system.d", "/etc/dbus-1/system.d")
INSTALL_CRIU = "packaging/install-criu.sh (CRIU 4.2.x from Debian forky in its own root)"


@dataclass
class Check:
    section: str
    item: str
    status: str  # OK / WARN / NO
    detail: str
    fix: str = ""
    required: bool = False  # a NO here means llmuxd cannot run this configuration


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def _run(argv: list[str], timeout: float = 30) -> tuple[int | None, str]:
    """(exit status, stdout+stderr); (None, reason) when it could not run."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None, f"no answer in {timeout:g} s"
    except OSError as e:
        return None, e.strerror or str(e)
    return r.returncode, (r.stdout + r.stderr)


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def parse_version(text: str) -> tuple[int, ...] | None:
    """``Version: 4.2.1`` (criu --version) or ``6.18.44-fc`` (a kernel release) -> (4, 2, 1)."""
    m = re.search(r"(?:Version:\s*)?(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    if not m:
        return None
    return tuple(int(x) for x in m.groups() if x is not None)


def _vstr(v: tuple[int, ...] | None) -> str:
    return ".".join(map(str, v)) if v else "?"


def criu_version_verdict(version: tuple[int, ...] | None, kernel: tuple[int, ...] | None) -> tuple[str, str]:
    """(OK|NO, explanation) for a CRIU version on a kernel: llmuxd needs CRIU >= 4.2."""
    if version is None:
        return NO, "cannot tell its version (`criu --version` printed no version)"
    if version[:2] >= CRIU_MIN:
        return OK, f"{_vstr(version)} (>= 4.2 required)"
    if version[0] < 4:
        return NO, (f"{_vstr(version)}: CRIU 3.x (Debian 12 ships 3.17) does not start on current kernels "
                    "(`vdso: Unexpected rt vDSO area bounds`); llmuxd needs >= 4.2")
    tcp = kernel is not None and kernel[:2] >= (6, 16)
    return NO, (f"{_vstr(version)}: CRIU 4.0/4.1 cannot dump any process holding a TCP socket on kernel >= 6.16 "
                f"(`Can't get 1:16 opt`, fixed in 4.2){'; this kernel is ' + _vstr(kernel) if tcp else ''}"
                "; every vLLM tree holds TCP sockets; llmuxd needs >= 4.2")


def first_problem_line(output: str) -> str:
    """The first line of ``criu check`` output that says what is wrong."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for ln in lines:
        if re.search(r"\b(Error|error|fail|FAIL|not supported|unsupported|must be)", ln):
            return ln
    return lines[0] if lines else "no output"


def _resolve(path: str, fallbacks: tuple[str, ...] = ()) -> str | None:
    if "/" in path:
        return path if os.path.isfile(path) else None
    found = shutil.which(path)
    if found:
        return found
    for fb in fallbacks:
        if os.path.isfile(fb) and os.access(fb, os.X_OK):
            return fb
    return None


# ---------------------------------------------------------------------------------------------
# facts
# ---------------------------------------------------------------------------------------------
def criu_facts(criu_path: str = "criu") -> dict[str, Any]:
    kernel = parse_version(platform.release())
    f: dict[str, Any] = {"requested": criu_path, "path": None, "version": None, "version_ok": False,
                         "version_detail": "", "check_ok": False, "check_detail": "", "nftables": False,
                         "iptables": shutil.which("iptables-restore"), "network_lock": "skip",
                         "network_lock_detail": "no CRIU",
                         "pycriu": False, "pycriu_detail": ""}
    path = _resolve(criu_path, ("/usr/local/bin/criu", "/usr/sbin/criu") if criu_path == "criu" else ())
    f["path"] = path
    if path:
        rc, out = _run([path, "--version"], timeout=15)
        version = parse_version(out) if rc == 0 else None
        f["version"] = _vstr(version) if version else None
        status, f["version_detail"] = criu_version_verdict(version, kernel)
        if rc != 0:
            f["version_detail"] = f"`{path} --version` failed: {first_problem_line(out)}"
        f["version_ok"] = status == OK
        rc, out = _run([path, "check"], timeout=60)
        f["check_ok"] = rc == 0
        f["check_detail"] = "Looks good" if rc == 0 else first_problem_line(out)
        f["nftables"] = criu_has_nftables(path)
        f["network_lock"], f["network_lock_detail"] = network_lock_method(path)
    f["nf_tables_kernel"] = kernel_has_nf_tables()
    try:
        mod = importlib.import_module("pycriu")
        importlib.import_module("pycriu.images")
        f["pycriu"], f["pycriu_detail"] = True, os.path.dirname(mod.__file__ or "")
    except Exception as e:  # noqa: BLE001 - ImportError, or protobuf 7's AttributeError
        f["pycriu_detail"] = f"{type(e).__name__}: {e}"
    return f


def cuda_facts(ckpt: CheckpointConfig, libcuda: str = cuda.LIBCUDA, nvml: str = cuda.LIBNVML,
               nvidia_smi: str = "nvidia-smi") -> dict[str, Any]:
    f: dict[str, Any] = {"driver_api": False, "driver_api_detail": "", "binary": None, "binary_ok": False,
                         "binary_detail": "", "selected": None, "selected_detail": "",
                         "plugin": None, "plugin_dir": ckpt.cuda_plugin_dir, "gpu": None,
                         "device_nodes": sorted(str(p) for p in Path("/dev").glob("nvidia*"))}
    try:
        drv = cuda.DriverBackend(libcuda)
        try:
            drv.init()
            f["driver_api"], f["driver_api_detail"] = True, drv.describe() + ": cuCheckpointProcess*"
        except cuda.CudaError as e:
            f["driver_api_detail"] = f"{drv.describe()} has cuCheckpoint*, but {e.message}"
    except OSError as e:
        f["driver_api_detail"] = f"{libcuda} {cuda.short_oserror(e)}"
    except AttributeError as e:
        f["driver_api_detail"] = str(e)
    f["binary"] = _resolve(ckpt.cuda_checkpoint_path)
    try:
        b = cuda.BinaryBackend(ckpt.cuda_checkpoint_path)
        f["binary_ok"], f["binary_detail"] = True, b.describe()
    except (OSError, RuntimeError) as e:
        f["binary_detail"] = str(e)
    cp, reason = cuda.select_checkpointer(ckpt.cuda_checkpoint_path, libcuda)
    f["selected"] = cp.kind if cp else None
    f["selected_detail"] = reason
    plugin = Path(ckpt.cuda_plugin_dir) / "cuda_plugin.so"
    f["plugin"] = str(plugin) if plugin.is_file() else None
    f["gpu"] = cuda.gpu_inventory(nvml, nvidia_smi)
    return f


def _test_child_cgroup(here: Path) -> dict[str, Any]:
    """mkdir a child of our own cgroup (what llmuxd does for its model cgroups), look, rmdir."""
    probe = here / f"llmuxd-doctor-{os.getpid()}"
    try:
        probe.mkdir()
    except OSError as e:
        return {"writable": False, "writable_detail": f"cannot create a cgroup under {here}: {e.strerror}"}
    try:
        return {"writable": True, "writable_detail": f"created and removed {probe.name} under {here}",
                "kill": (probe / "cgroup.kill").exists(), "freeze": (probe / "cgroup.freeze").exists()}
    finally:
        try:
            probe.rmdir()
        except OSError:
            pass


def cgroup_facts() -> dict[str, Any]:
    mount = cgroup2_mount()
    f: dict[str, Any] = {"mount": str(mount) if mount else None, "layout": None, "controllers": None,
                         "own": own_cgroup(), "writable": False, "writable_detail": "", "kill": None,
                         "freeze": None, "delegated": None, "delegated_detail": ""}
    if mount is None:
        return f
    f["layout"] = {"/sys/fs/cgroup": "pure", "/sys/fs/cgroup/unified": "hybrid"}.get(str(mount), "other")
    ctl = _read(mount / "cgroup.controllers")
    f["controllers"] = ctl.split() if ctl is not None else None
    if f["own"] is None:
        f["writable_detail"] = "this process is not in the cgroup v2 hierarchy"
        return f
    here = mount / f["own"].lstrip("/")
    f.update(_test_child_cgroup(here))
    if f["kill"] is None and f["own"] != "/":
        f["kill"], f["freeze"] = (here / "cgroup.kill").exists(), (here / "cgroup.freeze").exists()
    if os.environ.get("INVOCATION_ID"):
        try:
            f["delegated"] = os.getxattr(here, "trusted.delegate") == b"1"
            f["delegated_detail"] = f"{here}: trusted.delegate={'1' if f['delegated'] else 'unset'}"
        except OSError:
            f["delegated_detail"] = f"{here}: no trusted.delegate mark (systemd < 251, or not delegated)"
    return f


def systemd_facts() -> dict[str, Any]:
    comm = (_read("/proc/1/comm") or "?").strip()
    booted = os.path.isdir("/run/systemd/system")  # sd_booted()
    f: dict[str, Any] = {"pid1": comm, "booted": booted, "invocation_id": os.environ.get("INVOCATION_ID"),
                         "notify_socket": os.environ.get("NOTIFY_SOCKET"), "unit": None}
    if booted and shutil.which("systemctl"):
        rc, out = _run(["systemctl", "show", "-p", "LoadState", "-p", "ActiveState", "-p", "Delegate",
                        "llmuxd.service"], timeout=10)
        if rc == 0:
            f["unit"] = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return f


async def _bus_connect(address: str, timeout: float) -> str | None:
    """None when a connection to the bus at ``address`` says hello within ``timeout``; else why not."""
    from dbus_fast.aio import MessageBus

    bus = MessageBus(bus_address=address)
    try:
        await asyncio.wait_for(bus.connect(), timeout)
    except asyncio.TimeoutError:
        return f"no answer in {timeout:g} s"
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    bus.disconnect()
    return None


def dbus_facts(timeout: float = 2.0) -> dict[str, Any]:
    address = system_bus_address()
    sockets = [p for p in bus_socket_paths(address) if os.path.exists(p)]
    f: dict[str, Any] = {"address": address, "socket": sockets[0] if sockets else None, "connect": False,
                         "connect_detail": "", "policy": None}
    if sockets:
        try:
            err = asyncio.run(_bus_connect(address, timeout))
        except RuntimeError as e:  # called from a running loop
            err = str(e)
        f["connect"], f["connect_detail"] = err is None, err or "connected"
    for d in DBUS_POLICY_DIRS:
        if os.path.isfile(os.path.join(d, DBUS_POLICY)):
            f["policy"] = os.path.join(d, DBUS_POLICY)
            break
    return f


def _prctl_get_child_subreaper() -> bool | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        val = ctypes.c_int(0)
        zero = ctypes.c_ulong(0)
        if libc.prctl(ctypes.c_int(37), ctypes.byref(val), zero, zero, zero) != 0:  # PR_GET_CHILD_SUBREAPER
            return None
        return True
    except (OSError, AttributeError):
        return None


def kernel_facts() -> dict[str, Any]:
    status = _read("/proc/self/status") or ""
    seccomp = re.search(r"^Seccomp:\s*(\d+)", status, re.M)
    actions = (_read("/proc/sys/kernel/seccomp/actions_avail") or "").split()
    pid_max = (_read("/proc/sys/kernel/pid_max") or "").strip()
    f: dict[str, Any] = {"release": platform.release(), "version": _vstr(parse_version(platform.release())),
                         "euid": os.geteuid(), "seccomp": seccomp is not None,
                         "seccomp_mode": int(seccomp.group(1)) if seccomp else None,
                         "seccomp_errno": "errno" in actions, "subreaper": _prctl_get_child_subreaper(),
                         "pid_max": int(pid_max) if pid_max.isdigit() else None, "pid_namespace": None,
                         "pid_namespace_detail": ""}
    if shutil.which("unshare"):
        rc, out = _run(["unshare", "--pid", "--fork", "true"], timeout=10)
        f["pid_namespace"] = rc == 0
        f["pid_namespace_detail"] = "unshare --pid works" if rc == 0 else first_problem_line(out)
    else:
        f["pid_namespace_detail"] = "no `unshare` to try it with"
    return f


def load_for_doctor(config_path: Path | str | None) -> tuple[Config | None, dict[str, Any]]:
    """(config or None, facts about it).  A missing file at the default path is not an error."""
    path = Path(config_path) if config_path is not None else DEFAULT_CONFIG_PATH
    info: dict[str, Any] = {"path": str(path), "loaded": False, "problems": [], "missing_default": False}
    if not path.exists() and path == DEFAULT_CONFIG_PATH:
        info["missing_default"] = True
        return None, info
    try:
        config = load_config(path)
    except ConfigError as e:
        info["problems"] = e.problems
        return None, info
    info["loaded"] = True
    info["models"] = {n: str(config.eviction_for(n)) for n in config.models}
    return config, info


def checkpoint_trust_facts(config: Config | None) -> dict[str, Any]:
    """Whether each model's checkpoint folder and the key file pass the trust rule."""
    from .checkpoint.seal import Unauthenticated
    from .checkpoint.store import Settings
    from .checkpoint.trust import Untrusted

    if config is None:
        return {"folders": {}, "key": None}
    settings = Settings.of(config)
    folders = {}
    for name in config.models:
        try:
            settings.check(config.checkpoint_dir_for(name))
            folders[name] = ""
        except Untrusted as e:
            folders[name] = str(e)
    key = None
    if settings.key_file is not None:
        try:
            settings.key()
            key = ""
        except (Untrusted, Unauthenticated, OSError, ValueError) as e:
            key = str(e)
    return {"folders": folders, "key": key, "key_file": str(settings.key_file or "")}


def gather_facts(config: Config | None, *, libcuda: str = cuda.LIBCUDA, nvml: str = cuda.LIBNVML,
                 nvidia_smi: str = "nvidia-smi") -> dict[str, Any]:
    ckpt = (config.checkpoint if config is not None else None) or CheckpointConfig()
    return {
        "criu": criu_facts(ckpt.criu_path),
        "cuda": cuda_facts(ckpt, libcuda, nvml, nvidia_smi),
        "cgroup": cgroup_facts(),
        "systemd": systemd_facts(),
        "dbus": dbus_facts(),
        "kernel": kernel_facts(),
        "trust": checkpoint_trust_facts(config),
    }


# ---------------------------------------------------------------------------------------------
# judgement (pure)
# ---------------------------------------------------------------------------------------------
def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 1024**3:.0f} GiB"


def describe_gpus(inv: dict | None) -> str:
    if not inv:
        return "no NVIDIA GPU"
    parts = [f"{g['index']}: {g['name']} ({_gib(g.get('memory_total'))}, {_gib(g.get('memory_free'))} free)"
             for g in inv["gpus"]]
    return f"{len(parts)} GPU(s): " + "; ".join(parts) + f"; driver {inv.get('driver_version')} (via {inv['source']})"


def assess(facts: dict[str, Any], config: Config | None, config_info: dict[str, Any] | None = None) -> list[Check]:
    checks: list[Check] = []
    add = checks.append
    ci = config_info or {}
    ckpt_models: list[str] = []
    suspend_models: list[str] = []
    if config is not None:
        ckpt_models = [n for n in config.models if config.eviction_for(n).process is ProcessEviction.CHECKPOINT]
        suspend_models = [n for n in config.models if config.eviction_for(n).process is ProcessEviction.CUDA_SUSPEND]

    # -- config --------------------------------------------------------------------------------
    if ci.get("problems"):
        add(Check("config", "config", NO, f"{ci['path']}: " + "; ".join(ci["problems"]),
                  "fix the file (`llmuxd check-config`)", required=True))
    elif ci.get("missing_default"):
        add(Check("config", "config", WARN, f"no {ci['path']}: judged with default settings and no models",
                  "pass --config PATH"))
    elif config is not None:
        ev = ", ".join(f"{n}={e}" for n, e in ci.get("models", {}).items())
        add(Check("config", "config", OK, f"{ci.get('path')}: {len(config.models)} model(s): {ev}"))

    # -- CRIU ----------------------------------------------------------------------------------
    cr = facts["criu"]
    need_criu = bool(ckpt_models)
    why = f" (needed by {', '.join(ckpt_models)}: process eviction `checkpoint`)" if need_criu else ""
    bad = NO if need_criu else WARN
    if not cr["path"]:
        add(Check("CRIU", "criu binary", bad, f"{cr['requested']} not found{why}", f"run {INSTALL_CRIU}",
                  required=need_criu))
    else:
        add(Check("CRIU", "criu binary", OK, cr["path"]))
        add(Check("CRIU", "criu version", OK if cr["version_ok"] else bad, cr["version_detail"] + ("" if cr["version_ok"] else why),
                  "" if cr["version_ok"] else f"run {INSTALL_CRIU}", required=need_criu))
        fix = ("run as root (CRIU needs CAP_SYS_ADMIN); in a container: --privileged or full capabilities"
               if facts["kernel"]["euid"] != 0 else
               "CRIU needs full capabilities and a writable /proc/sys (Docker: --privileged; systemd-nspawn: "
               "--capability=all with SYSTEMD_NSPAWN_API_VFS_WRITABLE=1 and SYSTEMD_SECCOMP=0)")
        add(Check("CRIU", "criu check", OK if cr["check_ok"] else bad,
                  cr["check_detail"] + ("" if cr["check_ok"] else why), "" if cr["check_ok"] else fix,
                  required=need_criu))
        lock = cr["network_lock"]
        detail = f"--network-lock {lock}: {cr['network_lock_detail']}"
        add(Check("CRIU", "network lock", WARN if lock == "skip" else OK, detail))
    add(Check("CRIU", "pycriu", OK if cr["pycriu"] else WARN,
              ("importable from " + cr["pycriu_detail"]) if cr["pycriu"] else
              f"not importable ({cr['pycriu_detail']}): checkpoint images cannot be inspected",
              "" if cr["pycriu"] else f"run {INSTALL_CRIU} with --venv (protobuf >= 3.20, < 7)"))

    # -- CUDA ----------------------------------------------------------------------------------
    cu = facts["cuda"]
    gpu = cu["gpu"]
    add(Check("CUDA", "GPU", OK if gpu else WARN, describe_gpus(gpu),
              "" if gpu else "models run on CPU only (vLLM's CPU build, or the simulator)"))
    add(Check("CUDA", "driver API", OK if cu["driver_api"] else WARN, cu["driver_api_detail"]))
    add(Check("CUDA", "cuda-checkpoint", OK if cu["binary_ok"] else WARN, cu["binary_detail"],
              "" if cu["binary_ok"] or cu["driver_api"] else
              "install NVIDIA's cuda-checkpoint (github NVIDIA/cuda-checkpoint) or set checkpoint.cuda_checkpoint_path"))
    # A GPU tree must have its CUDA state suspended before a plain CRIU dump (or CRIU's CUDA plugin does it).
    need_suspend = bool(gpu) and bool(suspend_models or ckpt_models)
    users = ", ".join(suspend_models + [m for m in ckpt_models if m not in suspend_models])
    if cu["selected"]:
        add(Check("CUDA", "CUDA suspend", OK, f"llmuxd will use the {cu['selected_detail']}"))
    elif need_suspend and not cu["plugin"]:
        add(Check("CUDA", "CUDA suspend", NO, f"needed by {users} on this GPU machine; {cu['selected_detail']}",
                  "install a driver >= 570 (cuCheckpoint* in libcuda) or cuda-checkpoint", required=True))
    elif suspend_models and not gpu:
        add(Check("CUDA", "CUDA suspend", WARN, f"{', '.join(suspend_models)} use `cuda_suspend`, but there is no "
                  "NVIDIA GPU here: nothing to suspend (fine for CPU vLLM / the simulator)"))
    else:
        add(Check("CUDA", "CUDA suspend", WARN, cu["selected_detail"]))
    if cu["plugin"]:
        add(Check("CUDA", "CRIU CUDA plugin", OK, f"{cu['plugin']}: CRIU loads it from its plugin dir and "
                  "suspends CUDA itself during dumps"))
    else:
        add(Check("CUDA", "CRIU CUDA plugin", OK, f"no cuda_plugin.so in {cu['plugin_dir']}: not needed, llmuxd "
                  "suspends CUDA before the dump"))

    # -- cgroups -------------------------------------------------------------------------------
    cg = facts["cgroup"]
    if not cg["mount"]:
        add(Check("cgroups", "cgroup v2", WARN, "no cgroup2 mount: model trees are tracked by process session",
                  "mount cgroup2 (e.g. Docker --cgroupns=private, or systemd's unified hierarchy)"))
    else:
        ctl = cg["controllers"]
        ctl_s = " ".join(ctl) if ctl else "none (resource controllers are on v1)"
        add(Check("cgroups", "cgroup v2", OK, f"{cg['layout']} at {cg['mount']}; controllers: {ctl_s}"))
        add(Check("cgroups", "own cgroup", OK if cg["own"] else WARN, cg["own"] or "not in the v2 hierarchy"))
        add(Check("cgroups", "writable", OK if cg["writable"] else WARN, cg["writable_detail"],
                  "" if cg["writable"] else "run as root / with Delegate=yes; without it trees are tracked by session"))
        if cg["kill"] is not None:
            missing = [n for n, v in (("cgroup.kill", cg["kill"]), ("cgroup.freeze", cg["freeze"])) if not v]
            add(Check("cgroups", "kill/freeze", WARN if missing else OK,
                      f"missing {', '.join(missing)} (kernel < 5.14 / 5.2): kill falls back to signals, no freeze"
                      if missing else "cgroup.kill and cgroup.freeze present"))
    sd = facts["systemd"]
    if sd["invocation_id"]:
        add(Check("cgroups", "delegated", OK if cg["delegated"] else WARN, cg["delegated_detail"],
                  "" if cg["delegated"] else "set Delegate=yes in the unit"))
    elif sd["unit"] and sd["unit"].get("LoadState") == "loaded":
        d = sd["unit"].get("Delegate") == "yes"
        add(Check("cgroups", "delegated", OK if d else WARN, f"llmuxd.service: Delegate={sd['unit'].get('Delegate')}",
                  "" if d else "set Delegate=yes in llmuxd.service"))
    else:
        add(Check("cgroups", "delegated", OK, "not under systemd: llmuxd makes llmuxd-<port> under its own cgroup"))

    # -- systemd -------------------------------------------------------------------------------
    if sd["booted"]:
        add(Check("systemd", "PID 1", OK, f"systemd ({sd['pid1']})"))
    else:
        add(Check("systemd", "PID 1", WARN, f"{sd['pid1']}, not systemd: llmuxd runs standalone (no unit, "
                  "watchdog or journal; fine as a container entrypoint)"))
    add(Check("systemd", "unit", OK, f"running under a unit (INVOCATION_ID={sd['invocation_id']})"
              if sd["invocation_id"] else "not started by systemd (normal for an interactive run)"))
    if sd["unit"] is not None and not sd["invocation_id"]:
        u = sd["unit"]
        add(Check("systemd", "llmuxd.service", OK if u.get("LoadState") == "loaded" else WARN,
                  f"LoadState={u.get('LoadState')} ActiveState={u.get('ActiveState')}",
                  "" if u.get("LoadState") == "loaded" else "packaging/install.sh installs it"))
    add(Check("systemd", "NOTIFY_SOCKET", OK, f"{sd['notify_socket']}: sd_notify on" if sd["notify_socket"]
              else "unset: sd_notify off"))

    # -- D-Bus ---------------------------------------------------------------------------------
    db = facts["dbus"]
    if not db["socket"]:
        add(Check("D-Bus", "system bus", WARN, f"no socket for {db['address']}: D-Bus control is off "
                  "(HTTP /control still works)"))
    else:
        add(Check("D-Bus", "system bus", OK if db["connect"] else WARN,
                  f"{db['socket']}: {db['connect_detail']}"))
    add(Check("D-Bus", "policy", OK if db["policy"] else WARN,
              db["policy"] or f"no {DBUS_POLICY} in {' or '.join(DBUS_POLICY_DIRS)}: the bus refuses the name",
              "" if db["policy"] else f"install dbus/{DBUS_POLICY} into {DBUS_POLICY_DIRS[0]}"))

    # -- checkpoint folders ----------------------------------------------------------------------
    tr = facts.get("trust") or {"folders": {}, "key": None}
    for name, problem in tr["folders"].items():
        add(Check("checkpoints", f"folder of {name}", WARN if problem else OK,
                  problem or f"{config.checkpoint_dir_for(name)}: owned by root, not writable by others"))
    if tr["key"] is not None:
        add(Check("checkpoints", "key file", NO if tr["key"] else OK,
                  tr["key"] or f"{tr['key_file']}: checkpoints carry an HMAC-SHA256 tag"))

    # -- kernel --------------------------------------------------------------------------------
    k = facts["kernel"]
    kv = parse_version(k["release"])
    add(Check("kernel", "kernel", OK if kv and kv[:2] >= (5, 14) else WARN, k["release"]
              + ("" if kv and kv[:2] >= (5, 14) else ": < 5.14 has no cgroup.kill")))
    add(Check("kernel", "privileges", OK if k["euid"] == 0 else WARN, "root" if k["euid"] == 0 else
              f"euid {k['euid']}: CRIU and cgroup writes need root", "" if k["euid"] == 0 else "run as root"))
    use_seccomp = config.isolation.block_io_uring if config is not None else True
    sec_ok = k["seccomp"] and k["seccomp_errno"]
    add(Check("kernel", "seccomp", OK if sec_ok else WARN,
              ("available, SECCOMP_RET_ERRNO supported: the io_uring filter works"
               + (f" (this process already runs under a filter, mode {k['seccomp_mode']})" if k["seccomp_mode"] else "")
               if sec_ok else "not available: io_uring cannot be blocked, uvloop's ring makes trees undumpable")
              + ("" if use_seccomp else " (isolation.block_io_uring is off)")))
    add(Check("kernel", "child subreaper", OK if k["subreaper"] else WARN,
              "PR_SET_CHILD_SUBREAPER available: restored trees re-parent to llmuxd" if k["subreaper"]
              else "PR_GET_CHILD_SUBREAPER failed"))
    add(Check("kernel", "pid_max", OK, str(k["pid_max"])))
    use_pidns = config.isolation.pid_namespace if config is not None else True
    if k["pid_namespace"] is not None or use_pidns:
        add(Check("kernel", "PID namespace", OK if k["pid_namespace"] else WARN, k["pid_namespace_detail"]
                  + ("" if use_pidns else " (isolation.pid_namespace is off)"),
                  "" if k["pid_namespace"] else "needs CAP_SYS_ADMIN; restored PIDs may clash without it"))
    return checks


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.required and c.status == NO for c in checks) else 0


def render(checks: list[Check], config_path: str | None = None) -> str:
    lines = [f"llmuxd doctor{f' (config {config_path})' if config_path else ''}"]
    section = None
    width = max((len(c.item) for c in checks), default=10)
    for c in checks:
        if c.section != section:
            section = c.section
            lines.append(f"{section}:")
        line = f"  {c.status:<4}  {c.item:<{width}}  {c.detail}"
        if c.fix and c.status != OK:
            line += f"  -> {c.fix}"
        lines.append(line)
    failed = [c for c in checks if c.required and c.status == NO]
    if failed:
        lines.append(f"NOT READY: {len(failed)} thing(s) this configuration needs are missing: "
                     + ", ".join(f"{c.section} {c.item}" for c in failed))
    else:
        warns = sum(c.status == WARN for c in checks)
        lines.append("READY: llmuxd can run this configuration here"
                     + (f" ({warns} warning(s): parts that are off or degraded)" if warns else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------
def doctor_facts(config_path: Path | str | None = None, **gather_kw: Any) -> dict[str, Any]:
    """Everything ``llmuxd doctor`` knows, machine-readable (``--json``): ``config``, ``facts``,
    ``checks`` and ``exit_code``."""
    config, info = load_for_doctor(config_path)
    facts = gather_facts(config, **gather_kw)
    checks = assess(facts, config, info)
    return {"config": info, "facts": facts, "checks": [asdict(c) for c in checks], "exit_code": exit_code(checks)}


def run_doctor(config_path: Path | str | None = None, as_json: bool = False) -> int:
    """``llmuxd doctor [--config PATH] [--json]``: print the report; 0 if llmuxd can run the
    configuration here, 1 if something it needs is missing."""
    result = doctor_facts(config_path)
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        checks = [Check(**c) for c in result["checks"]]
        print(render(checks, result["config"]["path"]))
    sys.stdout.flush()
    return result["exit_code"]
