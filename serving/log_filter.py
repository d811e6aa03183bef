"""Keep the log readable and safe under bad input: one line per client mistake, no echoed attacker text.

kserve logs every ``InvalidInput`` (400 / INVALID_ARGUMENT), ``ModelNotFound``
(404 / NOT_FOUND), ``ModelNotReady`` (503) and refused repository call (501) at
ERROR level with a full stack trace, on REST and gRPC alike. A misbehaving
client would then flood the log and trip error alerts for problems that are
not the server's; the traceback says nothing the message does not (and the
messages quote client text only through ``serving.errors.clip``).

uvicorn's access log writes each request's full path, which a client chooses:
it is cut to 200 characters.
"""

from __future__ import annotations

import logging

from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady

from serving.errors import CLIP_CHARS
from serving.repository import RepositoryChangesDisabled

CLIENT_ERRORS = (InvalidInput, ModelNotFound, ModelNotReady, RepositoryChangesDisabled)


class ClientErrorFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, CLIENT_ERRORS):
            record.msg = "Rejected request (%s): %s"
            record.args = (type(exc).__name__, str(exc))
            record.exc_info = None
            record.exc_text = None
            record.levelno = logging.WARNING
            record.levelname = logging.getLevelName(logging.WARNING)
        return True


class AccessPathFilter(logging.Filter):
    """uvicorn's access record args are (client, method, full path, HTTP version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str) and len(args[2]) > CLIP_CHARS:
            record.args = (*args[:2], f"{args[2][:CLIP_CHARS]}...({len(args[2])} chars)", *args[3:])
        return True


def install() -> None:
    """Attach the filters to kserve's logger (REST handlers, gRPC interceptor) and uvicorn's access logger."""
    from kserve.logging import logger

    if not any(isinstance(f, ClientErrorFilter) for f in logger.filters):
        logger.addFilter(ClientErrorFilter())
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, AccessPathFilter) for f in access.filters):
        access.addFilter(AccessPathFilter())
