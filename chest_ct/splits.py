"""Give every image a role (train, valid, test or excluded), by whole duplicate groups.

Rules, in this order:

1. A duplicate group (copies of one picture, exact or near) with two labels is a
   label conflict: all its members are excluded from training and scoring.
2. Given split folders are kept. What the dataset lacks is held out from the
   fitting pool by whole groups, stratified by class, with shares of the **whole
   dataset's** groups: ``test_fraction`` of each class's groups become test,
   ``valid_fraction`` become valid. With ``train/ valid/`` the given valid folder
   becomes the test role (scored only) and early stopping gets its own slice of train.
3. A test image whose group also has a member in train or valid, and a valid image
   whose group also has a member in train, is excluded: the model has seen that
   picture, so scoring it would flatter the model.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from chest_ct.records import EXCLUDED, TEST, TRAIN, VALID, DatasetError, ImageRecord

ALL = "all"  # the given split of every image in a flat layout


def check_fraction(name: str, value: float) -> None:
    if not 0.0 < value < 0.5:
        raise DatasetError(f"{name}={value}: expected a fraction between 0 and 0.5")


def assign_roles(
    records: list[ImageRecord], *, seed: int, valid_fraction: float, test_fraction: float
) -> list[ImageRecord]:
    """Return ``records`` with ``split`` (and ``exclusion``) set; ``group`` must already be set."""
    check_fraction("valid_fraction", valid_fraction)
    check_fraction("test_fraction", test_fraction)
    members: dict[int, list[int]] = defaultdict(list)
    for i, rec in enumerate(records):
        members[rec.group].append(i)
    out = list(records)
    clean: dict[str, list[int]] = defaultdict(list)  # label -> groups without a label conflict
    for group, idx in sorted(members.items()):
        labels = sorted({records[i].label for i in idx})
        if len(labels) > 1:
            reason = f"label conflict: this picture is labelled {' and '.join(labels)} ({len(idx)} files)"
            for i in idx:
                out[i] = records[i].with_role(EXCLUDED, reason)
        else:
            clean[labels[0]].append(group)

    given = {r.given_split for r in records}
    role_of_group: dict[int, str] = {}
    rng = np.random.default_rng(seed)
    if given <= {ALL, TRAIN}:
        carve_from, carve = {ALL, TRAIN}, {TEST: test_fraction, VALID: valid_fraction}
    elif VALID in given and TEST in given:
        carve_from, carve = set(), {}
    else:
        carve_from, carve = {TRAIN}, {VALID: valid_fraction}
    for label in sorted(clean):
        groups = clean[label]
        pool = [g for g in groups if any(records[i].given_split in carve_from for i in members[g])]
        wanted = {role: max(1, round(fraction * len(groups))) for role, fraction in carve.items()}
        if carve and len(pool) <= sum(wanted.values()):
            raise DatasetError(
                f"cannot hold out {' and '.join(wanted)} by duplicate groups: class {label!r} has "
                f"{len(pool)} distinct picture(s) to draw from, needs at least {sum(wanted.values()) + 1} "
                "(one group each for train and every held-out split); add distinct pictures or supply "
                "the split folders yourself"
            )
        shuffled = [pool[i] for i in rng.permutation(len(pool))]
        start = 0
        for role, count in wanted.items():
            role_of_group.update((g, role) for g in shuffled[start : start + count])
            start += count

    given_role = {TRAIN: TRAIN, ALL: TRAIN, VALID: TEST if TEST not in given else VALID, TEST: TEST}
    for groups in clean.values():
        for g in groups:
            for i in members[g]:
                rec = records[i]
                carved = role_of_group.get(g) if rec.given_split in carve_from else None
                out[i] = rec.with_role(carved or given_role[rec.given_split])
    return _exclude_seen_copies(out, members)


def _exclude_seen_copies(records: list[ImageRecord], members: dict[int, list[int]]) -> list[ImageRecord]:
    """Exclude test (valid) images whose picture also sits in a role the model fits or early-stops on."""
    out = list(records)
    for idx in members.values():
        in_role = defaultdict(list)
        for i in idx:
            in_role[records[i].split].append(records[i].path)
        for i in idx:
            seen_in = [TRAIN, VALID] if records[i].split == TEST else [TRAIN] if records[i].split == VALID else []
            seen_in = [role for role in seen_in if in_role[role]]
            if seen_in:
                where = "; ".join(
                    f"{role}: {', '.join(sorted(in_role[role])[:3])}"
                    + (f" (+{len(in_role[role]) - 3} more)" if len(in_role[role]) > 3 else "")
                    for role in seen_in
                )
                out[i] = records[i].with_role(
                    EXCLUDED, f"copy of a picture the model sees ({where}); would have been {records[i].split}"
                )
    return out
