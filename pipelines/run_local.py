"""Run the whole pipeline on this machine with ``kfp.local`` (what ``make run`` does).

No cluster needed: every component runs as a subprocess of this Python, MLflow
writes to a SQLite file in the project folder unless ``MLFLOW_TRACKING_URI`` says
otherwise, and the last line printed is one JSON object naming the outputs.

    python -m pipelines.run_local --data ../shared/data/chest-ct epochs=5 image_size=64
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

from pipelines import params
from pipelines.params import declared_inputs

PROJECT = Path(__file__).resolve().parent.parent


def parse_params(pairs: list[str], declared: dict[str, str]) -> dict:
    """``name=value`` strings -> typed pipeline arguments (the parser ``pipelines.submit`` uses too)."""
    try:
        return params.parse_params(pairs, declared)
    except params.ParameterError as err:
        raise SystemExit(str(err)) from None


class _StepOutput:
    """A stdout that keeps the last line each failed step wrote (kfp.local prints steps and its log here)."""

    _LOG = re.compile(r"^\d\d:\d\d:\d\d\.\d+ - [A-Z]+ - (.*)")
    _FAILED = re.compile(r"Task '([^']+)' finished with status FAILURE")

    def __init__(self, stream):
        self.stream, self.last, self.failed = stream, "(no output)", {}

    def write(self, text: str) -> int:
        for line in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines():
            log = self._LOG.match(line)
            failed = self._FAILED.search(log.group(1)) if log else None
            if failed:
                self.failed.setdefault(failed.group(1), self.last)
            elif not log and line.strip(" -="):
                self.last = line.strip()
        return self.stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _browsable(artifact: Path) -> Path:
    """A ``.html`` copy of the HTML artifact (KFP names it after the output, without extension) for a browser."""
    copy = artifact.with_name("report.html")
    if artifact.is_file():
        shutil.copyfile(artifact, copy)
    return copy


def prepare_mlflow() -> str:
    """Default to a SQLite store in the project; keep artifacts beside it, not in the CWD."""
    uri = os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{PROJECT / 'mlflow.db'}")
    import mlflow

    from chest_ct.defaults import EXPERIMENT

    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:") and mlflow.get_experiment_by_name(EXPERIMENT) is None:
        mlflow.create_experiment(EXPERIMENT, artifact_location=(PROJECT / "mlartifacts").as_uri())
    return uri


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="data_uri: gdrive://ID, Drive share URL, s3://..., zip or folder")
    parser.add_argument("--runs-dir", default=str(PROJECT / "runs"), help="where kfp.local writes task outputs")
    parser.add_argument("params", nargs="*", help="pipeline parameters as name=value")
    args = parser.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # kfp.local honours retry policies: a bad data_uri should fail now, not after minutes of backoff.
    os.environ.setdefault("CHEST_CT_INGEST_RETRIES", "0")
    # No GPU node pool here: the train step must not expect one (pipelines/cluster.py, chest_ct/devices.py).
    os.environ.setdefault("CHEST_CT_GPU_COUNT", "0")
    # kfp.local warns that the components name a container image; here they run in this venv on purpose.
    warnings.filterwarnings("ignore", message=".*non-Python base image.*")
    from kfp import local

    from pipelines.pipeline import chest_ct_pipeline

    params = parse_params(args.params, declared_inputs(chest_ct_pipeline))
    params.setdefault("deploy_model", False)  # no cluster here; deploy_model=true to try anyway
    data = args.data
    if "://" not in data and Path(data).exists():
        data = str(Path(data).resolve())  # components may run from another working directory
    runs_dir = Path(args.runs_dir).resolve()
    tracking_uri = prepare_mlflow()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(runs_dir))
    steps_output = _StepOutput(sys.stdout)
    try:
        sys.stdout = steps_output
        outputs = chest_ct_pipeline(data_uri=data, **params).outputs
    except RuntimeError as exc:
        # End on one line: the failed step's last words (components exit with one line on download
        # failures), not kfp's "Inner task failed" summary.
        step = re.search(r"Inner task failed: '([^']+)'", re.sub(r"\x1b\[[0-9;]*m", "", str(exc)))
        name = step.group(1) if step else next(iter(steps_output.failed), "?")
        print(f"pipeline failed at step {name!r}: {steps_output.failed.get(name, exc)}", file=sys.stderr)
        return 1
    finally:
        sys.stdout = steps_output.stream
    model_dir = Path(outputs["model"].path)
    metadata = json.loads((model_dir / "model_metadata.json").read_text())
    evaluation = metadata.get("evaluation", {})
    result = {
        "model_dir": str(model_dir),
        "mlflow_run_id": outputs["mlflow_run_id"],
        "mlflow_tracking_uri": tracking_uri,
        "blessed": outputs["blessed"],
        # The score's basis: test images scored (and distinct pictures), images kept out of it.
        "scored_images": evaluation.get("scored_images"),
        "scored_groups": evaluation.get("scored_groups"),
        "excluded_images": evaluation.get("excluded_images"),
        "metrics": {unit: evaluation.get(unit, {}) for unit in ("per_group", "per_image")},
        "threshold": metadata["threshold"],
        "plots": str(model_dir.parent / "plots"),
        "evaluation_report": str(model_dir.parent / "evaluation_report"),
        "report_html": str(_browsable(model_dir.parent / "report_html")),
        "validation_report": outputs["validation_report"].path,
    }
    runs_dir.mkdir(parents=True, exist_ok=True)
    (runs_dir / "latest.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\nmodel (SavedModel): {result['model_dir']}\nplots: {result['plots']}\n"
        f"evaluation report: {result['evaluation_report']} (readable: {result['report_html']})\n"
        f"validation report: {result['validation_report']}\nMLflow: {tracking_uri} run {result['mlflow_run_id']} "
        f"(mlflow ui --backend-store-uri {tracking_uri})\nserve it: make serve",
        file=sys.stderr,
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
