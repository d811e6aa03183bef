"""The container image every component runs in (built from Dockerfile.train).

Read once at import, so set ``CHEST_CT_TRAIN_IMAGE`` before compiling the
pipeline to point it at your registry and tag.
"""

import os

TRAIN_IMAGE = os.environ.get("CHEST_CT_TRAIN_IMAGE", "ghcr.io/chest-ct/chest-ct-train:0.1.0")
