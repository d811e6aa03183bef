"""A model call that hangs, and the server's own deadline, against the real server (REST and gRPC).

Two servers on the steerable model (see test_serving_overload.py): one whose watchdog
limit is 0.5 s, one whose default deadline is 1.5 s. The gated model call hangs until
the test releases it, so nothing here depends on this machine's speed.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import requests

from tests.serving_helpers import (
    GATE,
    MODEL_NAME,
    ServerProcess,
    marked_png,
    metric,
    steerable_model,
    steerable_probability,
    wait_for,
)
from tests.test_serving_overload import body, grpc_request, post, probabilities


def _start(tmp_path_factory, *flags: str):
    model_dir, gate, _ = steerable_model(tmp_path_factory.mktemp("steerable"), version="v7")
    proc = ServerProcess(model_dir, tmp_path_factory.mktemp("watchdog-log") / "server.log", *flags)
    proc.wait_ready()
    return proc, gate


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    proc, gate = _start(tmp_path_factory, "--model_call_timeout_s", "0.5")
    try:
        yield proc, gate
    finally:
        gate.release()
        proc.stop()


@pytest.fixture(scope="module")
def short_deadline(tmp_path_factory):
    proc, gate = _start(tmp_path_factory, "--deadline_ms", "1500", "--max_queued_images", "8")
    try:
        yield proc, gate
    finally:
        gate.release()
        proc.stop()


def _stub(server):
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    return GRPCInferenceServiceStub(grpc.insecure_channel(server.grpc_target))


def _ready(server) -> tuple[int, int]:
    return (
        requests.get(f"{server.url}/v2/models/{MODEL_NAME}/ready", timeout=10).status_code,
        requests.get(f"{server.url}/v2/health/ready", timeout=10).status_code,
    )


def _serves(server, stub) -> None:
    png = marked_png(None, seed=77)
    assert probabilities(post(server, body([png]))) == pytest.approx([steerable_probability(png)], abs=1e-5)
    reply = stub.ModelInfer(grpc_request([png]), timeout=60)
    assert list(reply.outputs[0].contents.fp32_contents) == pytest.approx([steerable_probability(png)], abs=1e-5)


def test_a_hung_model_call_takes_the_server_out_of_rotation_until_it_ends(watched):
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    server, gate = watched
    stub = _stub(server)
    assert _ready(server) == (200, 200)
    with ThreadPoolExecutor(2) as pool:
        blocker = pool.submit(post, server, body([marked_png(GATE)]))
        wait_for(lambda: _ready(server) == (503, 503), "readiness to report the hung call", server=server)
        assert not stub.ModelReady(pb.ModelReadyRequest(name=MODEL_NAME), timeout=10).ready
        assert not stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        refused = post(server, body([marked_png(None)]))  # no point queueing behind a hung call
        assert refused.status_code == 503 and "not ready" in refused.json()["error"]
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(grpc_request([marked_png(None)]), timeout=60)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert requests.get(f"{server.url}/v2/health/live", timeout=10).status_code == 200  # alive, just not ready
        gate.release()
        assert blocker.result(timeout=60).status_code == 200
    wait_for(lambda: _ready(server) == (200, 200), "readiness to come back", server=server)
    assert "has run for more than 0.5 s" in server.log(tail=0)
    _serves(server, stub)


def test_the_default_deadline_answers_504_and_deadline_exceeded(short_deadline):
    server, gate = short_deadline
    stub = _stub(server)
    calls = metric(server, "chest_ct_model_call_images_count", model_name=MODEL_NAME)
    with ThreadPoolExecutor(4) as pool:
        blocker = pool.submit(post, server, body([marked_png(GATE)]))
        wait_for(
            lambda: metric(server, "chest_ct_model_call_images_count", model_name=MODEL_NAME) > calls,
            "the gated model call to start",
            server=server,
        )
        queued = pool.submit(post, server, body([marked_png(None, seed=1)]))  # no client deadline: the server's
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(grpc_request([marked_png(None, seed=2)]), timeout=60)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # from the server, not the client
        assert "deadline of 1.5 s passed" in caught.value.details()
        resp = queued.result(timeout=60)
        assert resp.status_code == 504 and "deadline of 1.5 s passed" in resp.json()["error"]
        assert blocker.result(timeout=60).status_code == 504  # it ran past its deadline too
        gate.release()
    _serves(server, stub)


def test_versioned_routes_of_a_versioned_steerable_model(short_deadline):
    server, _ = short_deadline
    assert requests.get(f"{server.url}/v2/models/{MODEL_NAME}/versions/v7/ready", timeout=10).status_code == 200
    resp = post(server, body([marked_png(None)]))
    assert resp.json()["model_version"] == "v7"
