"""Overload and failure against the real server (REST and gRPC on loopback), with a steerable SavedModel.

The model (``serving_helpers.steerable_model``) answers mean intensity / 255 per
image; an image marker makes its call block on a named pipe until the test
releases it, fail internally, return one result too many, or fail on input.
Holding the model that way fills the queue and budgets deterministically: no
test depends on how fast this machine is. Every test ends with a good request
on both protocols, which must still succeed.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import requests

from tests.serving_helpers import (
    EXTRA_RESULT,
    GATE,
    GATE_2,
    INPUT_ERROR,
    INTERNAL_ERROR,
    MODEL_NAME,
    SECRET_PATH,
    ServerProcess,
    b64,
    length_prefixed,
    marked_png,
    metric,
    steerable_model,
    steerable_probability,
    wait_for,
)

PIXEL_BUDGET = 40_000  # decoded pixels of admitted requests
BYTE_BUDGET = 256 * 1024  # request bodies held at once
QUEUE = 4  # images waiting for a model call
LABEL = {"model_name": MODEL_NAME}


@pytest.fixture(scope="module")
def steerable(tmp_path_factory):
    return steerable_model(tmp_path_factory.mktemp("steerable"))


@pytest.fixture(scope="module")
def server(steerable, tmp_path_factory):
    model_dir = steerable[0]
    proc = ServerProcess(
        model_dir,
        tmp_path_factory.mktemp("overload-log") / "server.log",
        "--max_batch_size",
        "2",
        "--max_queued_images",
        str(QUEUE),
        "--max_queued_pixels",
        str(PIXEL_BUDGET),
        "--max_inflight_bytes",
        str(BYTE_BUDGET),
        env={"LOKY_MAX_CPU_COUNT": "1"},
    )
    try:
        proc.wait_ready()
        yield proc
    finally:
        for gate in steerable[1:]:
            gate.release()
        proc.stop()


@pytest.fixture(scope="module")
def gate(steerable):
    return steerable[1]


@pytest.fixture(scope="module")
def stub(server):
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    with grpc.insecure_channel(server.grpc_target) as channel:
        yield GRPCInferenceServiceStub(channel)


@pytest.fixture
def pool():
    with ThreadPoolExecutor(16) as executor:
        yield executor


def body(pngs: list[bytes], **extra) -> dict:
    return {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(pngs)], "data": [b64(p) for p in pngs]}],
        **extra,
    }


def post(server, payload, headers=None) -> requests.Response:
    return requests.post(
        f"{server.url}/v2/models/{MODEL_NAME}/infer",
        data=json.dumps(payload),
        timeout=120,
        headers={"content-type": "application/json", **(headers or {})},
    )


def grpc_request(pngs: list[bytes], request_id: str = "", **parameters):
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    request = pb.ModelInferRequest(
        model_name=MODEL_NAME,
        id=request_id,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="image", datatype="BYTES", shape=[len(pngs)], contents=pb.InferTensorContents(bytes_contents=pngs)
            )
        ],
    )
    for key, value in parameters.items():
        request.parameters[key].int64_param = value
    return request


def probabilities(resp: requests.Response) -> list[float]:
    assert resp.status_code == 200, resp.text
    return {o["name"]: o for o in resp.json()["outputs"]}["probability"]["data"]


def assert_serves(server, stub) -> None:
    """A good request still succeeds on both protocols."""
    png = marked_png(None, seed=99)
    assert probabilities(post(server, body([png]))) == pytest.approx([steerable_probability(png)], abs=1e-5)
    reply = stub.ModelInfer(grpc_request([png]), timeout=60)
    assert list(reply.outputs[0].contents.fp32_contents) == pytest.approx([steerable_probability(png)], abs=1e-5)


@contextlib.contextmanager
def model_held(server, gate, pool):
    """The model busy with a gated call until the block ends (then the gated request must succeed)."""
    calls = metric(server, "chest_ct_model_call_images_count", **LABEL)
    blocker = pool.submit(post, server, body([marked_png(GATE)]))
    wait_for(
        lambda: metric(server, "chest_ct_model_call_images_count", **LABEL) > calls,
        "the gated model call to start",
        server=server,
    )
    try:
        yield
    finally:
        gate.release()
    assert blocker.result().status_code == 200, blocker.result().text


def read_response(sock: socket.socket) -> str:
    """One whole HTTP response (headers and Content-Length body) read from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(
        next(line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    )
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk, "connection closed mid-body"
        body += chunk
    return (head + b"\r\n\r\n" + body).decode(errors="replace")


def queue_images(server) -> float:
    return metric(server, "chest_ct_queue_images", **LABEL)


def rejected(server, reason: str) -> float:
    return metric(server, "chest_ct_requests_rejected_total", reason=reason, **LABEL)


# --- admission ---------------------------------------------------------------------------------


def test_full_queue_is_answered_at_once_with_503_and_retry_after(server, gate, stub, pool):
    pngs = [marked_png(None, seed=i) for i in range(QUEUE)]
    before = rejected(server, "queue_images")
    with model_held(server, gate, pool):
        queued = [pool.submit(post, server, body([png])) for png in pngs]
        wait_for(lambda: queue_images(server) == QUEUE, "the queue to fill", server=server)
        # Answered while the model is still held: the refusal cannot have waited for it.
        resp = post(server, body([marked_png(None, seed=50)]))
        assert resp.status_code == 503, resp.text
        assert int(resp.headers["retry-after"]) >= 1
        assert "overloaded" in resp.json()["error"] and "--max_queued_images" in resp.json()["error"]
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(grpc_request([marked_png(None, seed=51)]), timeout=60)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "overloaded" in caught.value.details()
        assert int(dict(caught.value.trailing_metadata())["retry-after"]) >= 1
    assert rejected(server, "queue_images") == before + 2
    for png, future in zip(pngs, queued, strict=True):  # everything admitted was served
        assert probabilities(future.result()) == pytest.approx([steerable_probability(png)], abs=1e-5)
    assert_serves(server, stub)


def test_pixel_budget_refuses_large_images_while_others_hold_pixels(server, gate, stub, pool):
    big = marked_png(None, height=250, width=250, seed=3)  # 62,500 decoded pixels > PIXEL_BUDGET on its own
    before = rejected(server, "queue_pixels")
    with model_held(server, gate, pool):
        resp = post(server, body([big]))
        assert resp.status_code == 503, resp.text
        assert "--max_queued_pixels" in resp.json()["error"]
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(grpc_request([big]), timeout=60)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "pixels" in caught.value.details()
    assert rejected(server, "queue_pixels") == before + 2
    # Alone, a request over the budget is admitted: an idle server serves every request within the limits.
    assert probabilities(post(server, body([big]))) == pytest.approx([steerable_probability(big)], abs=1e-5)
    assert_serves(server, stub)


def test_byte_budget_refuses_a_body_before_reading_it(server, gate, stub, pool):
    before = rejected(server, "inflight_bytes")
    with model_held(server, gate, pool):
        # Declare a body over the budget and send only its first bytes: the answer comes anyway.
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
            sock.sendall(
                (
                    f"POST /v2/models/{MODEL_NAME}/infer HTTP/1.1\r\nHost: x\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {BYTE_BUDGET + 1000}\r\n\r\n"
                    '{"inputs": ['
                ).encode()
            )
            head = read_response(sock)
        assert head.startswith("HTTP/1.1 503"), head
        assert "retry-after:" in head.lower() and "--max_inflight_bytes" in head
        noise = np.random.default_rng(0).integers(0, 256, BYTE_BUDGET, dtype=np.uint8).tobytes()
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(grpc_request([noise]), timeout=60)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "bytes" in caught.value.details()
    assert rejected(server, "inflight_bytes") == before + 2
    assert_serves(server, stub)


# --- deadlines and disconnects -----------------------------------------------------------------


def test_client_deadlines_answer_504_and_deadline_exceeded(server, gate, stub, pool):
    calls = metric(server, "chest_ct_model_call_images_sum", **LABEL)
    dropped = metric(server, "chest_ct_requests_dropped_total", reason="deadline_exceeded", **LABEL)
    with model_held(server, gate, pool):
        # REST and gRPC: the request parameter 'timeout' (microseconds, as tritonclient sends it)
        resp = post(server, body([marked_png(None, seed=5)], parameters={"timeout": 300_000}))
        assert resp.status_code == 504, resp.text
        assert "deadline of 0.3 s passed" in resp.json()["error"]
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(grpc_request([marked_png(None, seed=6)], timeout=300_000), timeout=60)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "deadline" in caught.value.details()
        # gRPC: the call's own deadline; the server drops the queued work when it passes.
        queued_before = queue_images(server)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(grpc_request([marked_png(None, seed=7)]), timeout=0.5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(
            lambda: queue_images(server) == queued_before, "the expired gRPC request to leave the queue", server=server
        )
    assert metric(server, "chest_ct_requests_dropped_total", reason="deadline_exceeded", **LABEL) >= dropped + 2
    # Only the gated image ever reached the model: the expired requests' work was dropped, not run.
    assert metric(server, "chest_ct_model_call_images_sum", **LABEL) == calls + 1
    bad = post(server, body([marked_png(None)], parameters={"timeout": -5}))
    assert bad.status_code == 400 and "'timeout'" in bad.json()["error"]
    assert_serves(server, stub)


def test_queued_work_of_a_disconnected_rest_client_is_dropped(server, gate, stub, pool):
    calls = metric(server, "chest_ct_model_call_images_sum", **LABEL)
    cancelled = metric(server, "chest_ct_requests_dropped_total", reason="cancelled", **LABEL)
    payload = json.dumps(body([marked_png(None, seed=8)])).encode()
    with model_held(server, gate, pool):
        sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=30)
        sock.sendall(
            (
                f"POST /v2/models/{MODEL_NAME}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                f"\r\nContent-Length: {len(payload)}\r\n\r\n"
            ).encode()
            + payload
        )
        wait_for(lambda: queue_images(server) == 1, "the request to queue", server=server)
        sock.close()
        wait_for(lambda: queue_images(server) == 0, "the disconnected client's work to leave the queue", server=server)
    assert metric(server, "chest_ct_requests_dropped_total", reason="cancelled", **LABEL) == cancelled + 1
    assert metric(server, "chest_ct_model_call_images_sum", **LABEL) == calls + 1  # only the gated image ran
    assert_serves(server, stub)


# --- splitting and turns -----------------------------------------------------------------------


def test_large_request_is_split_and_small_requests_take_turns_with_it(server, gate, steerable, stub, pool):
    """A 6-image request (chunks of 2) whose 5th image holds the model: a small request sent after it
    completes while the large one is still unfinished, and the large one's results come back in order."""
    large = [marked_png(None, seed=20 + i) for i in range(6)]
    large[4] = marked_png(GATE_2, seed=24)
    small = marked_png(None, seed=30)
    calls = metric(server, "chest_ct_model_call_images_count", **LABEL)
    with model_held(server, gate, pool):
        big = pool.submit(post, server, body(large))
        wait_for(lambda: queue_images(server) == 2, "the large request's first chunk to queue", server=server)
        small_reply = pool.submit(stub.ModelInfer, grpc_request([small]), timeout=60)
        wait_for(lambda: queue_images(server) == 3, "the small request to queue", server=server)
    # The first release let the queue run until the large request's gated chunk: the small one is done.
    reply = small_reply.result(timeout=60)
    assert list(reply.outputs[0].contents.fp32_contents) == pytest.approx([steerable_probability(small)], abs=1e-5)
    assert not big.done()
    # Calls: the gated one, chunk 1, the small request, chunk 2, chunk 3 (gated on the second gate).
    wait_for(
        lambda: metric(server, "chest_ct_model_call_images_count", **LABEL) == calls + 5,
        "the large request's last chunk to reach the model",
        server=server,
    )
    steerable[2].release()
    got = probabilities(big.result(timeout=60))
    expected = [steerable_probability(p) for p in large]
    assert got == pytest.approx(expected, abs=1e-5)  # every image's own result, in request order
    assert_serves(server, stub)


# --- failures ----------------------------------------------------------------------------------


def _logged_with(server, request_id: str) -> str:
    """The server's log record naming ``request_id`` (with its traceback)."""
    log = server.log(tail=0)
    assert request_id in log, f"request id {request_id} not in the server log"
    return log[log.index(request_id) :][:20_000]


@pytest.mark.parametrize(
    "marker, logged",
    [(INTERNAL_ERROR, SECRET_PATH), (EXTRA_RESULT, "2 results for 1")],
    ids=["tensorflow_error", "result_count_mismatch"],
)
def test_internal_failures_answer_a_generic_error_with_an_id_found_in_the_log(server, stub, marker, logged):
    resp = post(server, body([marked_png(marker)]))
    assert resp.status_code == 500, resp.text
    message = resp.json()["error"]
    assert message.startswith("internal error while serving request ") and SECRET_PATH not in message
    request_id = message.split("request ", 1)[1].split(";", 1)[0]
    assert logged in _logged_with(server, request_id)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(grpc_request([marked_png(marker)], request_id="grpc-failing-1"), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "grpc-failing-1" in caught.value.details() and SECRET_PATH not in caught.value.details()
    assert logged in _logged_with(server, "grpc-failing-1")
    assert_serves(server, stub)  # the batching loop lives on


def test_a_merged_call_is_rerun_per_request_only_for_input_errors(server, gate, stub, pool):
    good_a, good_b = marked_png(None, seed=40), marked_png(None, seed=41)
    with model_held(server, gate, pool):
        input_error = pool.submit(post, server, body([marked_png(INPUT_ERROR)]))
        with_input_error = pool.submit(post, server, body([good_a]))
        wait_for(lambda: queue_images(server) == 2, "both requests to queue", server=server)
    assert input_error.result().status_code == 400 and "element 0" in input_error.result().json()["error"]
    assert probabilities(with_input_error.result()) == pytest.approx([steerable_probability(good_a)], abs=1e-5)
    with model_held(server, gate, pool):
        internal = pool.submit(post, server, body([marked_png(INTERNAL_ERROR)]))
        with_internal = pool.submit(post, server, body([good_b]))
        wait_for(lambda: queue_images(server) == 2, "both requests to queue", server=server)
    # Not an input error (out of memory would be the real case): the call is not retried.
    assert internal.result().status_code == 500 and with_internal.result().status_code == 500
    assert_serves(server, stub)


# --- hostile input -----------------------------------------------------------------------------

HOSTILE = "evil\nINFO forged log line " + "x" * 10_000


def test_client_text_is_quoted_short_and_on_one_line(server, stub):
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    png = marked_png(None)
    cases = [
        body([png]) | {"inputs": [{"name": HOSTILE, "datatype": "BYTES", "shape": [1], "data": [b64(png)]}]},
        body([png]) | {"inputs": [{"name": "image", "datatype": HOSTILE, "shape": [1], "data": [b64(png)]}]},
        body([png])
        | {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": list(range(100_000)), "data": [1.0]}]},
        body([png], outputs=[{"name": HOSTILE}]),
    ]
    for payload in cases:
        resp = post(server, payload)
        assert resp.status_code == 400, resp.text
        assert len(resp.json()["error"]) < 1000 and "\n" not in resp.json()["error"]
    resp = requests.post(f"{server.url}/v2/models/{'m' * 5000}/infer", data=json.dumps(body([png])), timeout=60)
    assert resp.status_code == 404 and len(resp.json()["error"]) < 400
    for request in (
        pb.ModelInferRequest(model_name=HOSTILE, inputs=grpc_request([png]).inputs),
        pb.ModelInferRequest(
            model_name=MODEL_NAME,
            inputs=[pb.ModelInferRequest.InferInputTensor(name=HOSTILE, datatype="BYTES", shape=[1])],
        ),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, timeout=60)
        assert len(caught.value.details()) < 1000 and "\n" not in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:  # ModelReady / ModelMetadata of a hostile name
        stub.ModelMetadata(pb.ModelMetadataRequest(name=HOSTILE), timeout=60)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and len(caught.value.details()) < 1000
    post(server, body([png]), headers={"x-request-id": "r" * 8000})
    lines = server.log(tail=0).splitlines()
    assert not [line for line in lines if len(line) > 2000], "a log line quotes a client's text at full length"
    assert not [line for line in lines if line.startswith("INFO forged")], "a client's newline reached the log"
    assert_serves(server, stub)


def test_json_is_parsed_once_and_nan_is_not_json(server, stub):
    resp = post(
        server,
        {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 1, 1, 3], "data": [float("nan"), 1.0, 1.0]}]},
    )  # json.dumps writes the NaN literal
    assert resp.status_code == 400
    assert "not valid JSON" in resp.json()["error"] and "NaN" in resp.json()["error"]
    assert_serves(server, stub)


