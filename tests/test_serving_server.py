"""The real serving process (``python -m serving``) over REST and gRPC: contract, clients, parity, batching.

One server is started for the whole module on free loopback ports and always
stopped at teardown. Nothing is mocked: requests go over HTTP/gRPC sockets to
the same code an InferenceService runs. Bad-input tests are in
``test_serving_bad_input.py``.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import requests

from tests.serving_helpers import (
    IMAGE_SIZE,
    MODEL_NAME,
    RUN_ID,
    InProcessModel,
    ServerProcess,
    b64,
    ct_like,
    encode,
    exported_model,
    length_prefixed,
    lung_window,
    metric,
    rgb,
    run_in_subprocess,
    set_threshold,
)

TOL = 1e-5


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    """Encoded CT-like slices of different formats, modes and sizes (none is the model's input size)."""
    from PIL import Image

    def slice_(seed: int, size: int, nodule: bool) -> np.ndarray:
        return lung_window(ct_like(seed, size=size, nodule=nodule))

    rgba = np.dstack([np.repeat(slice_(4, 52, False)[..., None], 3, axis=-1), np.full((52, 52), 200, np.uint8)])
    return {
        "png": encode(np.repeat(slice_(1, 50, True)[..., None], 3, axis=-1), "PNG"),
        "jpeg": encode(Image.fromarray(slice_(2, 64, False)).convert("RGB"), "JPEG", quality=90),
        "gray_png": encode(slice_(3, 40, True), "PNG"),
        "rgba_png": encode(rgba, "PNG"),
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, images):
    """The exported test model, its threshold set between the test images' probabilities so both labels occur."""
    # A copy: the shared export stays as exported for the modules that copy it later (e.g. a golden-set test).
    path = tmp_path_factory.mktemp("thresholded") / "model"
    shutil.copytree(exported_model(str(tmp_path_factory.getbasetemp() / "serving")), path)
    out = InProcessModel(path).outputs("images", list(images.values()))
    probs = out["probability"]
    assert len(set(np.round(probs, 7))) > 1, "test images must get different probabilities"
    assert out["in_distribution"].all(), "the labels below assume the guard accepts the test images"
    set_threshold(path, float(np.median(probs)))
    return path


@pytest.fixture(scope="module")
def reference(model_dir) -> InProcessModel:
    return InProcessModel(model_dir)


@pytest.fixture(scope="module")
def threshold(model_dir) -> float:
    return json.loads((model_dir / "model_metadata.json").read_text())["threshold"]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    proc = ServerProcess(
        model_dir,
        tmp_path_factory.mktemp("serving-log") / "server.log",
        "--max_batch_size",
        "8",
        "--max_batch_wait_ms",
        "30",
        "--max_queued_images",
        "32",
    )
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def infer_url(server) -> str:
    return f"{server.url}/v2/models/{MODEL_NAME}/infer"


def post_json(server, payload: dict, **kwargs) -> requests.Response:
    return requests.post(
        infer_url(server), data=json.dumps(payload), timeout=60, headers={"content-type": "application/json"}, **kwargs
    )


def image_request(encoded: list[bytes], **extra) -> dict:
    return {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(encoded)], "data": [b64(e) for e in encoded]}],
        **extra,
    }


def outputs_of(body: dict) -> dict[str, dict]:
    return {o["name"]: o for o in body["outputs"]}


def expected_labels(probs, threshold: float) -> list[str]:
    return ["adenocarcinoma" if p >= threshold else "normal" for p in probs]


def split_binary_response(resp: requests.Response) -> tuple[dict, dict[str, bytes]]:
    """(JSON header, {output name: raw bytes}) of a binary tensor extension response."""
    length = int(resp.headers["inference-header-content-length"])
    header = json.loads(resp.content[:length])
    raw, offset = {}, length
    for out in header["outputs"]:
        size = out.get("parameters", {}).get("binary_data_size")
        if size is not None:
            raw[out["name"]] = resp.content[offset : offset + size]
            offset += size
    assert offset == len(resp.content)
    return header, raw


def split_length_prefixed(raw: bytes) -> list[bytes]:
    out, offset = [], 0
    while offset < len(raw):
        n = int.from_bytes(raw[offset : offset + 4], "little")
        out.append(raw[offset + 4 : offset + 4 + n])
        offset += 4 + n
    return out


# --- health and metadata -----------------------------------------------------------------------


