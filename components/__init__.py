"""KFP v2 lightweight components: thin wrappers that move artifacts in and out of ``chest_ct``.

Each component body imports the installed ``chest_ct`` package, so the same code
runs under ``kfp.local`` and in the training image on the cluster.
"""

from components.base_model import base_model
from components.deploy import deploy
from components.evaluate import evaluate
from components.ingest import ingest
from components.train import train

__all__ = ["base_model", "deploy", "evaluate", "ingest", "train"]
