"""Every default of the pipeline, written once.

The pipeline signature (what the Kubeflow UI shows), the library functions and the
benchmarks all refer to these names; the components take no defaults of their own,
as the pipeline always passes every value.
"""

from __future__ import annotations

# Data and splits
SEED = 42
#: Shares of the whole dataset's duplicate groups (distinct pictures), per class,
#: held out when the pipeline has to make the split itself.
VALID_FRACTION = 0.15
TEST_FRACTION = 0.2

# Model and training
IMAGE_SIZE = 224
BASE_WEIGHTS = "imagenet"
EPOCHS = 10
BATCH_SIZE = 32
LEARNING_RATE = 1e-3
AUGMENT_COPIES = 0
PATIENCE = 3
FINE_TUNE_EPOCHS = 0
FINE_TUNE_LEARNING_RATE = 1e-5
#: Off by default: TF op determinism slows some GPU kernels; CPU runs are repeatable without it.
DETERMINISTIC = False
#: VGG16's arithmetic in the feature pass and fine-tuning: auto, fp32 or bf16 (chest_ct/precision.py).
PRECISION = "auto"

# Reduced-precision guard (chest_ct/golden.py, serving/precision.py)
#: Images stored with the model whose float32 answers a reduced-precision server must reproduce.
GOLDEN_IMAGES = 8
#: Largest probability difference from float32 accepted on those images (and reported by evaluation).
PRECISION_TOLERANCE = 0.01

# DICOM: Hounsfield units -> the model's grey levels (a lung window: -1350 HU is black, +150 HU white)
WINDOW_LEVEL = -600.0
WINDOW_WIDTH = 1500.0

# Out-of-distribution guard: the share of in-distribution images it lets through, calibrated
# out-of-fold on the fitting images, and the number of folds (by duplicate group)
OOD_QUANTILE = 0.99
OOD_FOLDS = 5
#: The guard's targets, reported by evaluate: test CT images accepted, foreign images rejected.
GUARD_MIN_ACCEPT_RATE = 0.95
GUARD_MIN_REJECT_RATE = 0.95

# Decision threshold (chosen out-of-fold on the fitting data)
TARGET_SENSITIVITY = 0.95
THRESHOLD_FOLDS = 5

# Blessing
MIN_AUC = 0.8
MIN_SENSITIVITY = 0.9
MIN_SPECIFICITY = 0.5
MAX_AUC_DROP = 0.01
#: Fewer distinct test pictures per class than this, seen by neither model, make the
#: champion comparison inconclusive (the floors alone decide).
MIN_COMPARE_PER_CLASS = 5

# MLflow
EXPERIMENT = "chest-ct"
REGISTERED_MODEL = "chest-ct"
