"""chest_ct: the plain ML logic behind the chest-ct pipeline.

Nothing in this package imports KFP: the components in ``components/`` are thin
wrappers that move artifacts in and out of these functions, so the same code runs
in unit tests, in ``kfp.local`` and in the cluster image.
"""

POSITIVE_CLASS = "adenocarcinoma"
NEGATIVE_CLASS = "normal"
#: Index 0 is the negative class and index 1 the positive one, matching the
#: model's single sigmoid output (probability of ``POSITIVE_CLASS``).
CLASS_NAMES = (NEGATIVE_CLASS, POSITIVE_CLASS)
