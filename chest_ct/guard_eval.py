"""How well the out-of-distribution guard does its job: the rates the evaluation reports.

Two numbers, each against a target (:mod:`chest_ct.defaults`):

- **accepted**: the share of the test CT images (unseen pictures of the two classes)
  the guard lets through; too low and the model refuses real scans;
- **rejected**: the share of the fixed foreign set (:mod:`chest_ct.foreign`) the
  guard refuses, overall and per category; too low and the model answers
  confidently for what it has never seen.

Both come from the exported SavedModel, the graph the server runs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from chest_ct import defaults
from chest_ct.export import read_metadata
from chest_ct.foreign import foreign_set
from chest_ct.predict import Predictor, predict_outputs
from chest_ct.window import Window


@dataclass
class GuardRates:
    threshold: float
    test_images: int
    test_accepted: int
    foreign_images: int
    foreign_rejected: int
    #: category -> {"images", "rejected", "reject_rate"}
    per_category: dict[str, dict[str, float]] = field(default_factory=dict)
    min_accept_rate: float = defaults.GUARD_MIN_ACCEPT_RATE
    min_reject_rate: float = defaults.GUARD_MIN_REJECT_RATE

    @property
    def test_accept_rate(self) -> float:
        return self.test_accepted / self.test_images if self.test_images else float("nan")

    @property
    def foreign_reject_rate(self) -> float:
        return self.foreign_rejected / self.foreign_images if self.foreign_images else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "test_accept_rate": self.test_accept_rate,
            "foreign_reject_rate": self.foreign_reject_rate,
            "meets_accept_target": bool(self.test_accept_rate >= self.min_accept_rate),
            "meets_reject_target": bool(self.foreign_reject_rate >= self.min_reject_rate),
        }

    def metrics(self) -> dict[str, float]:
        """MLflow metrics: both rates, and the reject rate of each foreign category."""
        out = {
            "guard_test_accept_rate": self.test_accept_rate,
            "guard_foreign_reject_rate": self.foreign_reject_rate,
            "guard_threshold": self.threshold,
        }
        for category, row in self.per_category.items():
            out["guard_reject_rate_" + category.replace(" ", "_")] = row["reject_rate"]
        return out


def guard_rates(model_dir: Path, test_files: Sequence[str], *, batch_size: int = 32) -> GuardRates:
    """Run the test images and the foreign set through the model in ``model_dir``; count what the guard lets in."""
    metadata = read_metadata(model_dir)
    window = Window(**metadata["window"])
    accepted = predict_outputs(model_dir, test_files, batch_size)["in_distribution"]
    foreign = foreign_set(test_files, window)
    predictor = Predictor(model_dir)
    in_distribution = (
        np.concatenate(
            [
                predictor([f.png for f in foreign[i : i + batch_size]])["in_distribution"]
                for i in range(0, len(foreign), batch_size)
            ]
        )
        if foreign
        else np.zeros(0, bool)
    )
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for item, inside in zip(foreign, in_distribution.tolist(), strict=True):
        counts[item.category][0] += 1
        counts[item.category][1] += int(not inside)
    return GuardRates(
        threshold=float(metadata["ood"]["threshold"]),
        test_images=len(accepted),
        test_accepted=int(accepted.sum()),
        foreign_images=len(foreign),
        foreign_rejected=int((~in_distribution).sum()),
        per_category={c: {"images": n, "rejected": r, "reject_rate": r / n} for c, (n, r) in counts.items()},
    )


def log_guard_rates(run_id: str, rates: GuardRates) -> None:
    """Log the rates into the training run's metrics."""
    import mlflow

    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(rates.metrics())
        mlflow.log_dict(rates.to_dict(), "evaluation/guard.json")


def guard_markdown(guard: dict[str, Any]) -> list[str]:
    """Lines for the evaluation summary (``guard`` is :meth:`GuardRates.to_dict`)."""

    def mark(ok: bool) -> str:
        return "meets" if ok else "**below**"

    return [
        "## Out-of-distribution guard",
        (
            f"- test CT images accepted: {guard['test_accepted']}/{guard['test_images']} = "
            f"{guard['test_accept_rate']:.1%} ({mark(guard['meets_accept_target'])} the target of "
            f"{guard['min_accept_rate']:.0%})"
        ),
        (
            f"- foreign images rejected: {guard['foreign_rejected']}/{guard['foreign_images']} = "
            f"{guard['foreign_reject_rate']:.1%} ({mark(guard['meets_reject_target'])} the target of "
            f"{guard['min_reject_rate']:.0%}): "
            + ", ".join(f"{c} {row['rejected']}/{row['images']}" for c, row in guard["per_category"].items())
        ),
    ]
