"""``llmuxd`` command line: the daemon (``serve``) and a client for a running daemon."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from .config import DEFAULT_CONFIG_PATH, ConfigError, load_config


def _daemon_url(args: argparse.Namespace) -> str:
    """The control API's address: ``--url``, else the config's ``admin_host:admin_port`` when
    control has its own listener, else loopback on the config's ``port``."""
    if args.url:
        return args.url.rstrip("/")
    try:
        config = load_config(args.config)
    except ConfigError:
        return "http://127.0.0.1:3000"
    if config.admin_port:
        host = "127.0.0.1" if config.admin_host in ("", "0.0.0.0") else config.admin_host
        return f"http://{f'[{host}]' if ':' in host else host}:{config.admin_port}"
    return f"http://127.0.0.1:{config.port}"


def _call(args: argparse.Namespace, method: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    token = os.environ.get("LLMUXD_CONTROL_TOKEN")  # needed for a daemon that is not on loopback
    if token:
        headers["Authorization"] = f"Bearer {token.strip()}"
    req = urllib.request.Request(_daemon_url(args) + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read())["error"]["message"]
        except Exception:  # noqa: BLE001
            msg = e.reason
        raise SystemExit(f"llmuxd: {method} {path} failed ({e.code}): {msg}") from None
    except (urllib.error.URLError, OSError) as e:
        raise SystemExit(f"llmuxd: cannot reach the daemon at {_daemon_url(args)}: {getattr(e, 'reason', e)}") from None


def _fmt_secs(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}s"


def print_status(status: dict) -> None:
    sw = status.get("switching")
    print(f"active: {status['active_model'] or '-'}   queue: {status['queue_depth']}"
          + (f"   switching: {sw['from'] or '-'} -> {sw['to']}" if sw else ""))
    rows = [("MODEL", "STATE", "EVICTION", "PORT", "PIDS", "IN-FLIGHT", "LAST WAKE", "LAST SLEEP")]
    for name, m in status["models"].items():
        ev = f"{m['eviction']['weights']}+{m['eviction']['process']}"
        wake = _fmt_secs(m["last_wake_secs"]) + (f" ({m['last_wake_kind']})" if m.get("last_wake_kind") else "")
        rows.append((name, m["state"], ev, str(m["port"]), ",".join(map(str, m["pids"])) or "-",
                     str(m["in_flight"]), wake, _fmt_secs(m["last_sleep_secs"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    for name, m in status["models"].items():
        if m.get("last_error"):
            print(f"{name}: last error: {m['last_error']}")


def _load(args: argparse.Namespace):
    """The config, or None after printing every problem (exit code 2)."""
    try:
        return load_config(args.config)
    except ConfigError as e:
        print(e.render(), file=sys.stderr)
        return None


def cmd_serve(args: argparse.Namespace) -> int:
    from .api.dbus import DbusStartError
    from .daemon import serve
    from .log import setup_logging
    from .reload import ConfigSource

    if (config := _load(args)) is None:
        return 2
    updates = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if updates:
        config = config.model_copy(update=updates)
    setup_logging(args.log_level)
    try:
        asyncio.run(serve(config, dbus=args.dbus, checkpoint_on_stop=args.checkpoint_on_stop,
                          source=ConfigSource(args.config, updates)))
    except (OSError, DbusStartError) as e:
        print(f"llmuxd: cannot serve: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    if (config := _load(args)) is None:
        return 2
    print(f"{args.config}: ok, {len(config.models)} model(s)")
    for n in config.models:
        print(f"  {n}: {config.models[n].model_path} on port {config.models[n].port}, eviction {config.eviction_for(n)}")
    for note in config.ignored_settings():
        print(f"  note: {note}")
    return 0


def cmd_prepare_restore(args: argparse.Namespace) -> int:
    from .commands.prepare_restore import prepare_restore

    return prepare_restore(args.config)


def _run_checkpoint_command(args: argparse.Namespace, coro_fn) -> int:
    from .commands import CommandError
    from .log import setup_logging

    if (config := _load(args)) is None:
        return 2
    setup_logging("WARNING")
    try:
        return asyncio.run(coro_fn(config))
    except CommandError as e:
        print(f"llmuxd: {e}", file=sys.stderr)
        return 1


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from .commands.checkpoint import checkpoint_model

    return _run_checkpoint_command(args, lambda c: checkpoint_model(c, args.model))


def cmd_restore(args: argparse.Namespace) -> int:
    from .commands.restore import restore_model

    return _run_checkpoint_command(args, lambda c: restore_model(c, args.model, args.detached))


def cmd_inspect_checkpoint(args: argparse.Namespace) -> int:
    from .commands import CommandError
    from .commands.inspect_checkpoint import inspect_checkpoint

    try:
        return inspect_checkpoint(args.path, args.verify_images, args.key_file)
    except CommandError as e:
        print(f"llmuxd: {e}", file=sys.stderr)
        return 1


def cmd_validate(args: argparse.Namespace) -> int:
    from .commands.validate import print_table, validate

    async def go(config):
        if args.model not in config.models:
            from .commands import CommandError

            raise CommandError(f"unknown model {args.model!r}; known: {', '.join(config.models)}")
        rows = await validate(config, args.model, args.policies.split(","), args.cycles)
        return 0 if print_table(args.model, rows) else 1

    return _run_checkpoint_command(args, go)


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import run_doctor

    return run_doctor(args.config, as_json=args.json)


def cmd_status(args: argparse.Namespace) -> int:
    status = _call(args, "GET", "/control/status")
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print_status(status)
    return 0


def cmd_transition(args: argparse.Namespace) -> int:
    result = _call(args, "POST", f"/control/{args.command}", {"model": args.model})
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['model']}: {result['state']} ({result['duration_secs']:.3f} s)")
        if result.get("last_error"):
            print(f"{result['model']}: {result['last_error']}")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    from .status import ReloadResult

    result = _call(args, "POST", "/control/reload")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        r = ReloadResult.model_validate(result)
        print(f"reloaded {r.config_path} in {r.duration_secs:.3f} s: {r.summary()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmuxd", description="Multiplex vLLM model servers on one GPU behind one port.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH,
                        help=f"config file (default {DEFAULT_CONFIG_PATH})")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", parents=[common], help="run the daemon in the foreground (logs to stderr)")
    s.add_argument("--host", help="listen address (default: config's host)")
    s.add_argument("--port", type=int, help="listen port (default: config's port)")
    s.add_argument("--log-level", default="INFO")
    s.add_argument("--dbus", default="auto", metavar="auto|system|session|off|ADDRESS",
                   help="D-Bus control: auto = the system bus when there is one (default)")
    s.add_argument("--checkpoint-on-stop", action="store_true",
                   help="on stop, checkpoint models whose process eviction is `checkpoint`")
    s.set_defaults(func=cmd_serve)

    k = sub.add_parser("checkpoint", parents=[common],
                       help="start MODEL if needed, warm it up, checkpoint it (CRIU), exit")
    k.add_argument("model")
    k.set_defaults(func=cmd_checkpoint)
    k = sub.add_parser("restore", parents=[common], help="restore MODEL from its checkpoint and serve it")
    k.add_argument("model")
    k.add_argument("--detached", action="store_true", help="leave it running and exit (a later `serve` adopts it)")
    k.set_defaults(func=cmd_restore)
    k = sub.add_parser("inspect-checkpoint", help="what a checkpoint needs, what it saved, what this container lacks")
    k.add_argument("path", type=Path)
    k.add_argument("--verify-images", action="store_true", help="also check every image's BLAKE3 digest")
    k.add_argument("--key-file", type=Path, help="check the checkpoint's tag with this key (checkpoint.key_file)")
    k.set_defaults(func=cmd_inspect_checkpoint)
    k = sub.add_parser("validate", parents=[common],
                       help="sleep/wake cycles of MODEL under each eviction policy: timings, memory, answers")
    k.add_argument("model")
    from .commands.validate import DEFAULT_POLICIES

    k.add_argument("--policies", default=DEFAULT_POLICIES, help=f"comma-separated WEIGHTS+PROCESS (default {DEFAULT_POLICIES})")
    k.add_argument("--cycles", type=int, default=2)
    k.set_defaults(func=cmd_validate)
    k = sub.add_parser("doctor", parents=[common], help="what this machine can and cannot do for llmuxd")
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=cmd_doctor)

    r = sub.add_parser("prepare-restore", parents=[common],
                       help="before the daemon starts: check the config and checkpoints, prepare what a restore needs")
    r.set_defaults(func=cmd_prepare_restore)

    c = sub.add_parser("check-config", parents=[common], help="validate the config file and print what it says")
    c.set_defaults(func=cmd_check_config)

    def client(name: str, help: str, func, model: bool = False) -> None:
        cp = sub.add_parser(name, parents=[common], help=help)
        if model:
            cp.add_argument("model")
        cp.add_argument("--url", help="daemon URL (default: http://127.0.0.1:<config port>)")
        cp.add_argument("--json", action="store_true", help="print the raw JSON answer")
        cp.add_argument("--timeout", type=float, default=3600)
        cp.set_defaults(func=func)

    client("status", "show the running daemon's models", cmd_status)
    client("sleep", "evict a model per its policy; returns when done", cmd_transition, model=True)
    client("wake", "make a model the awake one; returns when done", cmd_transition, model=True)
    client("reload", "have the daemon re-read its config file and apply it", cmd_reload)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
