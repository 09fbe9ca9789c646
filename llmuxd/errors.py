"""Domain errors.  Raised by the controller; each transport maps them once at its boundary
(``api/errors.py`` to OpenAI's error envelope, ``api/dbus.py`` to named D-Bus errors)."""

from __future__ import annotations


class LlmuxdError(Exception):
    """Base of every error a client of llmuxd can be told about."""

    #: Stable machine-readable name, used as OpenAI ``code`` and D-Bus error suffix.
    code = "internal_error"

    def __init__(self, message: str, *, model: str | None = None):
        super().__init__(message)
        self.message = message
        self.model = model


class BadRequest(LlmuxdError):
    code = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param


class PayloadTooLarge(LlmuxdError):
    code = "payload_too_large"


class UnknownModel(LlmuxdError):
    code = "model_not_found"

    def __init__(self, model: str, known: list[str]):
        super().__init__(f"The model '{model}' does not exist. Known models: {', '.join(sorted(known))}", model=model)


class SwitchFailed(LlmuxdError):
    """The model could not be made ready (start, wake or restore failed)."""

    code = "model_unavailable"
    retry_after_secs = 5


class QueueTimeout(LlmuxdError):
    code = "queue_timeout"


class BackendDied(LlmuxdError):
    """The backend went away while it was serving a request."""

    code = "backend_died"


class TransitionFailed(LlmuxdError):
    """A control-plane transition (sleep, wake) failed; the model state says where it ended."""

    code = "transition_failed"


class NotSupported(LlmuxdError):
    code = "not_supported"


class ShuttingDown(LlmuxdError):
    code = "shutting_down"
    retry_after_secs = 10
