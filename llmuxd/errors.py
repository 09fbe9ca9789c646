"""Domain errors.  Raised by the controller; each carries what every transport needs to tell
a client about it: ``http_status`` and ``openai_type`` (``api/errors.py`` maps them to
OpenAI's error envelope), ``code`` (OpenAI's ``code``) and its class name (the D-Bus error
``io.llmux.Llmuxd1.Error.<name>``, mapped in ``api/dbus.py``).  Each transport maps them once,
at its boundary."""

from __future__ import annotations


class LlmuxdError(Exception):
    """Base of every error a client of llmuxd can be told about."""

    #: Stable machine-readable name, used as OpenAI ``code``.
    code = "internal_error"
    http_status = 500
    openai_type = "server_error"
    #: Seconds a client should wait before trying again (HTTP ``Retry-After``), or None.
    retry_after_secs: int | None = None
    #: The D-Bus error name suffix; None: the class name.
    dbus_name: str | None = None

    def __init__(self, message: str, *, model: str | None = None):
        super().__init__(message)
        self.message = message
        self.model = model


class BadRequest(LlmuxdError):
    code = "invalid_request"
    http_status = 400
    openai_type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param


class PayloadTooLarge(BadRequest):
    code = "payload_too_large"
    http_status = 413
    dbus_name = "BadRequest"


class Unauthorized(LlmuxdError):
    """No valid credentials (a missing or wrong bearer token)."""

    code = "invalid_api_key"
    http_status = 401
    openai_type = "invalid_request_error"


class Forbidden(LlmuxdError):
    """The caller is known but may not do this (e.g. control from a non-loopback peer)."""

    code = "forbidden"
    http_status = 403
    openai_type = "invalid_request_error"
    dbus_name = "AccessDenied"


class TooManyRequests(LlmuxdError):
    """The wait queue is full."""

    code = "too_many_requests"
    http_status = 429
    openai_type = "rate_limit_error"
    retry_after_secs = 5


class RequestTimeout(LlmuxdError):
    """The client did not send its request in time."""

    code = "request_timeout"
    http_status = 408
    openai_type = "invalid_request_error"


class UnknownModel(LlmuxdError):
    code = "model_not_found"
    http_status = 404
    openai_type = "invalid_request_error"

    def __init__(self, model: str, known: list[str]):
        super().__init__(f"The model '{model}' does not exist. Known models: {', '.join(sorted(known))}", model=model)
        self.param = "model"


class ModelRemoved(LlmuxdError):
    """A reload removed the model from the configuration while the request waited for it."""

    code = "model_removed"
    http_status = 404
    openai_type = "invalid_request_error"

    def __init__(self, model: str):
        super().__init__(f"The model '{model}' was removed from the configuration (reload) while this request "
                         "waited for it", model=model)
        self.param = "model"


class ConfigRefused(LlmuxdError):
    """A reload found the config file unusable; the running configuration stays in force.  The
    message says every reason, as ``llmuxd check-config`` does."""

    code = "invalid_config"
    http_status = 422
    openai_type = "invalid_request_error"


class SwitchFailed(LlmuxdError):
    """The model could not be made ready (start, wake or restore failed)."""

    code = "model_unavailable"
    http_status = 503
    retry_after_secs = 5


class QueueTimeout(LlmuxdError):
    code = "queue_timeout"
    http_status = 504
    openai_type = "timeout_error"


class BackendDied(LlmuxdError):
    """The backend went away (or stalled) while it was serving a request."""

    code = "backend_died"
    http_status = 502


class Evicted(LlmuxdError):
    """The model was taken away while a request was being served (drain deadline, shutdown)."""

    code = "model_evicted"
    http_status = 503
    retry_after_secs = 5


class TransitionFailed(LlmuxdError):
    """A control-plane transition (sleep, wake) failed; the model state says where it ended."""

    code = "transition_failed"


class NotSupported(LlmuxdError):
    code = "not_supported"
    http_status = 501


class ShuttingDown(LlmuxdError):
    code = "shutting_down"
    http_status = 503
    retry_after_secs = 10
