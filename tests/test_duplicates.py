"""Duplicate groups: the banded search must give exactly the all-pairs answer, on any hash set."""

import hashlib

import numpy as np
import pytest

from chest_ct.duplicates import (
    CHAIN_MIN_SIZE,
    DuplicateChainError,
    group_duplicates,
    group_duplicates_all_pairs,
    largest_groups,
    phash_array,
)
from chest_ct.near_pairs import near_pairs, plan_bands


def hexes(values) -> list[str]:
    return [f"{int(v):016x}" for v in values]


def distinct_shas(n: int, seed: int = 0) -> list[str]:
    return [hashlib.sha256(f"{seed}-{i}".encode()).hexdigest() for i in range(n)]


def flip(value: int, bits) -> int:
    for b in bits:
        value ^= 1 << int(b)
    return value


def assert_same_as_all_pairs(shas, phashes, max_distance=4):
    fast = group_duplicates(shas, phashes, max_distance=max_distance, max_group_share=None)
    slow = group_duplicates_all_pairs(shas, phashes, max_distance=max_distance)
    assert fast == slow
    return fast


def test_phash_array_reads_imagehash_hex():
    values = ["0000000000000000", "ffffffffffffffff", "813e56391a7d6c71"]
    assert phash_array(values).tolist() == [int(v, 16) for v in values]
    with pytest.raises(ValueError, match=r"phash #1 'abc': expected 16 hex digits"):
        phash_array(["0" * 16, "abc", "1" * 16])
    with pytest.raises(ValueError, match=r"phash #0 'zzzzzzzzzzzzzzzz'"):
        phash_array(["z" * 16])
    with pytest.raises(ValueError, match="same length"):
        group_duplicates(["a", "b"], ["0" * 16])


@pytest.mark.parametrize("n", [2, 100, 10_000, 1_000_000, 100_000_000])
@pytest.mark.parametrize("max_distance", range(1, 11))
def test_every_band_plan_is_exact_by_pigeonhole(n, max_distance):
    """Disjoint bands inside the 64 bits, radii with sum(radius + 1) > max_distance: then any pair within
    max_distance is within its band's radius on some band, whatever the cost model chose."""
    bands = plan_bands(max_distance, n)
    covered = [bit for shift, width, _ in bands for bit in range(shift, shift + width)]
    assert len(covered) == len(set(covered)) and min(covered) >= 0 and max(covered) < 64
    assert sum(radius + 1 for _, _, radius in bands) > max_distance


def test_small_example_exact_near_and_transitive():
    base = "ffffffff00000000"
    near = "fffffff700000000"  # 1 bit from base
    nearer = "fffffff700000003"  # 2 bits from near, 3 from base
    far = "00000000ffffffff"
    shas = ["a", "b", "a", "c", "d"]
    phashes = [base, far, "aaaaaaaaaaaaaaaa", near, nearer]
    groups = group_duplicates(shas, phashes, max_distance=2)
    assert groups == [0, 1, 0, 0, 0], "same sha256 joins regardless of phash; near copies chain; ids by first member"
    assert group_duplicates(shas, phashes, max_distance=-1) == [0, 1, 0, 2, 3], "-1: exact copies only"
    assert group_duplicates([], []) == []


@pytest.mark.parametrize("max_distance", [-1, 0, 1, 2, 3, 4, 6, 9])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_sets_with_planted_copies_match_all_pairs(seed, max_distance):
    rng = np.random.default_rng(seed)
    n = 3000
    values = [int(v) for v in rng.integers(0, 2**64, n, dtype=np.uint64)]
    shas = distinct_shas(n, seed)
    for src, dst in rng.integers(0, n, (300, 2)):  # near copies at 1..6 bits
        values[dst] = flip(values[src], rng.choice(64, rng.integers(1, 7), replace=False))
    for src, dst in rng.integers(0, n, (100, 2)):  # exact copies
        shas[dst], values[dst] = shas[src], values[src]
    for src, dst in rng.integers(0, n, (50, 2)):  # same picture re-encoded: same phash, other bytes
        values[dst] = values[src]
    groups = assert_same_as_all_pairs(shas, hexes(values), max_distance)
    assert len(set(groups)) < n


def test_dense_cluster_all_within_four_bits():
    """Hundreds of hashes all within distance 4 of each other: one group, every pair a candidate."""
    rng = np.random.default_rng(2)
    center = int(rng.integers(0, 2**64, dtype=np.uint64))
    cluster = [flip(center, rng.choice(64, rng.integers(0, 3), replace=False)) for _ in range(600)]
    others = [int(v) for v in rng.integers(0, 2**64, 600, dtype=np.uint64)]
    values = cluster + others
    groups = assert_same_as_all_pairs(distinct_shas(len(values)), hexes(values))
    assert len({groups[i] for i in range(600)}) == 1


