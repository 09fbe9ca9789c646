"""What a command prints: its result as text, or with ``--json`` as its typed contract's JSON
(and nothing else on stdout: progress lines then go to stderr); a failure as ``llmuxd:
<message>`` on stderr, and with ``--json`` also as an :class:`~.exits.ErrorReport` on stdout."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from pydantic import BaseModel

from .exits import Failure, report


def as_json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def _print_json(result: BaseModel) -> None:
    print(json.dumps(result.model_dump(mode="json", by_alias=True), indent=2))


def emit(args: argparse.Namespace, result: BaseModel, text: str | None) -> None:
    """A command's result: ``result`` as JSON with ``--json``, else ``text`` (when there is any)."""
    if as_json(args):
        _print_json(result)
    elif text:
        print(text)
    sys.stdout.flush()


def progress(args: argparse.Namespace) -> Callable[[str], None]:
    """Where a command's progress lines go: stdout, or stderr with ``--json``."""
    out = sys.stderr if as_json(args) else sys.stdout
    return lambda line: print(line, file=out, flush=True)


def fail(args: argparse.Namespace, failure: Failure) -> int:
    print(f"llmuxd: {failure.message}", file=sys.stderr)
    if as_json(args):
        _print_json(report(failure))
    sys.stdout.flush()
    return int(failure.exit)
