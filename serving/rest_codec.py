"""v2 REST bodies: read under a size cap, decoded from JSON (+ binary tensor data), responses encoded.

Why not kserve's own decoding: with the binary tensor extension it forces BYTES
elements through UTF-8 (image files answer 500), malformed JSON gets a 422 list
of pydantic locations, and bodies are read without a cap. Here:

- ``read_body`` enforces ``max_request_bytes`` while streaming, also after
  gzip/deflate decompression, and reports each chunk's size to admission;
- ``decode_request`` parses JSON once, with orjson (a body orjson rejects is a
  400; there is no second, more lenient parse), and keeps binary tensor data
  as memoryviews of the body, so nothing is copied before it is checked;
- ``encode_response`` writes JSON or JSON + binary outputs, without
  ``"model_version": null`` for an unversioned model.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import Response
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferInput, InferRequest, InferResponse, RequestedOutput

from serving.errors import clip, one_line

HEADER_LENGTH = "inference-header-content-length"


class RequestTooLarge(Exception):
    """The request body (after decompression) is over ``max_request_bytes``: 413."""

    def __init__(self, limit: int):
        super().__init__(
            f"request body is over the limit of {limit} bytes; send fewer or smaller images "
            "(the limit is set with --max_request_bytes / CHEST_CT_MAX_REQUEST_BYTES)"
        )


async def read_body(request: Request, limit: int, on_bytes: Callable[[int], None]) -> bytes:
    """The body, decompressed if Content-Encoding is gzip or deflate, at most ``limit`` bytes.

    ``on_bytes(total)`` is called with the bytes held so far after each chunk (admission counts them).
    """
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        decompressor = None
    elif encoding in ("gzip", "x-gzip"):
        decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        decompressor = zlib.decompressobj(zlib.MAX_WBITS)
    else:
        raise InvalidInput(f"Content-Encoding {clip(encoding)} is not supported; use gzip, deflate or none")
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
            on_bytes(size)
        if decompressor is not None:
            tail = decompressor.flush()
            size += len(tail)
            if size > limit:
                raise RequestTooLarge(limit)
            parts.append(tail)
            if not decompressor.eof:
                raise InvalidInput(f"the {encoding} request body is truncated")
    except zlib.error as exc:
        raise InvalidInput(f"the request body is not valid {encoding} data ({one_line(str(exc))})") from exc
    return b"".join(parts)


def decode_request(body: bytes, header_length: str | None, model_name: str) -> InferRequest:
    """Parse a v2 REST request: JSON, or JSON followed by binary tensor data (binary tensor extension)."""
    view = memoryview(body)
    binary = view[:0]
    if header_length is not None:
        try:
            json_length = int(header_length)
        except ValueError:
            raise InvalidInput(
                f"header Inference-Header-Content-Length must be an integer, got {clip(header_length)}"
            ) from None
        if not 0 < json_length <= len(body):
            raise InvalidInput(
                f"header Inference-Header-Content-Length is {json_length} but the body has {len(body)} bytes"
            )
        view, binary = view[:json_length], view[json_length:]
    doc = _parse_json(view, header_length is not None)
    if not isinstance(doc, dict):
        raise InvalidInput(f"the request body must be a JSON object (v2 inference request), got {type(doc).__name__}")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f"'id' must be a string, got {type(request_id).__name__}")
    parameters = _parameters(doc.get("parameters"), "request 'parameters'")
    if "inputs" not in doc:
        raise InvalidInput(
            'the request has no \'inputs\'; expected {"inputs": [{"name": ..., "datatype": ..., '
            '"shape": [...], "data": [...]}]}'
        )
    if not isinstance(doc["inputs"], list):
        raise InvalidInput("'inputs' must be a list of tensors")
    inputs, offset = [], 0
    for i, item in enumerate(doc["inputs"]):
        inp, used = _input(item, i, binary, offset)
        inputs.append(inp)
        offset += used
    if offset != len(binary):
        raise InvalidInput(
            f"the body has {len(binary)} bytes of binary data after the JSON header but the inputs' "
            f"binary_data_size parameters add up to {offset}"
        )
    return InferRequest(
        model_name=model_name,
        infer_inputs=inputs,
        request_id=request_id,
        parameters=parameters or None,
        request_outputs=_outputs(doc.get("outputs")),
    )


def _parse_json(body: memoryview, has_binary_header: bool) -> Any:
    if not body or (len(body) <= 64 and not bytes(body).strip()):
        raise InvalidInput("the request body is empty; expected a v2 inference request in JSON")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        hint = (
            ""
            if has_binary_header
            else (
                " (JSON has no NaN or Infinity; for raw binary tensor data send the Inference-Header-Content-Length "
                "header; in plain JSON, BYTES elements must be base64 strings)"
            )
        )
        reason = one_line(str(exc))
        if "depth limit" in reason:
            reason = f"nested too deeply ({reason})"
        raise InvalidInput(f"the request body is not valid JSON: {reason}{hint}") from None


def _input(item: Any, i: int, binary: memoryview, offset: int) -> tuple[InferInput, int]:
    if not isinstance(item, dict):
        raise InvalidInput(f"inputs[{i}] must be an object with name, datatype, shape and data")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"inputs[{i}] has no string 'name'")
    where = f"input {clip(name)}"
    for key in ("datatype", "shape"):
        if key not in item:
            raise InvalidInput(f"{where} has no '{key}'")
    datatype, shape = item["datatype"], item["shape"]
    if not isinstance(datatype, str):
        raise InvalidInput(f'{where}: \'datatype\' must be a string such as "BYTES" or "FP32"')
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidInput(f"{where}: 'shape' must be a list of integers, got {clip(shape)}")
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
        raise InvalidInput(f"{where}: binary_data_size must be a non-negative integer, got {clip(size)}")
    if offset + size > len(binary):
        raise InvalidInput(
            f"{where}: binary_data_size {size} runs past the end of the body ({len(binary) - offset} binary bytes left)"
        )
    inp = InferInput(name, shape, datatype, data=None, parameters=params)
    inp._raw_data = binary[offset : offset + size]  # where kserve keeps binary tensor data (see inputs._raw_data)
    return inp, size


def _outputs(outputs: Any) -> list[RequestedOutput] | None:
    if outputs is None:
        return None
    if not isinstance(outputs, list):
        raise InvalidInput("'outputs' must be a list of {\"name\": ...} objects")
    requested = []
    for i, out in enumerate(outputs):
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise InvalidInput(f"outputs[{i}] must be an object with a string 'name'")
        requested.append(
            RequestedOutput(out["name"], _parameters(out.get("parameters"), f"output {clip(out['name'])} parameters"))
        )
    return requested or None


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, (str, int, float, bool)) for v in value.values()):
        raise InvalidInput(f"{where} must be an object of string, number or boolean values")
    return dict(value)


def encode_response(response: Any, headers: dict[str, str] | None = None) -> Response:
    """JSON, or JSON + binary tensor data with Inference-Header-Content-Length when binary output was asked for."""
    headers = dict(headers or {})
    if not isinstance(response, InferResponse):
        return json_response(response, headers)
    body, json_length = response.to_rest()
    if json_length is None:
        if body.get("model_version") is None:
            body.pop("model_version", None)
        return json_response(body, headers)
    if response.model_version is None:  # to_rest() already wrote the header with "model_version": null
        header = orjson.loads(body[:json_length])
        header.pop("model_version", None)
        head = orjson.dumps(header)
        body, json_length = head + body[json_length:], len(head)
    headers[HEADER_LENGTH] = str(json_length)
    return Response(content=body, media_type="application/octet-stream", headers=headers)


def json_response(content: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(content=orjson.dumps(content), media_type="application/json", headers=headers)
