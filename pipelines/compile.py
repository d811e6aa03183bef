"""Compile the pipeline to the YAML that Kubeflow Pipelines runs (``make compile``).

Compile-time settings (image, GPU node pool, Secret names) are read from the
environment: see ``components/image.py`` and ``pipelines/cluster.py``.

The platform spec is made portable across the supported KFP backends (2.4.1
to 2.15+). kfp-kubernetes 2.17 writes two Secret fields older backends do not
know: ``optional`` (added in 2.15's proto) and ``secretNameParameter`` (2.5).
2.2/2.3 refuse the whole config; 2.4.1 to 2.14 drop them silently. For a
Secret named by a constant, both repeat what ``secretName`` already says
(``optional: false`` is the default), so they are removed and every backend
reads the same config. tests/test_compile.py parses the result strictly with
each backend's protos.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from kfp.compiler import pipeline_spec_builder
from kfp.pipeline_spec import pipeline_spec_pb2

from pipelines.pipeline import chest_ct_pipeline

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "chest_ct_pipeline.yaml"


def portable_platform_spec(platform_spec: pipeline_spec_pb2.PlatformSpec) -> pipeline_spec_pb2.PlatformSpec:
    """``platform_spec`` without the Secret fields older backends cannot read, where they add nothing."""
    document: dict[str, Any] = json_format.MessageToDict(platform_spec)
    executors = (((document.get("platforms") or {}).get("kubernetes") or {}).get("deploymentSpec") or {}).get(
        "executors"
    ) or {}
    for config in executors.values():
        for secret in [*config.get("secretAsEnv", []), *config.get("secretAsVolume", [])]:
            if secret.get("optional") is False:
                del secret["optional"]
            if secret.get("secretNameParameter") == {"runtimeValue": {"constant": secret.get("secretName")}}:
                del secret["secretNameParameter"]
    return json_format.ParseDict(document, pipeline_spec_pb2.PlatformSpec())


def compile_pipeline(output: Path = DEFAULT_OUTPUT) -> Path:
    pipeline_spec_builder.write_pipeline_spec_to_file(
        pipeline_spec=chest_ct_pipeline.pipeline_spec,
        pipeline_description=chest_ct_pipeline.description,
        platform_spec=portable_platform_spec(chest_ct_pipeline.platform_spec),
        package_path=str(output),
    )
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    print(compile_pipeline(parser.parse_args(argv).output))


if __name__ == "__main__":
    main()
