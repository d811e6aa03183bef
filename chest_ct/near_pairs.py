"""Every pair of 64-bit hashes within a few bits of each other, without comparing all pairs.

The hash is cut into bands; two hashes within ``max_distance`` bits must be within a
small radius on at least one band (pigeonhole: with 3 bands and distance <= 4, one
band matches exactly or two bands differ in at most 1 bit). Each band is looked up for
its exact key and every key within that radius (multi-index hashing), and the few
candidates are checked on all 64 bits: the exact all-pairs answer at near-linear cost.
:mod:`chest_ct.duplicates` joins these pairs into groups of copies.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np

_CANDIDATES_PER_BLOCK = 1 << 21  # bounds the memory of one lookup step (~100 MB) whatever the data


def hamming_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(a, b))


def plan_bands(max_distance: int, n: int) -> list[tuple[int, int, int]]:
    """Bands ``[(shift, width, radius)]`` for ``n`` hashes, chosen by a cost model.

    Exactness: if the radii satisfy ``sum(radius + 1) >= max_distance + 1``, two hashes
    within ``max_distance`` bits are within ``radius`` bits on at least one band (were
    they not, their distance would be at least that sum). For 4 bits and 3 bands, radii
    (1, 1, 0) do: a close pair matches one band exactly or two bands within one bit.
    Widths trade lookups (``n`` x probes) against random candidates (``n^2`` x probes /
    2^width) and the lookup table (2^width).
    """
    best: tuple[float, tuple[int, ...], list[int]] | None = None
    for m in range(1, min(64, max_distance + 1) + 1):
        for radii in _partitions(max_distance + 1 - m, m, max_distance + 1):
            cost, widths = _best_widths(radii, n)
            if best is None or cost < best[0]:
                best = (cost, radii, widths)
    assert best is not None  # m = 1 always gives a plan
    _, radii, widths = best
    bands, top = [], 64
    for width, radius in zip(widths, radii, strict=True):
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
    for shift, width, radius in plan_bands(max_distance, n):
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
                close = hamming_distance(sorted_values[i], sorted_values[j]) <= max_distance
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