def test_binary_bytes_tensor_is_split_no_further_than_its_declared_count(server, stub):
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    raw = length_prefixed([marked_png(None)]) + struct.pack("<I", 0) * 100_000  # 1 image, then 100,000 empties
    header = json.dumps(
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(raw)}}]}
    ).encode()
    resp = requests.post(
        f"{server.url}/v2/models/{MODEL_NAME}/infer",
        data=header + raw,
        timeout=60,
        headers={"inference-header-content-length": str(len(header))},
    )
    assert resp.status_code == 400 and "data holds more" in resp.json()["error"]
    request = pb.ModelInferRequest(
        model_name=MODEL_NAME,
        raw_input_contents=[raw],
        inputs=[pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])],
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "holds more" in caught.value.details()
    assert_serves(server, stub)


# --- protocol ----------------------------------------------------------------------------------


def test_request_ids_headers_and_an_unversioned_model(server, stub):
    png = marked_png(None, seed=60)
    resp = post(server, body([png]), headers={"x-request-id": "trace-123"})
    assert resp.json()["id"] == "trace-123" and resp.headers["x-request-id"] == "trace-123"
    assert "model_version" not in resp.json()  # unversioned model: no "model_version": null
    resp = post(
        server,
        body([png], id="body-id", parameters={"binary_data_output": True}),
        headers={"x-request-id": "trace-124"},
    )
    header = json.loads(resp.content[: int(resp.headers["inference-header-content-length"])])
    assert header["id"] == "body-id" and "model_version" not in header
    reply, call = stub.ModelInfer.with_call(grpc_request([png]), metadata=(("x-request-id", "trace-125"),), timeout=60)
    assert reply.id == "trace-125" and dict(call.initial_metadata())["x-request-id"] == "trace-125"
    meta = requests.get(f"{server.url}/v2/models/{MODEL_NAME}", timeout=10).json()
    assert "versions" not in meta and meta["platform"] == "tensorflow_savedmodel"
    assert_serves(server, stub)


