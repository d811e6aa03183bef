"""chest_ct: the plain ML logic behind the chest-ct pipeline.

Nothing in this package imports KFP: the components in ``components/`` are thin
wrappers that move artifacts in and out of these functions, so the same code runs
in unit tests, in ``kfp.local`` and in the cluster image. Library code reports
progress through :mod:`logging` (logger ``chest_ct``).
"""

import logging

POSITIVE_CLASS = "adenocarcinoma"
NEGATIVE_CLASS = "normal"
#: Index 0 is the negative class and index 1 the positive one, matching the
#: model's single sigmoid output (probability of ``POSITIVE_CLASS``).
CLASS_NAMES = (NEGATIVE_CLASS, POSITIVE_CLASS)


def show_progress() -> None:
    """Print chest_ct's progress messages (INFO) on stderr: for components and command-line tools."""
    logging.basicConfig(format="%(message)s")
    logging.getLogger("chest_ct").setLevel(logging.INFO)
