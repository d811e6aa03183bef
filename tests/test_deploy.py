"""Publishing a model: S3 upload, the InferenceService object, and rollouts against KServe's rules.

S3 is moto in server mode (real HTTP, real boto3 signing). The Kubernetes API
is tests/platforms/kube_api.py: strict field validation, dry runs, merge
patches, RBAC and, behind it, a KServe release (0.14.1 to 0.16.0) whose
webhook and controller follow that release's source.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import boto3
import pytest
import yaml
from kubernetes.client import Configuration

from chest_ct import deploy, rollout
from chest_ct import inference_service as isvc
from chest_ct.model_store import model_uri, parse_s3_uri, upload_model_dir
from tests.platforms import kube_api
from tests.platforms.kserve import RELEASES, Controller, Release

NAMESPACE = "chest-ct"
ISVC_PATH = f"/apis/serving.kserve.io/v1beta1/namespaces/{NAMESPACE}/inferenceservices"

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
    uri = upload_model_dir(saved_model, f"s3://{bucket}/chest-ct/run-1/", endpoint_url=s3_endpoint)

    assert uri == f"s3://{bucket}/chest-ct/run-1"
    local = sorted(p.relative_to(saved_model).as_posix() for p in saved_model.rglob("*") if p.is_file())
    assert _keys(client, bucket, "chest-ct/run-1/") == [f"chest-ct/run-1/{name}" for name in local]

    import tensorflow as tf  # what KServe's storage initializer would download must be the same model

    download = tmp_path / "mnt-models"
    for key in _keys(client, bucket, "chest-ct/run-1/"):
        target = download / key.removeprefix("chest-ct/run-1/")
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(target))
    assert tf.saved_model.load(str(download))(tf.constant([1.5, -1.0]))["probability"].numpy().tolist() == [3.0, -2.0]


def test_upload_again_to_the_same_prefix_is_allowed(s3, s3_endpoint, saved_model):
    client, bucket = s3
    first = upload_model_dir(saved_model, f"s3://{bucket}/v1", endpoint_url=s3_endpoint)
    assert upload_model_dir(saved_model, f"s3://{bucket}/v1", endpoint_url=s3_endpoint) == first
    assert len(_keys(client, bucket, "v1/")) == sum(1 for p in saved_model.rglob("*") if p.is_file())


def test_upload_refuses_a_prefix_holding_another_models_files(s3, s3_endpoint, saved_model):
    client, bucket = s3
    client.put_object(Bucket=bucket, Key="champion/variables/old-shard", Body=b"stale")
    with pytest.raises(ValueError, match=r"s3_uri: .*champion.*old-shard"):
        upload_model_dir(saved_model, f"s3://{bucket}/champion", endpoint_url=s3_endpoint)
    assert _keys(client, bucket, "champion/") == ["champion/variables/old-shard"]


def test_upload_does_not_treat_a_sibling_prefix_as_its_own(s3, s3_endpoint, saved_model):
    client, bucket = s3
    client.put_object(Bucket=bucket, Key="run-10/saved_model.pb", Body=b"other model")
    upload_model_dir(saved_model, f"s3://{bucket}/run-1", endpoint_url=s3_endpoint)
    assert client.get_object(Bucket=bucket, Key="run-10/saved_model.pb")["Body"].read() == b"other model"


def test_upload_needs_a_saved_model(tmp_path, s3_endpoint):
    (tmp_path / "model.keras").write_bytes(b"not a SavedModel")
    with pytest.raises(ValueError, match="model_dir: expected a TensorFlow SavedModel"):
        upload_model_dir(tmp_path, "s3://bucket/prefix", endpoint_url=s3_endpoint)


@pytest.mark.parametrize("uri", ["s3://bucket", "s3://bucket/", "gs://bucket/model", "bucket/model", ""])
def test_an_s3_prefix_is_required(uri):
    with pytest.raises(ValueError, match="s3_uri: expected s3://<bucket>/<prefix>"):
        parse_s3_uri(uri)


def test_each_model_version_gets_its_own_prefix():
    assert model_uri("s3://models/chest-ct/", "abc123") == "s3://models/chest-ct/abc123"
    with pytest.raises(ValueError, match="version"):
        model_uri("s3://models/chest-ct", "../champion")


# ---------------------------------------------------- the InferenceService object


def test_inference_service_speaks_v2_loads_from_storage_uri_and_is_ready_only_with_the_model():
    obj = isvc.inference_service("s3://models/chest-ct/run-7", image="registry.example/serve:1.2.3")
    [container] = obj["spec"]["predictor"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["PROTOCOL"] == "v2" and env["STORAGE_URI"] == "s3://models/chest-ct/run-7"
    assert container["image"] == "registry.example/serve:1.2.3"
    assert "--model_dir=/mnt/models" in container["args"] and "--model_name=chest-ct" in container["args"]
    # The server's health route answers before the model is loaded; the model route does not.
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/models/chest-ct/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert "canaryTrafficPercent" not in obj["spec"]["predictor"]


def test_autoscaling_fits_a_cpu_bound_model():
    """Knative's default (concurrency target 100, no limit) would never add a pod for a 7 images/s model."""
    predictor = isvc.inference_service("s3://m/p")["spec"]["predictor"]
    assert predictor["scaleMetric"] == "concurrency"
    # Knative's hard limit is what the server admits, so queue-proxy holds the excess rather than the pod refusing it.
    from serving.config import ServerConfig

    limits = ServerConfig()
    assert predictor["containerConcurrency"] == limits.max_batch_size + limits.max_queued_images
    assert 1 <= predictor["scaleTarget"] <= predictor["containerConcurrency"]
    assert predictor["timeout"] == 60 and predictor["maxReplicas"] > predictor["minReplicas"] >= 1
    annotations = isvc.inference_service("s3://m/p")["metadata"]["annotations"]
    assert annotations["serving.kserve.io/enable-prometheus-scraping"] == "true"
    standard = isvc.inference_service("s3://m/p", deployment_mode="Standard")["spec"]["predictor"]
    assert standard["annotations"]["prometheus.io/port"] == "8080"  # no queue-proxy to aggregate in Standard mode
    with pytest.raises(ValueError, match="could never reach"):
        isvc.Autoscaling(scale_target=9, container_concurrency=4)
    with pytest.raises(ValueError, match="scale_metric"):
        isvc.Autoscaling(scale_metric="cpu")  # KServe's webhook refuses cpu for Knative's autoscaler


