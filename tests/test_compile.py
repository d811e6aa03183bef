"""The compiled pipeline YAML: up to date, and carrying the cluster settings the issue asks for."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[1]
COMMITTED = PROJECT / "pipelines" / "chest_ct_pipeline.yaml"
STEPS = {"ingest", "base-model", "train", "evaluate", "deploy"}


def compile_with(tmp_path: Path, **env: str) -> tuple[dict, dict]:
    """Compile in a fresh interpreter: the settings are read from the environment at import."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CHEST_CT_")}
    out = tmp_path / "pipeline.yaml"
    subprocess.run(
        [sys.executable, "-m", "pipelines.compile", "--output", str(out)],
        cwd=PROJECT,
        env={**clean, **env},
        check=True,
        capture_output=True,
        timeout=120,
    )
    spec, platform = yaml.safe_load_all(out.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compiled")
    spec, k8s = compile_with(tmp)
    return tmp / "pipeline.yaml", spec, k8s


def test_committed_yaml_is_up_to_date(default):
    path, _, _ = default
    assert COMMITTED.read_text() == path.read_text(), "pipelines/chest_ct_pipeline.yaml is stale: run `make compile`"


def test_parameters_and_defaults(default):
    _, spec, _ = default
    params = spec["root"]["inputDefinitions"]["parameters"]
    for name in (
        "data_uri",
        "image_size",
        "epochs",
        "batch_size",
        "learning_rate",
        "base_weights",
        "target_sensitivity",
        "seed",
    ):
        assert "defaultValue" in params[name], name
    assert params["base_weights"]["defaultValue"] == "imagenet"
    assert params["target_sensitivity"]["defaultValue"] == 0.95


def test_every_task_has_resources_image_and_secrets(default):
    _, spec, k8s = default
    executors = spec["deploymentSpec"]["executors"]
    assert {e.removeprefix("exec-") for e in executors} == STEPS
    for name, executor in executors.items():
        container = executor["container"]
        assert container["image"] == "ghcr.io/chest-ct/chest-ct-train:0.1.0"
        assert not container["image"].endswith(":latest")
        res = container["resources"]
        for field in ("resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest", "resourceMemoryLimit"):
            assert res.get(field), f"{name} lacks {field}"
        secrets = {s["secretName"]: {k["envVar"] for k in s["keyToEnv"]} for s in k8s[name]["secretAsEnv"]}
        assert secrets["mlflow-tracking"] == {
            "MLFLOW_TRACKING_URI",
            "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD",
        }
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= secrets["s3-credentials"]
    text = yaml.safe_dump(spec)
    assert "AWS_SECRET_ACCESS_KEY=" not in text and "password" not in text.lower().replace(
        "mlflow_tracking_password", ""
    )


def test_train_runs_on_the_gpu_pool(default):
    _, spec, k8s = default
    accel = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]["accelerator"]
    assert accel["resourceType"] == "nvidia.com/gpu" and accel["resourceCount"] == "1"
    assert k8s["exec-train"]["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}
    assert k8s["exec-train"]["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
    for other in ("exec-ingest", "exec-evaluate", "exec-deploy"):
        assert "accelerator" not in spec["deploymentSpec"]["executors"][other]["container"]["resources"]
        assert "nodeSelector" not in k8s[other]


def test_retries_and_caching(default):
    _, spec, _ = default
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["ingest"]["retryPolicy"]["maxRetryCount"] == 3
    assert not tasks["ingest"].get("cachingOptions", {}).get("enableCache"), "mutable source: never cached"
    assert not tasks["evaluate"].get("cachingOptions", {}).get("enableCache"), "registry side effects"
    assert tasks["base-model"]["cachingOptions"]["enableCache"] is True
    assert tasks["train"]["cachingOptions"]["enableCache"] is True


def test_deploy_runs_only_when_blessed(default):
    _, spec, _ = default
    outer = spec["root"]["dag"]["tasks"]["condition-1"]
    assert "evaluate-blessed'] == true" in outer["triggerPolicy"]["condition"]
    inner = spec["components"]["comp-condition-1"]["dag"]["tasks"]["condition-2"]
    assert "deploy_model'] == true" in inner["triggerPolicy"]["condition"]
    assert "deploy" in spec["components"]["comp-condition-2"]["dag"]["tasks"]


def test_settings_for_other_clouds_and_cpu_only(tmp_path):
    spec, k8s = compile_with(
        tmp_path,
        CHEST_CT_TRAIN_IMAGE="registry.example.com/ml/chest-ct-train:1.2.3",
        CHEST_CT_GPU_NODE_SELECTOR="k8s.amazonaws.com/accelerator=nvidia-tesla-t4",
        CHEST_CT_GPU_COUNT="2",
    )
    train = spec["deploymentSpec"]["executors"]["exec-train"]["container"]
    assert train["image"] == "registry.example.com/ml/chest-ct-train:1.2.3"
    assert train["resources"]["accelerator"]["resourceCount"] == "2"
    assert k8s["exec-train"]["nodeSelector"]["labels"] == {"k8s.amazonaws.com/accelerator": "nvidia-tesla-t4"}
    spec, k8s = compile_with(tmp_path, CHEST_CT_GPU_COUNT="0")
    assert "accelerator" not in spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert "nodeSelector" not in k8s["exec-train"] and "tolerations" not in k8s["exec-train"]


def test_bad_compile_settings_are_named(tmp_path):
    with pytest.raises(subprocess.CalledProcessError) as err:
        compile_with(tmp_path, CHEST_CT_GPU_NODE_SELECTOR="gpu-pool")
    assert "CHEST_CT_GPU_NODE_SELECTOR='gpu-pool': expected key=value" in err.value.stderr.decode()


# ------------------------------------------------- what each supported backend parses


@pytest.mark.parametrize("backend", ["2.4.1", "2.5.0", "2.15.0"])
def test_every_supported_backend_parses_the_compiled_pipeline_strictly(default, backend):
    """The API server (PipelineSpec, PlatformSpec) and the driver (KubernetesExecutorConfig), unknown fields failing."""
    from tests.platforms.kfp_protos import backend as protos

    path, _, _ = default
    pipeline, platform = yaml.safe_load_all(path.read_text())
    protos(backend).check_pipeline(pipeline, platform)


@pytest.mark.parametrize("backend", ["2.4.1", "2.5.0"])
def test_kfp_kubernetes_unmodified_output_is_what_older_backends_cannot_read(backend, tmp_path):
    """Defect 2: what kfp-kubernetes 2.17 writes fails the older protos; pipelines/compile.py removes it."""
    from google.protobuf.json_format import ParseError
    from kfp import compiler

    from pipelines.pipeline import chest_ct_pipeline
    from tests.platforms.kfp_protos import backend as protos

    plain = tmp_path / "plain.yaml"
    compiler.Compiler().compile(chest_ct_pipeline, str(plain))
    pipeline, platform = yaml.safe_load_all(plain.read_text())
    with pytest.raises(ParseError, match='has no field named "optional"'):
        protos(backend).check_pipeline(pipeline, platform)


def test_the_portable_spec_says_the_same_as_kfp_kubernetes(default, tmp_path):
    from kfp import compiler

    from pipelines.pipeline import chest_ct_pipeline

    plain = tmp_path / "plain.yaml"
    compiler.Compiler().compile(chest_ct_pipeline, str(plain))
    path, _, ours = default
    _, theirs = yaml.safe_load_all(plain.read_text())
    theirs = theirs["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for executor, config in theirs.items():
        for original, portable in zip(config["secretAsEnv"], ours[executor]["secretAsEnv"], strict=True):
            assert original["optional"] is False  # the default, so dropping it changes nothing
            assert original["secretNameParameter"] == {"runtimeValue": {"constant": original["secretName"]}}
            assert portable == {k: v for k, v in original.items() if k not in ("optional", "secretNameParameter")}


def test_the_train_step_checks_for_the_gpus_it_requested(tmp_path):
    spec, _ = compile_with(tmp_path, CHEST_CT_GPU_COUNT="2")
    env = {e["name"]: e["value"] for e in spec["deploymentSpec"]["executors"]["exec-train"]["container"]["env"]}
    assert env["CHEST_CT_EXPECTED_GPUS"] == "2"
    spec, _ = compile_with(tmp_path, CHEST_CT_GPU_COUNT="0")
    env = spec["deploymentSpec"]["executors"]["exec-train"]["container"].get("env", [])
    assert "CHEST_CT_EXPECTED_GPUS" not in {e["name"] for e in env}


def test_deploy_parameters_and_the_one_serving_image_default(default):
    from chest_ct.deploy import DEFAULT_READY_TIMEOUT_S
    from chest_ct.inference_service import DEFAULT_IMAGE, DEFAULT_KSERVE_VERSION

    _, spec, _ = default
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["serving_image"]["defaultValue"] == DEFAULT_IMAGE
    assert params["kserve_version"]["defaultValue"] == DEFAULT_KSERVE_VERSION
    assert params["ready_timeout_seconds"]["defaultValue"] == DEFAULT_READY_TIMEOUT_S
    sources = [p for p in PROJECT.rglob("*.py") if ".venv" not in p.parts and "tests" not in p.parts]
    assert [p.relative_to(PROJECT).as_posix() for p in sources if DEFAULT_IMAGE in p.read_text()] == [
        "chest_ct/inference_service.py"
    ]


@pytest.mark.parametrize("backend", ["2.4.1", "2.15.0"])
def test_a_multi_user_kfp_server_of_each_backend_accepts_the_upload(default, backend):
    import warnings

    from pipelines import kfp_client
    from tests.platforms.kfp_server import FakeKfp, serve

    path, _, _ = default
    fake = FakeKfp(
        multi_user=True,
        backend_version=backend,
        tokens={"t": ("alice", ("pipelines.kubeflow.org",))},
        access={"alice": {"team"}},
    )
    with serve(fake) as url, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        connection = kfp_client.connect(url, "team", "t")
        kfp_client.upload(connection, path)
        target = kfp_client.package_target(path)
        kfp_client.start_run(connection, target, {"epochs": 1})
    assert [p["namespace"] for p in fake.pipelines.values()] == ["team"]
    assert len(fake.runs) == 1
