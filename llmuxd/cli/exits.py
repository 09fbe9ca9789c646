"""What ``llmuxd`` exits with, and the one mapping of every failure to it.

A command either returns an :class:`Exit` or raises; :func:`failure_of` turns whatever it
raised (a domain error from the daemon or from the model code, a config error, a command's
own error) into a :class:`Failure`: the message, the exit status and a stable ``code``, which
``--json`` prints as an :class:`ErrorReport`."""

from __future__ import annotations

from enum import IntEnum

from pydantic import BaseModel

from ..commands import CommandError
from ..config import ConfigError
from ..errors import BadRequest, ConfigRefused, LlmuxdError, ModelRemoved, QueueTimeout, UnknownModel


class Exit(IntEnum):
    OK = 0
    FAILED = 1  # the operation failed (the daemon or the command says why), or doctor: not ready
    USAGE = 2  # bad usage: arguments, request, or an invalid config file
    UNREACHABLE = 3  # no daemon answers at the control address
    UNKNOWN_MODEL = 4  # the model is not in the config
    TIMEOUT = 5  # no answer within --timeout (the daemon goes on), or the daemon timed out (QueueTimeout)


#: One line per exit status, for ``llmuxd --help`` and the README.
MEANING = {
    Exit.OK: "done",
    Exit.FAILED: "the operation failed (the message says why); doctor: something required is missing",
    Exit.USAGE: "bad usage: wrong arguments, a bad request, an invalid config file",
    Exit.UNREACHABLE: "no llmuxd answers at the control address",
    Exit.UNKNOWN_MODEL: "no such model in the config",
    Exit.TIMEOUT: "no answer in time: --timeout passed (the transition goes on in the daemon)",
}

#: Domain errors with an exit status of their own (subclasses included); the rest: FAILED.
_DOMAIN = ((UnknownModel, Exit.UNKNOWN_MODEL), (QueueTimeout, Exit.TIMEOUT), (BadRequest, Exit.USAGE),
           (ConfigRefused, Exit.USAGE), (ModelRemoved, Exit.UNKNOWN_MODEL))


class Failure(Exception):
    """A command failed: ``llmuxd: <message>`` on stderr, ``exit`` as the exit status."""

    def __init__(self, message: str, exit: Exit = Exit.FAILED, code: str = "failed",
                 problems: list[str] | None = None):
        super().__init__(message)
        self.message = message
        self.exit = exit
        self.code = code
        self.problems = problems or []


class ErrorBody(BaseModel):
    message: str
    code: str  # the daemon's error code (OpenAI's ``code``) or the CLI's own
    exit_code: int
    problems: list[str] = []  # an invalid config: one line per problem


class ErrorReport(BaseModel):
    """What ``--json`` prints on stdout when a command fails."""

    error: ErrorBody


def _domain_classes(cls: type[LlmuxdError] = LlmuxdError) -> list[type[LlmuxdError]]:
    return [cls] + [c for sub in cls.__subclasses__() for c in _domain_classes(sub)]


def exit_for(error: type[LlmuxdError]) -> Exit:
    return next((status for cls, status in _DOMAIN if issubclass(error, cls)), Exit.FAILED)


def exit_for_code(code: str | None) -> Exit:
    """The exit status for a daemon's error ``code`` (its JSON envelope's ``error.code``)."""
    cls = next((c for c in _domain_classes() if c.code == code), None)
    return exit_for(cls) if cls is not None else Exit.FAILED


def failure_of(exc: BaseException) -> Failure | None:
    """The Failure a raised exception means, or None when it is not one of ours (a bug)."""
    if isinstance(exc, Failure):
        return exc
    if isinstance(exc, LlmuxdError):
        return Failure(exc.message, exit_for(type(exc)), exc.code)
    if isinstance(exc, ConfigError):
        return Failure(exc.render(), Exit.USAGE, "invalid_config", exc.problems)
    if isinstance(exc, CommandError):
        return Failure(str(exc))
    return None


def report(failure: Failure) -> ErrorReport:
    return ErrorReport(error=ErrorBody(message=failure.message, code=failure.code, exit_code=int(failure.exit),
                                       problems=failure.problems))
