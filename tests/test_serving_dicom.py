"""The server's ``dicom`` input and the guard's outputs, against the real ``python -m serving`` process.

DICOM files go over REST (base64 JSON and the binary tensor extension) and gRPC
(typed and raw contents); every answer must equal the SavedModel's ``serve_hu``
called in this process on the HU pydicom reads from the same bytes. Bad DICOM gets
a 400 / INVALID_ARGUMENT naming the element and the reason; the image limits
(pixel cap, body size, image count) hold for DICOM too.
"""

from __future__ import annotations

import asyncio
import json

import grpc
import numpy as np
import pytest
import requests
import skimage.data

from serving.dicom import read_hu
from serving.outputs import UNSUPPORTED_INPUT
from tests.dicom_helpers import TEST_MAX_PIXELS, ct_dicom, hostile, real
from tests.serving_helpers import (
    MODEL_NAME,
    RUN_ID,
    InProcessModel,
    ServerProcess,
    b64,
    ct_like,
    encode,
    exported_model,
    length_prefixed,
    metric,
)

TOL = 1e-5
MAX_REQUEST_BYTES = 4 * 1024 * 1024
MAX_IMAGES = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return exported_model(str(tmp_path_factory.getbasetemp() / "serving"))


@pytest.fixture(scope="module")
def reference(model_dir) -> InProcessModel:
    return InProcessModel(model_dir)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    proc = ServerProcess(
        model_dir,
        tmp_path_factory.mktemp("serving-dicom-log") / "server.log",
        "--max_request_bytes",
        str(MAX_REQUEST_BYTES),
        "--max_images",
        str(MAX_IMAGES),
        "--max_batch_size",
        "4",
    )
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def slices() -> list[bytes]:
    """Three CT-like slices of one size: default rescale, a half-HU slope, a shifted intercept."""
    return [
        ct_dicom(ct_like(400, nodule=True)),
        ct_dicom(ct_like(401), slope=0.5, intercept=-2048.0),
        ct_dicom(ct_like(402, nodule=True), intercept=-1000.0),
    ]


def expected(reference: InProcessModel, files: list[bytes]) -> dict[str, np.ndarray]:
    """The SavedModel in this process on the HU read from ``files`` (what the server must answer)."""
    return reference.outputs("hu", np.stack([read_hu(f, TEST_MAX_PIXELS) for f in files]))


def dicom_request(files: list[bytes], **extra) -> dict:
    return {
        "inputs": [{"name": "dicom", "datatype": "BYTES", "shape": [len(files)], "data": [b64(f) for f in files]}],
        **extra,
    }


def post(server, payload) -> requests.Response:
    return requests.post(
        f"{server.url}/v2/models/{MODEL_NAME}/infer",
        data=json.dumps(payload),
        timeout=60,
        headers={"content-type": "application/json"},
    )


def outputs_of(body: dict) -> dict[str, list]:
    return {o["name"]: o["data"] for o in body["outputs"]}


def check_against(out: dict, want: dict[str, np.ndarray], threshold: float) -> None:
    probs = np.asarray(out["probability"], np.float32)
    assert np.max(np.abs(probs - want["probability"])) <= TOL
    assert np.max(np.abs(np.asarray(out["ood_score"], np.float32) - want["ood_score"])) <= TOL
    assert list(out["in_distribution"]) == want["in_distribution"].tolist()
    labels = [
        ("adenocarcinoma" if p >= threshold else "normal") if ok else UNSUPPORTED_INPUT
        for p, ok in zip(want["probability"], want["in_distribution"], strict=True)
    ]
    assert [v.decode() if isinstance(v, bytes) else v for v in out["label"]] == labels


def threshold_of(model_dir) -> float:
    return json.loads((model_dir / "model_metadata.json").read_text())["threshold"]


# --- the contract -------------------------------------------------------------------------------


def test_metadata_lists_the_dicom_input_the_guard_and_the_window(server, model_dir):
    meta = requests.get(f"{server.url}/v2/models/{MODEL_NAME}", timeout=10).json()
    assert {"name": "dicom", "datatype": "BYTES", "shape": [-1]} in meta["inputs"]
    assert {"name": "in_distribution", "datatype": "BOOL", "shape": [-1]} in meta["outputs"]
    stored = json.loads((model_dir / "model_metadata.json").read_text())
    params = meta["parameters"]
    assert params["ood_threshold"] == pytest.approx(stored["ood"]["threshold"])
    assert (params["window_level"], params["window_width"]) == (-600.0, 1500.0)
    assert params["unsupported_label"] == UNSUPPORTED_INPUT
    assert metric(server, "chest_ct_ood_threshold", model_name=MODEL_NAME) == pytest.approx(params["ood_threshold"])


