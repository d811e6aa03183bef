"""The opt-in ``heatmap`` output (Grad-CAM) of the real ``python -m serving`` process, over REST and gRPC.

A request that names ``heatmap`` in ``outputs`` runs the explain signature of its
input kind; every map must equal the SavedModel's explain signature called in this
process on the same input (within 1e-5). A request that names no outputs must get
exactly the four outputs it got before the heatmap existed, and a model exported
without explain signatures must refuse ``heatmap`` with a clear 400, not a 500.
The engine's handling (separate batch kinds, separate pace) is tested in process.
The map's meaning (its peak on the patch that decides the class) is tested in
process by tests/test_gradcam.py and once here through the served path.
"""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import numpy as np
import pytest
import requests

from serving.dicom import read_hu
from tests.dicom_helpers import TEST_MAX_PIXELS, ct_dicom, real
from tests.serving_helpers import (
    MODEL_NAME,
    InProcessModel,
    ServerProcess,
    b64,
    ct_like,
    encode,
    exported_model,
    lung_window,
    marked_png,
    rgb,
    steerable_model,
)

TOL = 1e-5
SIZE = 128  # an 8x8 heatmap grid: enough cells for the maps to differ in shape, not only in scale
GRID = [SIZE // 16, SIZE // 16]
DEFAULT = ["probability", "label", "ood_score", "in_distribution"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return exported_model(str(tmp_path_factory.getbasetemp() / "serving"), SIZE)


@pytest.fixture(scope="module")
def reference(model_dir) -> InProcessModel:
    return InProcessModel(model_dir)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    proc = ServerProcess(
        model_dir,
        tmp_path_factory.mktemp("serving-heatmap-log") / "server.log",
        "--max_batch_size",
        "4",
        "--max_queued_images",
        "16",
    )
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    """CT-like slices of different sizes, modes and formats, and a photo (which the guard rejects)."""
    import skimage.data
    from PIL import Image

    return [
        encode(np.repeat(lung_window(ct_like(11, size=90, nodule=True))[..., None], 3, axis=-1)),
        encode(Image.fromarray(lung_window(ct_like(12, size=140))), "JPEG", quality=92),
        encode(lung_window(ct_like(13, size=64, nodule=True))),
        encode(skimage.data.coffee()[::4, ::4]),
    ]


def infer(server, payload: dict) -> requests.Response:
    return requests.post(
        f"{server.url}/v2/models/{MODEL_NAME}/infer",
        data=json.dumps(payload),
        timeout=120,
        headers={"content-type": "application/json"},
    )


def image_request(encoded: list[bytes], outputs: list[str] | None = None, **extra) -> dict:
    body = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(encoded)], "data": [b64(e) for e in encoded]}],
        **extra,
    }
    if outputs is not None:
        body["outputs"] = [{"name": name} for name in outputs]
    return body


def by_name(body: dict) -> dict[str, dict]:
    return {o["name"]: o for o in body["outputs"]}


def heatmap_of(output: dict) -> np.ndarray:
    """A JSON ``heatmap`` output as float32 ``[N, h, w]`` (v2 JSON data are flat, row-major)."""
    assert output["datatype"] == "FP32" and len(output["shape"]) == 3
    return np.asarray(output["data"], np.float32).reshape(output["shape"])


def check_maps(got: np.ndarray, want: dict[str, np.ndarray]) -> None:
    assert got.shape == want["heatmap"].shape and list(got.shape[1:]) == GRID
    assert np.max(np.abs(got - want["heatmap"])) <= TOL
    assert got.min() >= 0.0 and got.max() <= 1.0


# --- the contract -------------------------------------------------------------------------------


def test_metadata_lists_heatmap_as_opt_in(server):
    meta = requests.get(f"{server.url}/v2/models/{MODEL_NAME}", timeout=10).json()
    assert {"name": "heatmap", "datatype": "FP32", "shape": [-1, *GRID]} in meta["outputs"]
    params = meta["parameters"]
    assert params["default_outputs"] == ",".join(DEFAULT)
    assert params["opt_in_outputs"] == "heatmap"
    assert [params["heatmap_grid_height"], params["heatmap_grid_width"]] == GRID
    assert params["heatmap_layer"] == "block5_conv3" and "Grad-CAM" in params["heatmap_method"]


