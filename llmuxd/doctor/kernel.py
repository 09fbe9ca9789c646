"""CRIU and the kernel: the CRIU binary, its version, ``criu check``, the network lock and
pycriu; the kernel release, privileges, seccomp, the child subreaper, pid_max and PID
namespaces.  The facts (:func:`criu_facts`, :func:`kernel_facts`) and their judgement
(:func:`criu_checks`, :func:`kernel_checks`, pure)."""

from __future__ import annotations

import ctypes
import importlib
import os
import platform
import re
import shutil
from typing import Any

from ..checkpoint.criu import criu_has_nftables, kernel_has_nf_tables, network_lock_method
from ..config import Config
from .probe import first_problem_line, parse_version, read, resolve, run, vstr
from .report import NO, OK, WARN, Check

CRIU_MIN = (4, 2)
INSTALL_CRIU = "packaging/install-criu.sh (CRIU 4.2.x from Debian forky in its own root)"


def criu_version_verdict(version: tuple[int, ...] | None, kernel: tuple[int, ...] | None) -> tuple[str, str]:
    """(OK|NO, explanation) for a CRIU version on a kernel: llmuxd needs CRIU >= 4.2."""
    if version is None:
        return NO, "cannot tell its version (`criu --version` printed no version)"
    if version[:2] >= CRIU_MIN:
        return OK, f"{vstr(version)} (>= 4.2 required)"
    if version[0] < 4:
        return NO, (f"{vstr(version)}: CRIU 3.x (Debian 12 ships 3.17) does not start on current kernels "
                    "(`vdso: Unexpected rt vDSO area bounds`); llmuxd needs >= 4.2")
    tcp = kernel is not None and kernel[:2] >= (6, 16)
    return NO, (f"{vstr(version)}: CRIU 4.0/4.1 cannot dump any process holding a TCP socket on kernel >= 6.16 "
                f"(`Can't get 1:16 opt`, fixed in 4.2){'; this kernel is ' + vstr(kernel) if tcp else ''}"
                "; every vLLM tree holds TCP sockets; llmuxd needs >= 4.2")


def criu_facts(criu_path: str = "criu") -> dict[str, Any]:
    kernel = parse_version(platform.release())
    f: dict[str, Any] = {"requested": criu_path, "path": None, "version": None, "version_ok": False,
                         "version_detail": "", "check_ok": False, "check_detail": "", "nftables": False,
                         "iptables": shutil.which("iptables-restore"), "network_lock": "skip",
                         "network_lock_detail": "no CRIU",
                         "pycriu": False, "pycriu_detail": ""}
    path = resolve(criu_path, ("/usr/local/bin/criu", "/usr/sbin/criu") if criu_path == "criu" else ())
    f["path"] = path
    if path:
        rc, out = run([path, "--version"], timeout=15)
        version = parse_version(out) if rc == 0 else None
        f["version"] = vstr(version) if version else None
        status, f["version_detail"] = criu_version_verdict(version, kernel)
        if rc != 0:
            f["version_detail"] = f"`{path} --version` failed: {first_problem_line(out)}"
        f["version_ok"] = status == OK
        rc, out = run([path, "check"], timeout=60)
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
    status = read("/proc/self/status") or ""
    seccomp = re.search(r"^Seccomp:\s*(\d+)", status, re.M)
    actions = (read("/proc/sys/kernel/seccomp/actions_avail") or "").split()
    pid_max = (read("/proc/sys/kernel/pid_max") or "").strip()
    f: dict[str, Any] = {"release": platform.release(), "version": vstr(parse_version(platform.release())),
                         "euid": os.geteuid(), "seccomp": seccomp is not None,
                         "seccomp_mode": int(seccomp.group(1)) if seccomp else None,
                         "seccomp_errno": "errno" in actions, "subreaper": _prctl_get_child_subreaper(),
                         "pid_max": int(pid_max) if pid_max.isdigit() else None, "pid_namespace": None,
                         "pid_namespace_detail": ""}
    if shutil.which("unshare"):
        rc, out = run(["unshare", "--pid", "--fork", "true"], timeout=10)
        f["pid_namespace"] = rc == 0
        f["pid_namespace_detail"] = "unshare --pid works" if rc == 0 else first_problem_line(out)
    else:
        f["pid_namespace_detail"] = "no `unshare` to try it with"
    return f


def criu_checks(facts: dict[str, Any], ckpt_models: list[str]) -> list[Check]:
    """The CRIU lines; a NO is required when some model (``ckpt_models``) checkpoints."""
    checks: list[Check] = []
    add = checks.append
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
    return checks


def kernel_checks(facts: dict[str, Any], config: Config | None) -> list[Check]:
    """The kernel lines, with what the config's isolation settings turn off."""
    checks: list[Check] = []
    add = checks.append
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
