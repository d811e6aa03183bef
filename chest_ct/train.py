"""Fit the classifier head on features of the frozen VGG16 base.

The base is frozen, so its output for an image never changes during training.
Running it once per image (plus once per augmented copy) and fitting the head on
those cached features gives the same model as re-running VGG16 on every image
every epoch, at a fraction of the cost. Augmentation therefore comes from a fixed
number of augmented variants per image (``augment_copies``, off by default: each
copy costs one more VGG16 pass over the training set) instead of fresh random
draws each epoch.

``fine_tune_epochs`` optionally unfreezes VGG16's last block afterwards and
trains it with the head on images (augmented on the fly). That costs a full
forward and partial backward pass per image per epoch, so it is opt-in.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import keras
import mlflow
import numpy as np
import tensorflow as tf
from sklearn.utils.class_weight import compute_class_weight

from chest_ct import registry
from chest_ct.export import export_saved_model
from chest_ct.ingest import load_manifest, split_files
from chest_ct.model import image_size_of, split_model
from chest_ct.preprocess import decode_and_resize, to_model_input

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass
class TrainResult:
    model: keras.Model
    history: dict[str, list[float]]
    best_epoch: int
    epochs_run: int
    train_examples: int
    class_weight: dict[int, float] = field(default_factory=dict)
    fine_tune_history: dict[str, list[float]] = field(default_factory=dict)


def augmenter(seed: int) -> keras.Sequential:
    """Mild geometric and intensity changes: CT slices are roughly centred and upright.

    Brightness and contrast jitter also weakens brightness as a shortcut cue.
    """
    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomRotation(0.05, seed=seed + 1),
            keras.layers.RandomZoom(0.1, seed=seed + 2),
            keras.layers.RandomContrast(0.2, seed=seed + 3),
            keras.layers.RandomBrightness(0.15, value_range=(0, 255), seed=seed + 4),
        ],
        name="augment",
    )


def image_dataset(files: Sequence[str], image_size: int, batch_size: int,
                  augment: keras.Sequential | None = None, labels: Sequence[int] | None = None,
                  shuffle_seed: int | None = None) -> tf.data.Dataset:
    """Batches of model-ready images, or ``(images, labels)`` when labels are given.

    Without ``shuffle_seed`` the order is the file order, so extracted features
    line up with their labels.
    """
    if labels is None:
        ds = tf.data.Dataset.from_tensor_slices(list(files))
    else:
        ds = tf.data.Dataset.from_tensor_slices((list(files), np.asarray(labels, np.float32)))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(files), seed=shuffle_seed, reshuffle_each_iteration=True)

    def on_images(fn):
        return fn if labels is None else (lambda x, y: (fn(x), y))

    ds = ds.map(on_images(lambda f: decode_and_resize(tf.io.read_file(f), image_size)),
                num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
    if augment is not None:
        ds = ds.map(on_images(lambda x: augment(x, training=True)), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.map(on_images(to_model_input), num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def extract_features(base: keras.Model, files: Sequence[str], image_size: int, batch_size: int,
                     augment: keras.Sequential | None = None) -> np.ndarray:
    return base.predict(image_dataset(files, image_size, batch_size, augment), verbose=0)


def _compile(model: keras.Model, learning_rate: float) -> None:
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=keras.losses.BinaryCrossentropy(),
                  metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")])


def _callbacks(patience: int, on_epoch: EpochCallback | None) -> list[keras.callbacks.Callback]:
    """Early stopping on validation loss (best weights kept), plus the per-epoch report if asked."""
    callbacks: list[keras.callbacks.Callback] = [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)]
    if on_epoch is not None:
        callbacks.append(keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: on_epoch(epoch + 1, {k: float(v) for k, v in (logs or {}).items()})))
    return callbacks


def validate_params(epochs: int, batch_size: int, learning_rate: float, augment_copies: int, patience: int,
                    fine_tune_epochs: int = 0, fine_tune_learning_rate: float = 1e-5) -> None:
    checks = {
        "fine_tune_epochs": (fine_tune_epochs, isinstance(fine_tune_epochs, int) and 0 <= fine_tune_epochs <= 1000,
                             "an integer from 0 to 1000"),
        "fine_tune_learning_rate": (fine_tune_learning_rate, 0 < fine_tune_learning_rate <= 1, "a number in (0, 1]"),
        "epochs": (epochs, isinstance(epochs, int) and 1 <= epochs <= 1000, "an integer from 1 to 1000"),
        "batch_size": (batch_size, isinstance(batch_size, int) and 1 <= batch_size <= 4096, "an integer from 1 to 4096"),
        "learning_rate": (learning_rate, 0 < learning_rate <= 1, "a number in (0, 1]"),
        "augment_copies": (augment_copies, isinstance(augment_copies, int) and 0 <= augment_copies <= 20,
                           "an integer from 0 to 20"),
        "patience": (patience, isinstance(patience, int) and patience >= 1, "an integer >= 1"),
    }
    for name, (value, ok, expected) in checks.items():
        if not ok:
            raise ValueError(f"{name}={value!r}: expected {expected}")


def train(
    model: keras.Model,
    train_files: Sequence[str],
    train_labels: Sequence[int],
    valid_files: Sequence[str],
    valid_labels: Sequence[int],
    *,
    epochs: int = 10,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    augment_copies: int = 0,
    patience: int = 3,
    seed: int = 42,
    fine_tune_epochs: int = 0,
    fine_tune_learning_rate: float = 1e-5,
    on_epoch: EpochCallback | None = None,
) -> TrainResult:
    """Train ``model``'s head in place; return it with the best epoch's weights restored."""
    validate_params(epochs, batch_size, learning_rate, augment_copies, patience, fine_tune_epochs,
                    fine_tune_learning_rate)
    if len(set(train_labels)) < 2:
        raise ValueError(f"training labels hold only class {sorted(set(train_labels))}; need both classes")
    keras.utils.set_random_seed(seed)
    base, head = split_model(model)
    size = image_size_of(model)

    # One pass over train and valid together: one input pipeline and fewer odd-sized batches.
    clean = extract_features(base, [*train_files, *valid_files], size, batch_size)
    x_valid = clean[len(train_files):]
    feats = [clean[: len(train_files)]]
    for copy in range(augment_copies):
        feats.append(extract_features(base, train_files, size, batch_size, augmenter(seed + 10 * copy)))
    x_train = np.concatenate(feats)
    y_train = np.tile(np.asarray(train_labels, dtype=np.float32), 1 + augment_copies)
    y_valid = np.asarray(valid_labels, dtype=np.float32)

    classes = np.unique(y_train)
    weights = compute_class_weight("balanced", classes=classes, y=y_train)
    class_weight = {int(c): float(w) for c, w in zip(classes, weights)}

    _compile(head, learning_rate)
    history = head.fit(
        x_train, y_train, validation_data=(x_valid, y_valid), epochs=epochs, batch_size=batch_size,
        class_weight=class_weight, shuffle=True, callbacks=_callbacks(patience, on_epoch), verbose=0,
    ).history
    val_loss = history["val_loss"]
    result = TrainResult(
        model=model,
        history={k: [float(v) for v in vals] for k, vals in history.items()},
        best_epoch=int(np.argmin(val_loss)) + 1,
        epochs_run=len(val_loss),
        train_examples=len(y_train),
        class_weight=class_weight,
    )
    if fine_tune_epochs:
        result.fine_tune_history = fine_tune(
            model, train_files, train_labels, valid_files, valid_labels, epochs=fine_tune_epochs,
            batch_size=batch_size, learning_rate=fine_tune_learning_rate, patience=patience, seed=seed,
            class_weight=class_weight,
            on_epoch=(lambda e, logs: on_epoch(result.epochs_run + e, {f"ft_{k}": v for k, v in logs.items()}))
            if on_epoch else None,
        )
    return result


def fine_tune(model: keras.Model, train_files: Sequence[str], train_labels: Sequence[int],
              valid_files: Sequence[str], valid_labels: Sequence[int], *, epochs: int, batch_size: int,
              learning_rate: float, patience: int, seed: int, class_weight: dict[int, float],
              on_epoch: EpochCallback | None = None) -> dict[str, list[float]]:
    """Unfreeze VGG16's last convolutional block and train it with the head, on images."""
    base, _ = split_model(model)
    size = image_size_of(model)
    base.trainable = True
    for layer in base.layers:
        layer.trainable = layer.name.startswith("block5")
    _compile(model, learning_rate)
    history = model.fit(
        image_dataset(train_files, size, batch_size, augmenter(seed + 100), labels=train_labels, shuffle_seed=seed),
        validation_data=image_dataset(valid_files, size, batch_size, labels=valid_labels),
        epochs=epochs, class_weight=class_weight, callbacks=_callbacks(patience, on_epoch), shuffle=False,
        verbose=0,  # shuffled in image_dataset
    ).history
    base.trainable = False
    return {k: [float(v) for v in vals] for k, vals in history.items()}


