"""Honest quality on the real data: metrics with 95% bootstrap intervals, per image and per picture.

    python -m bench.quality [--model-dir DIR --dataset-dir DIR] [--image-size 224] [--bootstrap 2000]

Without ``--model-dir`` it first runs the whole pipeline locally on
../shared/data/chest-ct (``pipelines.run_local``). The evaluation set is what the
pipeline scores: the ``test`` role (here the data's given ``valid`` folder, less
the copies of pictures the model was fitted or early-stopped on), at the
threshold stored with the model (chosen out-of-fold on the fitting data).

Per image, every file counts once. Per duplicate group (ingest's groups of exact
and near copies), each group counts once with its mean probability: on this data
many files are copies of a few pictures, so the per-image numbers overstate how
much evidence there is. The intervals resample whole groups in both cases
(:func:`chest_ct.metrics.bootstrap_intervals`, shared with the evaluation report).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.report import PROJECT, SHARED_DATA, publish, table, vgg16_weights  # noqa: E402
from chest_ct import defaults  # noqa: E402
from chest_ct.metrics import BOOTSTRAP_ROUNDS, INTERVAL_METRICS, bootstrap_intervals  # noqa: E402


def run_pipeline(image_size: int, tmp: Path) -> tuple[Path, Path]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    params = [
        f"image_size={image_size}",
        f"base_weights={vgg16_weights()}",
        "min_auc=0",
        "min_sensitivity=0",
        "min_specificity=0",
    ]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.run_local",
            "--data",
            str(SHARED_DATA),
            "--runs-dir",
            str(tmp / "runs"),
            *params,
        ],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        sys.exit(f"pipeline failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return Path(result["model_dir"]), Path(result["validation_report"]).parent / "dataset"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="an evaluated SavedModel; default: train one now")
    parser.add_argument("--dataset-dir", type=Path, help="the ingest output the model was evaluated with")
    parser.add_argument("--image-size", type=int, default=defaults.IMAGE_SIZE)
    parser.add_argument("--bootstrap", type=int, default=BOOTSTRAP_ROUNDS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.model_dir is None and not (SHARED_DATA / "train").is_dir():
        print(f"SKIPPED: real data not found at {SHARED_DATA} and no --model-dir given")
        return 0

    from chest_ct.export import read_metadata
    from chest_ct.metrics import by_group
    from chest_ct.predict import predict_files
    from chest_ct.records import TEST, TRAIN, Manifest
    from chest_ct.scoring import scored_test_set
    from chest_ct.shortcut import shortcut_audit

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, dataset_dir = (
            (args.model_dir, args.dataset_dir) if args.model_dir else run_pipeline(args.image_size, Path(tmp))
        )
        if dataset_dir is None:
            sys.exit("--dataset-dir is required with --model-dir")
        meta = read_metadata(model_dir)
        manifest = Manifest.load(dataset_dir)
        records, _ = scored_test_set(model_dir, manifest, manifest.role(TEST))
        positive, threshold = meta["positive_class"], float(meta["threshold"])
        prob = predict_files(model_dir, [manifest.file(r) for r in records])
        train_records = manifest.role(TRAIN)

    y_img, g_img = np.array([manifest.label_index(r) for r in records]), np.array([r.group for r in records])
    y_grp, p_grp, _ = by_group(y_img, prob, g_img)
    units = {"per image": (y_img, prob, g_img), "per duplicate group": (y_grp, p_grp, None)}
    rows, figures = (
        [],
        {
            "threshold": threshold,
            "threshold_source": meta.get("threshold_source", ""),
            "excluded_images": len(manifest.role("excluded")) + len(manifest.role(TEST)) - len(records),
            "image_size": meta["image_size"],
            "base_weights": Path(vgg16_weights()).name if not args.model_dir else "given model",
        },
    )
    for unit, (y, p, groups) in units.items():
        ci = bootstrap_intervals(y, p, threshold, groups=groups, rounds=args.bootstrap, seed=args.seed)
        key = unit.split()[-1]
        figures[f"n_{key}"] = {"positive": int(y.sum()), "negative": int((1 - y).sum())}
        for name in INTERVAL_METRICS:
            rows.append(
                [
                    unit,
                    name,
                    ci[name].value,
                    f"[{ci[name].low:.3f}, {ci[name].high:.3f}]",
                    f"{int(y.sum())} pos / {int((1 - y).sum())} neg",
                ]
            )
            figures[f"{name}_{key}"] = [round(ci[name].value, 4), round(ci[name].low, 4), round(ci[name].high, 4)]
    audit = shortcut_audit(train_records, records, positive, figures["roc_auc_image"][0])
    figures["shortcut_statistics_auc"] = round(audit["statistics_auc"], 4)
    text = table(["unit", "metric", "value", "95% bootstrap CI", "units"], rows)
    print(text)
    print(audit["message"])
    publish(
        "quality",
        f"Quality on the real data (given valid folder less copies of fitted pictures, "
        f"threshold {threshold:.4f} stored with the model, {args.bootstrap} bootstrap rounds)",
        f"Threshold: {figures['threshold_source']}\n\n{text}\n\nShortcut audit: {audit['message']}",
        figures,
        write=not args.no_write,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