def test_health_and_readiness_endpoints(server):
    assert requests.get(f"{server.url}/v2/health/live", timeout=5).json() == {"live": True}
    assert requests.get(f"{server.url}/v2/health/ready", timeout=5).json() == {"ready": True}
    assert requests.get(f"{server.url}/v2/models/{MODEL_NAME}/ready", timeout=5).json() == {
        "name": MODEL_NAME,
        "ready": True,
    }
    assert requests.get(f"{server.url}/openapi.json", timeout=5).status_code == 200


def test_versioned_readiness(server):
    ready = requests.get(f"{server.url}/v2/models/{MODEL_NAME}/versions/{RUN_ID}/ready", timeout=5)
    assert ready.status_code == 200 and ready.json() == {"name": MODEL_NAME, "ready": True}
    other = requests.get(f"{server.url}/v2/models/{MODEL_NAME}/versions/not-a-run/ready", timeout=5)
    assert other.status_code == 404 and "no version 'not-a-run'" in other.json()["error"]
    missing = requests.get(f"{server.url}/v2/models/nope/versions/{RUN_ID}/ready", timeout=5)
    assert missing.status_code == 404


def test_server_metadata_advertises_the_extensions_it_implements(server):
    meta = requests.get(f"{server.url}/v2", timeout=5).json()
    assert meta["name"] and meta["extensions"] == ["binary_tensor_data"]  # not the repository extension it refuses


def test_rest_model_metadata_lists_inputs_outputs_and_model_facts(server, threshold):
    meta = requests.get(f"{server.url}/v2/models/{MODEL_NAME}", timeout=5).json()
    assert meta["name"] == MODEL_NAME
    assert meta["versions"] == [RUN_ID] and meta["platform"] == "tensorflow_savedmodel"
    assert {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]} == {
        "image": ("BYTES", [-1]),
        "pixels": ("FP32", [-1, -1, -1, 3]),
        "dicom": ("BYTES", [-1]),
    }
    grid = IMAGE_SIZE // 16
    assert {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]} == {
        "probability": ("FP32", [-1]),
        "label": ("BYTES", [-1]),
        "ood_score": ("FP32", [-1]),
        "in_distribution": ("BOOL", [-1]),
        "heatmap": ("FP32", [-1, grid, grid]),
    }
    assert meta["parameters"]["opt_in_outputs"] == "heatmap"  # listed, but returned only when named
    params = meta["parameters"]
    assert params["threshold"] == pytest.approx(threshold)
    assert params["class_names"] == "normal,adenocarcinoma"
    assert params["positive_class"] == "adenocarcinoma"
    assert params["image_size"] == IMAGE_SIZE
    assert params["model_version"] == params["mlflow_run_id"] == RUN_ID
    assert params["pixels_datatypes"] == "UINT8,FP32"
    assert params["dataset_fingerprint"] == "sha256:test"
    versioned = requests.get(f"{server.url}/v2/models/{MODEL_NAME}/versions/{RUN_ID}", timeout=5)
    assert versioned.status_code == 200 and versioned.json()["parameters"]["threshold"] == params["threshold"]
    other = requests.get(f"{server.url}/v2/models/{MODEL_NAME}/versions/not-a-run", timeout=5)
    assert other.status_code == 404 and RUN_ID in other.json()["error"]


TRITON_GRPC_METADATA = """
import tritonclient.grpc as grpcclient
client = grpcclient.InferenceServerClient(PAYLOAD["target"])
RESULT["health"] = [client.is_server_live(), client.is_server_ready(), client.is_model_ready(PAYLOAD["model"])]
RESULT["metadata"] = client.get_model_metadata(PAYLOAD["model"], as_json=True)
"""


def test_grpc_model_metadata_and_health(server):
    result = run_in_subprocess(TRITON_GRPC_METADATA, {"target": server.grpc_target, "model": MODEL_NAME})
    assert result["health"] == [True, True, True]
    meta = result["metadata"]
    assert meta["versions"] == [RUN_ID] and meta["platform"] == "tensorflow_savedmodel"
    assert {i["name"]: (i["datatype"], [int(d) for d in i["shape"]]) for i in meta["inputs"]} == {
        "image": ("BYTES", [-1]),
        "pixels": ("FP32", [-1, -1, -1, 3]),
        "dicom": ("BYTES", [-1]),
    }
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {
        "probability": "FP32",
        "label": "BYTES",
        "ood_score": "FP32",
        "in_distribution": "BOOL",
        "heatmap": "FP32",
    }


