"""The kustomize overlays build, validate and meet the "restricted" Pod Security bar.

What is checked is what `kubectl apply -k manifests/overlays/<x>` would send:
the built output, validated against the Kubernetes 1.32 schemas
(kubernetes-validate) and, for the InferenceService CRD, against the KServe
SDK's v1beta1 model. checkov runs from its own virtualenv (.venv-checkov),
because it pins packaging<24, which pytest in .venv cannot use.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import kubernetes_validate
import pytest
import yaml

from chest_ct import deploy

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
OVERLAYS = ("cpu", "gpu")
KUBERNETES_VERSION = "1.32"
NAMESPACE = "chest-ct"
KUBECTL = shutil.which("kubectl")
CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"

needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with built-in kustomize) is not on PATH")

#: Volume types the restricted Pod Security Standard allows.
RESTRICTED_VOLUME_TYPES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}


def kustomize(path: Path) -> list[dict[str, Any]]:
    built = subprocess.run([KUBECTL, "kustomize", str(path)], check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(built) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict[str, Any]]]:
    if KUBECTL is None:
        pytest.skip("kubectl (with built-in kustomize) is not on PATH")
    return request.param, kustomize(MANIFESTS / "overlays" / request.param)


@pytest.fixture(scope="module")
def example_secrets() -> list[dict[str, Any]]:
    if KUBECTL is None:
        pytest.skip("kubectl (with built-in kustomize) is not on PATH")
    return kustomize(MANIFESTS / "examples" / "secrets")


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [doc for doc in docs if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return found


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(label, pod spec) of every workload, including the InferenceService predictor."""
    for doc in docs:
        label = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield label, doc["spec"]["template"]["spec"]
        elif doc["kind"] == "CronJob":
            yield label, doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        elif doc["kind"] == "InferenceService":
            yield label, doc["spec"]["predictor"]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return pod.get("initContainers", []) + pod.get("containers", [])


# -------------------------------------------------------------- build + schema


def test_overlay_builds_the_expected_objects(overlay):
    name, docs = overlay
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in docs}
    expected = {
        ("Namespace", NAMESPACE), ("ServiceAccount", "chest-ct-pipeline-runner"),
        ("ServiceAccount", "chest-ct-model-server"), ("Role", "inferenceservice-deployer"),
        ("RoleBinding", "inferenceservice-deployer"), ("InferenceService", "chest-ct"),
        ("Deployment", "mlflow"), ("Service", "mlflow"), ("ConfigMap", "mlflow-config"),
    }
    assert expected <= kinds
    assert not by_kind(docs, "Secret"), "credentials must not be part of an overlay (re-applying would reset them)"
    assert (("Job", "gpu-smoke-test") in kinds) == (name == "gpu")


def test_every_object_validates_against_its_schema(overlay):
    _, docs = overlay
    for doc in docs:
        if doc["kind"] == "InferenceService":
            deploy.to_inference_service_model(doc)  # CRD: the KServe SDK model is the schema
        else:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_example_secrets_validate_and_hold_no_real_values(example_secrets):
    for secret in example_secrets:
        kubernetes_validate.validate(secret, KUBERNETES_VERSION, strict=True)
        assert secret["metadata"]["namespace"] == NAMESPACE
    credentials = one(example_secrets, "Secret", "s3-credentials")["stringData"]
    assert credentials["AWS_ACCESS_KEY_ID"] == credentials["AWS_SECRET_ACCESS_KEY"] == "CHANGE_ME"
    assert "CHANGE_ME" in credentials["AWS_ENDPOINT_URL"]
    assert "CHANGE_ME" in one(example_secrets, "Secret", "mlflow-credentials")["stringData"]["MLFLOW_BACKEND_STORE_URI"]


def test_pipeline_example_secrets_have_every_key_the_tasks_read():
    """pipelines/cluster.py maps these keys into every task; a missing key stops the pod."""
    if KUBECTL is None:
        pytest.skip("kubectl (with built-in kustomize) is not on PATH")
    from pipelines import cluster

    secrets = {s["metadata"]["name"]: s for s in kustomize(MANIFESTS / "examples" / "pipeline-secrets")}
    for secret in secrets.values():
        kubernetes_validate.validate(secret, KUBERNETES_VERSION, strict=True)
    for name, keys in cluster.SECRET_ENV.items():
        assert name in secrets, f"examples/pipeline-secrets lacks Secret {name}"
        assert set(keys) <= set(secrets[name]["stringData"]), name
    assert secrets["mlflow-tracking"]["stringData"]["MLFLOW_TRACKING_URI"] == (
        f"http://mlflow.{NAMESPACE}.svc.cluster.local:5000")


