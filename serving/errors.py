"""The server's own error answers, and ``clip`` for anything a client supplied that goes into a message.

The three errors subclass grpc_interceptor's status exceptions, so kserve's gRPC
interceptor answers them with their status code and message as they are;
``serving.rest`` maps them to HTTP statuses. None of them is logged per
request by the handlers: under overload that would be one log line per
rejected request (the metrics count them instead).
"""

from __future__ import annotations

import uuid
from typing import Any

from grpc_interceptor import exceptions as grpc_errors
from kserve.errors import ModelNotReady

#: Longest user-supplied text (names, shapes, values) quoted in an error body or a log line.
CLIP_CHARS = 200


def clip(value: Any, limit: int = CLIP_CHARS) -> str:
    """``value`` as one line of at most ``limit`` characters (strings quoted, control characters escaped).

    Long lists are cut before they are turned into text, so a million-element shape costs nothing.
    """
    if isinstance(value, (list, tuple)):
        head = ", ".join(clip(v, 40) for v in value[:16])
        text = f"[{head}{', ...' if len(value) > 16 else ''}]"
        total = len(value)
    elif isinstance(value, (str, bytes)):
        text, total = repr(value[: limit + 1]), len(value)
    else:
        text = repr(value)
        total = len(text)
    if len(text) > limit:
        return f"{text[:limit]}...({total} {'items' if isinstance(value, (list, tuple)) else 'chars'})"
    return text


def one_line(text: str, limit: int = CLIP_CHARS) -> str:
    """Free text (an exception's message) as one line of at most ``limit`` characters, unquoted."""
    flat = "".join(c if c.isprintable() else " " for c in text[: limit + 1]).strip()
    return f"{flat[:limit]}...({len(text)} chars)" if len(text) > limit else flat


def safe_id(request_id: str | None) -> str | None:
    """``request_id`` if it can be quoted in a message and grepped in the log as is, else None."""
    if request_id and len(request_id) <= 128 and request_id.isprintable() and not any(c.isspace() for c in request_id):
        return request_id
    return None


def new_id() -> str:
    return str(uuid.uuid4())


class Overloaded(grpc_errors.Unavailable):
    """Admission refused the request: 503 with Retry-After (REST), UNAVAILABLE (gRPC)."""

    def __init__(self, what: str, reason: str, retry_after_s: int):
        self.reason = reason  # the metric label
        self.retry_after_s = retry_after_s
        super().__init__(
            f"server is overloaded: {what}; retry in {retry_after_s} s or send the request to another replica"
        )


class DeadlineExceeded(grpc_errors.DeadlineExceeded):
    """The request's deadline passed before it was answered: 504 (REST), DEADLINE_EXCEEDED (gRPC)."""

    def __init__(self, deadline_s: float, where: str):
        super().__init__(
            f"the request's deadline of {deadline_s:.3g} s passed {where}; its remaining work was "
            "dropped (the deadline is the server's --deadline_ms, or less if the client set one)"
        )


class InternalError(grpc_errors.Internal):
    """Something failed inside the server: 500 (REST), INTERNAL (gRPC), with an id that finds it in the log."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        super().__init__(
            f"internal error while serving request {request_id}; the server log has the details under this id"
        )


def unexpected(exc: BaseException, request_id: str | None = None) -> InternalError:
    """Log an unexpected exception (a bug) with an id and turn it into the answer naming that id."""
    from kserve.logging import logger

    error_id = safe_id(request_id) or new_id()
    logger.error("Request %s failed: %s: %s", error_id, type(exc).__name__, exc, exc_info=exc)
    return InternalError(error_id)


class NotReady(ModelNotReady):
    """kserve's ModelNotReady (503 / UNAVAILABLE), with the ``reason`` its gRPC interceptor reads.

    kserve 0.21's interceptor answers ``ex.reason`` for ModelNotReady, which that class does not
    have: a plain ModelNotReady reaches gRPC clients as UNKNOWN "AttributeError".
    """

    def __init__(self, model_name: str, detail: str | None = None):
        super().__init__(clip(model_name), detail)
        self.reason = self.error_msg
