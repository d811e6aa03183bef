"""The batching engine and admission in process, with the real exported SavedModel.

Merging, splitting, isolating a bad request's failure, a loop that survives its own
bugs, the deadline estimate of admission, and the export's one-at-a-time decode.
The same behaviour over REST and gRPC is in test_serving_overload.py.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from tests.serving_helpers import InProcessModel, encode, exported_model, rgb

TOL = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return exported_model(str(tmp_path_factory.getbasetemp() / "serving"))


@pytest.fixture(scope="module")
def runner(model_dir):
    from serving.runner import SavedModelRunner

    return SavedModelRunner(model_dir)


@pytest.fixture(scope="module")
def reference(model_dir):
    return InProcessModel(model_dir)


def engine_for(runner, max_batch_size: int = 4, max_wait_s: float = 0.0, max_call_pixels: int = 10**9):
    from serving.batching import BatchingEngine

    return BatchingEngine(
        runner, model_name="test", max_batch_size=max_batch_size, max_call_pixels=max_call_pixels, max_wait_s=max_wait_s
    )


async def run_images(engine, encoded: list[bytes], request_id: str = "r", timeout: float = 120.0):
    from serving.batching import IMAGES

    return await engine.run(
        IMAGES, encoded, [30 * 34] * len(encoded), request_id=request_id, deadline=time.monotonic() + timeout
    )


async def run_pixels(engine, pixels: np.ndarray, request_id: str = "p"):
    from serving.batching import pixels_kind

    n, height, width, _ = pixels.shape
    return await engine.run(
        pixels_kind(height, width), pixels, [height * width] * n, request_id=request_id, deadline=time.monotonic() + 120
    )


def _calls():
    from serving.metrics import CALL_REQUESTS

    CALL_REQUESTS.labels(model_name="test")  # make the series exist
    samples = {s.name: s.value for s in CALL_REQUESTS.collect()[0].samples if s.labels.get("model_name") == "test"}
    return samples["chest_ct_model_call_requests_count"], samples["chest_ct_model_call_requests_sum"]


def _images(n: int, seed: int) -> list[bytes]:
    return [encode(rgb(30, 34, seed=seed + i), "PNG") for i in range(n)]


def test_concurrent_requests_share_one_model_call(runner, reference):
    engine = engine_for(runner, max_batch_size=4, max_wait_s=0.2)
    requests = [_images(1, 10), _images(2, 20), _images(1, 30)]
    calls_before, merged_before = _calls()

    async def go():
        return await asyncio.gather(*(run_images(engine, r) for r in requests))

    results = asyncio.run(go())
    calls_after, merged_after = _calls()
    assert calls_after - calls_before == 1  # 1 + 2 + 1 images fit in one call of 4
    assert merged_after - merged_before == 3  # ...that served all three requests
    for req, got in zip(requests, results, strict=True):
        assert got.shape == (len(req),)
        assert np.max(np.abs(got["probability"] - reference.images(req))) <= TOL


def test_request_larger_than_the_batch_is_split_in_order(runner, reference):
    engine = engine_for(runner, max_batch_size=4)
    images = _images(10, 40)
    calls_before, _ = _calls()
    got = asyncio.run(run_images(engine, images))
    assert _calls()[0] - calls_before == 3  # 4 + 4 + 2
    assert np.max(np.abs(got["probability"] - reference.images(images))) <= TOL


def test_chunks_are_sized_by_pixels_as_well_as_images(runner):
    engine = engine_for(runner, max_batch_size=8, max_call_pixels=1000)
    assert engine.chunk_bounds([400, 400, 400, 5000, 100]) == [(0, 2, 800), (2, 3, 400), (3, 4, 5000), (4, 5, 100)]
    engine = engine_for(runner, max_batch_size=2)
    assert engine.chunk_bounds([1] * 5) == [(0, 2, 2), (2, 4, 2), (4, 5, 1)]
    assert engine.chunk_bounds([1] * 5, first=1) == [(0, 1, 1), (1, 3, 2), (3, 5, 2)]  # admission's room


def test_a_bad_request_does_not_fail_the_requests_merged_with_it(runner, reference):
    """Bytes TensorFlow cannot decode (the Pillow check is bypassed here) fail only their own request."""
    from serving.runner import ModelInputError

    engine = engine_for(runner, max_batch_size=8, max_wait_s=0.2)
    good_a, good_b = _images(2, 50), _images(1, 60)
    bad = [_images(1, 70)[0], b"\x89PNG\r\n\x1a\n but not really"]

    async def go():
        return await asyncio.gather(
            run_images(engine, good_a), run_images(engine, bad), run_images(engine, good_b), return_exceptions=True
        )

    res_a, res_bad, res_b = asyncio.run(go())
    assert np.max(np.abs(res_a["probability"] - reference.images(good_a))) <= TOL
    assert np.max(np.abs(res_b["probability"] - reference.images(good_b))) <= TOL
    assert isinstance(res_bad, ModelInputError)
    assert res_bad.index == 1 and "element 1" in str(res_bad)


def test_pixels_of_different_sizes_are_not_merged(runner, reference):
    engine = engine_for(runner, max_batch_size=8, max_wait_s=0.05)
    small = rgb(20, 20, seed=80)[None].astype(np.float32)
    large = rgb(40, 24, seed=81)[None].astype(np.float32)
    same = rgb(20, 20, seed=82)[None].astype(np.float32)
    calls_before, _ = _calls()

    async def go():
        return await asyncio.gather(run_pixels(engine, small), run_pixels(engine, large), run_pixels(engine, same))

    got_small, got_large, got_same = asyncio.run(go())
    assert _calls()[0] - calls_before == 2  # 20x20 twice in one call, 40x24 alone
    for pixels, got in ((small, got_small), (large, got_large), (same, got_same)):
        assert np.max(np.abs(got["probability"] - reference.pixels(pixels))) <= TOL


def test_a_cancelled_request_does_not_stop_the_engine(runner, reference):
    engine = engine_for(runner, max_batch_size=4, max_wait_s=0.05)
    images = _images(1, 90)

    async def go():
        doomed = asyncio.ensure_future(run_images(engine, _images(3, 95)))
        await asyncio.sleep(0)
        doomed.cancel()
        return await run_images(engine, images)

    got = asyncio.run(go())
    assert abs(float(got["probability"][0]) - float(reference.images(images)[0])) <= TOL


def test_the_loop_survives_its_own_exceptions(runner, reference):
    """A bug inside the loop fails that call's requests with an id (500) and the next request is served."""
    from serving.errors import InternalError

    engine = engine_for(runner)
    real_run_call = engine._run_call
    failures = []

    async def broken_once(jobs):
        if not failures:
            failures.append(jobs)
            raise RuntimeError("a bug in the loop")
        return await real_run_call(jobs)

    engine._run_call = broken_once
    images = _images(1, 100)

    async def go():
        first = await asyncio.gather(run_images(engine, _images(1, 101), request_id="doomed"), return_exceptions=True)
        return first[0], await run_images(engine, images)

    failed, served = asyncio.run(go())
    assert isinstance(failed, InternalError) and "doomed" in str(failed.details)
    assert abs(float(served["probability"][0]) - float(reference.images(images)[0])) <= TOL