def test_example_secrets_have_every_key_the_workloads_read(overlay, example_secrets):
    _, docs = overlay
    provided = {(s["metadata"]["name"], key) for s in example_secrets for key in s.get("stringData", {})}
    for label, pod in pod_specs(docs):
        for container in containers(pod):
            for env in container.get("env", []):
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    assert (ref["name"], ref["key"]) in provided, f"{label}: {ref} missing from examples/secrets"
    model_server = one(docs, "ServiceAccount", "chest-ct-model-server")
    assert {s["name"] for s in model_server["secrets"]} <= {s["metadata"]["name"] for s in example_secrets}


def test_everything_lives_in_the_chest_ct_namespace(overlay):
    _, docs = overlay
    for doc in docs:
        if doc["kind"] == "Namespace":
            assert doc["metadata"]["name"] == NAMESPACE
        else:
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']}/{doc['metadata']['name']}"


# ------------------------------------------------------------ Pod Security


def test_namespace_enforces_restricted(overlay):
    _, docs = overlay
    labels = one(docs, "Namespace", NAMESPACE)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_every_pod_meets_the_restricted_profile(overlay):
    _, docs = overlay
    specs = list(pod_specs(docs))
    assert {label for label, _ in specs} >= {"Deployment/mlflow", "InferenceService/chest-ct"}
    for label, pod in specs:
        pod_context = pod.get("securityContext") or {}
        assert not any(pod.get(key) for key in ("hostNetwork", "hostPID", "hostIPC")), label
        for volume in pod.get("volumes", []):
            assert set(volume) - {"name"} <= RESTRICTED_VOLUME_TYPES, f"{label}: volume {volume['name']}"
        for container in containers(pod):
            where = f"{label} container {container['name']}"
            context = container.get("securityContext") or {}
            assert context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is True, where
            assert context.get("runAsUser", pod_context.get("runAsUser", 1)) != 0, where
            assert context.get("allowPrivilegeEscalation") is False, where
            assert not context.get("privileged"), where
            assert "ALL" in context.get("capabilities", {}).get("drop", []), where
            assert set(context.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}, where
            seccomp = context.get("seccompProfile") or pod_context.get("seccompProfile") or {}
            assert seccomp.get("type") in ("RuntimeDefault", "Localhost"), where
            # Beyond "restricted": a read-only root, with an emptyDir for /tmp.
            assert context.get("readOnlyRootFilesystem") is True, where
            assert any(m["mountPath"] == "/tmp" for m in container.get("volumeMounts", [])), where


def test_every_container_has_requests_limits_and_probes(overlay):
    _, docs = overlay
    for label, pod in pod_specs(docs):
        for container in containers(pod):
            where = f"{label} container {container['name']}"
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(kind, {})), f"{where}: {kind}"
            if not label.startswith(("Job/", "CronJob/")):  # servers are probed, batch jobs just exit
                assert container.get("livenessProbe") and container.get("readinessProbe"), where


def test_images_are_pinned(overlay):
    _, docs = overlay
    images = [c["image"] for _, pod in pod_specs(docs) for c in containers(pod)]
    assert images
    for image in images:
        name_part = image.rsplit("/", 1)[-1]
        assert "@sha256:" in image or (":" in name_part and not name_part.endswith(":latest")), image


# ---------------------------------------------------------- serving + MLflow


def test_inference_service_is_what_the_deploy_step_builds(overlay):
    _, docs = overlay
    built = one(docs, "InferenceService", "chest-ct")
    expected = deploy.inference_service(namespace=NAMESPACE)
    assert built["spec"] == expected["spec"]
    assert built["metadata"]["annotations"] == expected["metadata"]["annotations"]