def test_grpc_versions_are_checked_and_server_metadata_is_honest(server):
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = GRPCInferenceServiceStub(channel)
        assert stub.ModelReady(pb.ModelReadyRequest(name=MODEL_NAME, version=RUN_ID), timeout=10).ready
        assert stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL_NAME, version=RUN_ID), timeout=10).versions == [
            RUN_ID
        ]
        for call, request in (
            (stub.ModelReady, pb.ModelReadyRequest(name=MODEL_NAME, version="not-a-run")),
            (stub.ModelMetadata, pb.ModelMetadataRequest(name=MODEL_NAME, version="not-a-run")),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call(request, timeout=10)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "not-a-run" in caught.value.details()
        assert list(stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10).extensions) == ["binary_tensor_data"]


# --- REST JSON ---------------------------------------------------------------------------------


def test_rest_images_match_in_process_model(server, images, reference, threshold):
    encoded = list(images.values())
    resp = post_json(server, image_request(encoded, id="req-42"))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["id"] == "req-42"
    assert body["model_name"] == MODEL_NAME and body["model_version"] == RUN_ID
    assert body["parameters"]["threshold"] == pytest.approx(threshold)
    out = outputs_of(body)
    assert out["probability"]["datatype"] == "FP32" and out["probability"]["shape"] == [len(encoded)]
    assert out["label"]["datatype"] == "BYTES" and out["label"]["shape"] == [len(encoded)]
    expected = reference.images(encoded)
    got = np.asarray(out["probability"]["data"], np.float32)
    assert np.max(np.abs(got - expected)) <= TOL
    assert out["label"]["data"] == expected_labels(got, threshold)
    assert set(out["label"]["data"]) == {"adenocarcinoma", "normal"}


def test_rest_generates_a_request_id_when_absent(server, images):
    ids = set()
    for _ in range(2):
        resp = post_json(server, image_request([images["png"]]))
        assert resp.status_code == 200, resp.text
        ids.add(resp.json()["id"])
    assert len(ids) == 2 and all(uuid.UUID(i) for i in ids)


@pytest.mark.parametrize("datatype", ["UINT8", "FP32"])
def test_rest_pixels_match_in_process_model(server, reference, datatype):
    pixels = np.stack([rgb(20, 30, seed=5), rgb(20, 30, seed=6)]).astype(np.uint8)
    data = pixels.reshape(-1).tolist() if datatype == "UINT8" else (pixels.astype(np.float32) + 0.25).tolist()
    resp = post_json(
        server, {"inputs": [{"name": "pixels", "datatype": datatype, "shape": list(pixels.shape), "data": data}]}
    )
    assert resp.status_code == 200, resp.text
    sent = pixels.astype(np.float32) + (0.25 if datatype == "FP32" else 0.0)
    got = np.asarray(outputs_of(resp.json())["probability"]["data"], np.float32)
    assert np.max(np.abs(got - reference.pixels(sent))) <= TOL


def test_pixels_and_encoded_image_of_the_same_picture_agree(server, images):
    """A PNG is lossless, so its decoded pixels must score the same through either input."""
    import io

    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(images["png"])).convert("RGB"))
    by_image = outputs_of(post_json(server, image_request([images["png"]])).json())["probability"]["data"]
    by_pixels = outputs_of(
        post_json(
            server,
            {
                "inputs": [
                    {
                        "name": "pixels",
                        "datatype": "UINT8",
                        "shape": [1, *pixels.shape],
                        "data": pixels.reshape(-1).tolist(),
                    }
                ]
            },
        ).json()
    )["probability"]["data"]
    assert abs(by_image[0] - by_pixels[0]) <= TOL


@pytest.mark.parametrize("wanted", [["label"], ["probability"], ["label", "probability"]])
def test_rest_outputs_selection(server, images, wanted):
    resp = post_json(server, image_request([images["png"]], outputs=[{"name": n} for n in wanted]))
    assert resp.status_code == 200, resp.text
    assert [o["name"] for o in resp.json()["outputs"]] == wanted


