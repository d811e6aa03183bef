"""Group copies of one picture: same bytes (sha256) or nearly the same pixels (phash).

Groups matter twice: a split the pipeline makes must keep each group on one side,
and a group that spans given splits is leakage that inflates evaluation scores.

Near duplicates are found without comparing all pairs (:mod:`chest_ct.near_pairs`,
multi-index hashing on bands of the 64-bit phash) and scipy joins the pairs into
connected components. The answer is exactly the all-pairs one
(:func:`group_duplicates_all_pairs`, the definition, kept for tests and the
benchmark) at near-linear cost: about a second per million hashes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from chest_ct.near_pairs import hamming_distance, near_pairs

log = logging.getLogger(__name__)

DEFAULT_PHASH_DISTANCE = 4  # the shared data's README joins near copies at <= 4 bits of 64
# Chain guard: neighbouring CT slices can join thousands of images transitively into one
# group, after which no balanced split exists (a 20% test split cannot hold a group of 25%
# without being mostly that group). A group holding more than this share of all images (and
# more than CHAIN_MIN_SIZE of them) is an error, not a silent skew. Heavily copied small
# sets stay under it: the shared data's largest group is 16 of 258 images (6%).
DEFAULT_MAX_GROUP_SHARE = 0.25
CHAIN_MIN_SIZE = 20


class DuplicateChainError(ValueError):
    """Duplicate search joined so many images into one group that no grouped split is possible."""


@dataclass(frozen=True)
class GroupSummary:
    """One duplicate group, for reports: how big, and whether it is a chain rather than copies."""

    group: int
    size: int
    distinct_files: int  # distinct sha256
    spread_bits: int  # largest phash distance from the group's first member; > max_distance means chained
    examples: tuple[str, ...]  # the first few members (names when given, else indices)


def phash_array(phashes: Sequence[str]) -> np.ndarray:
    """64-bit perceptual hashes (16 hex digits each, as imagehash writes them) -> uint64 array."""
    joined = "".join(phashes)
    try:
        if len(joined) != 16 * len(phashes):
            raise ValueError
        raw = bytes.fromhex(joined)
    except ValueError:
        for i, h in enumerate(phashes):
            try:
                if len(h) != 16:
                    raise ValueError
                bytes.fromhex(h)
            except (ValueError, TypeError):
                raise ValueError(f"phash #{i} {h!r}: expected 16 hex digits (a 64-bit imagehash)") from None
        raise
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64)


def _first_index_labels(labels: np.ndarray) -> list[int]:
    """Renumber component labels 0, 1, 2... in order of each group's first item."""
    _, first = np.unique(labels, return_index=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[labels].tolist()


def group_duplicates(
    sha256s: Sequence[str],
    phashes: Sequence[str],
    *,
    max_distance: int = DEFAULT_PHASH_DISTANCE,
    max_group_share: float | None = DEFAULT_MAX_GROUP_SHARE,
    names: Sequence[str] | None = None,
) -> list[int]:
    """Return a group id per item; items share an id when they are copies of one picture.

    Items join on equal sha256, and (when ``max_distance >= 0``) on phashes at most
    ``max_distance`` bits apart, transitively (connected components), as a chain of
    small edits still describes one picture. Ids are numbered in order of first item.

    Raises :class:`DuplicateChainError` when one group holds more than
    ``max_group_share`` of the items (and more than ``CHAIN_MIN_SIZE``): the message
    lists the largest groups (``names`` label them) and what to change. ``None`` turns
    the guard off; :func:`largest_groups` reports the groups either way.
    """
    n = len(sha256s)
    if len(phashes) != n:
        raise ValueError(f"sha256s and phashes must have the same length ({n} != {len(phashes)})")
    if n == 0:
        return []
    first_seen: dict[str, int] = {}
    sha_rep = np.fromiter((first_seen.setdefault(s, i) for i, s in enumerate(sha256s)), dtype=np.int64, count=n)
    sources, targets = [np.arange(n)], [sha_rep]
    if max_distance >= 0:
        values, phash_rep, inverse = np.unique(phash_array(phashes), return_index=True, return_inverse=True)
        sources.append(np.arange(n))
        targets.append(phash_rep[inverse])  # equal phash: distance 0
        i, j = near_pairs(values, max_distance)
        sources.append(phash_rep[i])
        targets.append(phash_rep[j])
    src, dst = np.concatenate(sources), np.concatenate(targets)
    graph = coo_matrix((np.ones(len(src), dtype=np.int32), (src, dst)), shape=(n, n)).tocsr()
    _, labels = connected_components(graph, directed=False)
    groups = _first_index_labels(labels)
    if max_group_share is not None:
        check_chaining(
            groups, sha256s, phashes, max_distance=max_distance, max_group_share=max_group_share, names=names
        )
    return groups


def largest_groups(
    groups: Sequence[int],
    sha256s: Sequence[str],
    phashes: Sequence[str],
    *,
    names: Sequence[str] | None = None,
    top: int = 5,
    examples: int = 3,
) -> list[GroupSummary]:
    """The ``top`` largest groups with more than one member, largest first."""
    labels = np.asarray(groups, dtype=np.int64)
    if len(labels) == 0:
        return []
    sizes = np.bincount(labels)
    order = np.argsort(-sizes, kind="stable")[:top]
    hashes = phash_array(phashes)
    out = []
    for gid in order:
        if sizes[gid] < 2:
            break
        members = np.flatnonzero(labels == gid).tolist()
        out.append(
            GroupSummary(
                group=int(gid),
                size=int(sizes[gid]),
                distinct_files=len({sha256s[m] for m in members}),
                spread_bits=int(hamming_distance(hashes[members], hashes[members[0]]).max()),
                examples=tuple(str(names[m]) if names is not None else str(m) for m in members[:examples]),
            )
        )
    return out


def check_chaining(
    groups: Sequence[int],
    sha256s: Sequence[str],
    phashes: Sequence[str],
    *,
    max_distance: int,
    max_group_share: float = DEFAULT_MAX_GROUP_SHARE,
    names: Sequence[str] | None = None,
) -> None:
    """Raise :class:`DuplicateChainError` when the largest group is over the share (see :func:`group_duplicates`)."""
    n = len(groups)
    top = largest_groups(groups, sha256s, phashes, names=names)
    if top:
        log.info(
            "largest duplicate groups: %s",
            "; ".join(
                f"{g.size} images ({g.distinct_files} distinct files, phash spread {g.spread_bits} bits)" for g in top
            ),
        )
    if not top or top[0].size <= max(max_group_share * n, CHAIN_MIN_SIZE):
        return
    worst = top[0]
    chained = worst.spread_bits > max(max_distance, 0)
    raise DuplicateChainError(
        f"duplicate search joined {worst.size} of {n} images ({worst.size / n:.0%}) into one group, over the "
        f"cap of {max_group_share:.0%}: no balanced split can keep such a group on one side. "
        + (
            f"Its members are up to {worst.spread_bits} bits apart although copies are joined at <= {max_distance}: "
            "near copies chain (e.g. neighbouring slices of one scan). "
            if chained
            else f"It has {worst.distinct_files} distinct files. "
        )
        + "Largest groups: "
        + "; ".join(
            f"{g.size} images, {g.distinct_files} distinct files, spread {g.spread_bits} "
            f"bits, e.g. {', '.join(g.examples)}"
            for g in top
        )
        + ". Lower the phash distance (0 joins equal hashes only, -1 exact copies only), supply the split "
        "folders yourself, or raise the cap (max_group_share) if one picture really is that common."
    )


def group_duplicates_all_pairs(
    sha256s: Sequence[str], phashes: Sequence[str], *, max_distance: int = DEFAULT_PHASH_DISTANCE
) -> list[int]:
    """The definition: compare every pair, union-find. O(N^2): for tests and benchmarks, not for data."""
    n = len(sha256s)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    first_seen: dict[str, int] = {}
    for i, digest in enumerate(sha256s):
        union(i, first_seen.setdefault(digest, i))
    if n > 1 and max_distance >= 0:
        hashes = phash_array(phashes)
        for i in range(n - 1):
            for j in np.flatnonzero(hamming_distance(hashes[i + 1 :], hashes[i]) <= max_distance):
                union(i, i + 1 + int(j))
    renumber: dict[int, int] = {}
    return [renumber.setdefault(find(i), len(renumber)) for i in range(n)]
