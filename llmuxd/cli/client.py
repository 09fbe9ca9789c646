"""``llmuxd status | wake | sleep | reload``: a client of a running daemon's control API.  The
answers are read back into the daemon's own contracts (:class:`~llmuxd.status.Status`,
:class:`~llmuxd.status.Transition`, :class:`~llmuxd.status.ReloadResult`); its errors keep their code and get their exit status from
:mod:`.exits`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ..config import DEFAULT_CONFIG_PATH, DEFAULT_STARTUP_TIMEOUT_SECS, CheckpointConfig, Config, PolicyConfig, ProcessEviction, load_config
from ..progress_view import following, running
from ..status import ReloadResult, Status, Transition
from .exits import Exit, Failure, exit_for_code
from .output import as_json, emit

#: How long ``status`` waits for an answer (the daemon answers it at once, even mid-switch).
STATUS_TIMEOUT_SECS = 10.0
#: Added to the sum of the config's timeouts a transition may run into.
MARGIN_SECS = 60.0

C = TypeVar("C", bound=BaseModel)


@dataclass
class Target:
    url: str
    config: Config | None  # None: no config file here; the defaults apply


def target(args: argparse.Namespace) -> Target:
    """Where the daemon is and what it runs: ``--url``, else the config's ``admin_host:admin_port``
    when control has its own listener, else loopback on the config's ``port``.  No readable file
    at the default config path means the defaults; an invalid config is an error (exit 2)."""
    path = args.config
    config = None if path == DEFAULT_CONFIG_PATH and not os.access(path, os.R_OK) else load_config(path)
    if args.url:
        return Target(args.url.rstrip("/"), config)
    if config is None:
        return Target(f"http://127.0.0.1:{Config.model_fields['port'].default}", None)
    if config.admin_port:
        host = "127.0.0.1" if config.admin_host in ("", "0.0.0.0") else config.admin_host
        return Target(f"http://{f'[{host}]' if ':' in host else host}:{config.admin_port}", config)
    return Target(f"http://127.0.0.1:{config.port}", config)


def transition_timeout(config: Config | None) -> float:
    """How long ``wake``/``sleep`` wait for the daemon by default: the longest a transition can
    run into with this config — the awake model's drain, a checkpoint dump and a restore that
    fails (when a model checkpoints), then a cold start — plus a margin."""
    policy = config.policy if config is not None else PolicyConfig()
    ckpt = (config.checkpoint if config is not None else None) or CheckpointConfig()
    startup = (max(config.startup_timeout_for(n) for n in config.models) if config is not None and config.models
               else DEFAULT_STARTUP_TIMEOUT_SECS)
    secs = policy.drain_timeout_secs + startup + MARGIN_SECS
    if config is None or any(config.eviction_for(n).process is ProcessEviction.CHECKPOINT for n in config.models):
        secs += ckpt.dump_timeout_secs + ckpt.restore_timeout_secs
    return secs


def _headers() -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    token = os.environ.get("LLMUXD_CONTROL_TOKEN")  # needed for a daemon that is not on loopback
    if token:
        headers["Authorization"] = f"Bearer {token.strip()}"
    return headers


def call(where: Target, method: str, path: str, body: dict | None, timeout: float) -> Any:
    """One control API call: its JSON answer, or a Failure with the daemon's code and message."""
    data = json.dumps(body).encode() if body is not None else None
    try:
        req = urllib.request.Request(where.url + path, data=data, method=method, headers=_headers())
    except ValueError as e:
        raise Failure(f"bad daemon URL {where.url!r}: {e}", Exit.USAGE, "bad_url") from None
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:
        try:
            err = json.loads(e.read())["error"]
            msg, code = str(err["message"]), str(err.get("code") or "failed")
        except Exception:  # noqa: BLE001 - not llmuxd's envelope
            msg, code = str(e.reason), "failed"
        raise Failure(f"{method} {path} failed ({e.code}): {msg}", exit_for_code(code), code) from None
    except TimeoutError:  # connected, but no answer in time (a connect timeout is a URLError)
        goes_on = f"; the {path.rsplit('/', 1)[1]} goes on in the daemon (see `llmuxd status`)" if body else ""
        raise Failure(f"no answer from the daemon at {where.url} within {timeout:g} s{goes_on}", Exit.TIMEOUT,
                      "client_timeout") from None
    except (urllib.error.URLError, OSError) as e:
        raise Failure(f"cannot reach the daemon at {where.url}: {getattr(e, 'reason', e)}", Exit.UNREACHABLE,
                      "daemon_unreachable") from None
    try:
        return json.loads(raw)
    except ValueError:
        raise Failure(f"the daemon at {where.url} did not answer {method} {path} with JSON", Exit.FAILED,
                      "unexpected_answer") from None


