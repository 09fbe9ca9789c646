"""Log set-up shared by the simulator's processes: plain lines on stdout, like vLLM."""

from __future__ import annotations

import logging
import sys


def setup_logging() -> None:
    """Log INFO and above to stdout with vLLM-like line prefixes."""
    try:
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    except (AttributeError, ValueError):
        pass
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(
        "%(levelname)s %(asctime)s [%(processName)s pid=%(process)d %(filename)s:%(lineno)d] "
        "%(message)s", datefmt="%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
