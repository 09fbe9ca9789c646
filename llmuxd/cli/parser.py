"""The ``llmuxd`` command line: every command, its arguments, and the exit statuses in the
help's epilog."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import __version__
from ..config import DEFAULT_CONFIG_PATH
from . import client, local
from .exits import MEANING


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text}: not a positive number of seconds")
    return value


def _epilog() -> str:
    return "exit status:\n" + "\n".join(f"  {int(code)}  {text}" for code, text in MEANING.items())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmuxd", description="Multiplex vLLM model servers on one GPU behind one port.",
                                epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-V", "--version", action="version", version=f"llmuxd {__version__}",
                   help="print llmuxd's version and exit")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH,
                        help=f"config file (default {DEFAULT_CONFIG_PATH})")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print the result as JSON (errors too, on stdout)")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, func, help: str, parents=(common, as_json)) -> argparse.ArgumentParser:
        cp = sub.add_parser(name, parents=list(parents), help=help, description=help[:1].upper() + help[1:] + ".",
                            epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
        cp.set_defaults(func=func)
        return cp

    s = command("serve", local.cmd_serve, "run the daemon in the foreground (logs to stderr)", parents=(common,))
    s.add_argument("--host", help="listen address (default: config's host)")
    s.add_argument("--port", type=int, help="listen port (default: config's port)")
    s.add_argument("--log-level", default="INFO")
    s.add_argument("--dbus", default="auto", metavar="auto|system|session|off|ADDRESS",
                   help="D-Bus control: auto = the system bus when there is one (default)")
    s.add_argument("--checkpoint-on-stop", action="store_true",
                   help="on stop, checkpoint models whose process eviction is `checkpoint`")

    def client_command(name: str, func, help: str) -> argparse.ArgumentParser:
        cp = command(name, func, help)
        cp.add_argument("--url", help="the daemon's control API (default: from the config: admin_port, else port, "
                                      "on loopback)")
        cp.add_argument("--timeout", type=_seconds, metavar="SECS",
                        help=f"how long to wait for the answer (default: {client.STATUS_TIMEOUT_SECS:g} s for status; "
                             "for wake and sleep the longest a transition can take with the config's timeouts "
                             f"(startup, drain, dump, restore) plus {client.MARGIN_SECS:g} s)")
        return cp

    client_command("status", client.cmd_status, "show the running daemon's models")
    for verb, help in (("wake", "make a model the awake one; returns when done"),
                       ("sleep", "evict a model per its policy; returns when done")):
        client_command(verb, client.cmd_transition, help).add_argument("model", help="a model of the config")
    client_command("reload", client.cmd_reload, "have the daemon read its config file again and apply it "
                                                "without a restart; returns when done")

    k = command("checkpoint", local.cmd_checkpoint, "start MODEL if needed, warm it up, checkpoint it (CRIU), exit")
    k.add_argument("model")
    k = command("restore", local.cmd_restore, "restore MODEL from its checkpoint and serve it")
    k.add_argument("model")
    k.add_argument("--detached", action="store_true", help="leave it running and exit (a later `serve` adopts it)")
    k = command("inspect-checkpoint", local.cmd_inspect_checkpoint,
                "what a checkpoint needs, what it saved, what this container lacks", parents=(as_json,))
    k.add_argument("path", type=Path)
    k.add_argument("--verify-images", action="store_true", help="also check every image's BLAKE3 digest")
    k.add_argument("--key-file", type=Path, help="check the checkpoint's tag with this key (checkpoint.key_file)")
    k = command("validate", local.cmd_validate,
                "sleep/wake cycles of MODEL under each eviction policy: timings, memory, answers")
    k.add_argument("model")
    from ..commands.validate import DEFAULT_POLICIES

    k.add_argument("--policies", default=DEFAULT_POLICIES,
                   help=f"comma-separated WEIGHTS+PROCESS (default {DEFAULT_POLICIES})")
    k.add_argument("--cycles", type=int, default=2)
    command("doctor", local.cmd_doctor, "what this machine can and cannot do for llmuxd")
    command("prepare-restore", local.cmd_prepare_restore,
            "before the daemon starts: check the config and checkpoints, prepare what a restore needs")
    command("check-config", local.cmd_check_config, "validate the config file and print what it says")
    return p
