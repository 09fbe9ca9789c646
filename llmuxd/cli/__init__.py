"""``llmuxd`` command line: the daemon (``serve``), the commands that run here without one
(:mod:`.local`), and a client of a running daemon (:mod:`.client`).  Every command prints its
typed result as text or, with ``--json``, as JSON (:mod:`.output`); every failure gets its exit
status from one table (:mod:`.exits`), printed in ``llmuxd --help``."""

from __future__ import annotations

from .exits import Exit, failure_of
from .output import fail
from .parser import build_parser

__all__ = ["Exit", "build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # bad arguments: argparse exits with 2 (Exit.USAGE)
    try:
        return int(args.func(args))
    except Exception as e:
        failure = failure_of(e)
        if failure is None:
            raise
        return fail(args, failure)