def test_rest_dicom_matches_the_in_process_model(server, reference, slices, model_dir):
    resp = post(server, dicom_request(slices, id="dcm-1"))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["id"] == "dcm-1" and body["model_version"] == RUN_ID
    assert body["parameters"]["ood_threshold"] == pytest.approx(
        json.loads((model_dir / "model_metadata.json").read_text())["ood"]["threshold"]
    )
    want = expected(reference, slices)
    assert want["in_distribution"].all(), "CT-like slices are what the test model's guard was fitted on"
    check_against(outputs_of(body), want, threshold_of(model_dir))


@pytest.mark.parametrize("name", ["CT_small.dcm", "693_J2KI.dcm"])
def test_real_ct_files_uncompressed_and_jpeg2000(server, reference, model_dir, name):
    data = real(name)
    resp = post(server, dicom_request([data]))
    assert resp.status_code == 200, resp.text
    check_against(outputs_of(resp.json()), expected(reference, [data]), threshold_of(model_dir))


def test_rest_binary_tensor_extension_carries_raw_dicom(server, reference, slices, model_dir):
    raw = length_prefixed(slices[:2])
    header = json.dumps(
        {"inputs": [{"name": "dicom", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(raw)}}]}
    ).encode()
    resp = requests.post(
        f"{server.url}/v2/models/{MODEL_NAME}/infer",
        data=header + raw,
        timeout=60,
        headers={"inference-header-content-length": str(len(header))},
    )
    assert resp.status_code == 200, resp.text
    check_against(outputs_of(resp.json()), expected(reference, slices[:2]), threshold_of(model_dir))


def test_grpc_typed_and_raw_contents(server, reference, slices, model_dir):
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    want = expected(reference, slices)
    typed = pb.ModelInferRequest(
        model_name=MODEL_NAME,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="dicom", datatype="BYTES", shape=[3], contents=pb.InferTensorContents(bytes_contents=slices)
            )
        ],
    )
    raw = pb.ModelInferRequest(
        model_name=MODEL_NAME,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="dicom", datatype="BYTES", shape=[3])],
        raw_input_contents=[length_prefixed(slices)],
    )
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = GRPCInferenceServiceStub(channel)
        replies = [stub.ModelInfer(typed, timeout=60), stub.ModelInfer(raw, timeout=60)]
    for reply in replies:
        out = {o.name: o for o in reply.outputs}
        if reply.raw_output_contents:  # raw in, raw out
            names = [o.name for o in reply.outputs]
            data = dict(zip(names, reply.raw_output_contents, strict=True))
            got = {
                "probability": np.frombuffer(data["probability"], np.float32),
                "ood_score": np.frombuffer(data["ood_score"], np.float32),
                "in_distribution": np.frombuffer(data["in_distribution"], np.bool_).tolist(),
                "label": _split(data["label"]),
            }
        else:
            got = {
                "probability": list(out["probability"].contents.fp32_contents),
                "ood_score": list(out["ood_score"].contents.fp32_contents),
                "in_distribution": list(out["in_distribution"].contents.bool_contents),
                "label": list(out["label"].contents.bytes_contents),
            }
        assert out["in_distribution"].datatype == "BOOL"
        check_against(got, want, threshold_of(model_dir))
        assert reply.parameters["ood_threshold"].string_param


def _split(raw: bytes) -> list[bytes]:
    out, offset = [], 0
    while offset < len(raw):
        n = int.from_bytes(raw[offset : offset + 4], "little")
        out.append(raw[offset + 4 : offset + 4 + n])
        offset += 4 + n
    return out


def test_kserve_grpc_client_sends_dicom(server, reference, slices, model_dir):
    from kserve import InferenceGRPCClient, InferInput, InferRequest

    async def call():
        client = InferenceGRPCClient(server.grpc_target, timeout=60)
        inp = InferInput("dicom", [2], "BYTES")
        inp.set_data_from_numpy(np.array(slices[1:], dtype=np.object_), binary_data=True)
        try:
            return await client.infer(InferRequest(model_name=MODEL_NAME, infer_inputs=[inp], request_id="kg"))
        finally:
            await client.close()

    res = asyncio.run(call())
    out = {o.name: o.as_numpy() for o in res.outputs}
    check_against({k: v.tolist() for k, v in out.items()}, expected(reference, slices[1:]), threshold_of(model_dir))


# --- the guard in answers, and what the server counts --------------------------------------------