def test_admission_refuses_what_would_miss_its_deadline_at_the_current_pace(runner):
    """With 10 s per image and a 5-image request taking turns, a 2-image request needs ~40 s: refused."""
    from serving.admission import Admission
    from serving.config import ServerConfig
    from serving.errors import Overloaded

    engine = engine_for(runner, max_batch_size=1)
    admission = Admission(ServerConfig(max_queued_images=100), engine, "test")
    first = admission.enter(100)
    admission.admit(first, images=5, first_chunk=1, pixels=500, time_left_s=30.0)  # nothing else: admitted
    engine.seconds_per_image = 10.0
    second = admission.enter(100)
    with pytest.raises(Overloaded) as caught:
        admission.admit(second, images=2, first_chunk=1, pixels=200, time_left_s=30.0)
    assert caught.value.reason == "deadline" and "would take about 40.0 s" in caught.value.details
    admission.admit(second, images=2, first_chunk=1, pixels=200, time_left_s=60.0)  # enough time: admitted
    for ticket in (first, second):
        admission.release(ticket)
    assert (admission.inflight_bytes, admission.held_pixels, admission.queue_images) == (0, 0, 0)


def test_a_large_request_enters_with_the_room_there_is(runner):
    """One image waits and the limit is 2: a 64-image request is admitted with a first chunk of 1, not refused."""
    from serving.admission import Admission
    from serving.config import ServerConfig
    from serving.errors import Overloaded

    admission = Admission(ServerConfig(max_queued_images=2), engine_for(runner, max_batch_size=2), "test")
    small = admission.enter(100)
    assert admission.admit(small, images=1, first_chunk=1, pixels=10, time_left_s=30.0) == 1
    large = admission.enter(100)
    assert admission.admit(large, images=64, first_chunk=2, pixels=640, time_left_s=30.0) == 1
    with pytest.raises(Overloaded):  # now full
        admission.enter(100)
    for ticket in (small, large):
        admission.release(ticket)


def test_the_exported_model_decodes_one_image_at_a_time(model_dir):
    """parallel_iterations=1 on the in-graph map: a batch never holds more than one decoded full-size image."""
    from tensorflow.core.protobuf import saved_model_pb2

    graph = saved_model_pb2.SavedModel.FromString((model_dir / "saved_model.pb").read_bytes()).meta_graphs[0]
    loops = [
        node
        for fn in graph.graph_def.library.function
        for node in fn.node_def
        if node.op in ("While", "StatelessWhile") and "parallel_iterations" in node.attr
    ]
    assert loops and all(node.attr["parallel_iterations"].i == 1 for node in loops)
