"""Fit the classifier: the head on cached features of the frozen VGG16 base, then optional fine-tuning.

(Over 300 lines: the head fit and the fine-tuning share the compile settings, the callbacks and
the TrainResult both fill in; the out-of-fold refits of the head live in :mod:`chest_ct.fold_head`.)

The base is frozen, so its output for an image never changes during training.
Running it once per image (plus once per augmented copy, ``augment_copies``, off
by default: each costs one more VGG16 pass over the training set) and fitting the
head on those cached features gives the same model as re-running VGG16 every
epoch, at a fraction of the cost. The cached features also let the threshold be
chosen out-of-fold in seconds (:func:`chest_ct.fold_head.head_fit_predict`).

Every picture counts once: images are weighted by their duplicate group, and the
classes weigh the same. ``fine_tune_epochs`` optionally unfreezes VGG16's last
block afterwards; its result is kept only if it lowers the validation loss.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import keras
import numpy as np

from chest_ct import defaults
from chest_ct.determinism import seed_everything
from chest_ct.inputs import extract_features, image_dataset
from chest_ct.model import image_size_of, split_model
from chest_ct.ood import block_features
from chest_ct.precision import PrecisionChoice, check_choice, choose_precision, conv_policy
from chest_ct.records import Manifest
from chest_ct.window import LUNG_WINDOW, Window

log = logging.getLogger(__name__)
EpochCallback = Callable[[int, dict[str, float]], None]
HEAD, FINE_TUNED = "head", "fine-tuned"


@dataclass(frozen=True)
class Examples:
    """Images of one role: files, 0/1 labels and duplicate groups, in manifest order."""

    files: list[str]
    labels: list[int]
    groups: list[int]

    @classmethod
    def of_role(cls, manifest: Manifest, role: str) -> Examples:
        files, labels = manifest.files_and_labels(role)
        return cls(files, labels, [r.group for r in manifest.role(role)])

    def __len__(self) -> int:
        return len(self.files)


def picture_weights(labels: Sequence[int], groups: Sequence[int]) -> np.ndarray:
    """Sample weights under which each picture (duplicate group) weighs the same, and so does each class.

    A picture with 8 copies gives each copy 1/8 of its weight. Mean weight is 1.
    """
    y, g = np.asarray(labels), np.asarray(groups)
    size = Counter(zip(y.tolist(), g.tolist(), strict=True))
    pictures_per_class = Counter(label for label, _ in size)
    w = np.array([1.0 / size[(yi, gi)] / pictures_per_class[yi] for yi, gi in zip(y.tolist(), g.tolist(), strict=True)])
    return (w / w.mean()).astype(np.float32)


@dataclass
class Features:
    """The frozen base's output: clean training images, each augmented copy of them, validation images.

    ``blocks``: the same pass's pooled feature maps after each of the guard's blocks
    (:data:`chest_ct.ood.BLOCKS`), train then valid, so fitting the out-of-distribution
    guard on the frozen base needs no second VGG16 pass.
    """

    train: np.ndarray
    train_augmented: list[np.ndarray]
    valid: np.ndarray
    blocks: list[np.ndarray] = field(default_factory=list)


@dataclass
class TrainResult:
    model: keras.Model
    history: dict[str, list[float]]
    head_best_epoch: int
    epochs_run: int
    #: The exported model's epoch, counting head epochs then fine-tuning epochs, and its validation loss.
    best_epoch: int
    best_val_loss: float
    exported_stage: str
    train_examples: int
    features: Features
    initial_head_weights: list[np.ndarray]
    #: VGG16's arithmetic in the feature pass and fine-tuning (the head is always float32).
    precision: PrecisionChoice
    fine_tune_history: dict[str, list[float]] = field(default_factory=dict)


def validate_params(
    epochs: int,
    batch_size: int,
    learning_rate: float,
    augment_copies: int,
    patience: int,
    fine_tune_epochs: int,
    fine_tune_learning_rate: float,
    precision: str = defaults.PRECISION,
) -> None:
    def is_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    checks = {
        "epochs": (epochs, is_int(epochs) and 1 <= epochs <= 1000, "an integer from 1 to 1000"),
        "batch_size": (batch_size, is_int(batch_size) and 1 <= batch_size <= 4096, "an integer from 1 to 4096"),
        "learning_rate": (learning_rate, 0 < learning_rate <= 1, "a number in (0, 1]"),
        "augment_copies": (
            augment_copies,
            is_int(augment_copies) and 0 <= augment_copies <= 20,
            "an integer from 0 to 20",
        ),
        "patience": (patience, is_int(patience) and patience >= 1, "an integer >= 1"),
        "fine_tune_epochs": (
            fine_tune_epochs,
            is_int(fine_tune_epochs) and 0 <= fine_tune_epochs <= 1000,
            "an integer from 0 to 1000",
        ),
        "fine_tune_learning_rate": (fine_tune_learning_rate, 0 < fine_tune_learning_rate <= 1, "a number in (0, 1]"),
    }
    for name, (value, ok, expected) in checks.items():
        if not ok:
            raise ValueError(f"{name}={value!r}: expected {expected}")
    check_choice("precision", precision)


def _compile(model: keras.Model, learning_rate: float, loss_scale: bool = False) -> None:
    optimizer = keras.optimizers.Adam(learning_rate)
    if loss_scale:  # float16 gradients: scale the loss so small ones do not underflow to zero
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")],
    )


def _callbacks(patience: int, on_epoch: EpochCallback | None) -> list[keras.callbacks.Callback]:
    """Early stopping on validation loss (best weights kept), plus the per-epoch report if asked."""
    callbacks: list[keras.callbacks.Callback] = [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)
    ]
    if on_epoch is not None:
        callbacks.append(
            keras.callbacks.LambdaCallback(
                on_epoch_end=lambda epoch, logs: on_epoch(epoch + 1, {k: float(v) for k, v in (logs or {}).items()})
            )
        )
    return callbacks


def _floats(history: dict[str, list[float]]) -> dict[str, list[float]]:
    return {k: [float(v) for v in vals] for k, vals in history.items()}


def fit_classifier(
    model: keras.Model,
    train: Examples,
    valid: Examples,
    *,
    epochs: int = defaults.EPOCHS,
    batch_size: int = defaults.BATCH_SIZE,
    learning_rate: float = defaults.LEARNING_RATE,
    augment_copies: int = defaults.AUGMENT_COPIES,
    patience: int = defaults.PATIENCE,
    seed: int = defaults.SEED,
    fine_tune_epochs: int = defaults.FINE_TUNE_EPOCHS,
    fine_tune_learning_rate: float = defaults.FINE_TUNE_LEARNING_RATE,
    deterministic: bool = defaults.DETERMINISTIC,
    window: Window = LUNG_WINDOW,
    precision: str = defaults.PRECISION,
    on_epoch: EpochCallback | None = None,
) -> TrainResult:
    """Train ``model`` in place; return it as it should be exported, with what training learnt.

    Runs on the distribution strategy whose scope is active (``chest_ct.devices.training_strategy``),
    in which ``model`` must have been built or loaded.
    """
    validate_params(
        epochs,
        batch_size,
        learning_rate,
        augment_copies,
        patience,
        fine_tune_epochs,
        fine_tune_learning_rate,
        precision,
    )
    for name, examples in (("training", train), ("validation", valid)):
        if len(set(examples.labels)) < 2:
            raise ValueError(f"{name} labels hold only class {sorted(set(examples.labels))}; need both classes")
    seed_everything(seed, deterministic)
    base, head = split_model(model)
    size = image_size_of(model)
    initial_head_weights = head.get_weights()
    choice = choose_precision(precision)
    log.info("precision: %s (%s)", choice.policy, choice.reason)

    # One pass over train and valid together: one input pipeline and fewer odd-sized batches. It also
    # returns the pooled block features the guard is fitted on (the base's own output is the last of them).
    with conv_policy(base, choice.policy, model):
        blocks = block_features(model, [*train.files, *valid.files], size, batch_size, window=window)
        clean = blocks[-1].astype(np.float32)  # exact: the float32 output, widened to float64 and back
        features = Features(
            train=clean[: len(train)],
            valid=clean[len(train) :],
            blocks=blocks,
            train_augmented=[
                extract_features(
                    base, train.files, size, batch_size, augment_seed=seed + 1000 * (copy + 1), window=window
                )
                for copy in range(augment_copies)
            ],
        )
    x_train = np.concatenate([features.train, *features.train_augmented])
    y_train = np.tile(np.asarray(train.labels, np.float32), 1 + augment_copies)
    w_train = np.tile(picture_weights(train.labels, train.groups), 1 + augment_copies)
    w_valid = picture_weights(valid.labels, valid.groups)

    _compile(head, learning_rate)
    history = _floats(
        head.fit(
            x_train,
            y_train,
            sample_weight=w_train,
            validation_data=(features.valid, np.asarray(valid.labels, np.float32), w_valid),
            epochs=epochs,
            batch_size=batch_size,
            shuffle=True,
            callbacks=_callbacks(patience, on_epoch),
            verbose=0,
        ).history
    )
    best = int(np.argmin(history["val_loss"]))
    result = TrainResult(
        model=model,
        history=history,
        head_best_epoch=best + 1,
        epochs_run=len(history["val_loss"]),
        best_epoch=best + 1,
        best_val_loss=history["val_loss"][best],
        exported_stage=HEAD,
        train_examples=len(y_train),
        features=features,
        initial_head_weights=initial_head_weights,
        precision=choice,
    )
    if fine_tune_epochs:
        with conv_policy(base, choice.policy, model):
            _fine_tune(
                result,
                train,
                valid,
                w_valid,
                epochs=fine_tune_epochs,
                batch_size=batch_size,
                learning_rate=fine_tune_learning_rate,
                patience=patience,
                seed=seed,
                on_epoch=on_epoch,
                window=window,
                loss_scale=choice.loss_scale,
            )
    return result


def _fine_tune(
    result: TrainResult,
    train: Examples,
    valid: Examples,
    w_valid: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    patience: int,
    seed: int,
    on_epoch: EpochCallback | None,
    window: Window,
    loss_scale: bool = False,
) -> None:
    """Unfreeze VGG16's last block and train it with the head on images; keep it only if val_loss improves.

    Under a mixed policy (:func:`chest_ct.precision.conv_policy`) the convolutions run in
    bf16/fp16 on float32 variables and the head's output stays float32.
    """
    model = result.model
    base, _ = split_model(model)
    size = image_size_of(model)
    head_only = [(v, v.numpy()) for v in model.weights]
    base.trainable = True
    for layer in base.layers:
        layer.trainable = layer.name.startswith("block5")
    _compile(model, learning_rate, loss_scale)
    w_train = picture_weights(train.labels, train.groups)
    offset = result.epochs_run
    history = _floats(
        model.fit(
            image_dataset(
                train.files,
                size,
                batch_size,
                labels=train.labels,
                weights=w_train,
                augment_seed=seed + 100,
                shuffle_seed=seed,
                window=window,
            ),
            validation_data=image_dataset(
                valid.files, size, batch_size, labels=valid.labels, weights=w_valid, window=window
            ),
            epochs=epochs,
            shuffle=False,  # shuffled in image_dataset
            callbacks=_callbacks(
                patience,
                (lambda e, logs: on_epoch(offset + e, {f"ft_{k}": v for k, v in logs.items()})) if on_epoch else None,
            ),
            verbose=0,
        ).history
    )
    base.trainable = False
    result.fine_tune_history = history
    best = int(np.argmin(history["val_loss"]))
    if history["val_loss"][best] < result.best_val_loss:
        result.best_epoch, result.best_val_loss = offset + best + 1, history["val_loss"][best]
        result.exported_stage = FINE_TUNED
    else:  # fine-tuning did not help: export the head-only model, as the logged best epoch says
        for variable, value in head_only:
            variable.assign(value)