def test_foreign_input_is_labelled_unsupported_and_counted(server, reference, slices):
    photo = encode(skimage.data.astronaut())
    air = ct_dicom(np.full((64, 64), -1000.0, np.float32))  # a "CT slice" of nothing but air
    assert not reference.outputs("images", [photo])["in_distribution"][0]
    assert not expected(reference, [air])["in_distribution"][0]
    labels = {"model_name": MODEL_NAME}
    before = {
        name: metric(server, name, **labels)
        for name in ("chest_ct_ood_score_count", "chest_ct_probability_count", "chest_ct_guard_rejections_total")
    }

    by_image = post(server, {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(photo)]}]})
    by_dicom = post(server, dicom_request([air, slices[0]]))
    for resp in (by_image, by_dicom):
        assert resp.status_code == 200, resp.text
    image_out, dicom_out = outputs_of(by_image.json()), outputs_of(by_dicom.json())
    assert image_out["label"] == [UNSUPPORTED_INPUT] and image_out["in_distribution"] == [False]
    assert dicom_out["label"][0] == UNSUPPORTED_INPUT and dicom_out["label"][1] in ("normal", "adenocarcinoma")
    assert dicom_out["in_distribution"] == [False, True]
    threshold = requests.get(f"{server.url}/v2/models/{MODEL_NAME}", timeout=10).json()["parameters"]["ood_threshold"]
    assert image_out["ood_score"][0] > threshold and dicom_out["ood_score"][0] > threshold >= dicom_out["ood_score"][1]
    assert 0.0 <= image_out["probability"][0] <= 1.0, "the probability is still reported, for the record"

    after = {name: metric(server, name, **labels) for name in before}
    assert after["chest_ct_ood_score_count"] - before["chest_ct_ood_score_count"] == 3
    assert after["chest_ct_probability_count"] - before["chest_ct_probability_count"] == 3
    assert after["chest_ct_guard_rejections_total"] - before["chest_ct_guard_rejections_total"] == 2
    assert metric(server, "chest_ct_ood_score_bucket", le="+Inf", **labels) == after["chest_ct_ood_score_count"]


# --- bad DICOM and the limits ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(hostile()))
def test_bad_dicom_is_a_400_naming_the_element_and_the_reason(server, kind):
    data, reason = hostile()[kind]
    resp = post(server, dicom_request([real("CT_small.dcm"), data]))  # the bad ones are 128 x 128 like it
    assert resp.status_code == 400, resp.text
    message = resp.json()["error"]
    assert message.startswith("input 'dicom' element 1: ") and reason in message, message


@pytest.mark.parametrize(
    "kind",
    ["not CT (MR)", "compressed, no decoder (JPEG-LS)", "multi-frame", "truncated in the pixels", "over the pixel cap"],
)
def test_bad_dicom_over_grpc_is_invalid_argument(server, kind):
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    data, reason = hostile()[kind]
    request = pb.ModelInferRequest(
        model_name=MODEL_NAME,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="dicom", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[data])
            )
        ],
    )
    with grpc.insecure_channel(server.grpc_target) as channel, pytest.raises(grpc.RpcError) as caught:
        GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'dicom' element 0" in caught.value.details() and reason in caught.value.details()


def test_slices_of_different_sizes_in_one_request_are_refused(server, slices):
    other = ct_dicom(ct_like(9, size=48))
    resp = post(server, dicom_request([slices[0], other]))
    assert resp.status_code == 400
    assert "element 1 is 48x48 but element 0 is 64x64; send slices of one size per request" in resp.json()["error"]


def test_image_limits_hold_for_dicom(server, slices):
    big = ct_dicom(np.zeros((1500, 1500), np.float32))  # 4.5 MB of pixels: over the 4 MiB body cap
    assert post(server, dicom_request([big])).status_code == 413
    too_many = post(server, dicom_request([slices[0]] * (MAX_IMAGES + 1)))
    assert too_many.status_code == 400 and f"over the limit of {MAX_IMAGES}" in too_many.json()["error"]
    empty = post(server, {"inputs": [{"name": "dicom", "datatype": "BYTES", "shape": [1], "data": [""]}]})
    assert empty.status_code == 400 and "element 0 is empty" in empty.json()["error"]
    not_base64 = post(server, {"inputs": [{"name": "dicom", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]})
    assert not_base64.status_code == 400 and "base64-encoded DICOM file" in not_base64.json()["error"]
    png_as_dicom = post(server, dicom_request([encode(np.zeros((8, 8), np.uint8))]))
    assert png_as_dicom.status_code == 400 and "not a DICOM file" in png_as_dicom.json()["error"]


def test_the_server_is_still_up_and_never_answered_500(server, slices):
    assert post(server, dicom_request(slices[:1])).status_code == 200
    log = server.log_path.read_text(errors="replace")
    assert '" 500' not in log and "Internal server error" not in log
