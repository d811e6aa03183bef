"""Bad input against the running server: a 4xx (or the gRPC equivalent) naming the input and the problem.

Each case goes to the real ``python -m serving`` process over REST or gRPC.
The module ends by checking that the same process is still up and answers
good requests on both protocols, i.e. no bad request took it down.
"""

from __future__ import annotations

import gzip
import json
import struct

import grpc
import numpy as np
import pytest
import requests
from PIL import Image

from tests.serving_helpers import (
    MODEL_NAME,
    RUN_ID,
    ServerProcess,
    b64,
    encode,
    exported_model,
    length_prefixed,
    png_with_declared_size,
    rgb,
)

MAX_REQUEST_BYTES = 1024 * 1024
MAX_IMAGES = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = exported_model(str(tmp_path_factory.getbasetemp() / "serving"))
    proc = ServerProcess(
        model_dir,
        tmp_path_factory.mktemp("serving-bad-log") / "server.log",
        "--max_request_bytes",
        str(MAX_REQUEST_BYTES),
        "--max_images",
        str(MAX_IMAGES),
    )
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


GOOD_PNG = encode(rgb(40, 40, seed=1), "PNG")
GOOD_JPEG = encode(rgb(160, 160, seed=2), "JPEG")


def image_input(elements: list, shape: list[int] | None = None, datatype: str = "BYTES", name: str = "image") -> dict:
    return {
        "name": name,
        "datatype": datatype,
        "shape": shape if shape is not None else [len(elements)],
        "data": elements,
    }


def pixels_input(data: list, shape: list[int], datatype: str = "UINT8") -> dict:
    return {"name": "pixels", "datatype": datatype, "shape": shape, "data": data}


def bomb_png() -> bytes:
    """A real, fully valid PNG of 6000x6000 black pixels: 36 Mpx that compress to a few dozen KB."""
    return encode(Image.new("L", (6000, 6000)), "PNG", optimize=False)


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def gif() -> bytes:
    return encode(rgb(20, 20, seed=3), "GIF")


def raw_body(header: dict, binary: bytes) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    return head + binary, {
        "inference-header-content-length": str(len(head)),
        "content-type": "application/octet-stream",
    }


