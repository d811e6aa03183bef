from kfp import dsl
from kfp.dsl import Model, Output

from components.image import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def base_model(model: Output[Model], image_size: int, base_weights: str, seed: int):
    """VGG16 without top, frozen, plus a new head (initialised from ``seed``), saved as ``model.keras``."""
    from pathlib import Path

    from chest_ct.determinism import seed_everything
    from chest_ct.model import WeightsDownloadError, build_model

    seed_everything(seed)
    out = Path(model.path)
    out.mkdir(parents=True, exist_ok=True)
    try:
        built = build_model(image_size, base_weights)
    except WeightsDownloadError as err:  # one line naming the URL and what to pass instead, no traceback
        raise SystemExit(f"base model: {err}") from None
    built.save(out / "model.keras")
    model.metadata.update(image_size=image_size, base_weights=base_weights, seed=seed, framework="keras")
