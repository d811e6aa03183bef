"""Group copies of one picture: same bytes (sha256) or nearly the same pixels (phash).

Groups matter twice: a split the pipeline makes must keep each group on one side,
and a group that spans given splits is leakage that inflates evaluation scores.

Near duplicates are found without comparing all pairs. The 64-bit hash is cut into
bands; two hashes within ``max_distance`` bits must be within a small radius on at
least one band (pigeonhole: with 3 bands and distance <= 4, one band matches exactly
or two bands differ in at most 1 bit). Each band is looked up for its exact key and every key within that
radius (multi-index hashing), the few candidates are checked on all 64 bits, and
scipy joins the pairs into connected components. The answer is exactly the all-pairs
one (:func:`group_duplicates_all_pairs`, the definition, kept for tests and the
benchmark) at near-linear cost: about a second per million hashes.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

log = logging.getLogger(__name__)

DEFAULT_PHASH_DISTANCE = 4  # the shared data's README joins near copies at <= 4 bits of 64
# Chain guard: neighbouring CT slices can join thousands of images transitively into one
# group, after which no balanced split exists (a 20% test split cannot hold a group of 25%
# without being mostly that group). A group holding more than this share of all images (and
# more than CHAIN_MIN_SIZE of them) is an error, not a silent skew. Heavily copied small
# sets stay under it: the shared data's largest group is 16 of 258 images (6%).
DEFAULT_MAX_GROUP_SHARE = 0.25
CHAIN_MIN_SIZE = 20
_CANDIDATES_PER_BLOCK = 1 << 21  # bounds the memory of one lookup step (~100 MB) whatever the data


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


def _distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(a, b))


def _plan(max_distance: int, n: int) -> list[tuple[int, int, int]]:
    """Bands ``[(shift, width, radius)]`` for ``n`` hashes, chosen by a cost model.

    Exactness: if the radii satisfy ``sum(radius + 1) >= max_distance + 1``, two hashes
    within ``max_distance`` bits are within ``radius`` bits on at least one band (were
    they not, their distance would be at least that sum). For 4 bits and 3 bands, radii
    (1, 1, 0) do: a close pair matches one band exactly or two bands within one bit.
    Widths trade lookups (``n`` x probes) against random candidates (``n^2`` x probes /
    2^width) and the lookup table (2^width).
    """
    best = None
    for m in range(1, min(64, max_distance + 1) + 1):
        for radii in _partitions(max_distance + 1 - m, m, max_distance + 1):
            cost, widths = _best_widths(radii, n)
            if best is None or cost < best[0]:
                best = (cost, radii, widths)
    _, radii, widths = best
    bands, top = [], 64
    for width, radius in zip(widths, radii):
        top -= width
        bands.append((top, width, radius))
    return bands


def _partitions(total: int, parts: int, cap: int) -> list[tuple[int, ...]]:
    """Non-increasing tuples of ``parts`` non-negative ints summing to ``total``, each at most ``cap``."""
    if parts == 1:
        return [(total,)] if total <= cap else []
    return [
        (first, *rest)
        for first in range(min(total, cap), -1, -1)
        for rest in _partitions(total - first, parts - 1, first)
    ]


@functools.lru_cache(maxsize=4096)
def _band_cost(width: int, radius: int, n: int) -> float:
    """Rough seconds for one band (constants measured on numpy 2, one core)."""
    probes = sum(math.comb(width, t) for t in range(radius + 1))
    queries = n * (1 + (probes - 1) / 2)  # each flipped probe runs from half the keys
    table = width <= _BandIndex.TABLE_MAX_WIDTH
    return (
        queries * (15e-9 if table else 60e-9) + queries * n / 2.0**width * 30e-9 + (1.5e-9 * 2**width if table else 0)
    )


def _best_widths(radii: tuple[int, ...], n: int) -> tuple[float, list[int]]:
    """Widths (at most 64 bits in all) minimising the summed band cost: a small dynamic programme."""
    best: dict[int, tuple[float, list[int]]] = {0: (0.0, [])}
    for radius in radii:
        step: dict[int, tuple[float, list[int]]] = {}
        for used, (cost, widths) in best.items():
            for width in range(max(1, radius), 64 - used + 1):
                total = cost + _band_cost(width, radius, n)
                if used + width not in step or total < step[used + width][0]:
                    step[used + width] = (total, [*widths, width])
        best = step
    return min(best.values(), key=lambda entry: entry[0])


def near_pairs(values: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Every index pair ``(i, j)``, ``i != j``, with ``popcount(values[i] ^ values[j]) <= max_distance``.

    ``values`` should be distinct (equal hashes are cheaper to join by equality). A pair
    may be reported more than once (it can match on several bands).
    """
    values = np.asarray(values, dtype=np.uint64)
    n = len(values)
    empty = (np.empty(0, np.int64), np.empty(0, np.int64))
    if n < 2 or max_distance < 1:
        return empty
    found_i, found_j = [], []
    everyone = np.arange(n)
    for shift, width, radius in _plan(max_distance, n):
        keys = ((values >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int64)
        order = np.argsort(keys, kind="stable")
        # Work in key order: probes, table lookups and candidates then sit close together in memory.
        sorted_keys, sorted_values = keys[order], values[order]
        lookup = _BandIndex(sorted_keys, width)
        for bits in itertools.chain.from_iterable(itertools.combinations(range(width), t) for t in range(radius + 1)):
            flip = sum(1 << b for b in bits)
            if flip:  # a pair differs on the flip's lowest bit: probe only from the end where it is 0
                queries = np.flatnonzero((sorted_keys & (flip & -flip)) == 0)
            else:
                queries = everyone
            lo, count = lookup.find(sorted_keys[queries] ^ flip)
            hit = np.flatnonzero(count)
            if len(hit) == 0:
                continue
            for i, j in _expand(queries[hit], lo[hit], count[hit]):
                if not flip:
                    keep = i < j  # within a bucket each pair is seen from both ends, and each item sees itself
                    i, j = i[keep], j[keep]
                close = _distance(sorted_values[i], sorted_values[j]) <= max_distance
                found_i.append(order[i[close]])
                found_j.append(order[j[close]])
    if not found_i:
        return empty
    return np.concatenate(found_i), np.concatenate(found_j)


class _BandIndex:
    """Where each band key sits in the sorted keys: a direct table for narrow bands, binary search otherwise."""

    TABLE_MAX_WIDTH = 24  # 2^24 x 4 bytes = 64 MB at most; 3 bands of 64 bits need 2^22

    def __init__(self, sorted_keys: np.ndarray, width: int):
        self.sorted_keys = sorted_keys
        self.bounds = None
        if width <= self.TABLE_MAX_WIDTH:
            self.bounds = np.zeros((1 << width) + 1, dtype=np.int32 if len(sorted_keys) < 2**31 else np.int64)
            np.cumsum(np.bincount(sorted_keys, minlength=1 << width), out=self.bounds[1:])

    def find(self, probe: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Start position and count of each probe key among the sorted keys."""
        if self.bounds is not None:
            lo = self.bounds[probe]
            return lo, self.bounds[probe + 1] - lo
        lo = np.searchsorted(self.sorted_keys, probe, side="left")
        return lo, np.searchsorted(self.sorted_keys, probe, side="right") - lo


def _expand(queries: np.ndarray, lo: np.ndarray, count: np.ndarray):
    """Yield (query, candidate) positions, in blocks of about ``_CANDIDATES_PER_BLOCK`` pairs."""
    ends = np.cumsum(count, dtype=np.int64)
    start = 0
    while start < len(queries):
        base = ends[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, base + _CANDIDATES_PER_BLOCK, side="right")))
        c = count[start:stop]
        total = int(ends[stop - 1] - base)
        offsets = np.arange(total) - np.repeat(ends[start:stop] - base - c, c)
        yield np.repeat(queries[start:stop], c), np.repeat(lo[start:stop], c) + offsets
        start = stop


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
        members = np.flatnonzero(labels == gid)
        out.append(
            GroupSummary(
                group=int(gid),
                size=int(sizes[gid]),
                distinct_files=len({sha256s[m] for m in members}),
                spread_bits=int(_distance(hashes[members], hashes[members[0]]).max()),
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
            for j in np.flatnonzero(_distance(hashes[i + 1 :], hashes[i]) <= max_distance):
                union(i, i + 1 + int(j))
    renumber: dict[int, int] = {}
    return [renumber.setdefault(find(i), len(renumber)) for i in range(n)]