def _read(contract: type[C], data: Any, where: Target) -> C:
    try:
        return contract.model_validate(data)
    except ValidationError as e:
        raise Failure(f"the daemon at {where.url} answered something else than a {contract.__name__}: "
                      f"{e.error_count()} problem(s), first: {e.errors()[0]['msg']}", Exit.FAILED,
                      "unexpected_answer") from None


def _fmt_secs(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}s"


def render_status(status: Status) -> str:
    sw = status.switching
    lines = [f"active: {status.active_model or '-'}   queue: {status.queue_depth}"
             + (f"   switching: {sw.from_ or '-'} -> {sw.to}" if sw else "")]
    rows = [("MODEL", "STATE", "EVICTION", "PORT", "PIDS", "IN-FLIGHT", "LAST WAKE", "LAST SLEEP")]
    for name, m in status.models.items():
        wake = _fmt_secs(m.last_wake_secs) + (f" ({m.last_wake_kind})" if m.last_wake_kind else "")
        rows.append((name, m.state, f"{m.eviction.weights}+{m.eviction.process}", str(m.port),
                     ",".join(map(str, m.pids)) or "-", str(m.in_flight), wake, _fmt_secs(m.last_sleep_secs)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines += [running(name, m.progress) for name, m in status.models.items() if m.progress]
    lines += [f"{name}: last error: {m.last_error}" for name, m in status.models.items() if m.last_error]
    return "\n".join(lines)


def render_transition(result: Transition) -> str:
    return f"{result.model}: {result.state} ({result.duration_secs:.3f} s)" + (
        f"\n{result.model}: {result.last_error}" if result.last_error else "")


def cmd_status(args: argparse.Namespace) -> int:
    where = target(args)
    data = call(where, "GET", "/control/status", None, args.timeout or STATUS_TIMEOUT_SECS)
    status = _read(Status, data, where)
    emit(args, status, render_status(status))
    return Exit.OK


def cmd_transition(args: argparse.Namespace) -> int:
    """``wake MODEL`` / ``sleep MODEL``: returns when the transition is done."""
    where = target(args)
    timeout = args.timeout or transition_timeout(where.config)

    def events():  # the daemon's transitions, live, shown on stderr while the call runs
        req = urllib.request.Request(where.url + "/control/events", headers=_headers())
        return urllib.request.urlopen(req, timeout=timeout)

    with following(events, lambda: call(where, "GET", "/control/status", None, STATUS_TIMEOUT_SECS)["event_seq"],
                   sys.stderr, enabled=not as_json(args)):
        data = call(where, "POST", f"/control/{args.command}", {"model": args.model}, timeout)
    result = _read(Transition, data, where)
    emit(args, result, render_transition(result))
    return Exit.OK


def cmd_reload(args: argparse.Namespace) -> int:
    """``reload``: the daemon reads its config file again; returns when it is applied (or refused)."""
    where = target(args)
    data = call(where, "POST", "/control/reload", {}, args.timeout or transition_timeout(where.config))
    result = _read(ReloadResult, data, where)
    emit(args, result, f"reloaded {result.config_path} in {result.duration_secs:.3f} s: {result.summary()}")
    return Exit.OK