@pytest.mark.parametrize(
    ("version", "knative", "standard"),
    [
        ("0.14.1", "Serverless", "RawDeployment"),
        ("0.15.0", "Serverless", "RawDeployment"),
        ("0.15.2", "Serverless", "RawDeployment"),
        ("0.16.0", "Knative", "Standard"),
        ("0.17", "Knative", "Standard"),
    ],
)
def test_the_mode_annotation_uses_the_name_the_target_kserve_knows(version, knative, standard):
    assert isvc.mode_annotation("Knative", version) == knative
    assert isvc.mode_annotation("Standard", version) == standard
    obj = isvc.inference_service("s3://m/p", kserve_version=version)
    assert obj["metadata"]["annotations"][isvc.DEPLOYMENT_MODE_ANNOTATION] == knative


@pytest.mark.parametrize("version", RELEASES)
def test_each_release_reads_the_annotation_as_knative_mode_even_when_the_cluster_default_is_not(version):
    """Defect 4: 'Knative' on 0.14-0.15.x was silently replaced by the cluster default."""
    release = Release(version, default_mode="Standard" if version >= "0.16" else "RawDeployment")
    ours = isvc.inference_service("s3://m/p", kserve_version=version)
    assert release.is_knative(release.deployment_mode(ours))
    if version < "0.16":
        before = isvc.inference_service("s3://m/p", kserve_version="0.16")  # what the old code always wrote
        assert not release.is_knative(release.deployment_mode(before))


