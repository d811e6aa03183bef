"""REST additions to kserve's FastAPI app: the v2 infer and model metadata routes, and a body size cap.

kserve 0.21's own v2 infer route is replaced (routes registered first win) because:

- with the binary tensor extension it forces BYTES elements through UTF-8 and
  answers 500 for image files; this route keeps them as raw bytes, so
  ``tritonclient.http`` and kserve's ``InferenceRESTClient`` can send images
  with ``binary_data=True``;
- malformed or incomplete JSON should be a 400 that says what is wrong, not a
  422 list of pydantic locations;
- the body must be read under a size cap (also after gzip/deflate
  decompression, which tritonclient can apply to requests).

The metadata route adds the model's version and ``parameters`` (threshold,
class names, image size, limits), which kserve's metadata response model drops.
Everything else (health, readiness, model ready, v1, metrics, gRPC) is kserve's.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from http import HTTPStatus
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from kserve.errors import InvalidInput, ModelNotReady
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.infer_type import InferInput, InferRequest, InferResponse, RequestedOutput

from serving.predictor import ChestCtModel

HEADER_LENGTH = "inference-header-content-length"
V2_MODEL = "/v2/models/{model_name}"


class RequestTooLarge(Exception):
    """The request body (after decompression) is over ``max_request_bytes``."""

    def __init__(self, limit: int):
        super().__init__(f"request body is over the limit of {limit} bytes; send fewer or smaller images "
                         "(the limit is set with --max_request_bytes / CHEST_CT_MAX_REQUEST_BYTES)")


class BodySizeLimit:
    """ASGI middleware: 413 for any request whose body is over the cap.

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
            return await _send_error(send, HTTPStatus.REQUEST_ENTITY_TOO_LARGE, str(RequestTooLarge(self.max_bytes)))
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