# (case id, request: JSON payload | (body bytes, headers), expected status, substrings expected in the error)
REST_CASES = [
    ("malformed_json", (b'{"inputs": [', {}), 400, ["not valid json"]),
    ("json_not_an_object", [1, 2, 3], 400, ["json object"]),
    ("json_nested_too_deeply", (b"[" * 100_000 + b"]" * 100_000, {}), 400, ["not valid json", "nested"]),
    (
        "pixels_nested_too_deeply",
        {"inputs": [pixels_input(json.loads("[" * 100 + "1" + "]" * 100), [1, 1, 1, 3])]},
        400,
        ["input 'pixels'", "regular (non-ragged) array"],
    ),
    ("empty_body", (b"", {}), 400, ["empty"]),
    ("missing_inputs", {"id": "x"}, 400, ["no 'inputs'"]),
    ("inputs_not_a_list", {"inputs": {"name": "image"}}, 400, ["'inputs' must be a list"]),
    ("no_inputs", {"inputs": []}, 400, ["no inputs"]),
    (
        "both_inputs",
        {"inputs": [image_input([b64(GOOD_PNG)]), pixels_input([0] * 12, [1, 2, 2, 3])]},
        400,
        ["both", "'image'", "'pixels'"],
    ),
    ("unknown_input_name", {"inputs": [image_input([b64(GOOD_PNG)], name="img")]}, 400, ["unknown input 'img'"]),
    (
        "input_given_twice",
        {"inputs": [image_input([b64(GOOD_PNG)]), image_input([b64(GOOD_PNG)])]},
        400,
        ["'image'", "more than once"],
    ),
    (
        "missing_datatype",
        {"inputs": [{"name": "image", "shape": [1], "data": [b64(GOOD_PNG)]}]},
        400,
        ["input 'image'", "no 'datatype'"],
    ),
    ("shape_not_integers", {"inputs": [image_input([b64(GOOD_PNG)], shape=["1"])]}, 400, ["input 'image'", "'shape'"]),
    (
        "image_wrong_datatype",
        {"inputs": [image_input([1.0], datatype="FP32")]},
        400,
        ["input 'image'", "datatype must be bytes", "fp32"],
    ),
    (
        "pixels_wrong_datatype",
        {"inputs": [pixels_input([0] * 12, [1, 2, 2, 3], "INT64")]},
        400,
        ["input 'pixels'", "uint8 or fp32", "int64"],
    ),
    (
        "image_shape_data_mismatch",
        {"inputs": [image_input([b64(GOOD_PNG)], shape=[2])]},
        400,
        ["input 'image'", "2 element", "holds 1"],
    ),
    (
        "image_wrong_rank",
        {"inputs": [image_input([b64(GOOD_PNG)], shape=[1, 1])]},
        400,
        ["input 'image'", "shape must be [n]"],
    ),
    (
        "pixels_shape_data_mismatch",
        {"inputs": [pixels_input([0] * 47, [1, 4, 4, 3])]},
        400,
        ["input 'pixels'", "needs 48 values", "holds 47"],
    ),
    ("pixels_wrong_rank", {"inputs": [pixels_input([0] * 48, [4, 4, 3])]}, 400, ["input 'pixels'", "rank 4"]),
    (
        "pixels_wrong_channel_count",
        {"inputs": [pixels_input([0] * 64, [1, 4, 4, 4])]},
        400,
        ["input 'pixels'", "3 (rgb channels)"],
    ),
    ("pixels_negative_dimension", {"inputs": [pixels_input([], [1, -4, 4, 3])]}, 400, ["input 'pixels'", "negative"]),
    ("image_n_zero", {"inputs": [image_input([], shape=[0])]}, 400, ["input 'image'", "n=0"]),
    ("pixels_n_zero", {"inputs": [pixels_input([], [0, 4, 4, 3])]}, 400, ["input 'pixels'", "n=0"]),
    (
        "too_many_images",
        {"inputs": [image_input([b64(GOOD_PNG)] * (MAX_IMAGES + 1))]},
        400,
        ["input 'image'", f"limit of {MAX_IMAGES}"],
    ),
    (
        "bytes_not_an_image",
        {"inputs": [image_input([b64(b"hello, I am not an image")])]},
        400,
        ["input 'image' element 0", "not a png or jpeg"],
    ),
    ("gif_not_accepted", {"inputs": [image_input([b64(gif())])]}, 400, ["element 0", "format gif", "png or jpeg"]),
    (
        "truncated_png",
        {"inputs": [image_input([b64(GOOD_PNG), b64(truncated(GOOD_PNG))])]},
        400,
        ["input 'image' element 1", "truncated or corrupt"],
    ),
    (
        "truncated_jpeg",
        {"inputs": [image_input([b64(truncated(GOOD_JPEG))])]},
        400,
        ["input 'image' element 0", "jpeg", "truncated or corrupt"],
    ),
    (
        "jpeg_cut_inside_header",
        {"inputs": [image_input([b64(GOOD_JPEG[:200])])]},
        400,
        ["input 'image' element 0", "truncated or corrupt"],
    ),
    (
        "decompression_bomb",
        {"inputs": [image_input([b64(bomb_png())])]},
        400,
        ["input 'image' element 0", "6000x6000", "limit"],
    ),
    (
        "bomb_header_only",
        {"inputs": [image_input([b64(png_with_declared_size(100_000, 100_000))])]},
        400,
        ["input 'image' element 0", "too large"],
    ),
    (
        "pixels_over_pixel_cap",
        {"inputs": [pixels_input([], [1, 5000, 5000, 3])]},
        400,
        ["input 'pixels'", "5000x5000", "limit"],
    ),
    (
        "base64_does_not_decode",
        {"inputs": [image_input(["this is not base64!"])]},
        400,
        ["input 'image'", "element 0", "not valid base64"],
    ),
    ("bytes_element_not_a_string", {"inputs": [image_input([12345])]}, 400, ["input 'image'", "base64 string"]),
    ("empty_image_element", {"inputs": [image_input([""])]}, 400, ["input 'image'", "element 0 is empty"]),
    (
        "nan_pixels",
        {"inputs": [pixels_input([float("nan")] + [1.0] * 11, [1, 2, 2, 3], "FP32")]},
        400,
        ["not valid json", "nan"],
    ),  # JSON has no NaN: json.dumps writes a literal orjson refuses
    (
        "inf_pixels_binary",
        raw_body(
            {
                "inputs": [
                    {
                        "name": "pixels",
                        "datatype": "FP32",
                        "shape": [1, 2, 2, 3],
                        "parameters": {"binary_data_size": 48},
                    }
                ]
            },
            np.array([np.inf] + [1.0] * 11, np.float32).tobytes(),
        ),
        400,
        ["input 'pixels'", "nan or infinite"],
    ),
    (
        "pixels_out_of_range",
        {"inputs": [pixels_input([300] + [0] * 11, [1, 2, 2, 3], "FP32")]},
        400,
        ["input 'pixels'", "0..255"],
    ),
    (
        "uint8_pixels_not_whole",
        {"inputs": [pixels_input([0.5] + [0] * 11, [1, 2, 2, 3], "UINT8")]},
        400,
        ["input 'pixels'", "whole numbers"],
    ),
    (
        "pixels_not_numbers",
        {"inputs": [pixels_input(["red"] * 12, [1, 2, 2, 3], "FP32")]},
        400,
        ["input 'pixels'", "only numbers"],
    ),
    (
        "pixels_ragged",
        {"inputs": [pixels_input([[1, 2, 3], [4, 5]], [1, 1, 1, 3], "FP32")]},
        400,
        ["input 'pixels'", "ragged"],
    ),
    (
        "unknown_output",
        {"inputs": [image_input([b64(GOOD_PNG)])], "outputs": [{"name": "logits"}]},
        400,
        ["unknown output 'logits'"],
    ),
    ("id_not_a_string", {"id": 7, "inputs": [image_input([b64(GOOD_PNG)])]}, 400, ["'id' must be a string"]),
    (
        "raw_bytes_without_binary_header",
        (GOOD_PNG, {"content-type": "application/octet-stream"}),
        400,
        ["not valid json", "base64"],
    ),
    (
        "binary_header_not_a_number",
        (b'{"inputs": []}', {"inference-header-content-length": "abc"}),
        400,
        ["inference-header-content-length"],
    ),
    (
        "binary_data_size_past_end",
        raw_body(
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 999}}]},
            length_prefixed([GOOD_PNG])[:100],
        ),
        400,
        ["input 'image'", "binary_data_size"],
    ),
    (
        "binary_bytes_tensor_malformed",
        raw_body(
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 8}}]},
            struct.pack("<I", 500) + b"abcd",
        ),
        400,
        ["input 'image'", "malformed"],
    ),
    ("unsupported_content_encoding", (b"{}", {"content-encoding": "br"}), 400, ["content-encoding"]),
    ("corrupt_gzip", (b"\x1f\x8b this is not gzip", {"content-encoding": "gzip"}), 400, ["not valid gzip"]),
    (
        "body_over_size_cap",
        {"inputs": [image_input([b64(b"x" * (MAX_REQUEST_BYTES + 10))])]},
        413,
        ["over the limit", str(MAX_REQUEST_BYTES)],
    ),
    (
        "gzip_bomb",
        (
            gzip.compress(b'{"inputs": [' + b" " * (8 * MAX_REQUEST_BYTES) + b"]}"),
            {"content-encoding": "gzip", "content-type": "application/json"},
        ),
        413,
        ["over the limit"],
    ),
]