def test_knative_mode_routes_http_only_and_standard_mode_adds_grpc():
    knative = isvc.inference_service("s3://m/p")["spec"]["predictor"]["containers"][0]["ports"]
    standard = isvc.inference_service("s3://m/p", deployment_mode="Standard")["spec"]["predictor"]["containers"][0]
    assert [(p["name"], p["containerPort"]) for p in knative] == [("http1", 8080)]
    assert [(p["name"], p["containerPort"]) for p in standard["ports"]] == [("http", 8080), ("h2c", 8081)]


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
        ({"kserve_version": "latest"}, "kserve_version"),
        ({"autoscaling": "many"}, "autoscaling"),
    ],
)
def test_inference_service_names_the_bad_argument(kwargs, field):
    kwargs = {"storage_uri": "s3://m/p", **kwargs}
    if field == "autoscaling":
        with pytest.raises(ValueError, match="min_replicas"):
            isvc.Autoscaling(min_replicas=4, max_replicas=3)
        return
    with pytest.raises(ValueError, match=f"^{field}"):
        isvc.inference_service(**kwargs)


def test_image_pinned_by_digest_is_accepted():
    image = "ghcr.io/chest-ct/chest-ct-serve@sha256:" + "a" * 64
    assert isvc.inference_service("s3://m/p", image=image)["spec"]["predictor"]["containers"][0]["image"] == image


@pytest.mark.parametrize("version", RELEASES)
@pytest.mark.parametrize("mode", ["Knative", "Standard"])
def test_the_object_has_only_fields_the_release_knows_and_passes_its_webhook(version, mode):
    release = Release(version)
    obj = isvc.inference_service("s3://m/p", kserve_version=version, deployment_mode=mode)
    assert release.unknown_fields(obj) == []
    release.admit(obj, None)


def test_the_schema_check_can_fail():
    release = Release("0.15.2")
    obj = isvc.inference_service("s3://m/p")
    obj["spec"]["predictor"]["canaryTraficPercent"] = 5
    obj["spec"]["predictor"]["ephemeralContainers"] = []  # in the SDK, not in the CRD
    assert release.unknown_fields(obj) == ["spec.predictor.canaryTraficPercent", "spec.predictor.ephemeralContainers"]