def test_a_request_naming_no_outputs_gets_no_heatmap(server, images, reference):
    plain = infer(server, image_request(images[:2]))
    assert plain.status_code == 200, plain.text
    assert [o["name"] for o in plain.json()["outputs"]] == DEFAULT
    binary = infer(server, image_request(images[:2], parameters={"binary_data_output": True}))
    assert binary.status_code == 200, binary.text
    header = json.loads(binary.content[: int(binary.headers["inference-header-content-length"])])
    assert [o["name"] for o in header["outputs"]] == DEFAULT
    got = np.asarray(by_name(plain.json())["probability"]["data"], np.float32)
    assert np.max(np.abs(got - reference.images(images[:2]))) <= TOL


def test_rest_heatmap_matches_the_in_process_explain_signature(server, images, reference):
    resp = infer(server, image_request(images, outputs=[*DEFAULT, "heatmap"], id="cam-1"))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["id"] == "cam-1" and [o["name"] for o in body["outputs"]] == [*DEFAULT, "heatmap"]
    out = by_name(body)
    want = reference.outputs("images", images, explain=True)
    check_maps(heatmap_of(out["heatmap"]), want)
    # The explain signature's probability is the predict signature's: naming the heatmap changes nothing else.
    assert np.max(np.abs(np.asarray(out["probability"]["data"], np.float32) - reference.images(images))) <= TOL
    assert out["in_distribution"]["data"] == want["in_distribution"].tolist()
    assert want["in_distribution"][0] and not want["in_distribution"][3], "a CT-like slice inside, a photo outside"
    assert out["label"]["data"][3] == "unsupported-input"  # the map is still returned, for the record
    maps = heatmap_of(out["heatmap"])
    assert len({m.tobytes() for m in maps}) == len(images) and all(m.max() == 1.0 for m in maps)


def test_heatmap_alone_for_pixels_and_dicom(server, reference):
    pixels = np.stack([rgb(40, 56, seed=21), rgb(40, 56, seed=22)]).astype(np.uint8)
    resp = infer(
        server,
        {
            "inputs": [
                {
                    "name": "pixels",
                    "datatype": "UINT8",
                    "shape": list(pixels.shape),
                    "data": pixels.reshape(-1).tolist(),
                }
            ],
            "outputs": [{"name": "heatmap"}],
        },
    )
    assert resp.status_code == 200, resp.text
    assert [o["name"] for o in resp.json()["outputs"]] == ["heatmap"]
    check_maps(heatmap_of(by_name(resp.json())["heatmap"]), reference.outputs("pixels", pixels, explain=True))

    files = [real("CT_small.dcm"), ct_dicom(ct_like(31, size=128, nodule=True))]
    for data in files:  # one request each: a request's slices must share one size
        resp = infer(
            server,
            {
                "inputs": [{"name": "dicom", "datatype": "BYTES", "shape": [1], "data": [b64(data)]}],
                "outputs": [{"name": "label"}, {"name": "heatmap"}],
            },
        )
        assert resp.status_code == 200, resp.text
        want = reference.outputs("hu", read_hu(data, TEST_MAX_PIXELS)[None], explain=True)
        check_maps(heatmap_of(by_name(resp.json())["heatmap"]), want)


def test_rest_binary_heatmap(server, images, reference):
    body = image_request(images[:3])
    body["outputs"] = [{"name": "label"}, {"name": "heatmap", "parameters": {"binary_data": True}}]
    resp = infer(server, body)
    assert resp.status_code == 200, resp.text
    length = int(resp.headers["inference-header-content-length"])
    header = json.loads(resp.content[:length])
    out = by_name(header)
    assert "data" not in out["heatmap"] and out["heatmap"]["shape"] == [3, *GRID]
    assert out["heatmap"]["parameters"]["binary_data_size"] == 3 * GRID[0] * GRID[1] * 4 == len(resp.content) - length
    got = np.frombuffer(resp.content[length:], "<f4").reshape(out["heatmap"]["shape"])
    check_maps(got, reference.outputs("images", images[:3], explain=True))
    assert len(out["label"]["data"]) == 3


