"""What the exported SavedModel stores: every weight once.

Keras' ``ExportArchive.track(model)`` saves the ``keras.Variable`` wrappers of a
model beside the ``tf.Variable``s the signatures capture; TensorFlow cannot tell
they are the same weights, so each was written (and loaded into memory) twice
(keras-team/keras#23553): 115 MB of variables for VGG16's 59 MB. These tests read
the checkpoint itself, so they fail whichever object path brings a copy back.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from chest_ct.export import export_saved_model
from chest_ct.model import build_model
from chest_ct.ood import BLOCKS, fit_guard

SIZE = 32
#: Channels of VGG16's pooled features after each block of chest_ct.ood.BLOCKS.
CHANNELS = (64, 128, 256, 512, 512)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A random-weight model and a guard fitted on random features (the export does not care what they mean)."""
    keras.utils.set_random_seed(5)
    model = build_model(SIZE, "none")
    rng = np.random.default_rng(5)
    guard = fit_guard([rng.random((30, c)) for c in CHANNELS], list(range(30)))
    out = export_saved_model(model, tmp_path_factory.mktemp("export") / "model", {}, guard=guard)
    return model, guard, out


def stored(model_dir: Path) -> dict[str, np.ndarray]:
    """Every value in the SavedModel's checkpoint, by checkpoint key (the object graph left out)."""
    reader = tf.train.load_checkpoint(str(model_dir / "variables" / "variables"))
    return {
        key: reader.get_tensor(key)
        for key in reader.get_variable_to_shape_map()
        if key != "_CHECKPOINTABLE_OBJECT_GRAPH"
    }


def fingerprint(value: np.ndarray) -> tuple:
    value = np.asarray(value)
    return value.dtype.str, value.shape, value.tobytes()


def test_each_model_weight_is_stored_as_often_as_the_model_holds_it(export):
    """Counted by value: a random base has equal zero biases, which the model itself holds more than once."""
    model, _, out = export
    in_checkpoint = Counter(fingerprint(value) for value in stored(out).values())
    in_model = Counter(fingerprint(weight.numpy()) for weight in model.weights)
    wrong = [(key[1], in_model[key], in_checkpoint[key]) for key in in_model if in_checkpoint[key] != in_model[key]]
    assert not wrong, f"weights stored a wrong number of times (shape, times in the model, times stored): {wrong}"


def test_the_checkpoint_holds_the_model_and_the_guard_and_nothing_else(export):
    model, guard, out = export
    values = stored(out)
    guard_elements = (
        sum(m.size for m in guard.means) + sum(p.size for p in guard.precisions) + len(guard.scales) + 1
    )  # + the threshold
    assert len(guard.means) == len(BLOCKS)
    assert sum(v.size for v in values.values()) == model.count_params() + guard_elements
    total_bytes = sum(f.stat().st_size for f in (out / "variables").iterdir())
    assert total_bytes <= 1.1 * 4 * (model.count_params() + guard_elements)