@pytest.mark.parametrize("shared_bits", [(0, 22), (21, 43), (42, 64), (16, 48)])
def test_hashes_colliding_on_a_band_but_far_apart(shared_bits):
    """Thousands share one stretch of bits (a band's key, or parts of two) and differ elsewhere: many
    candidates, few real pairs, and pairs at exactly 4 and 5 bits."""
    rng = np.random.default_rng(3)
    lo, hi = shared_bits
    mask = ((1 << (hi - lo)) - 1) << lo
    common = int(rng.integers(0, 2**64, dtype=np.uint64)) & mask
    values = [(int(v) & ~mask) | common for v in rng.integers(0, 2**64, 2500, dtype=np.uint64)]
    outside = [b for b in range(64) if not lo <= b < hi]
    for i in range(0, 400, 2):  # partners at exactly 4 or 5 bits, all outside the shared stretch
        values[i + 1] = flip(values[i], rng.choice(outside, 4 + (i // 2) % 2, replace=False))
    groups = assert_same_as_all_pairs(distinct_shas(len(values)), hexes(values))
    joined = [groups[i] == groups[i + 1] for i in range(0, 400, 2)]
    assert all(joined[0::2]) and not any(joined[1::2]), "4 bits apart joins, 5 does not"


def test_boundary_distances_spread_over_every_bit_position():
    """A centre and variants at 3..6 bits, the flipped bits contiguous at every offset (so across any
    band boundary) and scattered: joins exactly where the distance is <= 4, and transitively."""
    rng = np.random.default_rng(4)
    center = int(rng.integers(0, 2**64, dtype=np.uint64))
    values = [center]
    for k in (3, 4, 5, 6):
        values += [flip(center, range(offset, offset + k)) for offset in range(65 - k)]
        values += [flip(center, rng.choice(64, k, replace=False)) for _ in range(60)]
    values += [int(v) for v in rng.integers(0, 2**64, 500, dtype=np.uint64)]
    assert_same_as_all_pairs(distinct_shas(len(values)), hexes(values))
    # Without transitivity each variant's distance to the centre decides: check the pair finder alone.
    unique = np.unique(np.array(values, dtype=np.uint64))
    i, j = near_pairs(unique, 4)
    found = set(zip(i.tolist(), j.tolist(), strict=True))
    d = np.bitwise_count(unique[:, None] ^ unique[None, :])
    expected = {(a, b) for a, b in zip(*np.nonzero(d <= 4), strict=True) if a < b}
    assert found == expected


def test_long_chain_matches_all_pairs():
    rng = np.random.default_rng(5)
    walk = [int(rng.integers(0, 2**64, dtype=np.uint64))]
    for _ in range(400):
        walk.append(flip(walk[-1], rng.choice(64, rng.integers(1, 4), replace=False)))
    values = walk + [int(v) for v in rng.integers(0, 2**64, 400, dtype=np.uint64)]
    order = rng.permutation(len(values))  # chain members scattered through the input
    groups = assert_same_as_all_pairs(distinct_shas(len(values)), hexes([values[k] for k in order]))
    assert max(np.bincount(groups)) >= 401


def chain_dataset(chain: int, singles: int):
    rng = np.random.default_rng(6)
    walk = [int(rng.integers(0, 2**64, dtype=np.uint64))]
    for _ in range(chain - 1):
        walk.append(flip(walk[-1], rng.choice(64, 2, replace=False)))
    values = walk + [int(v) for v in rng.integers(0, 2**64, singles, dtype=np.uint64)]
    names = [f"scan/slice{i:03d}.png" for i in range(chain)] + [f"other/{i}.png" for i in range(singles)]
    return distinct_shas(len(values)), hexes(values), names


def test_chain_guard_names_the_chain_instead_of_failing_in_the_splitter():
    shas, phashes, names = chain_dataset(120, 80)
    with pytest.raises(DuplicateChainError) as err:
        group_duplicates(shas, phashes, names=names)
    message = str(err.value)
    assert "joined 120 of 200 images (60%) into one group, over the cap of 25%" in message
    assert "near copies chain" in message and "scan/slice000.png" in message
    assert "Lower the phash distance" in message
    groups = group_duplicates(shas, phashes, names=names, max_group_share=None)  # the guard is a policy
    top = largest_groups(groups, shas, phashes, names=names)
    assert top[0].size == 120 and top[0].distinct_files == 120 and top[0].spread_bits > 4
    assert top[0].examples == ("scan/slice000.png", "scan/slice001.png", "scan/slice002.png")
    assert len(top) == 1, "singletons are not groups"


def test_chain_guard_on_one_picture_copied_many_times():
    shas = ["same"] * 60 + distinct_shas(40)
    phashes = hexes([7] * 60 + [int(v) for v in np.random.default_rng(7).integers(0, 2**64, 40, dtype=np.uint64)])
    with pytest.raises(DuplicateChainError, match="It has 1 distinct files"):
        group_duplicates(shas, phashes, max_distance=-1)


def test_chain_guard_leaves_small_groups_alone():
    shas, phashes, _ = chain_dataset(CHAIN_MIN_SIZE, 10)  # 2/3 of the items, but only 20 of them
    groups = group_duplicates(shas, phashes)
    assert max(np.bincount(groups)) == CHAIN_MIN_SIZE
