"""The display window that turns Hounsfield units into the grey levels the model reads.

A record without TensorFlow, so ingest's parent process (which never imports it)
can carry it; the TensorFlow op is :func:`chest_ct.preprocess.window_hu`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from chest_ct import defaults


@dataclass(frozen=True)
class Window:
    """A linear display window: ``level - width/2`` HU and below is black, ``level + width/2`` and above white.

    The default is a lung window (-1350..150 HU), what chest CT pictures of lung
    nodules are read in; a slice windowed otherwise (bone, brain) looks different
    to the model, and the out-of-distribution guard is there to notice.
    """

    level: float = defaults.WINDOW_LEVEL
    width: float = defaults.WINDOW_WIDTH

    def __post_init__(self) -> None:
        for name, value in (("window_level", self.level), ("window_width", self.width)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}={value!r}: expected a finite number of Hounsfield units")
        if not 1.0 <= self.width <= 100_000.0:
            raise ValueError(f"window_width={self.width!r}: expected 1 to 100000 HU")
        if not -100_000.0 <= self.level <= 100_000.0:
            raise ValueError(f"window_level={self.level!r}: expected -100000 to 100000 HU")

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


#: The default window (a lung window), shared as the default argument everywhere a window is taken.
LUNG_WINDOW = Window()