def test_grpc_heatmap_typed_and_raw(server, images, reference):
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    encoded = images[:2]
    want = reference.outputs("images", encoded, explain=True)
    wanted = [pb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in ("probability", "heatmap")]
    typed = pb.ModelInferRequest(
        model_name=MODEL_NAME,
        outputs=wanted,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="image", datatype="BYTES", shape=[2], contents=pb.InferTensorContents(bytes_contents=encoded)
            )
        ],
    )
    raw = pb.ModelInferRequest(
        model_name=MODEL_NAME,
        outputs=wanted,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[2])],
        raw_input_contents=[b"".join(len(e).to_bytes(4, "little") + e for e in encoded)],
    )
    plain = pb.ModelInferRequest(model_name=MODEL_NAME, inputs=typed.inputs)
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = GRPCInferenceServiceStub(channel)
        typed_reply, raw_reply, plain_reply = (stub.ModelInfer(r, timeout=120) for r in (typed, raw, plain))
    heatmap = {o.name: o for o in typed_reply.outputs}["heatmap"]
    assert heatmap.datatype == "FP32" and list(heatmap.shape) == [2, *GRID]
    check_maps(np.asarray(heatmap.contents.fp32_contents, np.float32).reshape(2, *GRID), want)
    names = [o.name for o in raw_reply.outputs]
    assert names == ["probability", "heatmap"] and len(raw_reply.raw_output_contents) == 2
    check_maps(np.frombuffer(raw_reply.raw_output_contents[1], "<f4").reshape(2, *GRID), want)
    assert [o.name for o in plain_reply.outputs] == DEFAULT


def test_heatmap_and_plain_requests_at_once_each_get_their_own_answer(server, images, reference):
    from concurrent.futures import ThreadPoolExecutor

    bodies = [
        image_request([images[i % 3]], outputs=[*DEFAULT, "heatmap"] if i % 2 else None, id=f"r{i}") for i in range(8)
    ]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda body: infer(server, body), bodies))
    for i, resp in enumerate(replies):
        assert resp.status_code == 200, resp.text
        out = by_name(resp.json())
        want = reference.outputs("images", [images[i % 3]], explain=True)
        assert abs(out["probability"]["data"][0] - float(want["probability"][0])) <= TOL
        if i % 2:
            check_maps(heatmap_of(out["heatmap"]), want)
        else:
            assert "heatmap" not in out


# --- a model without explain signatures -----------------------------------------------------------


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory):
    model, _, _ = steerable_model(tmp_path_factory.mktemp("no-explain"))
    proc = ServerProcess(model, tmp_path_factory.mktemp("serving-no-explain-log") / "server.log")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def test_heatmap_from_a_model_without_explain_signatures_is_a_clear_400(plain_server):
    png = marked_png(None)
    meta = requests.get(f"{plain_server.url}/v2/models/{MODEL_NAME}", timeout=10).json()
    assert [o["name"] for o in meta["outputs"]] == DEFAULT and "opt_in_outputs" not in meta["parameters"]
    resp = infer(plain_server, image_request([png], outputs=["label", "heatmap"]))
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert "output 'heatmap' is not available from this model" in error and "explain_images" in error
    assert infer(plain_server, image_request([png])).status_code == 200  # the same image without it is served

    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    request = pb.ModelInferRequest(
        model_name=MODEL_NAME,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="image", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[png])
            )
        ],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="heatmap")],
    )
    with grpc.insecure_channel(plain_server.grpc_target) as channel, pytest.raises(grpc.RpcError) as caught:
        GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "output 'heatmap' is not available" in caught.value.details()
    assert plain_server.alive()


# --- the engine and admission, in process ---------------------------------------------------------


@pytest.fixture(scope="module")
def runner(model_dir):
    from serving.runner import SavedModelRunner

    return SavedModelRunner(model_dir)


def test_explain_and_predict_chunks_never_share_a_model_call(runner, images, reference):
    from serving.batching import IMAGES, BatchingEngine, explaining

    engine = BatchingEngine(runner, model_name="heatmap-test", max_batch_size=8, max_call_pixels=10**9, max_wait_s=0.3)
    calls: list[tuple[bool, int]] = []
    real_call = engine._call

    def spy(kind, payloads):
        calls.append((kind.explain, sum(len(p) for p in payloads)))
        return real_call(kind, payloads)

    engine._call = spy  # type: ignore[method-assign]

    async def go():
        deadline = time.monotonic() + 120
        return await asyncio.gather(
            engine.run(IMAGES, images[:2], [1] * 2, request_id="plain-1", deadline=deadline),
            engine.run(explaining(IMAGES), images[2:3], [1], request_id="cam", deadline=deadline),
            engine.run(IMAGES, images[3:], [1], request_id="plain-2", deadline=deadline),
        )

    plain_1, cam, plain_2 = asyncio.run(go())
    assert sorted(calls) == [(False, 3), (True, 1)], "the two plain requests merge; the heatmap one runs alone"
    assert "heatmap" not in (plain_1.dtype.names or ()) and "heatmap" not in (plain_2.dtype.names or ())
    check_maps(cam["heatmap"], reference.outputs("images", images[2:3], explain=True))
    assert engine.explain_seconds_per_image != 0.1 and engine.seconds_per_image != 0.1  # each pace learned apart


