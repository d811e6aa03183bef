"""Training speed on the real data: chest-ct's train step against a floor and the tutorials' way.

    python -m bench.train [--image-size 224] [--epochs 10] [--fine-tune-epochs 3] [--no-baseline] [--no-write]

- floor: one float32 VGG16 forward pass over the training images, in process (the
  least any VGG16-based training can do: every image must go through the base once);
- chest-ct: the pipeline's train step (``train_and_export``: features once, head
  fitted on them, the out-of-fold threshold, MLflow logging, SavedModel export)
  with pipeline defaults and ``precision=fp32``;
- chest-ct bf16: the same with ``precision=bf16`` (what ``auto`` picks on a CPU with
  native bf16), against the same float32 floor; beside it the floor's own pass in
  bf16, and the bf16 model's float32 vs bf16 answers on the valid images (max
  difference, label flips at its threshold: ``chest_ct.precision.precision_agreement``,
  what a bf16 server's guard measures);
- baseline: the original tutorials' way, Keras ``fit`` on a Python generator
  that decodes the images and runs the whole model, frozen VGG16 included, on
  every image every epoch;
- options, reported separately: augmented feature copies, and fine-tuning
  VGG16's last block.

All are measured in this run, so the ratios hold on a busy machine. Run-to-run
speed on a shared 2-core VM varies widely (the same VGG16 pass took 14 s and 41 s
at 224 px within one run; the CPU other processes took during each run is
printed and written with the figures), so the floor and chest-ct are measured alternately (floor,
chest-ct, chest-ct bf16, bf16 floor, floor, ...) and each is taken as its fastest
run: the least disturbed estimate of each, and never a floor inflated by a slow moment.

Targets: chest-ct <= 1.5x floor, >= 6x faster than the baseline; on a CPU with native
bf16, chest-ct bf16 <= 0.75x the float32 floor with probabilities within 0.01 of
float32 on the valid images and no label flip.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.report import SHARED_DATA, publish, table, timed, vgg16_weights  # noqa: E402
from chest_ct import defaults  # noqa: E402


def tutorial_baseline(
    model_file: Path,
    files: list[str],
    labels: list[int],
    valid_files: list[str],
    valid_labels: list[int],
    image_size: int,
    batch_size: int,
    epochs: int,
) -> None:
    """The tutorials' loop: a generator of decoded images and ``model.fit`` over the full model."""
    import keras
    import numpy as np
    from keras.applications import vgg16
    from PIL import Image

    class Images(keras.utils.PyDataset):
        def __init__(self, paths: list[str], ys: list[int]):
            super().__init__()
            self.paths, self.ys = paths, np.asarray(ys, np.float32)

        def __len__(self) -> int:
            return (len(self.paths) + batch_size - 1) // batch_size

        def __getitem__(self, i: int):
            chunk = slice(i * batch_size, (i + 1) * batch_size)
            x = np.stack(
                [
                    np.asarray(Image.open(p).convert("RGB").resize((image_size, image_size)), np.float32)
                    for p in self.paths[chunk]
                ]
            )
            return vgg16.preprocess_input(x), self.ys[chunk]

    model = keras.models.load_model(model_file)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy", metrics=["accuracy"])
    model.fit(Images(files, labels), validation_data=Images(valid_files, valid_labels), epochs=epochs, verbose=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA)
    parser.add_argument("--image-size", type=int, default=defaults.IMAGE_SIZE)
    parser.add_argument("--epochs", type=int, default=defaults.EPOCHS)
    parser.add_argument("--batch-size", type=int, default=defaults.BATCH_SIZE)
    parser.add_argument("--fine-tune-epochs", type=int, default=3, help="0 skips the fine-tuning row")
    parser.add_argument("--augment-copies", type=int, default=2, help="0 skips the augmentation row")
    parser.add_argument("--repeats", type=int, default=2, help="chest-ct runs, alternated with repeats+1 floor runs")
    parser.add_argument("--no-baseline", action="store_true", help="skip the tutorials' fit (several minutes)")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args(argv)
    if not (args.data / "train").is_dir():
        print(f"SKIPPED: real data not found at {args.data} (expected train/ and valid/ folders)")
        return 0

    import keras
    import mlflow

    from chest_ct.export import read_metadata
    from chest_ct.ingest import build_dataset
    from chest_ct.inputs import extract_features
    from chest_ct.model import build_model, split_model
    from chest_ct.precision import MIXED_BF16, conv_policy, precision_agreement
    from chest_ct.records import TRAIN, VALID, Manifest
    from chest_ct.train import train_and_export
    from serving.precision import cpu_bf16

    weights = vgg16_weights()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        build_dataset(args.data, tmp / "data")
        manifest = Manifest.load(tmp / "data")
        files, labels = manifest.files_and_labels(TRAIN)
        valid_files, valid_labels = manifest.files_and_labels(VALID)
        model_file = tmp / "base.keras"
        build_model(args.image_size, weights).save(model_file)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        mlflow.create_experiment("chest-ct", artifact_location=(tmp / "artifacts").as_uri())

        model = keras.models.load_model(model_file)
        base, _ = split_model(model)
        extract_features(base, files[: args.batch_size], args.image_size, args.batch_size)  # warm-up, untimed

        import psutil

        from bench.serve_floor import CpuShare

        share = CpuShare([lambda: [psutil.Process()]])  # CPU other processes take during each run

        def floor(policy: str = "float32") -> float:
            with conv_policy(base, policy, model):
                if policy != "float32":  # the warm-up of this dtype's graph, untimed
                    extract_features(base, files[: args.batch_size], args.image_size, args.batch_size)
                seconds, _ = share.measure(
                    f"floor {policy} #{len(share.phases)}",
                    lambda: timed(extract_features, base, files, args.image_size, args.batch_size),
                )
            print(f"floor ({policy}): {seconds:.1f}s for {len(files)} images", file=sys.stderr, flush=True)
            return seconds

        def chest_ct(out: str, **extra) -> float:
            extra = {"precision": "fp32", **extra}
            seconds, _ = share.measure(
                out,
                lambda: timed(
                    train_and_export,
                    tmp / "data",
                    model_file,
                    tmp / out,
                    epochs=args.epochs,
                    batch_size=args.batch_size,
                    **extra,
                ),
            )
            print(f"{out}: {seconds:.1f}s", file=sys.stderr, flush=True)
            return seconds

        floors, ours, ours_bf16, floors_bf16 = [floor()], [], [], []
        for i in range(args.repeats):
            ours.append(chest_ct(f"chest-ct-{i}"))
            ours_bf16.append(chest_ct(f"chest-ct-bf16-{i}", precision="bf16"))
            floors_bf16.append(floor(MIXED_BF16))
            floors.append(floor())
        floor_s, chest_ct_s, bf16_s, bf16_floor_s = min(floors), min(ours), min(ours_bf16), min(floors_bf16)
        bf16_model = tmp / "chest-ct-bf16-0"
        shared_valid = [
            str(p) for p in sorted((args.data / "valid").rglob("*")) if p.suffix.lower() in (".png", ".jpg", ".jpeg")
        ]
        agreement = precision_agreement(bf16_model, shared_valid, read_metadata(bf16_model)["threshold"])
        print(f"bf16 vs fp32 on the valid images: {agreement}", file=sys.stderr, flush=True)
        baseline_s = float("nan")
        if not args.no_baseline:
            baseline_s, _ = timed(
                tutorial_baseline,
                model_file,
                files,
                labels,
                valid_files,
                valid_labels,
                args.image_size,
                args.batch_size,
                args.epochs,
            )
            print(f"baseline: {baseline_s:.1f}s", file=sys.stderr, flush=True)
        options = []
        if args.augment_copies:
            options.append(
                (
                    f"chest-ct, augment_copies={args.augment_copies} (option)",
                    chest_ct("augmented", augment_copies=args.augment_copies),
                )
            )
        if args.fine_tune_epochs:
            options.append(
                (
                    f"chest-ct, fine-tune block5 for {args.fine_tune_epochs} epochs (option)",
                    chest_ct("fine-tuned", fine_tune_epochs=args.fine_tune_epochs),
                )
            )

    n = len(files)
    runs = lambda values: ", ".join(f"{v:.1f}" for v in values)  # noqa: E731
    rows = [
        [
            f"floor: one VGG16 pass, float32, in process (best of {len(floors)})",
            floor_s,
            n / floor_s,
            1.0,
            baseline_s / floor_s,
            runs(floors),
        ],
        [
            f"chest-ct train step, pipeline defaults, precision=fp32 (best of {len(ours)})",
            chest_ct_s,
            n * args.epochs / chest_ct_s,
            chest_ct_s / floor_s,
            baseline_s / chest_ct_s,
            runs(ours),
        ],
        [
            f"chest-ct train step, precision=bf16 (best of {len(ours_bf16)})",
            bf16_s,
            n * args.epochs / bf16_s,
            bf16_s / floor_s,
            baseline_s / bf16_s,
            runs(ours_bf16),
        ],
        [
            f"reference: the floor's VGG16 pass in bf16 (best of {len(floors_bf16)})",
            bf16_floor_s,
            n / bf16_floor_s,
            bf16_floor_s / floor_s,
            baseline_s / bf16_floor_s,
            runs(floors_bf16),
        ],
        [
            "baseline: tutorials' fit on a generator",
            baseline_s,
            n * args.epochs / baseline_s,
            baseline_s / floor_s,
            1.0,
            runs([baseline_s]),
        ],
    ]
    rows += [[name, s, n * args.epochs / s, s / floor_s, baseline_s / s, runs([s])] for name, s in options]
    text = table(["what", "seconds", "images/s", "x floor", "speedup vs baseline", "runs (s)"], rows)
    cpu = cpu_bf16()
    figures = {
        "floor_runs_s": [round(v, 2) for v in floors],
        "chest_ct_runs_s": [round(v, 2) for v in ours],
        "floor_s": round(floor_s, 2),
        "chest_ct_s": round(chest_ct_s, 2),
        "baseline_s": None if args.no_baseline else round(baseline_s, 2),
        "ratio_vs_floor": round(chest_ct_s / floor_s, 3),
        "speedup_vs_baseline": None if args.no_baseline else round(baseline_s / chest_ct_s, 2),
        "bf16_runs_s": [round(v, 2) for v in ours_bf16],
        "bf16_chest_ct_s": round(bf16_s, 2),
        "bf16_floor_s": round(bf16_floor_s, 2),
        "bf16_train_ratio_vs_fp32_floor": round(bf16_s / floor_s, 3),
        "bf16_floor_ratio": round(bf16_floor_s / floor_s, 3),
        "bf16_max_abs_diff": agreement.get("max_abs_diff"),
        "bf16_label_flips": agreement.get("label_flips"),
        "bf16_parity_images": agreement.get("images"),
        "native_bf16": cpu.native,
        "background_cpu_max": round(max(share.phases.values()), 3),
        "images": n,
        "epochs": args.epochs,
        "image_size": args.image_size,
        "base_weights": Path(weights).name,
        **{f"option_{i}_s": round(s, 2) for i, (_, s) in enumerate(options)},
    }

    def met(ok: bool) -> str:
        return "met" if ok else "MISSED"

    verdict = (
        f"targets: chest-ct <= 1.5x floor: {met(figures['ratio_vs_floor'] <= 1.5)}; "
        + (f">= 6x faster than baseline: {met(figures['speedup_vs_baseline'] >= 6)}; " if not args.no_baseline else "")
        + f"bf16 train step <= 0.75x the float32 floor: {met(figures['bf16_train_ratio_vs_fp32_floor'] <= 0.75)}"
        + ("" if cpu.native else f" (no native bf16 here: {cpu.source})")
        + f"; bf16 probabilities within 0.01 of float32 on the {agreement.get('images')} shared valid images, "
        + "no label flip: "
        + met(agreement.get("max_abs_diff", 1.0) <= 0.01 and agreement.get("label_flips", 1) == 0)
    )
    print(text)
    background = "; ".join(f"{name} {100 * v:.0f}%" for name, v in share.phases.items())
    print(verdict)
    print(f"CPU taken by other processes on this machine, per run: {background}")
    publish(
        "train",
        f"Training ({args.image_size} px, {n} training images, {args.epochs} epochs, "
        f"base weights: {Path(weights).name})",
        f"{text}\n\n{verdict}\n\n"
        f"CPU taken by other processes on this machine, per run: {background}.\n\n"
        "bf16 vs float32 answers of the bf16-trained model's SavedModel on the shared valid "
        f"images (oneDNN's graph rewrite, as a bf16 server runs it): {agreement}",
        figures,
        write=not args.no_write,
        machine_note=f"; native bf16: {cpu.native} ({cpu.source})",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