async def _send_error(send, status: HTTPStatus, message: str) -> None:
    body = orjson.dumps({"error": message})
    await send({"type": "http.response.start", "status": int(status),
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def install(app: FastAPI, dataplane: DataPlane, model: ChestCtModel) -> None:
    """Register the routes, middleware and error handlers on kserve's app before the server starts."""
    limit = model.settings.max_request_bytes
    app.add_middleware(BodySizeLimit, max_bytes=limit)

    async def too_large(_: Request, exc: RequestTooLarge) -> JSONResponse:
        return JSONResponse(status_code=HTTPStatus.REQUEST_ENTITY_TOO_LARGE, content={"error": str(exc)})

    app.add_exception_handler(RequestTooLarge, too_large)

    async def run_infer(request: Request, model_name: str, model_version: str | None) -> Response:
        if model_version is not None:
            _check_version(model, model_name, model_version)
        # Unknown model -> ModelNotFound (404); not ready -> 503, as kserve's own route does.
        if not await dataplane.model_ready(model_name, True):
            raise ModelNotReady(model_name)
        body = await read_body(request, limit)
        loop = asyncio.get_running_loop()  # parsing up to max_request_bytes of JSON: keep the loop free
        infer_request = await loop.run_in_executor(None, decode_request, body, request.headers.get(HEADER_LENGTH),
                                                   model_name)
        if model_version is not None:
            infer_request.model_version = model_version
        response, _ = await dataplane.infer(model_name=model_name, request=infer_request,
                                            headers=dict(request.headers))
        return encode_response(response)

    async def infer(request: Request, model_name: str) -> Response:
        return await run_infer(request, model_name, None)

    async def infer_version(request: Request, model_name: str, model_version: str) -> Response:
        return await run_infer(request, model_name, model_version)

    async def get_metadata(model_name: str, model_version: str | None) -> Response:
        if model_version is not None:
            _check_version(model, model_name, model_version)
        result = await dataplane.model_metadata(model_name)  # ModelNotFound -> 404
        registered = dataplane.get_model_from_registry(model_name)
        if isinstance(registered, ChestCtModel) and registered.ready:
            if registered.version:
                result["versions"] = [registered.version]
            result["parameters"] = registered.metadata_parameters()
        return _json(result)

    async def metadata(model_name: str) -> Response:
        return await get_metadata(model_name, None)

    async def metadata_version(model_name: str, model_version: str) -> Response:
        return await get_metadata(model_name, model_version)

    for path, endpoint, methods in (
        (V2_MODEL + "/infer", infer, ["POST"]),
        (V2_MODEL + "/versions/{model_version}/infer", infer_version, ["POST"]),
        (V2_MODEL, metadata, ["GET"]),
        (V2_MODEL + "/versions/{model_version}", metadata_version, ["GET"]),
    ):
        # Hidden from /openapi.json: kserve's (shadowed) routes document the same JSON schema.
        app.add_api_route(path, endpoint, methods=methods, include_in_schema=False)


def _check_version(model: ChestCtModel, model_name: str, model_version: str) -> None:
    if model_name == model.name and model.ready:
        model.check_version(model_version)


# --- body --------------------------------------------------------------------------------------

async def read_body(request: Request, limit: int) -> bytes:
    """The request body, decompressed if Content-Encoding is gzip or deflate, at most ``limit`` bytes."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        decompressor = None
    elif encoding in ("gzip", "x-gzip"):
        decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        decompressor = zlib.decompressobj(zlib.MAX_WBITS)
    else:
        raise InvalidInput(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none")
    parts, size = [], 0
    try:
        async for chunk in request.stream():
            if decompressor is not None:
                chunk = decompressor.decompress(chunk, limit + 1 - size)
                if decompressor.unconsumed_tail:
                    raise RequestTooLarge(limit)
            size += len(chunk)
            if size > limit:
                raise RequestTooLarge(limit)
            parts.append(chunk)
        if decompressor is not None:
            tail = decompressor.flush()
            size += len(tail)
            if size > limit:
                raise RequestTooLarge(limit)
            parts.append(tail)
            if not decompressor.eof:
                raise InvalidInput(f"the {encoding} request body is truncated")
    except zlib.error as exc:
        raise InvalidInput(f"the request body is not valid {encoding} data ({exc})") from exc
    return b"".join(parts)


def decode_request(body: bytes, header_length: str | None, model_name: str) -> InferRequest:
    """Parse a v2 REST request: JSON, or JSON followed by binary tensor data (binary tensor extension)."""
    binary = b""
    if header_length is not None:
        try:
            json_length = int(header_length)
        except ValueError:
            raise InvalidInput(f"header Inference-Header-Content-Length must be an integer, "
                               f"got {header_length!r}") from None
        if not 0 < json_length <= len(body):
            raise InvalidInput(f"header Inference-Header-Content-Length is {json_length} but the body has "
                               f"{len(body)} bytes")
        body, binary = body[:json_length], body[json_length:]
    doc = _parse_json(body, header_length is not None)
    if not isinstance(doc, dict):
        raise InvalidInput(f"the request body must be a JSON object (v2 inference request), got {type(doc).__name__}")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f"'id' must be a string, got {type(request_id).__name__}")
    parameters = _parameters(doc.get("parameters"), "request 'parameters'")
    if "inputs" not in doc:
        raise InvalidInput("the request has no 'inputs'; expected {\"inputs\": [{\"name\": ..., \"datatype\": ..., "
                           "\"shape\": [...], \"data\": [...]}]}")
    if not isinstance(doc["inputs"], list):
        raise InvalidInput("'inputs' must be a list of tensors")
    inputs, offset = [], 0
    for i, item in enumerate(doc["inputs"]):
        inp, used = _input(item, i, binary, offset)
        inputs.append(inp)
        offset += used
    if offset != len(binary):
        raise InvalidInput(f"the body has {len(binary)} bytes of binary data after the JSON header but the inputs' "
                           f"binary_data_size parameters add up to {offset}")
    outputs = doc.get("outputs")
    requested = None
    if outputs is not None:
        if not isinstance(outputs, list):
            raise InvalidInput("'outputs' must be a list of {\"name\": ...} objects")
        requested = []
        for i, out in enumerate(outputs):
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise InvalidInput(f"outputs[{i}] must be an object with a string 'name'")
            requested.append(RequestedOutput(out["name"], _parameters(out.get("parameters"),
                                                                      f"output '{out['name']}' parameters")))
    return InferRequest(model_name=model_name, infer_inputs=inputs, request_id=request_id,
                        parameters=parameters or None, request_outputs=requested or None)


def _parse_json(body: bytes, has_binary_header: bool) -> Any:
    if not body.strip():
        raise InvalidInput("the request body is empty; expected a v2 inference request in JSON")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:  # the stdlib also reads NaN/Infinity, so such pixels get the specific message later
        return json.loads(body)
    except RecursionError:
        raise InvalidInput("the request body is not valid JSON: nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        hint = "" if has_binary_header else (
            " (for raw binary tensor data send the Inference-Header-Content-Length header; "
            "in plain JSON, BYTES elements must be base64 strings)")
        raise InvalidInput(f"the request body is not valid JSON: {exc}{hint}") from exc


def _input(item: Any, i: int, binary: bytes, offset: int) -> tuple[InferInput, int]:
    if not isinstance(item, dict):
        raise InvalidInput(f"inputs[{i}] must be an object with name, datatype, shape and data")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"inputs[{i}] has no string 'name'")
    where = f"input '{name}'"
    for key in ("datatype", "shape"):
        if key not in item:
            raise InvalidInput(f"{where} has no '{key}'")
    datatype, shape = item["datatype"], item["shape"]
    if not isinstance(datatype, str):
        raise InvalidInput(f"{where}: 'datatype' must be a string such as \"BYTES\" or \"FP32\"")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidInput(f"{where}: 'shape' must be a list of integers, got {shape!r}")
    params = _parameters(item.get("parameters"), f"{where} parameters")
    data = item.get("data")
    if data is not None:
        if not isinstance(data, list):
            raise InvalidInput(f"{where}: 'data' must be a list")
        return InferInput(name, shape, datatype, data=data, parameters=params), 0
    size = params.get("binary_data_size")
    if size is None:
        raise InvalidInput(f"{where} has no 'data' (nor a binary_data_size parameter for binary tensor data)")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidInput(f"{where}: binary_data_size must be a non-negative integer, got {size!r}")
    if offset + size > len(binary):
        raise InvalidInput(f"{where}: binary_data_size {size} runs past the end of the body "
                           f"({len(binary) - offset} binary bytes left)")
    inp = InferInput(name, shape, datatype, data=None, parameters=params)
    inp._raw_data = binary[offset:offset + size]  # where kserve keeps binary tensor data (see validation._raw_data)
    return inp, size


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, (str, int, float, bool)) for v in value.values()):
        raise InvalidInput(f"{where} must be an object of string, number or boolean values")
    return dict(value)


def encode_response(response: Any) -> Response:
    """JSON, or JSON + binary tensor data with Inference-Header-Content-Length when binary output was asked for."""
    if isinstance(response, InferResponse):
        body, json_length = response.to_rest()
        if json_length is not None:
            return Response(content=body, media_type="application/octet-stream",
                            headers={HEADER_LENGTH: str(json_length)})
        return _json(body)
    return _json(response)


def _json(content: Any) -> Response:
    return Response(content=orjson.dumps(content), media_type="application/json")

