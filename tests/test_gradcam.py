"""Grad-CAM from the exported model: shape, range, parity with an in-process computation, and meaning.

The meaning test needs a base whose last conv layer still knows *where* things
are. ImageNet weights cannot be downloaded here, and the random base of
``base_weights=none`` (Glorot-uniform 3x3 kernels) does not: thirteen layers of
random 3x3 mixing spread a patch's effect over the whole 4x4 grid at 64 px.
Measured while writing this test, a head trained on such a base separates the
classes (test AUC 0.97-1.0) but its Grad-CAM peak falls on the patch's cell in
4-8% of images, chance being 6%; even the raw change of the block5 activations
caused by the patch peaks on its cell only 5% of the time at 64 px (35% at 128 px).

So :func:`local_base` gives VGG16 delta-orthogonal weights (Xiao et al., 2018:
each 3x3 kernel zero but for a random orthogonal centre tap, an initialisation
for training very deep plain CNNs). Each cell of the last conv layer then sees
only its own 16x16 block of the image, as the features of a trained base are
local. Everything under test is the production code: the SavedModel's
preprocessing, forward split, logit, gradient, channel weights and normalisation.

What the meaning tests check, with the patch in a different cell in each image:
the peak cell is the patch's cell (so the right tensor, axes not transposed);
with a dark decoy patch elsewhere the map still picks the bright one (the sign:
evidence *for* the class); and a model trained on the opposite rule (dark patch
= positive) on the same kind of images points at the dark patch instead, so the
map follows what the model learnt, not what stands out in the image.
"""

from __future__ import annotations

import io
from dataclasses import replace

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from chest_ct import gradcam
from chest_ct.determinism import seed_everything
from chest_ct.export import BYTES_SIGNATURE, PIXELS_SIGNATURE, SIGNATURES, export_saved_model, read_metadata
from chest_ct.forward import LAST_CONV_LAYER, SplitModel
from chest_ct.model import build_model, split_model
from chest_ct.ood import feature_model, fit_guard
from chest_ct.preprocess import to_model_input

SIZE, CELL, PATCH = 64, 16, 8
GRID = SIZE // CELL
BRIGHT, DARK = 250.0, 0.0
EXPLAIN_IMAGES, EXPLAIN_PIXELS = SIGNATURES["images", "explain"], SIGNATURES["pixels", "explain"]


def local_base(model: keras.Model, seed: int) -> None:
    """Delta-orthogonal weights for every conv layer of the base: spatially local features."""
    base, _ = split_model(model)
    orthogonal = keras.initializers.Orthogonal(seed=seed)
    for layer in base.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kernel, bias = layer.get_weights()
            centre = np.zeros_like(kernel)
            centre[1, 1] = orthogonal(kernel.shape[2:]).numpy()
            layer.set_weights([centre, np.zeros_like(bias)])