def test_inference_service_is_a_v2_custom_predictor(overlay):
    _, docs = overlay
    predictor = one(docs, "InferenceService", "chest-ct")["spec"]["predictor"]
    [container] = predictor["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert container["name"] == "kserve-container"
    assert env["PROTOCOL"] == "v2"
    assert env["STORAGE_URI"].startswith("s3://")
    assert "--model_name=chest-ct" in container["args"] and "--model_dir=/mnt/models" in container["args"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert predictor["serviceAccountName"] == "chest-ct-model-server"


def test_mlflow_reads_its_stores_from_config_and_secret(overlay):
    _, docs = overlay
    config = one(docs, "ConfigMap", "mlflow-config")["data"]
    assert config["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert config["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert "mlflow.chest-ct.svc.cluster.local:5000" in config["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    [container] = one(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    assert container["image"].startswith("ghcr.io/mlflow/mlflow:v3.")
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-credentials"
    assert container["envFrom"] == [{"configMapRef": {"name": "mlflow-config"}}]
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    service = one(docs, "Service", "mlflow")
    assert service["spec"]["ports"][0]["port"] == 5000


def test_rbac_lets_the_pipeline_manage_inference_services_only(overlay):
    _, docs = overlay
    [rule] = one(docs, "Role", "inferenceservice-deployer")["rules"]
    assert rule == {
        "apiGroups": ["serving.kserve.io"],
        "resources": ["inferenceservices"],
        "verbs": ["get", "list", "watch", "create", "patch", "update"],
    }
    binding = one(docs, "RoleBinding", "inferenceservice-deployer")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "inferenceservice-deployer"}
    subjects = {(s["namespace"], s["name"]) for s in binding["subjects"]}
    assert subjects == {(NAMESPACE, "chest-ct-pipeline-runner"), ("kubeflow", "pipeline-runner")}
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")


# ---------------------------------------------------------------- overlays


def test_gpu_overlay_schedules_the_smoke_test_on_gpu_nodes():
    if KUBECTL is None:
        pytest.skip("kubectl (with built-in kustomize) is not on PATH")
    docs = kustomize(MANIFESTS / "overlays" / "gpu")
    pod = one(docs, "Job", "gpu-smoke-test")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "cloud.google.com/gke-accelerator" in pod["nodeSelector"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert container["image"].startswith("ghcr.io/chest-ct/chest-ct-train:")


def test_serving_is_identical_in_both_overlays_and_cpu_asks_for_no_gpu():
    if KUBECTL is None:
        pytest.skip("kubectl (with built-in kustomize) is not on PATH")
    cpu, gpu = (kustomize(MANIFESTS / "overlays" / name) for name in OVERLAYS)
    assert one(cpu, "InferenceService", "chest-ct") == one(gpu, "InferenceService", "chest-ct")
    assert "nvidia.com/gpu" not in json.dumps(cpu)


@needs_kubectl
def test_images_transformer_reaches_the_inference_service(tmp_path):
    """Overlays retarget the serving image with `images:`; the CRD path must be wired."""
    overlay = tmp_path / "retarget"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        # kustomize wants a relative path to another kustomization
        "resources": [os.path.relpath(MANIFESTS / "overlays" / "cpu", overlay)],
        "images": [{"name": "ghcr.io/chest-ct/chest-ct-serve", "newName": "registry.example/serve",
                    "newTag": "9.9.9"}],
    }))
    docs = kustomize(overlay)
    [container] = one(docs, "InferenceService", "chest-ct")["spec"]["predictor"]["containers"]
    assert container["image"] == "registry.example/serve:9.9.9"


# ------------------------------------------------------------------- checkov


def run_checkov(path: Path, framework: str) -> dict[str, Any]:
    """checkov's JSON summary for one file; offline (--skip-download)."""
    result = subprocess.run(
        [str(CHECKOV), "--file", str(path), "--framework", framework, "--output", "json", "--quiet",
         "--skip-download", "--compact"],
        capture_output=True, text=True, timeout=300,
    )
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    summary = {"passed": 0, "failed": 0, "skipped": 0}
    failed: list[str] = []
    for part in reports:
        for key in summary:
            summary[key] += part.get("summary", {}).get(key, 0)
        failed += [f"{c['check_id']} {c['resource']}: {c['check_name']}"
                   for c in part.get("results", {}).get("failed_checks", [])]
    return {"summary": summary, "failed": failed}


@needs_kubectl
@pytest.mark.skipif(not CHECKOV.exists(), reason="checkov is not installed in .venv-checkov (see Makefile)")
@pytest.mark.parametrize("target", ["overlays/cpu", "overlays/gpu", "examples/secrets", "examples/pipeline-secrets"])
def test_checkov_finds_nothing_in_the_built_manifests(target, tmp_path):
    built = tmp_path / "built.yaml"
    built.write_text(yaml.safe_dump_all(kustomize(MANIFESTS / target)))
    report = run_checkov(built, "kubernetes")
    assert report["failed"] == []
    assert report["summary"]["passed"] > 0  # it really looked at the objects


def test_pod_security_check_rejects_a_privileged_container():
    """The restricted check above must be able to fail."""
    docs = [{"kind": "Deployment", "metadata": {"name": "bad"}, "spec": {"template": {"spec": {"containers": [
        {"name": "c", "image": "x:1", "securityContext": {"privileged": True}}]}}}}]
    with pytest.raises(AssertionError):
        test_every_pod_meets_the_restricted_profile(("bad", copy.deepcopy(docs)))