def post(server, request, path: str | None = None) -> requests.Response:
    url = f"{server.url}{path or f'/v2/models/{MODEL_NAME}/infer'}"
    if isinstance(request, tuple):
        body, headers = request
        return requests.post(url, data=body, headers=headers, timeout=60)
    return requests.post(url, data=json.dumps(request), headers={"content-type": "application/json"}, timeout=60)


@pytest.mark.parametrize("request_, status, expected", [c[1:] for c in REST_CASES], ids=[c[0] for c in REST_CASES])
def test_rest_bad_input_is_rejected_with_a_clear_message(server, request_, status, expected):
    resp = post(server, request_)
    assert resp.status_code == status, resp.text
    message = resp.json()["error"].lower()
    for text in expected:
        assert text in message, f"{text!r} not in {message!r}"
    assert server.alive()


def test_rest_chunked_body_over_size_cap(server):
    """No Content-Length (chunked upload): the cap is enforced while the body streams in."""

    def chunks():
        yield b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["'
        for _ in range(2 * MAX_REQUEST_BYTES // 65536):
            yield b"A" * 65536
        yield b'"]}]}'

    resp = requests.post(
        f"{server.url}/v2/models/{MODEL_NAME}/infer",
        data=chunks(),
        timeout=60,
        headers={"content-type": "application/json"},
    )
    assert resp.status_code == 413, resp.text
    assert "over the limit" in resp.json()["error"]


def test_rest_unknown_model_is_404(server):
    resp = post(server, {"inputs": [image_input([b64(GOOD_PNG)])]}, path="/v2/models/no-such-model/infer")
    assert resp.status_code == 404
    assert "no-such-model" in resp.json()["error"] and "does not exist" in resp.json()["error"]
    assert requests.get(f"{server.url}/v2/models/no-such-model", timeout=10).status_code == 404
    assert requests.get(f"{server.url}/v2/models/no-such-model/ready", timeout=10).status_code == 404


def test_rest_unknown_model_version_is_404(server):
    resp = post(
        server, {"inputs": [image_input([b64(GOOD_PNG)])]}, path=f"/v2/models/{MODEL_NAME}/versions/not-a-run/infer"
    )
    assert resp.status_code == 404
    assert "no version 'not-a-run'" in resp.json()["error"] and RUN_ID in resp.json()["error"]


def test_rest_v1_protocol_is_refused_with_a_pointer_to_v2(server):
    resp = requests.post(f"{server.url}/v1/models/{MODEL_NAME}:predict", json={"instances": [[1, 2, 3]]}, timeout=10)
    assert resp.status_code == 400
    assert f"/v2/models/{MODEL_NAME}/infer" in resp.json()["error"]


# --- gRPC --------------------------------------------------------------------------------------


def _grpc_request(inputs, raw=None, model=MODEL_NAME, outputs=(), version=""):
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    tensors = []
    for name, datatype, shape, contents in inputs:
        tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
        if contents is not None:
            tensor.contents.CopyFrom(pb.InferTensorContents(**contents))
        tensors.append(tensor)
    return pb.ModelInferRequest(
        model_name=model,
        model_version=version,
        inputs=tensors,
        raw_input_contents=raw or [],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=o) for o in outputs],
    )


