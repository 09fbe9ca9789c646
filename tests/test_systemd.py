"""llmuxd as a real systemd service in a booted container: systemd 252 as PID 1, the real
dbus-daemon system bus enforcing our policy file, journald, a delegated cgroup v2 tree.
Driven the three ways users drive it: systemctl, busctl, curl."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time

import httpx
import pytest

from conftest import model_entry
from harness import free_ports, wait_until
from systemd_env import ServiceContainer, require_containers

pytestmark = [pytest.mark.systemd, pytest.mark.slow]


@pytest.fixture
def service(tmp_path, hf_home, request):
    require_containers()
    created: list[ServiceContainer] = []

    def make(watchdog_sec: int = 0, extra_args=(), env: dict | None = None, **policy) -> ServiceContainer:
        p = free_ports(3)
        config = {"models": {"m1": model_entry("m1", p[1], extra=extra_args), "m2": model_entry("m2", p[2])},
                  "port": p[0], "metrics_port": 0, "host": "127.0.0.1", "vllm_command": "llmuxd-vllm-sim",
                  "policy": {"min_active_secs": 0, "startup_timeout_secs": 30, **policy}}
        sc = ServiceContainer("svc", tmp_path, config,
                              {"HF_HOME": str(hf_home), "LLMUXD_TEST_HOOKS": "1", **(env or {})},
                              binds=[(str(hf_home), str(hf_home))], watchdog_sec=watchdog_sec)
        created.append(sc)
        return sc.start()

    yield make
    for sc in created:
        sc.stop()


def test_start_ready_status_restore_unit_and_journal(service):
    s = service()
    t0 = time.monotonic()
    s.c.systemctl("start", "llmuxd", check=True)  # Type=notify: returns once READY=1 arrived
    ready_secs = time.monotonic() - t0
    print(f"systemctl start llmuxd -> active in {ready_secs:.2f} s (container booted in {s.c.boot_seconds:.2f} s)")
    # READY was sent only once HTTP and D-Bus serve: both answer the moment start returns.
    assert httpx.get(s.url + "/health", timeout=5).status_code == 200
    assert "io.llmux.Llmuxd1" in s.c.busctl("list", "--no-legend", check=True).stdout
    assert s.c.systemctl("is-active", "llmuxd").stdout.strip() == "active"
    status = s.c.systemctl("status", "llmuxd").stdout
    assert 'Status: "active: none; m1 stopped, m2 stopped"' in status, status
    # The restore unit ran first, and said what it found.
    assert s.show("llmuxd-restore", "Result") == "success"
    restore_done = int(s.show("llmuxd-restore", "ExecMainExitTimestampMonotonic"))
    daemon_started = int(s.show("llmuxd", "ExecMainStartTimestampMonotonic"))
    assert 0 < restore_done <= daemon_started
    assert "prepare-restore: 2 model(s) checked" in s.c.journal("llmuxd-restore")
    # The STATUS line follows the state.
    httpx.post(s.url + "/control/wake", json={"model": "m1"}, timeout=60)
    assert 'Status: "active: m1; m1 awake, m2 stopped"' in s.c.systemctl("status", "llmuxd").stdout
    # journald got the structured fields.
    entries = s.c.journal("llmuxd", json_output=True)
    switch = [e for e in entries if e.get("EVENT") == "switch"]
    assert switch and switch[0]["MODEL"] == "m1" and float(switch[0]["DURATION_S"]) > 0
    assert any(e.get("EVENT") == "state" and e.get("MODEL") == "m1" for e in entries)
    # The model's own output too (llmuxd forwards what its tree writes to /var/log/llmuxd/m1.log),
    # under the model's name, with MODEL= and the line's level, as an operator reads it back.
    def output(model: str) -> list[dict]:
        out = s.sh(f"journalctl --no-pager -o json MODEL={model}").stdout
        return [e for e in map(json.loads, out.splitlines()) if e.get("LLMUXD_MODEL_OUTPUT") == "1"]

    serving = wait_until(lambda: [e for e in output("m1") if "Starting vLLM API server" in e["MESSAGE"]], 15,
                         what="m1's own line in the journal")
    assert serving[0]["SYSLOG_IDENTIFIER"] == "m1" and serving[0]["PRIORITY"] == "6", serving[0]
    assert serving[0]["_SYSTEMD_UNIT"] == "llmuxd.service"
    assert any(e["MESSAGE"].startswith("--- llmuxd: starting ") for e in output("m1"))
    assert output("m2") == []  # not started: nothing of it
    # Stopping the service stops every model tree.
    assert s.procs("llmuxd-vllm-sim")
    s.c.systemctl("stop", "llmuxd", check=True)
    assert s.procs("llmuxd-vllm-sim") == []
    assert s.show("llmuxd", "Result") == "success"


def _sd(out: str) -> tuple[str, float]:
    m = re.fullmatch(r'sd "(\w+)" ([\d.e+-]+)\s*', out)
    assert m, out
    return m.group(1), float(m.group(2))


def test_dbus_http_agree_signals_and_policy(service):
    s = service()
    s.c.systemctl("start", "llmuxd", check=True)
    monitor = subprocess.Popen(["busctl", "-M", s.name, "monitor", "--json=short", "io.llmux.Llmuxd1"],
                               stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        t0 = time.monotonic()
        state, secs = _sd(s.busctl_call("Wake", "s", "m1").stdout)
        wake_rtt = time.monotonic() - t0
        assert state == "awake" and secs > 0
        st = s.status()
        assert st["active_model"] == "m1" and st["models"]["m1"]["state"] == "awake"
        assert s.c.busctl("get-property", "io.llmux.Llmuxd1", "/io/llmux/Llmuxd1", "io.llmux.Llmuxd1",
                          "ActiveModel", check=True).stdout.strip() == 's "m1"'
        inspect = s.busctl_call("Inspect").stdout
        assert inspect.startswith('sa(ssaussddss) "m1" 2 "m1" "awake"'), inspect
        pids = st["models"]["m1"]["pids"]
        assert f'"m1" "awake" {len(pids)} {" ".join(map(str, pids))} "offload" "keep_running"' in inspect
        t0 = time.monotonic()
        state, _ = _sd(s.busctl_call("Sleep", "s", "m1").stdout)
        sleep_rtt = time.monotonic() - t0
        assert state == "asleep" and s.status()["models"]["m1"]["state"] == "asleep"
        print(f"D-Bus Wake (cold start) {wake_rtt:.3f} s, Sleep {sleep_rtt:.3f} s")
        # Named errors.
        r = s.c.run(["dbus-send", "--system", "--print-reply", "--dest=io.llmux.Llmuxd1", "/io/llmux/Llmuxd1",
                     "io.llmux.Llmuxd1.Wake", "string:ghost"], check=False)
        assert r.returncode != 0 and "io.llmux.Llmuxd1.Error.UnknownModel" in r.stderr
        # The policy: others may look, not touch.
        assert s.busctl_call("Inspect", user="65534").returncode == 0
        r = s.busctl_call("Wake", "s", "m2", user="65534", check=False)
        assert r.returncode != 0 and "Access denied" in r.stderr
        r = s.busctl_call("Sleep", "s", "m1", user="65534", check=False)
        assert r.returncode != 0 and "Access denied" in r.stderr
        assert s.status()["models"]["m2"]["state"] == "stopped"
    finally:
        time.sleep(0.3)
        monitor.terminate()
        out, _ = monitor.communicate(timeout=10)
    signals = [json.loads(line) for line in out.splitlines() if line.strip()]
    changes = [m["payload"]["data"] for m in signals if m.get("member") == "ModelStateChanged"]
    assert ["m1", "stopped", "starting"] in changes and ["m1", "sleeping", "asleep"] in changes, changes
    assert any(m.get("member") == "PropertiesChanged" for m in signals)


def test_cgroup_per_model_kill9_restart_and_watchdog(service):
    s = service(watchdog_sec=3)
    s.c.systemctl("start", "llmuxd", check=True)
    for m in ("m1", "m2"):
        assert httpx.post(s.url + "/control/wake", json={"model": m}, timeout=60).status_code == 200
    st = s.status()
    base = "/sys/fs/cgroup/system.slice/llmuxd.service"
    for m in ("m1", "m2"):
        cg = st["models"][m]["cgroup"]
        assert cg == f"{base}/model-{m}"
        for pid in st["models"][m]["pids"]:
            assert s.sh(f"grep ^0:: /proc/{pid}/cgroup").stdout.strip() == f"0::/system.slice/llmuxd.service/model-{m}"
    main = int(s.show("llmuxd", "MainPID"))
    assert s.sh(f"grep ^0:: /proc/{main}/cgroup").stdout.strip() == "0::/system.slice/llmuxd.service/supervisor"
    sims = set(s.procs("llmuxd-vllm-sim"))
    assert sims
    # kill -9: systemd restarts it; the old trees are gone, never duplicated, requests work again.
    s.sh(f"kill -9 {main}")
    t0 = time.monotonic()
    while int(s.show("llmuxd", "MainPID") or 0) in (0, main) or \
            s.c.systemctl("is-active", "llmuxd").stdout.strip() != "active":
        assert time.monotonic() - t0 < 60, s.c.systemctl("status", "llmuxd").stdout
        time.sleep(0.1)
    print(f"restarted after kill -9 in {time.monotonic() - t0:.2f} s")
    assert int(s.show("llmuxd", "NRestarts")) == 1
    assert not sims & set(s.procs("llmuxd-vllm-sim"))
    r = httpx.post(s.url + "/v1/completions", json={"model": "m1", "prompt": "x"}, timeout=60)
    assert r.status_code == 200
    # One API server of m1, no duplicate (its cmdline: python .../llmuxd-vllm-sim serve ...).
    assert len(s.procs("^[^ ]*python[^ ]* [^ ]*llmuxd-vllm-sim serve")) == 1
    # A blocked event loop: the watchdog (3 s here) gets the service restarted.
    main = int(s.show("llmuxd", "MainPID"))

    def block():
        try:
            httpx.post(s.url + "/debug/block-loop", json={"seconds": 60}, timeout=90)
        except httpx.HTTPError:
            pass  # the watchdog kills the daemon while it blocks: no answer is the expected end

    threading.Thread(target=block, daemon=True).start()
    t0 = time.monotonic()
    while int(s.show("llmuxd", "NRestarts")) < 2:
        assert time.monotonic() - t0 < 30, s.c.systemctl("status", "llmuxd").stdout
        time.sleep(0.2)
    print(f"watchdog restart {time.monotonic() - t0:.2f} s after the loop blocked")
    assert "Watchdog timeout" in s.c.journal()
    s.wait_active()
    assert int(s.show("llmuxd", "MainPID")) != main
    assert httpx.post(s.url + "/v1/completions", json={"model": "m2", "prompt": "x"}, timeout=60).status_code == 200


def test_systemctl_reload(service):
    """`systemctl reload llmuxd` (ExecReload= sends SIGHUP): the config file is read again while
    the service stays active under the same main PID and the awake model keeps its process; an
    invalid file is refused (said in the journal), the unit stays active, the old config serves."""
    s = service()
    s.c.systemctl("start", "llmuxd", check=True)
    assert httpx.post(s.url + "/v1/completions", json={"model": "m1", "prompt": "x"}, timeout=60).status_code == 200
    main, pid = s.show("llmuxd", "MainPID"), s.status()["models"]["m1"]["pid"]

    def write_config(config: dict) -> None:
        s.c.run(["sh", "-c", "cat > /etc/llmux/config.json"], input=json.dumps(config, indent=2))

    def journal_says(text: str) -> None:
        t0 = time.monotonic()
        while not any(text in e.get("MESSAGE", "") for e in s.c.journal("llmuxd", json_output=True)):
            assert time.monotonic() - t0 < 60, f"no {text!r} in the journal"
            time.sleep(0.2)

    config = json.loads(json.dumps(s.config))
    config["models"]["m3"] = model_entry("m3", free_ports(1)[0])
    write_config(config)
    s.c.systemctl("reload", "llmuxd", check=True)
    journal_says("reloaded /etc/llmux/config.json")
    assert s.c.systemctl("is-active", "llmuxd").stdout.strip() == "active"
    assert s.show("llmuxd", "MainPID") == main and s.show("llmuxd", "NRestarts") == "0"
    st = s.status()
    assert st["models"]["m1"]["pid"] == pid and st["models"]["m3"]["state"] == "stopped"
    entry = next(e for e in s.c.journal("llmuxd", json_output=True) if e.get("MESSAGE", "").startswith("reloaded"))
    assert entry["EVENT"] == "reload" and "added m3" in entry["MESSAGE"], entry
    write_config({**config, "port": "not a port"})
    s.c.systemctl("reload", "llmuxd", check=True)
    journal_says("reload refused, the running configuration stays in force")
    assert s.c.systemctl("is-active", "llmuxd").stdout.strip() == "active"
    assert s.show("llmuxd", "MainPID") == main
    assert set(s.status()["models"]) == {"m1", "m2", "m3"}
    assert httpx.post(s.url + "/v1/completions", json={"model": "m3", "prompt": "x"}, timeout=60).status_code == 200


# -- hardening ------------------------------------------------------------------------------------
# The exposure scores `systemd-analyze security` (systemd 252, the test image's) gives the units,
# measured when they were hardened (docs/systemd-hardening.md): 9.6 for both before; now 7.6 for
# the daemon (CRIU rules out every seccomp-based setting there) and 1.6 for the restore unit.
# --threshold is on the 0-100 scale (7.6 is 76): a unit that gets more exposed fails here.
EXPOSURE_THRESHOLD = {"llmuxd.service": 76, "llmuxd-restore.service": 16}
# The daemon's capability bounding set (llmuxd.service's CapabilityBoundingSet=), by number.
DAEMON_CAPS = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3, "CAP_FSETID": 4,
               "CAP_NET_BIND_SERVICE": 10, "CAP_NET_ADMIN": 12, "CAP_SYS_CHROOT": 18, "CAP_SYS_ADMIN": 21,
               "CAP_SYS_NICE": 23, "CAP_SYS_RESOURCE": 24, "CAP_SYS_TIME": 25}


def _proc_status(s: ServiceContainer, pid: int) -> dict[str, str]:
    text = s.sh(f"cat /proc/{pid}/status").stdout
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def test_hardened_units_exposure_and_sandbox(service):
    s = service()
    for unit, threshold in EXPOSURE_THRESHOLD.items():
        r = s.c.run(["systemd-analyze", "security", "--no-pager", f"--threshold={threshold}", unit], check=False)
        score = re.search(r"Overall exposure level for \S+: ([\d.]+)", r.stdout)
        print(f"{unit}: {score.group(0) if score else r.stdout[-300:]}")
        assert r.returncode == 0 and score, f"{unit} is more exposed than {threshold / 10}:\n{r.stdout}{r.stderr}"
    s.c.systemctl("start", "llmuxd", check=True)
    assert httpx.post(s.url + "/control/wake", json={"model": "m1"}, timeout=60).status_code == 200
    main = int(s.show("llmuxd", "MainPID"))
    st = _proc_status(s, main)
    # No seccomp filter on the daemon: CRIU (its child) could not dump a tree otherwise.
    assert st["Seccomp"] == "0", st
    assert st["NoNewPrivs"] == "1" and st["Umask"] == "0077", st
    # (the unit's set, less what the container itself lacks: the test containers have no CAP_SYS_RESOURCE)
    within = int(_proc_status(s, 1)["CapBnd"], 16)
    assert int(st["CapBnd"], 16) == sum(1 << n for n in DAEMON_CAPS.values()) & within, st["CapBnd"]
    # The model tree runs under the same bounding set.
    tree = s.status()["models"]["m1"]["pids"]
    assert tree and all(int(_proc_status(s, p)["CapBnd"], 16) == int(st["CapBnd"], 16) for p in tree)
    # No device filter: the GPU's device nodes (/dev/nvidia*) stay reachable.
    assert s.show("llmuxd", "DevicePolicy") == "auto" and s.show("llmuxd", "DeviceAllow") == ""
    # ProtectSystem=full: /usr and /etc are read-only for the daemon and its trees.
    r = s.sh(f"nsenter -t {main} -m sh -c 'touch /etc/llmuxd-probe' 2>&1", check=False)
    assert r.returncode != 0 and "Read-only file system" in r.stdout, r.stdout
    # A model's log (which may hold what the backend prints about itself) is for root only.
    assert s.sh("stat -c %a /var/log/llmuxd/m1.log").stdout.strip() == "600"
    # The restore unit ran in its sandbox: no network, few capabilities.
    assert s.show("llmuxd-restore", "Result") == "success"
    assert s.show("llmuxd-restore", "PrivateNetwork") == "yes"
    assert s.show("llmuxd-restore", "CapabilityBoundingSet") == "cap_chown cap_dac_override cap_dac_read_search cap_fowner"


SECRET_ARG = "sekret-value-123"
SECRET_ENV = "hf_sekret-env-456"
SECRET_CREDENTIAL = "control-sekret-789"


def test_secrets_stay_out_of_logs_status_and_dbus(service):
    """A backend's --api-key, llmuxd's secret environment and its control-token credential
    appear nowhere llmuxd writes or shows: the journal (every field of every unit),
    /control/status, D-Bus Inspect, the STATUS= line, `systemctl show`, and the header llmuxd
    writes into the model's log.  The credential reaches llmuxd as a file, not in its environment."""
    s = service(extra_args=["--api-key", SECRET_ARG], env={"HF_TOKEN": SECRET_ENV})
    s.write_file("/etc/credstore/control-token", SECRET_CREDENTIAL + "\n")
    s.c.systemctl("start", "llmuxd", check=True)
    main = int(s.show("llmuxd", "MainPID"))
    assert s.sh("stat -c '%a %U' /run/credentials/llmuxd.service/control-token").stdout.split() == ["400", "root"]
    assert SECRET_CREDENTIAL not in s.sh(f"tr '\\0' '\\n' < /proc/{main}/environ").stdout
    state, _ = _sd(s.busctl_call("Wake", "s", "m1").stdout)  # cold start
    assert state == "awake"
    r = httpx.post(s.url + "/control/sleep", json={"model": "m1"}, timeout=60)
    assert r.status_code == 200 and r.json()["state"] == "asleep", r.text
    shown = {
        "/control/status": json.dumps(s.status()),
        "D-Bus Inspect": s.busctl_call("Inspect").stdout,
        "journal": json.dumps(s.c.journal(json_output=True)),
        "systemctl status": s.c.systemctl("status", "llmuxd").stdout,
        "systemctl show": s.c.systemctl("show", "llmuxd").stdout,
    }
    header = [line for line in s.sh("cat /var/log/llmuxd/m1.log").stdout.splitlines()
              if line.startswith("--- llmuxd: starting")]
    assert header and all("--api-key" not in line for line in header), header  # moved to VLLM_API_KEY
    shown["model log header"] = "\n".join(header)
    spawned = [e["MESSAGE"] for e in s.c.journal("llmuxd", json_output=True) if "spawned pid" in e.get("MESSAGE", "")]
    assert spawned and all(SECRET_ARG not in m for m in spawned), spawned
    for where, text in shown.items():
        assert SECRET_ENV not in text, f"the secret environment shows in {where}"
        assert SECRET_CREDENTIAL not in text, f"the control token shows in {where}"
        # `systemctl status` lists the backend's command line, as ps does: the key is not on it
        # (llmuxd hands it to vLLM as VLLM_API_KEY)
        assert SECRET_ARG not in text, f"the --api-key value shows in {where}"
