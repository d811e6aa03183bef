"""Compile the pipeline to the YAML that Kubeflow Pipelines runs (``make compile``).

Compile-time settings (image, GPU node pool, Secret names) are read from the
environment: see ``components/image.py`` and ``pipelines/cluster.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kfp import compiler

from pipelines.pipeline import chest_ct_pipeline

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "chest_ct_pipeline.yaml"


def compile_pipeline(output: Path = DEFAULT_OUTPUT) -> Path:
    compiler.Compiler().compile(chest_ct_pipeline, package_path=str(output))
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    print(compile_pipeline(parser.parse_args(argv).output))


if __name__ == "__main__":
    main()
