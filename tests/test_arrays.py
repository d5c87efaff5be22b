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