def _image(*elements, shape=None):
    return ("image", "BYTES", shape if shape is not None else [len(elements)], {"bytes_contents": list(elements)})


GRPC_INVALID = grpc.StatusCode.INVALID_ARGUMENT
GRPC_CASES = [
    ("no_inputs", lambda: _grpc_request([]), GRPC_INVALID, ["no inputs"]),
    (
        "unknown_input_name",
        lambda: _grpc_request([("img", "BYTES", [1], {"bytes_contents": [GOOD_PNG]})]),
        GRPC_INVALID,
        ["unknown input 'img'"],
    ),
    (
        "both_inputs",
        lambda: _grpc_request([_image(GOOD_PNG), ("pixels", "UINT8", [1, 1, 1, 3], {"uint_contents": [1, 2, 3]})]),
        GRPC_INVALID,
        ["both"],
    ),
    (
        "image_wrong_datatype",
        lambda: _grpc_request([("image", "INT64", [1], {"int64_contents": [1]})]),
        GRPC_INVALID,
        ["input 'image'", "datatype must be bytes"],
    ),
    (
        "image_shape_data_mismatch",
        lambda: _grpc_request([_image(GOOD_PNG, shape=[3])]),
        GRPC_INVALID,
        ["input 'image'", "3 element", "holds 1"],
    ),
    ("image_n_zero", lambda: _grpc_request([_image(shape=[0])]), GRPC_INVALID, ["input 'image'", "n=0"]),
    (
        "bytes_not_an_image",
        lambda: _grpc_request([_image(b"\x00\x01 definitely not an image")]),
        GRPC_INVALID,
        ["element 0", "not a png or jpeg"],
    ),
    (
        "truncated_jpeg",
        lambda: _grpc_request([_image(GOOD_PNG, truncated(GOOD_JPEG))]),
        GRPC_INVALID,
        ["element 1", "truncated or corrupt"],
    ),
    (
        "bomb_header_only",
        lambda: _grpc_request([_image(png_with_declared_size(50_000, 40_000))]),
        GRPC_INVALID,
        ["element 0", "too large"],
    ),
    (
        "nan_pixels_raw",
        lambda: _grpc_request(
            [("pixels", "FP32", [1, 1, 1, 3], None)], raw=[np.array([np.nan, 1, 2], np.float32).tobytes()]
        ),
        GRPC_INVALID,
        ["input 'pixels'", "nan or infinite"],
    ),
    (
        "pixels_raw_length_mismatch",
        lambda: _grpc_request([("pixels", "FP32", [1, 2, 2, 3], None)], raw=[np.zeros(5, np.float32).tobytes()]),
        GRPC_INVALID,
        ["input 'pixels'", "needs 48 bytes", "got 20"],
    ),
    (
        "pixels_wrong_channel_count",
        lambda: _grpc_request([("pixels", "UINT8", [1, 1, 1, 1], {"uint_contents": [1]})]),
        GRPC_INVALID,
        ["input 'pixels'", "3 (rgb channels)"],
    ),
    (
        "raw_bytes_tensor_malformed",
        lambda: _grpc_request([("image", "BYTES", [1], None)], raw=[struct.pack("<I", 1000) + b"short"]),
        GRPC_INVALID,
        ["input 'image'", "malformed"],
    ),
    (
        "raw_contents_count_mismatch",
        lambda: _grpc_request([("image", "BYTES", [1], None)], raw=[b"a", b"b"]),
        GRPC_INVALID,
        ["number of inputs"],
    ),
    (
        "unknown_output",
        lambda: _grpc_request([_image(GOOD_PNG)], outputs=["logits"]),
        GRPC_INVALID,
        ["unknown output 'logits'"],
    ),
    (
        "unknown_model",
        lambda: _grpc_request([_image(GOOD_PNG)], model="no-such-model"),
        grpc.StatusCode.NOT_FOUND,
        ["no-such-model"],
    ),
    (
        "unknown_model_version",
        lambda: _grpc_request([_image(GOOD_PNG)], version="not-a-run"),
        grpc.StatusCode.NOT_FOUND,
        ["no version 'not-a-run'"],
    ),
    (
        "message_over_size_cap",
        lambda: _grpc_request([_image(b"x" * (MAX_REQUEST_BYTES + 10))]),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        [""],
    ),
]


