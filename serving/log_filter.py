"""Log client mistakes as one WARNING line instead of an ERROR with a traceback.

kserve logs every ``InvalidInput`` (400 / INVALID_ARGUMENT), ``ModelNotFound``
(404 / NOT_FOUND) and refused repository call (501) at ERROR level with a full stack trace, on
REST and gRPC alike. A misbehaving client would then flood the log and trip
error alerts for problems that are not the server's; the traceback says
nothing the message does not.
"""

from __future__ import annotations

import logging

from kserve.errors import InvalidInput, ModelNotFound

from serving.repository import RepositoryChangesDisabled

CLIENT_ERRORS = (InvalidInput, ModelNotFound, RepositoryChangesDisabled)


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


def install() -> None:
    """Attach the filter to kserve's logger (its REST error handlers and gRPC interceptor log there)."""
    from kserve.logging import logger

    if not any(isinstance(f, ClientErrorFilter) for f in logger.filters):
        logger.addFilter(ClientErrorFilter())
