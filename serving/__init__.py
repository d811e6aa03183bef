"""KServe v2 (Open Inference Protocol) predictor for the chest-ct classifier.

The server depends only on the exported SavedModel directory (``saved_model.pb``,
``variables/`` and ``model_metadata.json``), never on the training code in
``chest_ct``, so the serving image stays small and a model can be served
without the library that trained it. Start it with ``python -m serving``.
"""

DEFAULT_MODEL_NAME = "chest-ct"
#: The KServe storage initializer downloads ``storageUri`` here.
DEFAULT_MODEL_DIR = "/mnt/models"