def test_event_loop_executor_and_tensorflow_threads_follow_the_cpu_count(server):
    """LOKY_MAX_CPU_COUNT=1 stands in for a 1-CPU container quota (joblib reads cgroup v1 and v2 the same way)."""
    log = server.log(tail=0)
    assert "Setting max asyncio worker threads as 5" in log
    assert "TensorFlow thread pools sized to the container's CPU limit: 1" in log


def test_metrics_carry_queue_depth_call_seconds_and_rejections_by_reason(server):
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{server.url}/metrics", timeout=10).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))) for f in text_string_to_metric_families(text) for s in f.samples
    }
    model = ("model_name", MODEL_NAME)
    expected = [
        ("chest_ct_queue_images", ()),
        ("chest_ct_queued_pixels", ()),
        ("chest_ct_inflight_bytes", ()),
        ("chest_ct_model_call_seconds_count", ()),
        ("chest_ct_model_call_seconds_bucket", (("le", "0.005"),)),
    ]
    expected += [
        ("chest_ct_requests_rejected_total", (("reason", r),))
        for r in ("queue_images", "queue_pixels", "inflight_bytes", "deadline")
    ]
    expected += [("chest_ct_requests_dropped_total", (("reason", r),)) for r in ("deadline_exceeded", "cancelled")]
    for name, labels in expected:  # every series exists from the start (zeros, not gaps)
        assert (name, tuple(sorted((model, *labels)))) in samples, (name, labels)
    # Every budget is free again once the requests are answered.
    for name in ("chest_ct_queue_images", "chest_ct_queued_pixels", "chest_ct_inflight_bytes"):
        assert metric(server, name, **LABEL) == 0, name