@pytest.fixture(scope="module")
def grpc_stub(server):
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    with grpc.insecure_channel(server.grpc_target) as channel:
        yield GRPCInferenceServiceStub(channel)


@pytest.mark.parametrize("make_request, code, expected", [c[1:] for c in GRPC_CASES], ids=[c[0] for c in GRPC_CASES])
def test_grpc_bad_input_is_rejected_with_a_clear_status(server, grpc_stub, make_request, code, expected):
    with pytest.raises(grpc.RpcError) as caught:
        grpc_stub.ModelInfer(make_request(), timeout=60)
    assert caught.value.code() == code, caught.value.details()
    details = (caught.value.details() or "").lower()
    for text in expected:
        assert text in details, f"{text!r} not in {details!r}"
    assert server.alive()


# --- model repository extension ----------------------------------------------------------------


@pytest.mark.parametrize("action", ["unload", "load"])
def test_rest_model_repository_changes_are_refused(server, action):
    """An unload would leave a live pod that can never serve again; both calls are refused."""
    resp = requests.post(f"{server.url}/v2/repository/models/{MODEL_NAME}/{action}", timeout=10)
    assert resp.status_code == 501
    assert f"{action} of model '{MODEL_NAME}' is disabled" in resp.json()["error"]
    assert requests.get(f"{server.url}/v2/models/{MODEL_NAME}/ready", timeout=10).status_code == 200


def test_grpc_model_repository_unload_is_refused(server, grpc_stub):
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    with pytest.raises(grpc.RpcError) as caught:
        grpc_stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=MODEL_NAME), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "is disabled" in caught.value.details()
    assert grpc_stub.ModelReady(pb.ModelReadyRequest(name=MODEL_NAME), timeout=10).ready


# --- still serving -----------------------------------------------------------------------------


def test_server_still_answers_good_requests_after_all_the_bad_ones(server, grpc_stub):
    assert server.alive()
    assert requests.get(f"{server.url}/v2/health/ready", timeout=10).json() == {"ready": True}
    resp = post(server, {"inputs": [image_input([b64(GOOD_PNG), b64(GOOD_JPEG)])]})
    assert resp.status_code == 200, resp.text
    probs = {o["name"]: o for o in resp.json()["outputs"]}["probability"]["data"]
    assert len(probs) == 2 and all(0.0 <= p <= 1.0 for p in probs)
    reply = grpc_stub.ModelInfer(_grpc_request([_image(GOOD_PNG)], version=RUN_ID), timeout=60)
    assert {o.name for o in reply.outputs} == {"probability", "label", "ood_score", "in_distribution"}
    assert reply.model_version == RUN_ID


def test_no_bad_request_caused_a_server_error(server):
    """A 500 or INTERNAL anywhere in this module's traffic would show in the server's access log."""
    log = server.log_path.read_text(errors="replace")
    assert '" 500' not in log
    assert "Internal server error" not in log