def test_rest_binary_output_for_all_outputs(server, images, reference, threshold):
    encoded = [images["png"], images["jpeg"]]
    resp = post_json(server, image_request(encoded, parameters={"binary_data_output": True}))
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/octet-stream"
    header, raw = split_binary_response(resp)
    assert all("data" not in o for o in header["outputs"])
    probs = np.frombuffer(raw["probability"], np.float32)
    assert np.max(np.abs(probs - reference.images(encoded))) <= TOL
    assert [s.decode() for s in split_length_prefixed(raw["label"])] == expected_labels(probs, threshold)


def test_rest_binary_output_per_output(server, images):
    resp = post_json(
        server,
        image_request(
            [images["png"]], outputs=[{"name": "probability", "parameters": {"binary_data": True}}, {"name": "label"}]
        ),
    )
    assert resp.status_code == 200, resp.text
    header, raw = split_binary_response(resp)
    out = outputs_of(header)
    assert "data" not in out["probability"] and out["probability"]["parameters"]["binary_data_size"] == 4
    assert out["label"]["data"][0] in ("adenocarcinoma", "normal")
    assert set(raw) == {"probability"}


def test_rest_binary_tensor_extension_input(server, images, reference):
    """Raw image bytes after the JSON header (what tritonclient sends with binary_data=True)."""
    encoded = [images["png"], images["gray_png"]]
    raw = length_prefixed(encoded)
    header = json.dumps(
        {
            "id": "bin-1",
            "inputs": [
                {"name": "image", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(raw)}}
            ],
        }
    ).encode()
    resp = requests.post(
        infer_url(server),
        data=header + raw,
        timeout=60,
        headers={"content-type": "application/octet-stream", "inference-header-content-length": str(len(header))},
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["id"] == "bin-1"
    got = np.asarray(outputs_of(body)["probability"]["data"], np.float32)
    assert np.max(np.abs(got - reference.images(encoded))) <= TOL


def test_rest_binary_tensor_extension_fp32_pixels(server, reference):
    pixels = rgb(24, 24, seed=9)[None].astype(np.float32)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "pixels",
                    "datatype": "FP32",
                    "shape": list(pixels.shape),
                    "parameters": {"binary_data_size": pixels.nbytes},
                }
            ]
        }
    ).encode()
    resp = requests.post(
        infer_url(server),
        data=header + pixels.tobytes(),
        timeout=60,
        headers={"inference-header-content-length": str(len(header))},
    )
    assert resp.status_code == 200, resp.text
    got = np.asarray(outputs_of(resp.json())["probability"]["data"], np.float32)
    assert np.max(np.abs(got - reference.pixels(pixels))) <= TOL


def test_rest_gzip_compressed_request(server, images, reference):
    body = gzip.compress(json.dumps(image_request([images["jpeg"]])).encode())
    resp = requests.post(
        infer_url(server),
        data=body,
        timeout=60,
        headers={"content-type": "application/json", "content-encoding": "gzip"},
    )
    assert resp.status_code == 200, resp.text
    got = outputs_of(resp.json())["probability"]["data"][0]
    assert abs(got - float(reference.images([images["jpeg"]])[0])) <= TOL


