"""REST additions to kserve's FastAPI app: the v2 infer route and a few routes kserve gets wrong.

Routes registered here come before kserve's (first match wins):

- ``POST /v2/models/{name}[/versions/{v}]/infer``: kserve's reads the whole body
  before anything is checked, decodes it with the limitations listed in
  ``serving.rest_codec``, and keeps running a request whose client has gone.
  This one asks admission for room *before reading the body* (503 at once when
  full), reads it under the size cap, parses it once, drops the request's
  queued work if the client disconnects, and forwards the model's response
  headers;
- ``GET /v2/models/{name}[/versions/{v}]``: kserve's response model drops
  ``parameters`` (threshold, class names, limits) and its versioned route is 501;
- ``GET /v2/models/{name}/versions/{v}/ready``: kserve's is 501 with a traceback;
- ``GET /``: the web page for browsers (``serving.page``), kserve's liveness answer for everyone else.

Health, model readiness, server metadata, v1, metrics and gRPC stay kserve's
(with ``serving.dataplane`` behind them).
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from grpc_interceptor.exceptions import GrpcException
from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady
from kserve.logging import logger
from starlette.requests import ClientDisconnect

from serving import context, page
from serving.dataplane import ChestCtDataPlane
from serving.errors import DeadlineExceeded, InternalError, NotReady, Overloaded, clip, unexpected
from serving.predictor import INLINE_PARSE_BYTES, ChestCtModel
from serving.rest_codec import HEADER_LENGTH, RequestTooLarge, decode_request, encode_response, json_response, read_body

V2_MODEL = "/v2/models/{model_name}"
#: Errors that are answers in their own right; anything else in the infer route is an internal error.
ANSWERS = (InvalidInput, ModelNotFound, ModelNotReady, GrpcException, RequestTooLarge, NotImplementedError)


class BodySizeLimit:
    """ASGI middleware: 413 for any request whose body is over the cap, on every route (kserve's too).

    A declared Content-Length over the cap is refused before reading anything;
    a chunked body is counted as it streams and the read fails once over the cap.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            body = orjson.dumps({"error": str(RequestTooLarge(self.max_bytes))})
            await send(
                {
                    "type": "http.response.start",
                    "status": int(HTTPStatus.REQUEST_ENTITY_TOO_LARGE),
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise RequestTooLarge(self.max_bytes)
            return message

        return await self.app(scope, counting_receive, send)


def _error(status: HTTPStatus, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(
        content=orjson.dumps({"error": message}),
        status_code=int(status),
        media_type="application/json",
        headers=headers,
    )


def install(app: FastAPI, dataplane: ChestCtDataPlane, max_request_bytes: int) -> None:
    """Register the routes, middleware and error handlers on kserve's app before the server starts."""
    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)

    async def too_large(_: Request, exc: RequestTooLarge) -> Response:
        return _error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, str(exc))

    async def overloaded(_: Request, exc: Overloaded) -> Response:
        return _error(HTTPStatus.SERVICE_UNAVAILABLE, exc.details, {"retry-after": str(exc.retry_after_s)})

    async def deadline(_: Request, exc: DeadlineExceeded) -> Response:
        return _error(HTTPStatus.GATEWAY_TIMEOUT, exc.details)

    async def internal(_: Request, exc: InternalError) -> Response:
        return _error(HTTPStatus.INTERNAL_SERVER_ERROR, exc.details)

    app.add_exception_handler(RequestTooLarge, too_large)  # type: ignore[arg-type]  # Starlette's loose typing
    app.add_exception_handler(Overloaded, overloaded)  # type: ignore[arg-type]
    app.add_exception_handler(DeadlineExceeded, deadline)  # type: ignore[arg-type]
    app.add_exception_handler(InternalError, internal)  # type: ignore[arg-type]

    async def infer(request: Request, model_name: str, model_version: str | None = None) -> Response:
        try:
            return await _infer(request, dataplane, model_name, model_version, max_request_bytes)
        except ANSWERS:
            raise
        except ClientDisconnect:  # gone while sending its body: nobody to answer
            return Response(status_code=499)
        except Exception as exc:  # a bug: answer with an id that finds it in the log, not with its text
            raise unexpected(exc, request.headers.get("x-request-id")) from exc

    async def metadata(model_name: str, model_version: str | None = None) -> Response:
        return json_response(await dataplane.model_metadata(model_name, model_version))

    async def ready_version(model_name: str, model_version: str) -> Response:
        dataplane.check_version(model_name, model_version)
        if not await dataplane.model_ready(model_name):
            raise NotReady(model_name)
        return json_response({"name": model_name, "ready": True})

    for path, endpoint, methods in (
        (V2_MODEL + "/infer", infer, ["POST"]),
        (V2_MODEL + "/versions/{model_version}/infer", infer, ["POST"]),
        (V2_MODEL, metadata, ["GET"]),
        (V2_MODEL + "/versions/{model_version}", metadata, ["GET"]),
        (V2_MODEL + "/versions/{model_version}/ready", ready_version, ["GET"]),
    ):
        # Hidden from /openapi.json: kserve's (shadowed) routes document the same JSON schema.
        app.add_api_route(path, endpoint, methods=methods, include_in_schema=False)
    page.install(app, dataplane.live)


async def _infer(
    request: Request, dataplane: ChestCtDataPlane, model_name: str, model_version: str | None, max_request_bytes: int
) -> Response:
    dataplane.check_version(model_name, model_version)  # unknown model or version: 404
    if not await dataplane.model_ready(model_name):
        raise NotReady(model_name)
    model = dataplane.get_model_from_registry(model_name)
    if not isinstance(model, ChestCtModel):
        raise NotImplementedError(f"model {clip(model_name)} is not served by this route")
    declared = request.headers.get("content-length", "")
    headers = dict(request.headers)
    with model.request_scope(headers, int(declared) if declared.isdigit() else 0) as scope:
        admission = model.loaded_admission()

        def count(total: int) -> None:  # chunked bodies (no Content-Length) are counted as they arrive
            if total > scope.ticket.bytes:
                admission.add_bytes(scope.ticket, total - scope.ticket.bytes)

        body = await read_body(request, max_request_bytes, count)
        admission.hold(scope.ticket)  # its place in the queue, kept while it is parsed
        length = request.headers.get(HEADER_LENGTH)
        if len(body) > INLINE_PARSE_BYTES:  # large JSON: one at a time, off the event loop
            infer_request = await asyncio.get_running_loop().run_in_executor(
                model.parser, decode_request, body, length, model_name
            )
        else:
            infer_request = decode_request(body, length, model_name)
        del body  # from here on only the parsed request holds it (its binary data are views of it)
        if model_version is not None:
            infer_request.model_version = model_version
        work = asyncio.ensure_future(
            dataplane.infer(model_name=model_name, request=infer_request, headers=context.loggable(headers))
        )
        del infer_request
        outcome = await _unless_disconnected(request, work)
        if outcome is None:
            logger.info(
                "Client of request %s disconnected; its queued work was dropped", clip(scope.header_id or "(no id)", 64)
            )
            return Response(status_code=499)
        response, response_headers = outcome
        return encode_response(response, response_headers)


async def _unless_disconnected(request: Request, work: asyncio.Future):
    """``work``'s result, or None (``work`` cancelled) if the client disconnects first."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        raise
    finally:
        watcher.cancel()
    if work in done:
        return work.result()
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)  # let it drop its queued chunks and release its budget
    return None
