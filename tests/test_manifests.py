"""The kustomize manifests, checked against the rules the platforms enforce.

What is checked is what `kubectl apply -k` would send: built with kubectl's
kustomize, validated against the Kubernetes 1.32 schemas (kubernetes-validate)
and, for KServe's kinds, each release's API types. Then the platforms' rules,
ported from their source in tests/platforms/: the Pod Security "restricted"
profile on the complete pod KServe and Knative create, Knative's revision
validation, and RBAC evaluated rule by rule for the accounts KFP runs pipeline
pods as (standalone: kubeflow/pipeline-runner; multi-user:
<profile>/default-editor with Kubeflow's kubeflow-edit). checkov runs from its
own virtualenv (.venv-checkov: it pins packaging<24).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes.client import Configuration

from chest_ct import inference_service as isvc
from chest_ct import rollout
from tests.platforms import kube_api, pod_security
from tests.platforms.kserve import RELEASES, Controller, Release
from tests.platforms.rbac import Authorizer, Request
from tests.platforms.serving_pod import knative_refusals, kserve_default_storage_container, serving_pod

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
OVERLAYS = ("standalone", "kubeflow")
KUBERNETES_VERSION = "1.32"
NAMESPACE = "chest-ct"
PROFILE = "kubeflow-user-example-com"  # overlays/kubeflow/params.env
KUBECTL = shutil.which("kubectl")
CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"

pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with built-in kustomize) is not on PATH")


def kustomize(path: Path) -> list[dict[str, Any]]:
    built = subprocess.run([KUBECTL, "kustomize", str(path)], check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(built) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict[str, Any]]]:
    return request.param, kustomize(MANIFESTS / "overlays" / request.param)


@pytest.fixture(scope="module")
def storage_container() -> dict[str, Any]:
    [csc] = kustomize(MANIFESTS / "kserve")
    return csc


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [doc for doc in docs if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return found


def workload_pods(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, str]]]:
    for doc in docs:
        label = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            template = doc["spec"]["template"]
            yield label, template["spec"], template.get("metadata", {}).get("annotations", {})


def profile_overlay(tmp_path: Path, profile: str) -> list[dict[str, Any]]:
    """overlays/kubeflow built for another profile, as a user would after editing params.env."""
    copy_dir = tmp_path / "overlays" / "kubeflow"
    shutil.copytree(MANIFESTS / "overlays" / "kubeflow", copy_dir)
    (copy_dir / "params.env").write_text(f"PROFILE_NAMESPACE={profile}\n")
    kustomization = (copy_dir / "kustomization.yaml").read_text()
    (copy_dir / "kustomization.yaml").write_text(
        kustomization.replace("../../base", os.path.relpath(MANIFESTS / "base", copy_dir))
    )
    return kustomize(copy_dir)


# -------------------------------------------------------------- build + schema


def test_overlay_builds_the_expected_objects(overlay):
    name, docs = overlay
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in docs}
    assert {
        ("Namespace", NAMESPACE),
        ("ServiceAccount", "chest-ct-model-server"),
        ("Role", "inferenceservice-deployer"),
        ("RoleBinding", "inferenceservice-deployer"),
        ("Deployment", "mlflow"),
        ("Service", "mlflow"),
        ("ConfigMap", "mlflow-config"),
        ("NetworkPolicy", "mlflow"),
    } <= kinds
    assert not by_kind(docs, "Secret"), "credentials must not be part of an overlay (re-applying would reset them)"
    # An account that cannot mount a token cannot call the API: nothing may pretend to run pipelines as one.
    assert ("ServiceAccount", "chest-ct-pipeline-runner") not in kinds


def test_reapplying_the_manifests_does_not_touch_the_served_model(overlay):
    """Defect 5: an InferenceService in the manifests reset STORAGE_URI on every `kubectl apply -k`."""
    _, docs = overlay
    release = Release("0.15.2")
    api = kube_api.FakeKubeApi(release, Controller(release, lambda uri: True))
    with kube_api.serve(api) as url:
        isvcs = rollout.InferenceServices(rollout.custom_objects_api(Configuration(host=url)), NAMESPACE)
        rollout.deploy(isvcs, isvc.inference_service("s3://models/chest-ct/run-42"))
        for doc in by_kind(docs, "InferenceService"):  # what `kubectl apply -k` would send
            isvcs.patch(doc["metadata"]["name"], doc)
        assert isvc.storage_uri_of(isvcs.get("chest-ct")) == "s3://models/chest-ct/run-42"
    assert by_kind(docs, "InferenceService") == []


def test_every_object_validates_against_its_schema(overlay, storage_container):
    _, docs = overlay
    for doc in [*docs, *kustomize(MANIFESTS / "gpu-smoke-test")]:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    for version in RELEASES:
        assert Release(version).unknown_fields_of(storage_container, "V1alpha1ClusterStorageContainer") == []


def test_the_schema_check_can_fail(storage_container):
    bad = copy.deepcopy(storage_container)
    bad["spec"]["container"]["securityContex"] = {}
    assert Release("0.15.2").unknown_fields_of(bad, "V1alpha1ClusterStorageContainer") == [
        "spec.container.securityContex"
    ]


def test_everything_lives_in_the_chest_ct_namespace(overlay):
    _, docs = overlay
    for doc in docs:
        if doc["kind"] == "Namespace":
            assert doc["metadata"]["name"] == NAMESPACE
        else:
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']}/{doc['metadata']['name']}"


def test_example_secrets_have_every_key_the_workloads_and_tasks_read(overlay):
    from pipelines import cluster

    _, docs = overlay
    secrets = kustomize(MANIFESTS / "examples" / "secrets")
    provided = {(s["metadata"]["name"], key) for s in secrets for key in s.get("stringData", {})}
    for label, pod, _ in workload_pods(docs):
        for container in pod_security.containers(pod):
            for env in container.get("env", []):
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    assert (ref["name"], ref["key"]) in provided, f"{label}: {ref} missing from examples/secrets"
    model_server = one(docs, "ServiceAccount", "chest-ct-model-server")
    assert {s["name"] for s in model_server["secrets"]} <= {s["metadata"]["name"] for s in secrets}

    pipeline_secrets = {s["metadata"]["name"]: s for s in kustomize(MANIFESTS / "examples" / "pipeline-secrets")}
    for secret in [*secrets, *pipeline_secrets.values()]:
        kubernetes_validate.validate(secret, KUBERNETES_VERSION, strict=True)
        assert all(
            "CHANGE_ME" in v or not v or k in ("AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI")
            for k, v in secret["stringData"].items()
        ), secret["metadata"]["name"]
    for name, keys in cluster.SECRET_ENV.items():
        assert set(keys) <= set(pipeline_secrets[name]["stringData"]), name
        assert pipeline_secrets[name]["metadata"]["namespace"] == PROFILE  # multi-user is the normal case


# ------------------------------------------------------------------ Pod Security


def test_namespace_enforces_restricted(overlay):
    _, docs = overlay
    assert one(docs, "Namespace", NAMESPACE)["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_every_workload_pod_is_admitted_under_restricted(overlay):
    _, docs = overlay
    pods = [*workload_pods(docs), *workload_pods(kustomize(MANIFESTS / "gpu-smoke-test"))]
    assert {label for label, _, _ in pods} == {"Deployment/mlflow", "Job/gpu-smoke-test"}
    for label, pod, pod_annotations in pods:
        assert pod_security.violations(pod, pod_annotations) == [], label


@pytest.mark.parametrize("version", RELEASES)
@pytest.mark.parametrize("mode", ["Knative", "Standard"])
def test_the_complete_model_server_pod_is_admitted_under_restricted(version, mode, overlay, storage_container):
    """Our container, KServe's storage-initializer (merged with manifests/kserve) and Knative's queue-proxy."""
    _, docs = overlay
    release = Release(version)
    obj = isvc.inference_service("s3://chest-ct-models/chest-ct/run-1", kserve_version=version, deployment_mode=mode)
    accounts = {sa["metadata"]["name"]: sa for sa in by_kind(docs, "ServiceAccount")}
    pod, pod_annotations = serving_pod(obj, release, [storage_container], accounts)

    names = [c["name"] for c in pod_security.containers(pod)]
    expected = ["storage-initializer", "kserve-container"] + (["queue-proxy"] if mode == "Knative" else [])
    assert names == expected
    assert pod_security.violations(pod, pod_annotations) == []
    [initializer] = pod["initContainers"]
    assert "image" not in storage_container["spec"]["container"]  # KServe keeps its own release's image
    assert initializer["image"] == f"kserve/storage-initializer:v{version}"
    assert initializer["args"] == ["s3://chest-ct-models/chest-ct/run-1", "/mnt/models"]


@pytest.mark.parametrize("version", RELEASES)
def test_with_kserves_default_storage_container_the_pod_is_rejected(version):
    """Defect 1: the pod KServe creates by default fails "restricted" on its storage initializer."""
    release = Release(version)
    obj = isvc.inference_service("s3://chest-ct-models/chest-ct/run-1", kserve_version=version)
    pod, pod_annotations = serving_pod(obj, release, [kserve_default_storage_container(version)])
    problems = pod_security.violations(pod, pod_annotations)
    assert problems and all("storage-initializer" in p for p in problems)
    assert any(p.startswith("allowPrivilegeEscalation") for p in problems)


def test_the_storage_container_replaces_kserves_default_for_every_uri_it_served(storage_container):
    default = kserve_default_storage_container("0.15.2")
    assert storage_container["metadata"]["name"] == "default"  # a second match would be picked at random
    assert storage_container["spec"]["supportedUriFormats"] == default["spec"]["supportedUriFormats"]
    assert storage_container["spec"]["container"]["resources"] == default["spec"]["container"]["resources"]


def test_knative_accepts_the_predictor():
    predictor = isvc.inference_service("s3://m/p")["spec"]["predictor"]
    assert knative_refusals(predictor) == []
    bad = copy.deepcopy(predictor)
    bad["securityContext"] = {"runAsNonRoot": True}  # pod-level: off unless an operator enables it
    bad["containers"][0]["ports"].append({"name": "h2c", "containerPort": 8081})
    assert len(knative_refusals(bad)) == 2
    # KServe 0.15+'s autoscaling fields configure the component; they never reach the revision's pod.
    scaled = {**predictor, "scaleMetricType": "Utilization", "autoScaling": {"metrics": []}}
    assert knative_refusals(scaled) == []


def test_the_pod_security_check_can_fail():
    pod = {
        "containers": [{"name": "c", "securityContext": {"privileged": True}}],
        "volumes": [{"name": "host", "hostPath": {"path": "/"}}],
    }
    problems = pod_security.violations(pod)
    assert {p.split(" (")[0] for p in problems} >= {
        "privileged",
        "restricted volume types",
        "runAsNonRoot != true",
        "seccompProfile",
        "unrestricted capabilities",
    }


# ------------------------------------------------------------------- RBAC


DEPLOY_VERBS = ("get", "create", "patch")  # what chest_ct.rollout sends (dry runs included)


def _can(authorizer: Authorizer, user: str, verb: str, namespace: str = NAMESPACE) -> bool:
    return authorizer.allowed(Request(user, verb, namespace, "serving.kserve.io", "inferenceservices", "chest-ct"))


def test_standalone_lets_kfps_pipeline_runner_deploy_and_nothing_else():
    authorizer = Authorizer().load(kustomize(MANIFESTS / "overlays" / "standalone"))
    runner = "system:serviceaccount:kubeflow:pipeline-runner"
    assert all(_can(authorizer, runner, verb) for verb in DEPLOY_VERBS)
    assert not _can(authorizer, runner, "delete")
    assert not authorizer.allowed(Request(runner, "get", NAMESPACE, "", "secrets", "s3-credentials"))
    assert not _can(authorizer, f"system:serviceaccount:{PROFILE}:default-editor", "get")


@pytest.mark.parametrize("manifests_tag", ["v1.10.0", "v1.11.0"])
def test_multi_user_lets_the_profiles_default_editor_deploy(tmp_path, manifests_tag):
    docs = profile_overlay(tmp_path, "team-ct")
    authorizer = Authorizer().load(docs).add_profile("team-ct", manifests_tag).add_profile("other", manifests_tag)
    editor = "system:serviceaccount:team-ct:default-editor"
    assert all(_can(authorizer, editor, verb) for verb in DEPLOY_VERBS)
    assert not _can(authorizer, editor, "delete")
    # Another profile's pipelines, and standalone KFP's account, may not touch this model.
    assert not _can(authorizer, "system:serviceaccount:other:default-editor", "patch")
    assert not _can(authorizer, "system:serviceaccount:kubeflow:pipeline-runner", "get")
    # In its own profile namespace default-editor may serve models through Kubeflow's kubeflow-edit.
    assert _can(authorizer, editor, "create", namespace="team-ct")
    netpol = one(docs, "NetworkPolicy", "mlflow")
    admitted = {
        peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for peer in netpol["spec"]["ingress"][0]["from"]
    }
    assert admitted == {NAMESPACE, "team-ct"}


def test_the_old_binding_did_not_reach_multi_user_pipeline_pods():
    """Defect 3: the binding named chest-ct-pipeline-runner and kubeflow/pipeline-runner, not default-editor."""
    old = [
        {
            "kind": "Role",
            "metadata": {"name": "inferenceservice-deployer", "namespace": NAMESPACE},
            "rules": [{"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices"], "verbs": ["*"]}],
        },
        {
            "kind": "RoleBinding",
            "metadata": {"name": "inferenceservice-deployer", "namespace": NAMESPACE},
            "roleRef": {"kind": "Role", "name": "inferenceservice-deployer"},
            "subjects": [
                {"kind": "ServiceAccount", "name": "chest-ct-pipeline-runner", "namespace": NAMESPACE},
                {"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"},
            ],
        },
    ]
    authorizer = Authorizer().load(old).add_profile(PROFILE)
    assert not _can(authorizer, f"system:serviceaccount:{PROFILE}:default-editor", "patch")


def test_the_deploy_step_runs_end_to_end_as_the_profiles_default_editor(tmp_path):
    """The real rollout code against the API stand-in, authorized by the built overlay."""
    docs = profile_overlay(tmp_path, "team-ct")
    authorizer = Authorizer().load(docs).add_profile("team-ct")
    release = Release("0.15.2")
    api = kube_api.FakeKubeApi(
        release,
        Controller(release, lambda uri: True),
        authorizer=authorizer,
        tokens={
            "editor": "system:serviceaccount:team-ct:default-editor",
            "stranger": "system:serviceaccount:other:default-editor",
        },
    )
    with kube_api.serve(api) as url:

        def client(token: str) -> rollout.InferenceServices:
            configuration = Configuration(
                host=url, api_key={"authorization": token}, api_key_prefix={"authorization": "Bearer"}
            )
            return rollout.InferenceServices(rollout.custom_objects_api(configuration), NAMESPACE)

        rollout.deploy(client("editor"), isvc.inference_service("s3://m/run-1"), dry_run=True)
        rollout.deploy(client("editor"), isvc.inference_service("s3://m/run-1"))
        assert rollout.wait_ready(client("editor"), "chest-ct", timeout_s=5, poll_s=0.01).serving
        with pytest.raises(rollout.RolloutError, match='403: .*"system:serviceaccount:other:default-editor" cannot'):
            rollout.deploy(client("stranger"), isvc.inference_service("s3://m/run-2"))
    assert {r.user for r in api.requests} == {
        "system:serviceaccount:team-ct:default-editor",
        "system:serviceaccount:other:default-editor",
    }
    assert isvc.storage_uri_of(api.objects[(NAMESPACE, "chest-ct")]) == "s3://m/run-1"
    assert not [r for r in api.writes() if r.user == "system:serviceaccount:other:default-editor"]


def test_standalone_mlflow_admits_the_kfp_namespace():
    netpol = one(kustomize(MANIFESTS / "overlays" / "standalone"), "NetworkPolicy", "mlflow")
    admitted = {
        peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for peer in netpol["spec"]["ingress"][0]["from"]
    }
    assert admitted == {NAMESPACE, "kubeflow"}


# ---------------------------------------------------------- MLflow, GPU, images


def test_mlflow_reads_its_stores_from_config_and_secret(overlay):
    _, docs = overlay
    config = one(docs, "ConfigMap", "mlflow-config")["data"]
    assert config["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert config["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert "mlflow.chest-ct.svc.cluster.local:5000" in config["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    [container] = one(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-credentials"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])


def test_gpu_smoke_test_runs_on_gpu_nodes():
    docs = kustomize(MANIFESTS / "gpu-smoke-test")
    pod = one(docs, "Job", "gpu-smoke-test")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "cloud.google.com/gke-accelerator" in pod["nodeSelector"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert container["image"].startswith("ghcr.io/chest-ct/chest-ct-train:")
    assert all(d["metadata"].get("namespace") == NAMESPACE for d in docs)


def test_images_are_pinned(overlay):
    _, docs = overlay
    images = [
        c["image"]
        for _, pod, _ in [*workload_pods(docs), *workload_pods(kustomize(MANIFESTS / "gpu-smoke-test"))]
        for c in pod_security.containers(pod)
    ]
    assert images
    for image in images:
        name_part = image.rsplit("/", 1)[-1]
        assert "@sha256:" in image or (":" in name_part and not name_part.endswith(":latest")), image


# ------------------------------------------------------------------- checkov


def run_checkov(path: Path, framework: str) -> dict[str, Any]:
    """checkov's JSON summary for one file; offline (--skip-download)."""
    result = subprocess.run(
        [
            str(CHECKOV),
            "--file",
            str(path),
            "--framework",
            framework,
            "--output",
            "json",
            "--quiet",
            "--skip-download",
            "--compact",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    summary = {"passed": 0, "failed": 0, "skipped": 0}
    failed: list[str] = []
    for part in reports:
        for key in summary:
            summary[key] += part.get("summary", {}).get(key, 0)
        failed += [
            f"{c['check_id']} {c['resource']}: {c['check_name']}"
            for c in part.get("results", {}).get("failed_checks", [])
        ]
    return {"summary": summary, "failed": failed}


@pytest.mark.skipif(not CHECKOV.exists(), reason="checkov is not installed in .venv-checkov (see Makefile)")
@pytest.mark.parametrize(
    "target",
    [
        "overlays/standalone",
        "overlays/kubeflow",
        "gpu-smoke-test",
        "kserve",
        "examples/secrets",
        "examples/pipeline-secrets",
    ],
)
def test_checkov_finds_nothing_in_the_built_manifests(target, tmp_path):
    built = tmp_path / "built.yaml"
    built.write_text(yaml.safe_dump_all(kustomize(MANIFESTS / target)))
    report = run_checkov(built, "kubernetes")
    assert report["failed"] == []
    if target != "kserve":  # checkov has no checks for KServe's kinds
        assert report["summary"]["passed"] > 0  # it really looked at the objects
