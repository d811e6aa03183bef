"""Group copies of one picture: same bytes (sha256) or nearly the same pixels (phash).

Groups matter twice: a split the pipeline makes must keep each group on one side,
and a group that spans given splits is leakage that inflates evaluation scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_PHASH_DISTANCE = 4  # the shared data's README joins near copies at <= 4 bits of 64


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def group_duplicates(
    sha256s: Sequence[str], phashes: Sequence[str], *, max_distance: int = DEFAULT_PHASH_DISTANCE
) -> list[int]:
    """Return a group id per item; items share an id when they are copies of one picture.

    Near duplicates are joined transitively (union-find), as a chain of small edits
    still describes one picture.
    """
    n = len(sha256s)
    if len(phashes) != n:
        raise ValueError("sha256s and phashes must have the same length")
    parent = list(range(n))

    def union(a: int, b: int) -> None:
        ra, rb = _find(parent, a), _find(parent, b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    first_seen: dict[str, int] = {}
    for i, digest in enumerate(sha256s):
        union(i, first_seen.setdefault(digest, i))

    if n > 1 and max_distance >= 0:
        bits = np.array([[int(h, 16)] for h in phashes], dtype=np.uint64).view(np.uint8).reshape(n, 8)
        bits = np.unpackbits(bits, axis=1)  # n x 64
        for i in range(n - 1):
            distances = np.count_nonzero(bits[i + 1 :] != bits[i], axis=1)
            for j in np.nonzero(distances <= max_distance)[0]:
                union(i, i + 1 + int(j))

    roots = [_find(parent, i) for i in range(n)]
    renumber: dict[int, int] = {}
    return [renumber.setdefault(r, len(renumber)) for r in roots]
