"""bench.ingest, part 1: the duplicate search alone on random 64-bit hashes with planted copies."""

from __future__ import annotations

import hashlib
import sys
import tracemalloc
from functools import partial

from bench.report import timed


def planted_hashes(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Random sha256s and phashes with 10% near copies (1-4 bits) and 5% exact copies of other items."""
    import numpy as np

    rng = np.random.default_rng(seed)
    values = rng.integers(0, 2**64, n, dtype=np.uint64)
    near = rng.integers(0, n, (n // 10, 2))
    flips = rng.integers(0, 64, (n // 10, 4))
    counts = rng.integers(1, 5, n // 10)
    for (src, dst), bits, k in zip(near, flips, counts, strict=True):
        v = int(values[src])
        for b in set(bits[:k].tolist()):
            v ^= 1 << b
        values[dst] = v
    shas = [hashlib.sha256(f"{seed}:{i}".encode()).hexdigest() for i in range(n)]
    for src, dst in rng.integers(0, n, (n // 20, 2)):
        shas[dst], values[dst] = shas[src], values[src]
    return shas, [f"{int(v):016x}" for v in values]


def _index(shas: list[str]) -> dict[str, int]:
    return {s: i for i, s in enumerate(shas)}


def bench_dedup(sizes: list[int]) -> tuple[list[list], dict]:
    from chest_ct.duplicates import group_duplicates, group_duplicates_all_pairs

    rows, figures = [], {}
    for n in sizes:
        shas, phashes = planted_hashes(n)
        run = partial(group_duplicates, shas, phashes, max_group_share=None)
        runs = [timed(run)[0] for _ in range(3)]
        # A linear-time reference on the same input: how much this machine's caches alone grow the cost.
        reference = min(timed(_index, shas)[0] for _ in range(3))
        tracemalloc.start()
        groups = run()
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        exact = None
        if n <= 10_000:
            exact = groups == group_duplicates_all_pairs(shas, phashes)
        rows.append([f"{n:,} hashes", min(runs), peak, len(set(groups)), "" if exact is None else exact, reference])
        figures[n] = (min(runs), peak, exact, reference)
        print(f"dedup {n}: {min(runs):.2f}s, peak {peak:.0f} MiB", file=sys.stderr, flush=True)
    return rows, figures
