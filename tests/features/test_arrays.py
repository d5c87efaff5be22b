"""The request path's array primitives against NumPy's own definitions."""

from __future__ import annotations

import numpy as np
import pytest

from features import arrays


@pytest.mark.parametrize("size", [0, 1, 2, 50, 3000])
def test_group_and_first_positions_equal_numpy_unique(size: int) -> None:
    rng = np.random.default_rng(size)
    keys = rng.integers(-1, max(size // 3, 1), size)
    unique, inverse = arrays.group(keys)
    want_unique, want_index, want_inverse = np.unique(keys, return_index=True, return_inverse=True)
    np.testing.assert_array_equal(unique, want_unique)
    np.testing.assert_array_equal(inverse, want_inverse)
    np.testing.assert_array_equal(arrays.first_positions(keys), np.sort(want_index))


@pytest.mark.parametrize("size", [0, 1, 40, 3000])
def test_index_of_finds_each_query_like_a_dictionary(size: int) -> None:
    rng = np.random.default_rng(size + 1)
    keys = rng.choice(max(2 * size, 1), size=size, replace=False)
    queries = rng.integers(0, max(2 * size, 1) + 5, 2 * size + 1)
    where = {int(k): j for j, k in enumerate(keys.tolist())}
    want = [where.get(q, -1) for q in queries.tolist()]
    # Sorted search (no size), dense map (size small), sorted again (size too large),
    # and a size smaller than the largest value (the dense map grows to fit).
    largest = int(max(keys.max(initial=0), queries.max(initial=0))) + 1
    for bound in (None, largest, arrays.INDEX_DENSE_FACTOR * 10 * largest + 10**6, 1):
        np.testing.assert_array_equal(arrays.index_of(keys, queries, bound), want)


def test_negative_values_take_the_sorted_path_and_stay_correct() -> None:
    keys = np.asarray([0, 4, -3])
    queries = np.asarray([-1, 2, 4, -3])
    for size in (None, 5):
        assert arrays.index_of(keys, queries, size).tolist() == [-1, -1, 1, 2]
        unique, inverse = arrays.group(np.asarray([-1, 2, 2]), size)
        assert unique.tolist() == [-1, 2] and inverse.tolist() == [0, 1, 1]


def test_a_position_map_reads_minus_one_past_its_size_and_for_absent_keys() -> None:
    where = arrays.position_map(np.asarray([4, 0, 2]), 5)
    values = np.asarray([0, 1, 2, 3, 4, 5, 99])
    assert where[np.minimum(values, 5)].tolist() == [1, -1, 2, -1, 0, -1, -1]


def test_member_equals_numpy_isin_on_both_paths() -> None:
    rng = np.random.default_rng(9)
    values, members = rng.integers(0, 300, 500), rng.integers(0, 300, 40)
    want = np.isin(values, members)
    for size in (None, 300):
        np.testing.assert_array_equal(arrays.member(values, members, size), want)


@pytest.mark.parametrize("size", [1, 2, 50, 3000])
def test_dense_group_and_first_positions_equal_numpy_unique(size: int) -> None:
    rng = np.random.default_rng(size + 7)
    slots = max(size // 3, 1)
    keys = rng.integers(0, slots, size)
    want_unique, want_index, want_inverse = np.unique(keys, return_index=True, return_inverse=True)
    # Enough slots for the dense pass, and a size below the largest key (it grows).
    for bound in (slots, 1):
        unique, inverse = arrays.group(keys, bound)
        np.testing.assert_array_equal(unique, want_unique)
        np.testing.assert_array_equal(inverse, want_inverse)
        np.testing.assert_array_equal(arrays.first_positions(keys, bound), np.sort(want_index))
    assert arrays.first_positions(keys[:0], 10).tolist() == []


@pytest.mark.parametrize("n", [0, 1, 30, 400])
def test_a_candidate_match_finds_each_item_like_a_dictionary(n: int) -> None:
    rng = np.random.default_rng(n + 3)
    size = 500
    candidates = rng.integers(0, size, n)  # repeats on purpose
    items = np.concatenate([rng.integers(-1, size + 20, 3 * n + 5), [-1, size, size + 7]])
    for match in (
        arrays.match(candidates, size),  # dense for this size
        arrays.match(candidates, None),  # sorted
        arrays.CandidateMatch(candidates, size, dense=False),
        arrays.CandidateMatch(candidates, size, dense=True),
    ):
        rows = match.rows
        assert rows.shape == (n,) and (rows >= 0).all() and (rows < max(match.n_rows, 1)).all()
        # Equal candidates share a row; different ones do not.
        same = candidates[:, None] == candidates[None, :]
        np.testing.assert_array_equal(rows[:, None] == rows[None, :], same)
        at = match.at(items)
        row_of = {int(c): int(r) for c, r in zip(candidates.tolist(), rows.tolist(), strict=True)}
        np.testing.assert_array_equal(at, [row_of.get(i, -1) for i in items.tolist()])
    at, rows, n_rows = arrays.match_candidates(candidates, items, size)
    assert n_rows >= len(np.unique(candidates)) and len(rows) == n