def test_rest_versioned_infer_route(server, images):
    resp = requests.post(
        f"{server.url}/v2/models/{MODEL_NAME}/versions/{RUN_ID}/infer",
        timeout=60,
        data=json.dumps(image_request([images["png"]])),
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["model_version"] == RUN_ID


# --- third-party and kserve clients ------------------------------------------------------------


def test_tritonclient_http_binary_images(server, images, reference, threshold):
    import tritonclient.http as httpclient

    encoded = [images["png"], images["jpeg"], images["rgba_png"]]
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_model_ready(MODEL_NAME)
    assert client.get_model_metadata(MODEL_NAME)["parameters"]["image_size"] == IMAGE_SIZE
    inp = httpclient.InferInput("image", [len(encoded)], "BYTES")
    inp.set_data_from_numpy(np.array(encoded, dtype=np.object_), binary_data=True)
    result = client.infer(MODEL_NAME, [inp], request_id="triton-http-1")
    probs = result.as_numpy("probability")
    assert probs.dtype == np.float32 and probs.shape == (len(encoded),)
    assert np.max(np.abs(probs - reference.images(encoded))) <= TOL
    labels = [b.decode() for b in result.as_numpy("label")]
    assert labels == expected_labels(probs, threshold)
    assert result.get_response()["id"] == "triton-http-1"
    # JSON (non-binary) output of only the label
    only = client.infer(MODEL_NAME, [inp], outputs=[httpclient.InferRequestedOutput("label", binary_data=False)])
    assert [o["name"] for o in only.get_response()["outputs"]] == ["label"]
    assert only.as_numpy("probability") is None
    assert [str(v) if isinstance(v, str) else v.decode() for v in only.as_numpy("label")] == labels


def test_tritonclient_http_pixels_and_compression(server, reference):
    import tritonclient.http as httpclient

    pixels = np.stack([rgb(28, 28, seed=11), rgb(28, 28, seed=12)])
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    inp = httpclient.InferInput("pixels", list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels, binary_data=True)
    result = client.infer(MODEL_NAME, [inp], request_compression_algorithm="gzip")
    assert np.max(np.abs(result.as_numpy("probability") - reference.pixels(pixels))) <= TOL


TRITON_GRPC_INFER = """
import base64
import numpy as np
import tritonclient.grpc as grpcclient
client = grpcclient.InferenceServerClient(PAYLOAD["target"])
model = PAYLOAD["model"]
encoded = [base64.b64decode(e) for e in PAYLOAD["images"]]
inp = grpcclient.InferInput("image", [len(encoded)], "BYTES")
inp.set_data_from_numpy(np.array(encoded, dtype=np.object_))
result = client.infer(model, [inp], request_id="triton-grpc-1")
response = result.get_response()
RESULT["probability"] = result.as_numpy("probability").tolist()
RESULT["probability_dtype"] = str(result.as_numpy("probability").dtype)
RESULT["label"] = [b.decode() for b in result.as_numpy("label")]
RESULT["id"] = response.id
RESULT["model_version"] = response.model_version
RESULT["threshold"] = response.parameters["threshold"].string_param
only = client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput("label")])
RESULT["only_outputs"] = [o.name for o in only.get_response().outputs]
pixels = np.array(PAYLOAD["pixels"], dtype=np.float32)
pin = grpcclient.InferInput("pixels", list(pixels.shape), "FP32")
pin.set_data_from_numpy(pixels)
no_id = client.infer(model, [pin])
RESULT["pixels_probability"] = no_id.as_numpy("probability").tolist()
RESULT["generated_id"] = no_id.get_response().id
"""


def test_tritonclient_grpc(server, images, reference, threshold):
    encoded = [images["jpeg"], images["gray_png"]]
    pixels = rgb(30, 20, seed=13)[None].astype(np.float32)
    result = run_in_subprocess(
        TRITON_GRPC_INFER,
        {
            "target": server.grpc_target,
            "model": MODEL_NAME,
            "images": [b64(e) for e in encoded],
            "pixels": pixels.tolist(),
        },
    )
    probs = np.asarray(result["probability"], np.float32)
    assert result["probability_dtype"] == "float32"
    assert np.max(np.abs(probs - reference.images(encoded))) <= TOL
    assert result["label"] == expected_labels(probs, threshold)
    assert result["id"] == "triton-grpc-1" and result["model_version"] == RUN_ID
    assert float(result["threshold"]) == pytest.approx(threshold)
    assert result["only_outputs"] == ["label"]
    assert np.max(np.abs(np.asarray(result["pixels_probability"]) - reference.pixels(pixels))) <= TOL
    assert result["generated_id"]


def test_kserve_rest_client_binary_and_base64(server, images, reference):
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    encoded = [images["png"], images["jpeg"]]
    expected = reference.images(encoded)

    async def call():
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
        binary = InferInput("image", [2], "BYTES")
        binary.set_data_from_numpy(np.array(encoded, dtype=np.object_), binary_data=True)
        as_base64 = InferInput("image", [2], "BYTES", data=[b64(e) for e in encoded])
        results = []
        for inp in (binary, as_base64):
            res = await client.infer(
                server.url,
                InferRequest(model_name=MODEL_NAME, infer_inputs=[inp], request_id="kserve-rest"),
                model_name=MODEL_NAME,
            )
            results.append(res)
        return results

    for res in asyncio.run(call()):
        assert res.id == "kserve-rest"
        probs = res.outputs[[o.name for o in res.outputs].index("probability")].as_numpy()
        assert np.max(np.abs(probs - expected)) <= TOL


def test_kserve_grpc_client_raw_and_typed_contents(server, images, reference, threshold):
    from kserve import InferenceGRPCClient, InferInput, InferRequest

    encoded = [images["png"], images["rgba_png"]]
    expected = reference.images(encoded)

    async def call():
        client = InferenceGRPCClient(server.grpc_target, timeout=60)
        raw = InferInput("image", [2], "BYTES")
        raw.set_data_from_numpy(np.array(encoded, dtype=np.object_), binary_data=True)
        typed = InferInput("image", [2], "BYTES", data=list(encoded))
        try:
            return [
                await client.infer(InferRequest(model_name=MODEL_NAME, infer_inputs=[inp], request_id=rid))
                for inp, rid in ((raw, "raw"), (typed, "typed"))
            ]
        finally:
            await client.close()

    for res, rid in zip(asyncio.run(call()), ("raw", "typed"), strict=True):
        assert res.id == rid
        out = {o.name: o for o in res.outputs}
        probs = out["probability"].as_numpy()
        assert np.max(np.abs(probs - expected)) <= TOL
        labels = [v.decode() if isinstance(v, bytes) else v for v in out["label"].as_numpy().tolist()]
        assert labels == expected_labels(probs, threshold)


# --- batching ----------------------------------------------------------------------------------


def _merged_calls(server) -> float:
    """Model calls that served more than one request, from the server's Prometheus metrics."""
    labels = {"model_name": MODEL_NAME}
    return metric(server, "chest_ct_model_call_requests_count", **labels) - metric(
        server, "chest_ct_model_call_requests_bucket", le="1.0", **labels
    )


def test_concurrent_requests_are_merged_and_each_gets_its_own_answer(server, reference):
    """Concurrent single-image requests share model calls, yet each response matches its own image."""
    encoded = [encode(rgb(32 + i, 40, seed=100 + i), "PNG") for i in range(6)]
    expected = reference.images(encoded)
    before = _merged_calls(server)
    for _attempt in range(3):  # arrival timing is up to the OS; a merge is near-certain within 3 bursts
        barrier = threading.Barrier(len(encoded))

        def send(i, barrier=barrier):
            barrier.wait()
            return post_json(server, image_request([encoded[i]], id=f"c{i}"))

        with ThreadPoolExecutor(len(encoded)) as pool:
            responses = list(pool.map(send, range(len(encoded))))
        for i, resp in enumerate(responses):
            assert resp.status_code == 200, resp.text
            assert resp.json()["id"] == f"c{i}"
            assert abs(outputs_of(resp.json())["probability"]["data"][0] - expected[i]) <= TOL
        if _merged_calls(server) > before:
            break
    assert _merged_calls(server) > before


def test_batch_larger_than_model_call_size_is_split(server, reference):
    """--max_batch_size 8: 11 images take two model calls and still come back in order."""
    encoded = [encode(rgb(30, 30, seed=200 + i), "JPEG") for i in range(11)]
    resp = post_json(server, image_request(encoded))
    assert resp.status_code == 200, resp.text
    got = np.asarray(outputs_of(resp.json())["probability"]["data"], np.float32)
    assert np.max(np.abs(got - reference.images(encoded))) <= TOL


def test_server_answers_health_checks_while_busy(server):
    """Model calls run off the event loop, so readiness stays responsive under load."""
    encoded = [encode(rgb(256, 256, seed=300 + i), "PNG") for i in range(8)]
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(post_json, server, image_request(encoded)) for _ in range(2)]
        time.sleep(0.05)
        start = time.monotonic()
        ready = requests.get(f"{server.url}/v2/health/ready", timeout=10)
        elapsed = time.monotonic() - start
        assert all(f.result().status_code == 200 for f in futures)
    assert ready.status_code == 200
    assert elapsed < 2.0


def test_grpc_channel_reuse_under_concurrency(server, images, reference):
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    expected = float(reference.images([images["png"]])[0])
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = GRPCInferenceServiceStub(channel)
        contents = pb.InferTensorContents(bytes_contents=[images["png"]])
        request = pb.ModelInferRequest(
            model_name=MODEL_NAME,
            inputs=[
                pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1], contents=contents)
            ],
        )
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda _: stub.ModelInfer(request, timeout=60), range(8)))
    for resp in responses:
        out = {o.name: o for o in resp.outputs}
        assert abs(out["probability"].contents.fp32_contents[0] - expected) <= TOL
        assert out["label"].contents.bytes_contents[0] in (b"adenocarcinoma", b"normal")
    assert len({r.id for r in responses}) == len(responses)
