"""The offline commands: what ``llmuxd`` does without a running daemon, one module per command
(``checkpoint``, ``restore``, ``inspect-checkpoint``, ``validate``, ``prepare-restore``), and
:mod:`.standalone`, a model run outside the daemon for them.

This package sits beside ``cli.py`` at the top: it may import anything below it (model,
daemon, checkpoint, cuda, isolation, config); nothing below imports it."""


class CommandError(Exception):
    """A command cannot go on; the CLI prints ``llmuxd: <message>`` and exits 1."""
