"""Decide whether an evaluated model may become the champion.

Pure logic, no I/O: the per-group test metrics against absolute floors, and the
comparison with the current champion on test pictures neither model saw. Too few
such pictures make that comparison inconclusive: the decision then rests on the
floors alone, and the reasons say so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from chest_ct import defaults
from chest_ct.scoring import Comparison


@dataclass(frozen=True)
class BlessingPolicy:
    min_auc: float = defaults.MIN_AUC
    min_sensitivity: float = defaults.MIN_SENSITIVITY
    min_specificity: float = defaults.MIN_SPECIFICITY
    max_auc_drop: float = defaults.MAX_AUC_DROP
    #: Distinct pictures per class, seen by neither model, needed for a conclusive comparison.
    min_compare_per_class: int = defaults.MIN_COMPARE_PER_CLASS

    def __post_init__(self) -> None:
        for name in ("min_auc", "min_sensitivity", "min_specificity", "max_auc_drop"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value}: expected a number between 0 and 1")
        if not isinstance(self.min_compare_per_class, int) or self.min_compare_per_class < 1:
            raise ValueError(f"min_compare_per_class={self.min_compare_per_class!r}: expected an integer >= 1")

    def floors(self) -> dict[str, float]:
        """Metric name -> floor, on per-group test metrics."""
        return {"roc_auc": self.min_auc, "sensitivity": self.min_sensitivity, "specificity": self.min_specificity}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Decision:
    blessed: bool
    #: Why it is not blessed (empty when blessed).
    failures: list[str] = field(default_factory=list)
    #: What else the decision rested on (the champion comparison or why there was none).
    notes: list[str] = field(default_factory=list)

    @property
    def reasons(self) -> list[str]:
        return [*self.failures, *self.notes]

    def refuse(self, reason: str) -> None:
        self.blessed = False
        self.failures.append(reason)


def decide(per_group: dict[str, float], policy: BlessingPolicy, comparison: Comparison | None) -> Decision:
    """Bless only above every floor and without a conclusive ROC AUC regression against the champion.

    AUC is compared because it does not depend on either model's threshold.
    """
    failures = [
        f"per-group {name} {per_group[name]:.4f} is below the floor {floor:.4f}"
        for name, floor in policy.floors().items()
        if not per_group[name] >= floor
    ]
    notes: list[str] = []
    if comparison is None:
        notes.append("no champion yet: decided by the floors")
    elif comparison.error:
        failures.append(comparison.error)
    elif not comparison.conclusive(policy.min_compare_per_class):
        why = comparison.unavailable or (
            f"only {', '.join(f'{n} {c}' for c, n in comparison.groups_per_class.items())} test pictures are unseen by "
            f"both models (need {policy.min_compare_per_class} per class)"
        )
        notes.append(f"champion comparison inconclusive ({why}): decided by the floors alone")
    else:
        verdict = (
            f"per-group roc_auc {comparison.challenger_auc:.4f} against champion version "
            f"{comparison.champion_version}'s {comparison.champion_auc:.4f} on {comparison.images} test images "
            f"({sum(comparison.groups_per_class.values())} pictures) neither model saw"
        )
        if comparison.challenger_auc < comparison.champion_auc - policy.max_auc_drop:
            failures.append(f"{verdict}: regresses by more than the allowed {policy.max_auc_drop}")
        else:
            notes.append(f"{verdict}: no regression beyond {policy.max_auc_drop}")
    return Decision(blessed=not failures, failures=failures, notes=notes)
