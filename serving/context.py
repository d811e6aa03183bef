"""One request's deadline, id and admission ticket, from its arrival to its answer.

The transport (``serving.rest``'s infer route, ``serving.grpc_server``'s
ModelInfer) opens the scope as soon as a request arrives, before anything is
read or parsed: admission counts its bytes there and its deadline starts. kserve
then calls the model's ``predict`` in the same asyncio task, which finds the
scope in a context variable; the transport releases it when the answer is sent.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from kserve.errors import InvalidInput

from serving.admission import Admission, Ticket
from serving.errors import clip, one_line

_CURRENT: ContextVar[RequestScope | None] = ContextVar("chest_ct_request", default=None)
#: Request parameter a client may set to shorten its deadline: microseconds, as tritonclient's ``timeout``.
TIMEOUT_PARAMETER = "timeout"


@dataclass
class RequestScope:
    arrival: float  # time.monotonic()
    deadline: float
    ticket: Ticket
    #: The ``x-request-id`` header, used as the response id when the body has none.
    header_id: str | None = None
    #: Headers the model adds to the response (REST headers, gRPC initial metadata).
    response_headers: dict[str, str] = field(default_factory=dict)

    @property
    def budget_s(self) -> float:
        return self.deadline - self.arrival

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def shorten(self, seconds: float | None) -> None:
        """A client-supplied deadline, counted from arrival; it can only make the server's shorter."""
        if seconds is not None:
            self.deadline = min(self.deadline, self.arrival + seconds)


def current() -> RequestScope | None:
    return _CURRENT.get()


@contextlib.contextmanager
def request_scope(
    admission: Admission, headers: Mapping[str, str] | None, body_bytes: int, time_remaining: float | None = None
) -> Iterator[RequestScope]:
    """Admit a request that just arrived (Overloaded at once if it cannot be) and hold its scope until answered.

    ``time_remaining``: the client's deadline when the protocol carries one (gRPC).
    """
    arrival = time.monotonic()
    ticket = admission.enter(body_bytes)
    scope = RequestScope(
        arrival, arrival + admission.config.deadline_s, ticket, header_id=(headers or {}).get("x-request-id") or None
    )
    scope.shorten(time_remaining)
    token = _CURRENT.set(scope)
    try:
        yield scope
    finally:
        _CURRENT.reset(token)
        admission.release(ticket)


def client_timeout_s(parameters: Mapping[str, Any] | None) -> float | None:
    """The request parameter ``timeout`` (microseconds; 0 or absent: none) in seconds."""
    value = (parameters or {}).get(TIMEOUT_PARAMETER)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(
            f"request parameter '{TIMEOUT_PARAMETER}' must be a whole number of microseconds "
            f"(0: none), got {clip(value)}"
        )
    return value / 1e6 if value else None


def loggable(headers: Mapping[str, str]) -> dict[str, str]:
    """Headers for kserve, whose trace log quotes ``x-request-id`` as it is: that one cut to 128 characters."""
    out = dict(headers)
    if "x-request-id" in out:
        out["x-request-id"] = one_line(str(out["x-request-id"]), 128)
    return out