def test_admission_costs_a_heatmap_request_at_the_explain_pace(runner):
    """Explain calls measured 100x slower than predict ones: only the heatmap request misses its deadline."""
    from serving.admission import Admission
    from serving.batching import BatchingEngine
    from serving.config import ServerConfig
    from serving.errors import Overloaded

    engine = BatchingEngine(
        runner,
        model_name="heatmap-test",
        max_batch_size=1,
        max_call_pixels=10**9,
        seconds_per_image=0.1,
        explain_seconds_per_image=10.0,
    )
    admission = Admission(ServerConfig(max_queued_images=100), engine, "heatmap-test")
    first = admission.enter(100)
    admission.admit(first, images=2, first_chunk=1, pixels=2, time_left_s=30.0)
    plain, cam = admission.enter(100), admission.enter(100)
    admission.admit(plain, images=2, first_chunk=1, pixels=2, time_left_s=30.0)  # 0.2 s + 0.2 s
    with pytest.raises(Overloaded) as caught:  # 2 x 10 s + two turns of 0.2 s
        admission.admit(cam, images=2, first_chunk=1, pixels=2, time_left_s=15.0, explain=True)
    assert caught.value.reason == "deadline" and "10000 ms per image with heatmap" in caught.value.details
    # A heatmap request already admitted weighs on those behind it at its own pace.
    admission.admit(cam, images=2, first_chunk=1, pixels=2, time_left_s=60.0, explain=True)
    late = admission.enter(100)
    with pytest.raises(Overloaded):
        admission.admit(late, images=1, first_chunk=1, pixels=1, time_left_s=10.0, explain=True)
    admission.admit(late, images=1, first_chunk=1, pixels=1, time_left_s=1.0)  # plain: 0.1 s + 3 x 0.1 s turns
    for ticket in (first, plain, cam, late):
        admission.release(ticket)
    assert (admission.inflight_bytes, admission.held_pixels, admission.queue_images) == (0, 0, 0)
    assert admission._reserved_requests == []


# --- meaning, through the server ------------------------------------------------------------------


@pytest.fixture(scope="module")
def bright_rule_server(tmp_path_factory):
    """tests/test_gradcam.py's "a bright patch means adenocarcinoma" model (spatially local base), served."""
    from chest_ct.determinism import seed_everything
    from chest_ct.export import export_saved_model
    from chest_ct.model import build_model
    from tests.test_gradcam import BRIGHT, DARK, guard_for, local_base, patch_images, train_head
    from tests.test_gradcam import SIZE as PATCH_SIZE

    seed_everything(0)
    model = build_model(PATCH_SIZE, "none")
    local_base(model, seed=0)
    rng = np.random.default_rng(0)
    train_head(model, patch_images(rng, 60, (BRIGHT,))[0], patch_images(rng, 60, (DARK,))[0], seed=0)
    model_dir = export_saved_model(
        model,
        tmp_path_factory.mktemp("bright-rule") / "model",
        {"mlflow_run_id": "r"},
        guard=guard_for(model, patch_images(rng, 10, (BRIGHT, DARK))[0]),
    )
    proc = ServerProcess(model_dir, tmp_path_factory.mktemp("serving-bright-rule-log") / "server.log")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def test_the_served_heatmap_peaks_on_the_patch_that_decides_the_class(bright_rule_server):
    """The in-process localisation test (tests/test_gradcam.py) once through the served path: PNG over REST."""
    from tests.test_gradcam import BRIGHT, DARK, patch_images, peak_cells, png
    from tests.test_gradcam import GRID as PATCH_GRID

    pixels, cells = patch_images(np.random.default_rng(3), 20, (BRIGHT, DARK))
    resp = infer(bright_rule_server, image_request([png(p) for p in pixels], outputs=["probability", "heatmap"]))
    assert resp.status_code == 200, resp.text
    maps = heatmap_of(by_name(resp.json())["heatmap"])
    assert maps.shape == (20, PATCH_GRID, PATCH_GRID)
    on_bright = (peak_cells(maps) == cells[:, 0]).all(axis=1)
    assert on_bright.mean() >= 0.9, f"peak on the bright patch in {on_bright.mean():.0%} (chance {1 / 16:.0%})"
