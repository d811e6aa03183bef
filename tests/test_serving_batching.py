"""The batching engine with the real SavedModel: merging, splitting, and isolating a bad request's failure."""

from __future__ import annotations

import asyncio

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

    return SavedModelRunner(model_dir, max_batch_size=4)


@pytest.fixture(scope="module")
def reference(model_dir):
    return InProcessModel(model_dir)


def _calls():
    from serving.batching import BATCH_REQUESTS

    samples = {s.name + str(s.labels): s.value for s in BATCH_REQUESTS.collect()[0].samples}
    return samples["chest_ct_model_call_requests_count{}"], samples["chest_ct_model_call_requests_sum{}"]


def _images(n: int, seed: int) -> list[bytes]:
    return [encode(rgb(30, 34, seed=seed + i), "PNG") for i in range(n)]


def test_concurrent_requests_share_one_model_call(runner, reference):
    from serving.batching import BatchingEngine

    engine = BatchingEngine(runner, max_batch_size=4, max_wait_s=0.2)
    requests = [_images(1, 10), _images(2, 20), _images(1, 30)]
    calls_before, merged_before = _calls()

    async def go():
        return await asyncio.gather(*(engine.images(r) for r in requests))

    results = asyncio.run(go())
    calls_after, merged_after = _calls()
    assert calls_after - calls_before == 1  # 1 + 2 + 1 images fit in one call of 4
    assert merged_after - merged_before == 3  # ...that served all three requests
    for req, got in zip(requests, results, strict=True):
        assert got.shape == (len(req),)
        assert np.max(np.abs(got - reference.images(req))) <= TOL


def test_request_larger_than_the_batch_is_split_in_order(runner, reference):
    from serving.batching import BatchingEngine

    engine = BatchingEngine(runner, max_batch_size=4)
    images = _images(10, 40)
    got = asyncio.run(engine.images(images))
    assert np.max(np.abs(got - reference.images(images))) <= TOL


def test_a_bad_request_does_not_fail_the_requests_merged_with_it(runner, reference):
    """Bytes TensorFlow cannot decode (the validator is bypassed here) fail only their own request."""
    from serving.batching import BatchingEngine
    from serving.runner import ModelInputError

    engine = BatchingEngine(runner, max_batch_size=8, max_wait_s=0.2)
    good_a, good_b = _images(2, 50), _images(1, 60)
    bad = [_images(1, 70)[0], b"\x89PNG\r\n\x1a\n but not really"]

    async def go():
        return await asyncio.gather(engine.images(good_a), engine.images(bad), engine.images(good_b),
                                    return_exceptions=True)

    res_a, res_bad, res_b = asyncio.run(go())
    assert np.max(np.abs(res_a - reference.images(good_a))) <= TOL
    assert np.max(np.abs(res_b - reference.images(good_b))) <= TOL
    assert isinstance(res_bad, ModelInputError)
    assert res_bad.index == 1 and "element 1" in str(res_bad)


def test_pixels_of_different_sizes_are_not_merged(runner, reference):
    from serving.batching import BatchingEngine

    engine = BatchingEngine(runner, max_batch_size=8, max_wait_s=0.05)
    small = rgb(20, 20, seed=80)[None].astype(np.float32)
    large = rgb(40, 24, seed=81)[None].astype(np.float32)
    same = rgb(20, 20, seed=82)[None].astype(np.float32)
    calls_before, _ = _calls()

    async def go():
        return await asyncio.gather(engine.pixels(small), engine.pixels(large), engine.pixels(same))

    got_small, got_large, got_same = asyncio.run(go())
    assert _calls()[0] - calls_before == 2  # 20x20 twice in one call, 40x24 alone
    for pixels, got in ((small, got_small), (large, got_large), (same, got_same)):
        assert np.max(np.abs(got - reference.pixels(pixels))) <= TOL


def test_a_cancelled_request_does_not_stop_the_engine(runner, reference):
    from serving.batching import BatchingEngine

    engine = BatchingEngine(runner, max_batch_size=4, max_wait_s=0.05)
    images = _images(1, 90)

    async def go():
        doomed = asyncio.ensure_future(engine.images(_images(3, 95)))
        await asyncio.sleep(0)
        doomed.cancel()
        return await engine.images(images)

    got = asyncio.run(go())
    assert abs(float(got[0]) - float(reference.images(images)[0])) <= TOL
