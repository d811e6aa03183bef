"""chest_ct.deploy against real local servers.

S3 is moto in server mode (real HTTP, real boto3 signing); the Kubernetes API
is a small HTTP server implementing the InferenceService endpoints the KServe
client calls, with JSON merge-patch semantics, that records every request.
"""

from __future__ import annotations

import copy
import itertools
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest
from kubernetes.client import ApiClient, Configuration

from chest_ct import deploy

# ---------------------------------------------------------------------- S3


_buckets = itertools.count(1)


@pytest.fixture
def s3(s3_endpoint, aws_credentials):
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = f"models-{next(_buckets)}"
    client.create_bucket(Bucket=bucket)
    return client, bucket


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A real (tiny) TensorFlow SavedModel: nested variables/ and assets/ folders."""
    import tensorflow as tf

    class Doubler(tf.Module):
        def __init__(self):
            super().__init__()
            self.scale = tf.Variable(2.0)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
        def __call__(self, x):
            return {"probability": x * self.scale}

    path = tmp_path_factory.mktemp("export") / "model"
    tf.saved_model.save(Doubler(), str(path))
    (path / "model_metadata.json").write_text(json.dumps({"class_names": ["normal", "adenocarcinoma"]}))
    return path


def _keys(client, bucket: str, prefix: str) -> list[str]:
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []))


def test_upload_copies_every_file_and_the_copy_loads(s3, s3_endpoint, saved_model, tmp_path):
    client, bucket = s3
    uri = deploy.upload_model_dir(saved_model, f"s3://{bucket}/chest-ct/run-1/", endpoint_url=s3_endpoint)

    assert uri == f"s3://{bucket}/chest-ct/run-1"
    local = sorted(p.relative_to(saved_model).as_posix() for p in saved_model.rglob("*") if p.is_file())
    assert _keys(client, bucket, "chest-ct/run-1/") == [f"chest-ct/run-1/{name}" for name in local]
    assert "chest-ct/run-1/variables/variables.index" in _keys(client, bucket, "chest-ct/run-1/")

    # What KServe's storage initializer would download must be the same model.
    import tensorflow as tf

    download = tmp_path / "mnt-models"
    for key in _keys(client, bucket, "chest-ct/run-1/"):
        target = download / key.removeprefix("chest-ct/run-1/")
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(target))
    served = tf.saved_model.load(str(download))
    assert served(tf.constant([1.5, -1.0]))["probability"].numpy().tolist() == [3.0, -2.0]


def test_upload_again_to_the_same_prefix_is_allowed(s3, s3_endpoint, saved_model):
    client, bucket = s3
    first = deploy.upload_model_dir(saved_model, f"s3://{bucket}/v1", endpoint_url=s3_endpoint)
    second = deploy.upload_model_dir(saved_model, f"s3://{bucket}/v1", endpoint_url=s3_endpoint)
    assert first == second
    assert len(_keys(client, bucket, "v1/")) == sum(1 for p in saved_model.rglob("*") if p.is_file())


def test_upload_refuses_a_prefix_holding_another_models_files(s3, s3_endpoint, saved_model):
    client, bucket = s3
    client.put_object(Bucket=bucket, Key="champion/variables/old-shard", Body=b"stale")

    with pytest.raises(ValueError, match=r"s3_uri: .*champion.*old-shard"):
        deploy.upload_model_dir(saved_model, f"s3://{bucket}/champion", endpoint_url=s3_endpoint)
    assert _keys(client, bucket, "champion/") == ["champion/variables/old-shard"]


def test_upload_does_not_treat_a_sibling_prefix_as_its_own(s3, s3_endpoint, saved_model):
    client, bucket = s3
    client.put_object(Bucket=bucket, Key="run-10/saved_model.pb", Body=b"other model")
    deploy.upload_model_dir(saved_model, f"s3://{bucket}/run-1", endpoint_url=s3_endpoint)
    assert client.get_object(Bucket=bucket, Key="run-10/saved_model.pb")["Body"].read() == b"other model"


def test_upload_needs_a_saved_model(tmp_path, s3_endpoint):
    (tmp_path / "model.keras").write_bytes(b"not a SavedModel")
    with pytest.raises(ValueError, match="model_dir: expected a TensorFlow SavedModel"):
        deploy.upload_model_dir(tmp_path, "s3://bucket/prefix", endpoint_url=s3_endpoint)


@pytest.mark.parametrize("uri", ["s3://bucket", "s3://bucket/", "gs://bucket/model", "bucket/model", ""])
def test_upload_needs_an_s3_prefix(uri, saved_model):
    with pytest.raises(ValueError, match="s3_uri: expected s3://<bucket>/<prefix>"):
        deploy.upload_model_dir(saved_model, uri)


# ---------------------------------------------------- InferenceService object


def test_inference_service_is_a_valid_kserve_object_and_survives_a_round_trip():
    obj = deploy.inference_service(canary_traffic_percent=10)
    model = deploy.to_inference_service_model(obj)

    assert model.spec.predictor.canary_traffic_percent == 10
    assert model.spec.predictor.containers[0].name == "kserve-container"
    # Nothing was dropped or renamed on the way into the SDK model.
    assert ApiClient().sanitize_for_serialization(model) == obj


def test_inference_service_speaks_v2_and_loads_from_storage_uri():
    obj = deploy.inference_service(storage_uri="s3://models/chest-ct/run-7", image="registry.example/serve:1.2.3")
    container = obj["spec"]["predictor"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}

    assert env["PROTOCOL"] == "v2"
    assert env["STORAGE_URI"] == "s3://models/chest-ct/run-7"
    assert container["image"] == "registry.example/serve:1.2.3"
    assert "--model_dir=/mnt/models" in container["args"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert "canaryTrafficPercent" not in obj["spec"]["predictor"]


def test_knative_mode_routes_http_only_and_standard_mode_adds_grpc():
    knative = deploy.inference_service()["spec"]["predictor"]["containers"][0]["ports"]
    standard = deploy.inference_service(deployment_mode="Standard")["spec"]["predictor"]["containers"][0]["ports"]

    assert [(p["name"], p["containerPort"]) for p in knative] == [("http1", 8080)]
    assert [(p["name"], p["containerPort"]) for p in standard] == [("http", 8080), ("h2c", 8081)]
    deploy.to_inference_service_model(deploy.inference_service(deployment_mode="Standard"))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "Chest_CT"}, "name"),
        ({"namespace": "-bad"}, "namespace"),
        ({"image": "ghcr.io/chest-ct/chest-ct-serve"}, "image"),
        ({"image": "ghcr.io/chest-ct/chest-ct-serve:latest"}, "image"),
        ({"storage_uri": "models/chest-ct"}, "storage_uri"),
        ({"canary_traffic_percent": 101}, "canary_traffic_percent"),
        ({"canary_traffic_percent": True}, "canary_traffic_percent"),
        ({"canary_traffic_percent": 10, "deployment_mode": "Standard"}, "canary_traffic_percent"),
        ({"deployment_mode": "Serverless"}, "deployment_mode"),
        ({"min_replicas": 4, "max_replicas": 3}, "min_replicas"),
    ],
)
def test_inference_service_names_the_bad_argument(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        deploy.inference_service(**kwargs)


def test_image_pinned_by_digest_is_accepted():
    image = "ghcr.io/chest-ct/chest-ct-serve@sha256:" + "a" * 64
    assert deploy.inference_service(image=image)["spec"]["predictor"]["containers"][0]["image"] == image


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda o: o["spec"]["predictor"].update(canaryTraficPercent=5), r"spec\.predictor: unknown field 'canaryTraficPercent'"),
        (lambda o: o["spec"]["predictor"]["containers"][0]["ports"][0].update(containerPort="8080"),
         r"spec\.predictor\.containers\[0\]\.ports\[0\]\.containerPort: expected int"),
        (lambda o: o["spec"]["predictor"]["containers"][0].pop("name"), r"spec\.predictor\.containers\[0\]: .*name"),
        (lambda o: o.update(kind="Deployment"), "apiVersion/kind"),
        (lambda o: o["spec"].pop("predictor"), r"spec\.predictor: required"),
    ],
)
def test_sdk_model_check_names_the_bad_field(mutate, message):
    obj = deploy.inference_service()
    mutate(obj)
    with pytest.raises(ValueError, match=message):
        deploy.to_inference_service_model(obj)


# ------------------------------------------------ applying to a Kubernetes API


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, as the API server applies application/merge-patch+json."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


@dataclass
class Recorded:
    method: str
    path: str
    content_type: str | None
    body: Any


@dataclass
class FakeKubeApi:
    """InferenceService GET/POST/PATCH of the Kubernetes API, in memory."""

    objects: dict[tuple[str, str], dict] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    fail_get_with: int | None = None

    PREFIX = "/apis/serving.kserve.io/v1beta1/namespaces/"

    def handle(self, method: str, path: str, content_type: str | None, body: Any) -> tuple[int, dict]:
        self.requests.append(Recorded(method, path, content_type, body))
        if not path.startswith(self.PREFIX):
            return 404, _status(404, "NotFound", path)
        parts = path[len(self.PREFIX):].split("/")
        if len(parts) < 2 or parts[1] != "inferenceservices":
            return 404, _status(404, "NotFound", path)
        namespace, name = parts[0], (parts[2] if len(parts) > 2 else None)
        if method == "GET" and name:
            if self.fail_get_with:
                return self.fail_get_with, _status(self.fail_get_with, "InternalError", "boom")
            found = self.objects.get((namespace, name))
            return (200, found) if found else (404, _status(404, "NotFound", f'inferenceservices "{name}" not found'))
        if method == "POST" and not name:
            key = (namespace, body["metadata"]["name"])
            if key in self.objects:
                return 409, _status(409, "AlreadyExists", "exists")
            stored = merge_patch(body, {"metadata": {"resourceVersion": "1", "generation": 1}})
            self.objects[key] = stored
            return 201, stored
        if method == "PATCH" and name:
            if (namespace, name) not in self.objects:
                return 404, _status(404, "NotFound", name)
            if content_type != "application/merge-patch+json":
                return 415, _status(415, "UnsupportedMediaType", str(content_type))
            stored = merge_patch(self.objects[(namespace, name)], body)
            stored["metadata"]["generation"] += 1
            self.objects[(namespace, name)] = stored
            return 200, stored
        return 405, _status(405, "MethodNotAllowed", method)


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason,
            "message": message}


@pytest.fixture
def kube():
    api = FakeKubeApi()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self):
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            code, payload = api.handle(self.command, self.path.split("?")[0], self.headers.get("Content-Type"), body)
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = _serve

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    configuration = Configuration(host=f"http://127.0.0.1:{server.server_address[1]}")
    yield api, deploy.kserve_client(configuration)
    server.shutdown()
    server.server_close()


ISVC_PATH = "/apis/serving.kserve.io/v1beta1/namespaces/chest-ct/inferenceservices"


def test_apply_creates_when_absent_without_a_canary_split(kube):
    api, client = kube
    obj = deploy.inference_service(storage_uri="s3://models/chest-ct/run-1", canary_traffic_percent=10)

    result = deploy.apply_inference_service(obj, "chest-ct", client=client)

    assert [(r.method, r.path) for r in api.requests] == [("GET", f"{ISVC_PATH}/chest-ct"), ("POST", ISVC_PATH)]
    sent = api.requests[1].body
    assert "canaryTrafficPercent" not in sent["spec"]["predictor"]  # nothing to split against yet
    expected = copy.deepcopy(obj)
    del expected["spec"]["predictor"]["canaryTrafficPercent"]
    assert sent == expected
    assert result["metadata"]["resourceVersion"] == "1"


def test_apply_patches_when_present_and_sets_the_canary(kube):
    api, client = kube
    deploy.apply_inference_service(deploy.inference_service(storage_uri="s3://models/chest-ct/run-1"), "chest-ct",
                                   client=client)
    api.requests.clear()

    new = deploy.inference_service(storage_uri="s3://models/chest-ct/run-2", canary_traffic_percent=20)
    result = deploy.apply_inference_service(new, "chest-ct", client=client)

    assert [(r.method, r.path) for r in api.requests] == [
        ("GET", f"{ISVC_PATH}/chest-ct"),
        ("PATCH", f"{ISVC_PATH}/chest-ct"),
    ]
    patch = api.requests[1]
    assert patch.content_type == "application/merge-patch+json"
    assert patch.body["spec"]["predictor"]["canaryTrafficPercent"] == 20
    env = {e["name"]: e["value"] for e in patch.body["spec"]["predictor"]["containers"][0]["env"]}
    assert env["STORAGE_URI"] == "s3://models/chest-ct/run-2"
    stored = api.objects[("chest-ct", "chest-ct")]
    assert stored["spec"]["predictor"]["canaryTrafficPercent"] == 20
    assert result["metadata"]["generation"] == 2


def test_apply_without_canary_promotes_a_previous_canary(kube):
    api, client = kube
    deploy.apply_inference_service(deploy.inference_service(), "chest-ct", client=client)
    deploy.apply_inference_service(deploy.inference_service(canary_traffic_percent=10), "chest-ct", client=client)
    api.requests.clear()

    deploy.apply_inference_service(deploy.inference_service(), "chest-ct", client=client)

    assert api.requests[-1].method == "PATCH"
    assert api.requests[-1].body["spec"]["predictor"]["canaryTrafficPercent"] == 100
    assert api.objects[("chest-ct", "chest-ct")]["spec"]["predictor"]["canaryTrafficPercent"] == 100


def test_apply_refuses_to_switch_deployment_mode_in_place(kube):
    api, client = kube
    existing = deploy.inference_service(deployment_mode="Standard")
    existing["metadata"]["annotations"][deploy.DEPLOYMENT_MODE_ANNOTATION] = "RawDeployment"  # legacy name
    api.objects[("chest-ct", "chest-ct")] = existing

    with pytest.raises(ValueError, match="deployment_mode: chest-ct/chest-ct runs in Standard mode"):
        deploy.apply_inference_service(deploy.inference_service(), "chest-ct", client=client)
    assert [r.method for r in api.requests] == ["GET"]


def test_apply_does_not_mistake_a_server_error_for_absence(kube):
    api, client = kube
    api.fail_get_with = 500
    with pytest.raises(RuntimeError, match="500"):
        deploy.apply_inference_service(deploy.inference_service(), "chest-ct", client=client)
    assert [r.method for r in api.requests] == ["GET"]


def test_apply_checks_its_input_before_calling_the_api(kube):
    api, client = kube
    obj = deploy.inference_service()
    with pytest.raises(ValueError, match="metadata.namespace"):
        deploy.apply_inference_service(obj, "other", client=client)
    obj["spec"]["predictor"]["minReplica"] = 1
    with pytest.raises(ValueError, match="unknown field 'minReplica'"):
        deploy.apply_inference_service(obj, "chest-ct", client=client)
    assert api.requests == []