def patch_images(rng: np.random.Generator, n: int, patches: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Noise images with one square patch of each given brightness, each in its own random grid cell.

    Returns float32 RGB ``[n, SIZE, SIZE, 3]`` and the cells ``[n, len(patches), 2]`` (row, column).
    """
    images = rng.integers(40, 140, size=(n, SIZE, SIZE)).astype(np.float32)
    cells = np.zeros((n, len(patches), 2), int)
    off = (CELL - PATCH) // 2
    for i in range(n):
        for j, (flat, value) in enumerate(
            zip(rng.choice(GRID * GRID, len(patches), replace=False), patches, strict=True)
        ):
            row, col = divmod(int(flat), GRID)
            images[i, row * CELL + off : row * CELL + off + PATCH, col * CELL + off : col * CELL + off + PATCH] = value
            cells[i, j] = row, col
    return np.repeat(images[..., None], 3, axis=-1), cells


def train_head(model: keras.Model, positives: np.ndarray, negatives: np.ndarray, seed: int) -> None:
    base, head = split_model(model)
    x = to_model_input(tf.constant(np.concatenate([positives, negatives])))
    y = np.array([1] * len(positives) + [0] * len(negatives), np.float32)
    keras.utils.set_random_seed(seed)
    head.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy")
    head.fit(base.predict(x, verbose=0), y, epochs=30, batch_size=16, verbose=0)


def guard_for(model: keras.Model, images: np.ndarray):
    """An out-of-distribution guard fitted on ``images`` (every signature carries one; these tests do not read it)."""
    features = feature_model(model).predict(to_model_input(tf.constant(images)), verbose=0)
    return fit_guard([np.asarray(f, np.float64) for f in features], list(range(len(images))))


@pytest.fixture(scope="module")
def bright_rule(tmp_path_factory):
    """A model trained on "a bright patch means adenocarcinoma" (normal images carry a dark patch), exported."""
    seed_everything(0)
    model = build_model(SIZE, "none")
    local_base(model, seed=0)
    rng = np.random.default_rng(0)
    train_head(model, patch_images(rng, 60, (BRIGHT,))[0], patch_images(rng, 60, (DARK,))[0], seed=0)
    images = patch_images(rng, 10, (BRIGHT, DARK))[0]
    return model, export_saved_model(
        model, tmp_path_factory.mktemp("gradcam") / "model", {"mlflow_run_id": "r"}, guard=guard_for(model, images)
    )


@pytest.fixture(scope="module")
def loaded(bright_rule):
    return tf.saved_model.load(str(bright_rule[1]))


def peak_cells(maps: np.ndarray) -> np.ndarray:
    return np.array([np.unravel_index(np.argmax(m), m.shape) for m in maps])


def in_process(parts: SplitModel):
    """The explain head's math on a Keras model, outside any SavedModel: ``(probability, heatmap)``."""

    @tf.function
    def explain(pixels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        forward = parts(to_model_input(pixels))
        return forward.probability, gradcam.explain(forward, parts.head)

    return lambda pixels: tuple(t.numpy() for t in explain(tf.constant(pixels)))


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def textbook_gradcam(model: keras.Model, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM written the usual eager way (GradientTape on a Keras sub-model), apart from chest_ct.gradcam."""
    base, head = split_model(model)
    to_conv = keras.Model(base.inputs, base.get_layer(LAST_CONV_LAYER).output)
    after = base.layers[[layer.name for layer in base.layers].index(LAST_CONV_LAYER) + 1 :]
    dense = head.layers[-1]
    conv = to_conv(to_model_input(tf.constant(pixels)))
    with tf.GradientTape() as tape:
        tape.watch(conv)
        x = conv
        for layer in after:
            x = layer(x)
        logit = x @ dense.kernel + dense.bias
    grads = tape.gradient(logit, conv).numpy()
    cam = np.maximum((conv.numpy() * grads.mean(axis=(1, 2))[:, None, None, :]).sum(-1), 0)
    peak = cam.max(axis=(1, 2), keepdims=True)
    return np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0), tf.sigmoid(logit).numpy().reshape(-1)


def test_explain_signatures_shape_range_and_metadata(bright_rule, loaded):
    _, model_dir = bright_rule
    assert {BYTES_SIGNATURE, PIXELS_SIGNATURE, EXPLAIN_IMAGES, EXPLAIN_PIXELS} <= set(loaded.signatures)
    fn = loaded.signatures[EXPLAIN_PIXELS]
    assert set(fn.structured_outputs) == {"probability", "heatmap", "ood_score", "in_distribution"}
    assert fn.structured_outputs["heatmap"].shape.as_list() == [None, GRID, GRID]
    pixels, _ = patch_images(np.random.default_rng(1), 5, (BRIGHT, DARK))
    pixels[4] = 90.0  # a flat image: nothing raises the score anywhere, or something does, never NaN
    out = fn(pixels=tf.constant(pixels))
    heat = out["heatmap"].numpy()
    assert heat.dtype == np.float32 and heat.shape == (5, GRID, GRID)
    assert np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1
    assert set(np.round(heat.max(axis=(1, 2)), 6)) <= {0.0, 1.0}, "each map is scaled to its own maximum"
    meta = read_metadata(model_dir)
    assert meta["heatmap"]["grid"] == [GRID, GRID] and meta["heatmap"]["layer"] == LAST_CONV_LAYER
    assert meta["heatmap"]["signatures"] == {
        "images": EXPLAIN_IMAGES,
        "pixels": EXPLAIN_PIXELS,
        "hu": SIGNATURES["hu", "explain"],
    }
    assert set(meta["signatures"]) == set(loaded.signatures)


def test_explain_matches_in_process_gradcam_and_serving(bright_rule, loaded):
    model, _ = bright_rule
    pixels, _ = patch_images(np.random.default_rng(2), 6, (BRIGHT, DARK))
    exported = loaded.signatures[EXPLAIN_PIXELS](pixels=tf.constant(pixels))
    expected_heat, expected_prob = textbook_gradcam(model, pixels)
    np.testing.assert_allclose(exported["heatmap"].numpy(), expected_heat, atol=1e-5)
    np.testing.assert_allclose(exported["probability"].numpy(), expected_prob, atol=1e-6)
    served = loaded.signatures[PIXELS_SIGNATURE](pixels=tf.constant(pixels))["probability"].numpy()
    np.testing.assert_array_equal(exported["probability"].numpy(), served)
    # The bytes signature decodes PNG/JPEG in the graph exactly as serving_default does.
    encoded = tf.constant([png(p) for p in pixels])
    by_bytes = loaded.signatures[EXPLAIN_IMAGES](images=encoded)
    np.testing.assert_allclose(by_bytes["heatmap"].numpy(), exported["heatmap"].numpy(), atol=1e-5)
    np.testing.assert_array_equal(
        by_bytes["probability"].numpy(), loaded.signatures[BYTES_SIGNATURE](images=encoded)["probability"].numpy()
    )


def test_heatmap_peak_falls_on_the_bright_patch(loaded):
    rng = np.random.default_rng(3)
    alone, cells = patch_images(rng, 40, (BRIGHT,))
    normal, _ = patch_images(rng, 40, (DARK,))
    fn = loaded.signatures[EXPLAIN_PIXELS]
    out = fn(pixels=tf.constant(alone))
    assert out["probability"].numpy().min() > fn(pixels=tf.constant(normal))["probability"].numpy().max(), (
        "the model learnt the task"
    )
    hits = (peak_cells(out["heatmap"].numpy()) == cells[:, 0]).all(axis=1)
    assert hits.mean() >= 0.9, f"peak on the patch in {hits.mean():.0%} of images (chance {1 / GRID**2:.0%})"

    both, cells = patch_images(rng, 40, (BRIGHT, DARK))
    heat = fn(pixels=tf.constant(both))["heatmap"].numpy()
    on_bright = (peak_cells(heat) == cells[:, 0]).all(axis=1)
    assert on_bright.mean() >= 0.9, f"with a dark decoy, peak on the bright patch in {on_bright.mean():.0%}"
    rows = np.arange(len(heat))
    assert (heat[rows, cells[:, 1, 0], cells[:, 1, 1]] < 0.5).mean() >= 0.9, "the decoy is not evidence"


def test_the_map_follows_what_the_model_learnt(bright_rule):
    """Same architecture, base and kind of images, opposite rule: the map moves to the dark patch."""
    model, _ = bright_rule
    seed_everything(0)
    dark_rule = build_model(SIZE, "none")
    local_base(dark_rule, seed=0)
    rng = np.random.default_rng(4)
    train_head(dark_rule, patch_images(rng, 60, (DARK,))[0], patch_images(rng, 60, (BRIGHT,))[0], seed=0)
    both, cells = patch_images(rng, 40, (BRIGHT, DARK))
    maps = {}
    for name, m in (("bright", model), ("dark", dark_rule)):
        _, heat = in_process(SplitModel.of(m))(both)
        maps[name] = peak_cells(heat)
    assert (maps["bright"] == cells[:, 0]).all(axis=1).mean() >= 0.9
    assert (maps["dark"] == cells[:, 1]).all(axis=1).mean() >= 0.9


def test_a_saturated_probability_is_still_explained(bright_rule):
    """The map is of the logit: at probability 1.0 (float32) the sigmoid's gradient is 0, the logit's is not."""
    model, _ = bright_rule
    _, head = split_model(model)
    loud = keras.models.clone_model(head)
    loud.set_weights([w * 1000 for w in head.get_weights()])
    pixels, cells = patch_images(np.random.default_rng(5), 20, (BRIGHT,))
    prob, heat = in_process(replace(SplitModel.of(model), head=loud))(pixels)
    assert (prob == 1.0).mean() >= 0.9, "the test needs saturated probabilities"
    assert (heat.max(axis=(1, 2)) == 1.0).all()
    assert (peak_cells(heat) == cells[:, 0]).all(axis=1).mean() >= 0.9


def test_head_without_sigmoid_is_refused():
    head = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="relu")], name="head")
    with pytest.raises(ValueError, match="must end in a Dense layer with a sigmoid"):
        gradcam.head_logit(head, tf.zeros((1, 4)))