def train_and_export(
    dataset_dir: Path,
    base_model_file: Path,
    out_dir: Path,
    *,
    experiment: str = registry.DEFAULT_EXPERIMENT,
    tags: dict[str, str] | None = None,
    extra_artifacts: dict[str, Path] | None = None,
    **hyper: int | float,
) -> str:
    """The pipeline's train step: open an MLflow run, train, export; return the run id.

    ``hyper`` takes :func:`train`'s keyword arguments (epochs, batch_size, ...).
    """
    model = keras.models.load_model(base_model_file)
    manifest = load_manifest(dataset_dir)
    train_files, train_labels = split_files(dataset_dir, "train")
    valid_files, valid_labels = split_files(dataset_dir, "valid")
    params = {**hyper, "image_size": image_size_of(model), "dataset_fingerprint": manifest["fingerprint"],
              "train_images": len(train_files), "valid_images": len(valid_files)}
    run_id = registry.start_run(experiment, params, tags)
    epochs = hyper.get("epochs", 10)

    def on_epoch(epoch: int, logs: dict[str, float]) -> None:
        registry.log_epoch(run_id, epoch, logs)
        print(f"epoch {epoch}/{epochs} " + " ".join(f"{k}={v:.4f}" for k, v in sorted(logs.items())), flush=True)

    # Inside the run's context, so a failure marks the MLflow run FAILED instead of leaving it FINISHED.
    with mlflow.start_run(run_id=run_id):
        result = train(model, train_files, train_labels, valid_files, valid_labels, on_epoch=on_epoch, **hyper)
        export_saved_model(result.model, out_dir, {"mlflow_run_id": run_id,
                                                   "dataset_fingerprint": manifest["fingerprint"]})
        summary = {"best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                   "train_examples": result.train_examples, "class_weight": result.class_weight}
        mlflow.log_metrics({"best_epoch": result.best_epoch, "epochs_run": result.epochs_run})
        mlflow.log_dict({**summary, "history": result.history}, "training/history.json")
        for name, path in (extra_artifacts or {}).items():
            mlflow.log_artifact(str(path), f"training/{name}")
    print("training done: " + json.dumps(summary), flush=True)
    return run_id