def test_render_prints_what_the_deploy_step_sends(capsys):
    assert deploy.main(["render", "--storage-uri", "s3://models/chest-ct/run-7", "--kserve-version", "0.16"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == isvc.inference_service("s3://models/chest-ct/run-7", kserve_version="0.16")


# ------------------------------------------------ rollouts against the API stand-in


class Store:
    """Model URIs the storage initializer would find."""

    def __init__(self):
        self.uris: set[str] = set()

    def __call__(self, uri: str) -> bool:
        return uri in self.uris


@pytest.fixture(params=RELEASES)
def cluster(request):
    """(fake API, InferenceServices client, model store, release) for each supported KServe release."""
    release = Release(request.param)
    store = Store()
    api = kube_api.FakeKubeApi(release, Controller(release, store))
    with kube_api.serve(api) as url:
        isvcs = rollout.InferenceServices(rollout.custom_objects_api(Configuration(host=url)), NAMESPACE)
        yield api, isvcs, store, release


def _model(store: Store, run: str, release: Release, canary: int | None = None) -> dict:
    uri = f"s3://models/chest-ct/{run}"
    store.uris.add(uri)
    return isvc.inference_service(uri, kserve_version=release.version, canary_traffic_percent=canary)


def _revision_of(obj: dict, store_uri: str, api) -> str:
    return next(r.name for r in api.controller.revisions[(NAMESPACE, "chest-ct")] if r.storage_uri == store_uri)


def _traffic(isvcs) -> dict[str, int]:
    status = rollout.Status.of(isvcs.get("chest-ct"))
    split: dict[str, int] = {}
    for target in status.traffic:
        split[target["revisionName"]] = split.get(target["revisionName"], 0) + target["percent"]
    return {name: percent for name, percent in split.items() if percent}


def test_create_canary_promote_rollback_as_kserve_would_route_them(cluster):
    api, isvcs, store, release = cluster
    fast = {"timeout_s": 5, "poll_s": 0.01}

    # 1. first model: created, 100%
    change = rollout.deploy(isvcs, _model(store, "run-1", release, canary=10))
    assert change.action == "created" and "canaryTrafficPercent" not in api.writes()[-1].body["spec"]["predictor"]
    rollout.wait_ready(isvcs, "chest-ct", **fast)
    first = _revision_of(change.obj, "s3://models/chest-ct/run-1", api)
    assert _traffic(isvcs) == {first: 100}

    # 2. the next model as a 10% canary
    change = rollout.deploy(isvcs, _model(store, "run-2", release, canary=10))
    assert change.action == "patched" and "10% to the new model" in change.note
    rollout.wait_ready(isvcs, "chest-ct", **fast)
    canary = _revision_of(change.obj, "s3://models/chest-ct/run-2", api)
    assert _traffic(isvcs) == {canary: 10, first: 90}

    # 3. promote: only canaryTrafficPercent changes, no revision is created, the evaluated canary gets 100%
    revisions_before = len(api.controller.revisions[(NAMESPACE, "chest-ct")])
    rollout.promote(isvcs, "chest-ct")
    assert api.writes()[-1].body == {"spec": {"predictor": {"canaryTrafficPercent": None}}}
    status = rollout.wait_ready(isvcs, "chest-ct", **fast)
    assert len(api.controller.revisions[(NAMESPACE, "chest-ct")]) == revisions_before
    assert _traffic(isvcs) == {canary: 100}
    assert status.latest_rolled_out == canary
    assert isvc.storage_uri_of(isvcs.get("chest-ct")) == "s3://models/chest-ct/run-2"

    # 4. roll back the completed rollout: the first model again, nothing else changes
    change = rollout.rollback(isvcs, "chest-ct")
    assert api.writes()[-1].body == {"spec": {"predictor": {"canaryTrafficPercent": 0}}}
    assert first in change.note
    rollout.wait_ready(isvcs, "chest-ct", **fast)
    assert _traffic(isvcs) == {first: 100}


def test_rollback_of_a_canary_in_flight_and_promote_without_a_canary(cluster):
    api, isvcs, store, release = cluster
    fast = {"timeout_s": 5, "poll_s": 0.01}
    rollout.deploy(isvcs, _model(store, "run-1", release))
    rollout.wait_ready(isvcs, "chest-ct", **fast)
    first = rollout.Status.of(isvcs.get("chest-ct")).latest_ready
    with pytest.raises(rollout.RolloutError, match="no canary in progress"):
        rollout.promote(isvcs, "chest-ct")
    with pytest.raises(rollout.RolloutError, match="no earlier model"):
        rollout.rollback(isvcs, "chest-ct")

    rollout.deploy(isvcs, _model(store, "run-2", release, canary=25))
    rollout.wait_ready(isvcs, "chest-ct", **fast)
    rollout.rollback(isvcs, "chest-ct")
    rollout.wait_ready(isvcs, "chest-ct", **fast)
    assert _traffic(isvcs) == {first: 100}


def test_a_direct_rollout_drops_an_unpromoted_canary_and_says_so(cluster):
    api, isvcs, store, release = cluster
    fast = {"timeout_s": 5, "poll_s": 0.01}
    rollout.deploy(isvcs, _model(store, "run-1", release))
    rollout.wait_ready(isvcs, "chest-ct", **fast)
    rollout.deploy(isvcs, _model(store, "run-2", release, canary=10))
    rollout.wait_ready(isvcs, "chest-ct", **fast)

    change = rollout.deploy(isvcs, _model(store, "run-3", release))
    assert "replaces the canary at 10%" in change.note
    rollout.wait_ready(isvcs, "chest-ct", **fast)
    assert _traffic(isvcs) == {_revision_of(change.obj, "s3://models/chest-ct/run-3", api): 100}


def test_a_canary_needs_a_fully_rolled_out_model(cluster):
    api, isvcs, store, release = cluster
    rollout.deploy(isvcs, _model(store, "run-1", release))  # created, never Ready: nothing rolled out yet
    store.uris.discard("s3://models/chest-ct/run-1")
    with pytest.raises(rollout.RolloutError, match="no fully rolled-out model yet"):
        rollout.deploy(isvcs, _model(store, "run-2", release, canary=10))


def test_the_mode_annotation_follows_what_kserve_recorded(cluster):
    """0.15.1+ rejects an update whose annotation differs from status.deploymentMode."""
    api, isvcs, store, release = cluster
    rollout.deploy(isvcs, _model(store, "run-1", release))
    rollout.wait_ready(isvcs, "chest-ct", timeout_s=5, poll_s=0.01)
    recorded = isvcs.get("chest-ct")["status"].get("deploymentMode")
    assert recorded == (("Knative" if release.new_mode_names else "Serverless") if release.records_mode else None)

    # A deploy step compiled for another KServe release (e.g. after an upgrade) sends the other name.
    other = "0.16" if not release.new_mode_names else "0.15"
    newer = isvc.inference_service("s3://models/chest-ct/run-2", kserve_version=other)
    store.uris.add("s3://models/chest-ct/run-2")
    rollout.deploy(isvcs, newer)
    assert api.writes()[-1].body["metadata"]["annotations"][isvc.DEPLOYMENT_MODE_ANNOTATION] == (
        recorded or newer["metadata"]["annotations"][isvc.DEPLOYMENT_MODE_ANNOTATION]
    )

    # The webhook rule itself, as the old code met it: a raw patch with the other name.
    if release.records_mode:
        wrong = {
            "metadata": {
                "annotations": {
                    isvc.DEPLOYMENT_MODE_ANNOTATION: "Knative" if recorded == "Serverless" else "Serverless"
                }
            }
        }
        with pytest.raises(rollout.RolloutError, match="deploymentMode cannot be changed from"):
            isvcs.patch("chest-ct", wrong)


def test_switching_mode_in_place_is_refused_before_the_api_call(cluster):
    api, isvcs, store, release = cluster
    store.uris.add("s3://m/p")
    rollout.deploy(
        isvcs, isvc.inference_service("s3://m/p", kserve_version=release.version, deployment_mode="Standard")
    )
    rollout.wait_ready(isvcs, "chest-ct", timeout_s=5, poll_s=0.01)
    writes = len(api.writes())
    with pytest.raises(rollout.RolloutError, match="cannot switch it to Knative in place"):
        rollout.deploy(isvcs, _model(store, "run-2", release))
    assert len(api.writes()) == writes


def test_unknown_fields_are_refused_by_the_server_not_silently_dropped(cluster):
    api, isvcs, store, release = cluster
    obj = _model(store, "run-1", release)
    obj["spec"]["predictor"]["minReplica"] = 1
    with pytest.raises(rollout.RolloutError, match='strict decoding error: unknown field "spec.predictor.minReplica"'):
        rollout.deploy(isvcs, obj, dry_run=True)
    assert api.objects == {}
    assert api.writes()[-1].query == {"fieldValidation": "Strict", "dryRun": "All"}


def test_the_stand_in_drops_unknown_fields_when_not_strict_as_the_api_server_does(cluster):
    api, isvcs, store, release = cluster
    obj = _model(store, "run-1", release)
    obj["spec"]["predictor"]["minReplica"] = 1
    isvcs.api.create_namespaced_custom_object("serving.kserve.io", "v1beta1", NAMESPACE, "inferenceservices", obj)
    assert "minReplica" not in api.objects[(NAMESPACE, "chest-ct")]["spec"]["predictor"]


def test_a_dry_run_changes_nothing(cluster):
    api, isvcs, store, release = cluster
    rollout.deploy(isvcs, _model(store, "run-1", release), dry_run=True)
    assert api.objects == {}


def test_wait_ready_fails_with_the_status_message_when_the_model_is_missing(cluster):
    api, isvcs, store, release = cluster
    rollout.deploy(isvcs, isvc.inference_service("s3://models/chest-ct/nothing-here", kserve_version=release.version))
    with pytest.raises(rollout.RolloutError) as raised:
        rollout.wait_ready(isvcs, "chest-ct", timeout_s=0.3, poll_s=0.01)
    assert "not Ready after 0.3 s" in str(raised.value)
    assert "RevisionFailed" in str(raised.value) and "no model found under s3://models/chest-ct/nothing-here" in str(
        raised.value
    )


def test_wait_ready_waits_for_the_new_revision_not_the_old_one(cluster):
    api, isvcs, store, release = cluster
    api.controller.startup_polls = 3
    rollout.deploy(isvcs, _model(store, "run-1", release))
    rollout.wait_ready(isvcs, "chest-ct", timeout_s=5, poll_s=0.01)
    rollout.deploy(isvcs, _model(store, "run-2", release))
    polls_before = len([r for r in api.requests if r.method == "GET"])
    status = rollout.wait_ready(isvcs, "chest-ct", timeout_s=5, poll_s=0.01)
    assert len([r for r in api.requests if r.method == "GET"]) - polls_before == 3
    assert status.latest_ready == status.latest_created


def test_wait_ready_is_bounded_by_its_timeout():
    now = [0.0]
    states = iter([{"metadata": {"generation": 2}, "status": {"observedGeneration": 1}}] * 100)

    class Never:
        namespace = NAMESPACE

        def get(self, name):
            return next(states)

    with pytest.raises(rollout.RolloutError, match="not Ready after 30 s: Ready=Unknown .*observed 1"):
        rollout.wait_ready(
            Never(),
            "chest-ct",
            timeout_s=30,
            poll_s=10,
            clock=lambda: now[0],
            sleep=lambda s: now.__setitem__(0, now[0] + s),
        )
    assert now[0] == 30


def test_a_server_error_is_not_mistaken_for_absence(cluster):
    api, isvcs, store, release = cluster
    api.fail_get_with = 500
    with pytest.raises(rollout.RolloutError, match="500"):
        rollout.deploy(isvcs, _model(store, "run-1", release))
    assert api.writes() == []


# ------------------------------------------------------ the deploy step, end to end


@pytest.mark.parametrize("version", ["0.15.2", "0.16.0"])
def test_deploy_model_dry_runs_uploads_applies_and_waits(version, s3, s3_endpoint, saved_model):
    client, bucket = s3
    release = Release(version)

    def in_s3(uri: str) -> bool:
        b, prefix = parse_s3_uri(uri)
        return f"{prefix}/saved_model.pb" in _keys(client, b, prefix + "/")

    api = kube_api.FakeKubeApi(release, Controller(release, in_s3))
    with kube_api.serve(api) as url:
        done = deploy.deploy_model(
            saved_model,
            model_store_uri=f"s3://{bucket}/chest-ct",
            version="run-1",
            kserve_version=version,
            s3_endpoint_url=s3_endpoint,
            ready_timeout_s=5,
            api=rollout.custom_objects_api(Configuration(host=url)),
        )
    assert done.storage_uri == f"s3://{bucket}/chest-ct/run-1" and done.status.serving
    writes = api.writes()
    assert [(w.method, w.query.get("dryRun")) for w in writes] == [("POST", "All"), ("POST", None)]
    assert all(w.query["fieldValidation"] == "Strict" for w in writes)


def test_deploy_model_uploads_nothing_when_the_server_refuses_the_object(s3, s3_endpoint, saved_model):
    """The dry run fails first (here: no permission), so no model is left behind in S3."""
    from tests.platforms.rbac import Authorizer

    client, bucket = s3
    release = Release("0.15.2")
    api = kube_api.FakeKubeApi(
        release,
        Controller(release, lambda uri: True),
        authorizer=Authorizer(),
        tokens={"t": "system:serviceaccount:team:default-editor"},
    )
    with kube_api.serve(api) as url:
        configuration = Configuration(
            host=url, api_key={"authorization": "t"}, api_key_prefix={"authorization": "Bearer"}
        )
        with pytest.raises(rollout.RolloutError, match='cannot get resource "inferenceservices"'):
            deploy.deploy_model(
                saved_model,
                model_store_uri=f"s3://{bucket}/chest-ct",
                version="run-1",
                s3_endpoint_url=s3_endpoint,
                api=rollout.custom_objects_api(configuration),
            )
    assert _keys(client, bucket, "chest-ct/") == []


def test_the_promote_and_rollback_commands(cluster, monkeypatch, capsys):
    api, isvcs, store, release = cluster
    monkeypatch.setattr(rollout, "custom_objects_api", lambda configuration=None: isvcs.api)
    rollout.deploy(isvcs, _model(store, "run-1", release))
    rollout.wait_ready(isvcs, "chest-ct", timeout_s=5, poll_s=0.01)
    assert deploy.main(["promote"]) == 2
    assert "no canary in progress" in capsys.readouterr().err

    rollout.deploy(isvcs, _model(store, "run-2", release, canary=10))
    rollout.wait_ready(isvcs, "chest-ct", timeout_s=5, poll_s=0.01)
    assert deploy.main(["promote", "--wait", "5"]) == 0
    out = capsys.readouterr().out
    assert "chest-ct/chest-ct promoted" in out and "Ready=True" in out
    assert deploy.main(["status"]) == 0
    assert "100%" in capsys.readouterr().out
