"""The feature set's declared names and its missing-value rules."""

from __future__ import annotations

import math

import numpy as np
import pytest

from features import arrays, covisit
from features.candidates import SOURCES, CandidateConfig, retrieve
from features.events import COVISIT_NEIGHBOURS, HALF_LIVES, N_HALF_LIVES, N_TYPES, EventType
from features.popularity import PopularityIndex, decay_column, decay_rows
from features.schema import (
    DEVICES,
    FAMILIES,
    FEATURE_NAMES,
    PAGES,
    TINY,
    Context,
    FeatureInput,
    build_matrix,
    flush_tiny,
)
from features.state import (
    COL_COUNTS,
    COL_NBR,
    COL_NBR_REF,
    COL_NBR_SCORE,
    COL_REF,
    ItemTable,
    UserState,
    apply_user_event,
)
from tests.helpers import dense_table

T0 = 1_790_000_000.0


def _world() -> tuple[UserState, ItemTable, np.ndarray]:
    table = dense_table((f"i{k}", "c1", 10.0 + k) for k in range(4))
    user = UserState()
    apply_user_event(user, EventType.VIEW, T0, "i0", "c1", 10.0)
    return user, table, np.arange(4)


def test_the_issue_s_feature_groups_are_declared() -> None:
    for name in (
        "u_cnt_view_1h",
        "u_cnt_purchase_7d",
        "u_ctr",
        "u_cvr",
        "u_secs_since_last_event",
        "u_secs_since_last_purchase",
        "u_mean_price",
        "u_n_categories",
        "i_pop_click_1d",
        "i_cvr",
        "i_price",
        "i_age_secs",
        "ui_category_share",
        "ui_log_price_ratio",
        "ui_recent_position",
        "ui_secs_since_item",
        "ui_covisit",
        "ui_covisit_last",
        "ctx_hour_utc",
        "ctx_device",
        "ctx_page",
    ):
        assert name in FEATURE_NAMES, name
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)


def test_context_codes_and_missing_context() -> None:
    user, table, cand = _world()
    col = {name: FEATURE_NAMES.index(name) for name in ("ctx_hour_utc", "ctx_device", "ctx_page")}
    at = T0 - T0 % 86400 + 13 * 3600 + 59  # 13:00:59 UTC
    plain = build_matrix(user, table, cand, at, dtype=np.float64)
    assert (plain[:, col["ctx_hour_utc"]] == 13).all()
    assert np.isnan(plain[:, col["ctx_device"]]).all() and np.isnan(plain[:, col["ctx_page"]]).all()
    given = build_matrix(
        user, table, cand, at, dtype=np.float64, context=Context(device="mobile", page="cart")
    )
    assert (given[:, col["ctx_device"]] == DEVICES.index("mobile")).all()
    assert (given[:, col["ctx_page"]] == PAGES.index("cart")).all()
    other = build_matrix(user, table, cand, at, dtype=np.float64, context=Context(device="tv"))
    assert (other[:, col["ctx_device"]] == len(DEVICES)).all()


def test_user_without_history_has_missing_not_zero_features() -> None:
    _, table, cand = _world()
    m = build_matrix(UserState(), table, cand, T0, dtype=np.float64)
    for name in ("u_secs_since_last_event", "u_mean_price", "ui_covisit", "ui_recent_position"):
        assert np.isnan(m[:, FEATURE_NAMES.index(name)]).all(), name
    assert not math.isnan(m[0, FEATURE_NAMES.index("i_price")])


@pytest.mark.parametrize("dense", [True, False])
def test_covisit_sums_equal_the_comparison_matrix_with_repeated_candidates(
    dense: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not dense:  # the path a large catalogue takes
        monkeypatch.setattr(arrays, "INDEX_DENSE_FACTOR", 0)
    rng = np.random.default_rng(3)
    table = dense_table((f"i{k}", "c1", 10.0) for k in range(40))
    # Random co-visitation slots (1-based item rows, 0 = empty) and counts.
    table.raw[:, COL_NBR : COL_NBR + COVISIT_NEIGHBOURS] = rng.integers(
        0, 41, (40, COVISIT_NEIGHBOURS)
    )
    table.raw[:, COL_NBR_SCORE : COL_NBR_SCORE + COVISIT_NEIGHBOURS] = rng.random(
        (40, COVISIT_NEIGHBOURS)
    )
    table.raw[:, COL_NBR_REF] = T0 - rng.random(40) * 86_400
    items = rng.choice(40, 6, replace=False)
    candidates = rng.integers(0, 40, 80)  # repeats on purpose
    idx, scores = covisit.neighbours(table, items, T0)
    match = candidates[:, None] == idx.ravel()[None, :]
    want_all = match @ scores.ravel()
    want_last = match[:, : idx.shape[1]] @ scores[0]
    got_all, got_last = covisit.scores_for(table, items, candidates, T0)
    np.testing.assert_allclose(got_all, want_all, rtol=1e-12)
    np.testing.assert_allclose(got_last, want_last, rtol=1e-12)
    assert (got_all > 0).sum() > 10  # the random slots do hit candidates


def test_one_decayed_column_equals_the_full_decay() -> None:
    rng = np.random.default_rng(4)
    raw = rng.random((30, COL_NBR_REF + 5)) * 100
    raw[:, COL_REF] = T0 - rng.random(30) * 1e7
    for h in range(len(HALF_LIVES)):
        np.testing.assert_array_equal(decay_column(raw, T0, h), decay_rows(raw, T0)[:, :, h])


def test_a_subnormal_price_gives_a_finite_log_ratio_without_a_warning() -> None:
    table = dense_table([("a", "c", 10.0), ("tiny", "c", 5e-324)])
    user = UserState()
    apply_user_event(user, EventType.VIEW, T0, "a", "c", 10.0)
    matrix = build_matrix(user, table, np.arange(2), T0, dtype=np.float64)  # warnings are errors
    ratio = matrix[:, FEATURE_NAMES.index("ui_log_price_ratio")]
    assert ratio[0] == 0.0 and np.isfinite(ratio[1]) and ratio[1] < -700


def test_decayed_rows_equal_the_plain_broadcast_definition() -> None:
    rng = np.random.default_rng(8)
    raw = rng.random((40, COL_NBR_REF + 5)) * 100
    raw[:, COL_REF] = T0 - rng.random(40) * 1e8
    raw[:3, COL_REF] = T0 + 50  # a reference after now: no growth
    dt = np.maximum(T0 - raw[:, COL_REF], 0.0)
    factors = np.exp2(-dt[:, None] / np.asarray(HALF_LIVES)[None, :])
    counts = raw[:, COL_COUNTS:COL_NBR_REF].reshape(-1, N_TYPES, N_HALF_LIVES)
    np.testing.assert_array_equal(decay_rows(raw, T0), counts * factors[:, None, :])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_flush_tiny_equals_the_plain_masked_copy(dtype: type[np.floating]) -> None:
    rng = np.random.default_rng(9)
    for _ in range(20):
        m = rng.random((50, 30)) * 10.0 ** rng.integers(-45, 3, (50, 30))
        m[rng.random((50, 30)) < 0.2] *= -1
        m[rng.random((50, 30)) < 0.2] = 0.0
        m[rng.random((50, 30)) < 0.1] = -0.0
        m[rng.random((50, 30)) < 0.1] = np.nan
        m = m.astype(dtype)
        want = m.copy()
        np.copyto(want, 0.0, where=np.abs(want) < TINY)
        got = flush_tiny(m)
        assert got is m
        # Bit for bit: -0.0 becomes 0.0 as in the plain copy.
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


def _busy_world(rng: np.random.Generator) -> tuple[UserState, ItemTable, PopularityIndex]:
    table = dense_table((f"i{k}", f"c{k % 7}", float(rng.integers(0, 50))) for k in range(300))
    user = UserState()
    for k, item in enumerate(rng.choice(300, 60).tolist()):
        event = EventType.VIEW if k % 5 else EventType.CLICK
        ts = T0 - 3600.0 * (60 - k)
        apply_user_event(user, event, ts, f"i{item}", f"c{item % 7}", 10.0)
        table.apply_event(item, event, ts)
    table.raw[:, COL_NBR : COL_NBR + COVISIT_NEIGHBOURS] = rng.integers(
        0, 301, (300, COVISIT_NEIGHBOURS)
    )
    table.raw[:, COL_NBR_SCORE : COL_NBR_SCORE + COVISIT_NEIGHBOURS] = rng.random(
        (300, COVISIT_NEIGHBOURS)
    )
    table.raw[:, COL_NBR_REF] = T0 - rng.random(300) * 86_400
    return user, table, PopularityIndex.build(table, T0)


@pytest.mark.parametrize("dense", [True, False])
def test_families_fill_the_matrix_as_they_compute_and_read_lists_like_dictionaries(
    dense: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not dense:  # the path a large catalogue takes
        monkeypatch.setattr(arrays, "INDEX_DENSE_FACTOR", 0)
    rng = np.random.default_rng(10)
    user, table, popularity = _busy_world(rng)
    found = retrieve(user, table, popularity, CandidateConfig(), np.zeros(0, np.int64), T0)
    candidates = rng.integers(0, 300, 250)  # repeats on purpose
    matrix = build_matrix(user, table, candidates, T0, dtype=np.float64, retrieval=found)
    x = FeatureInput(user, table, candidates, T0, retrieval=found)
    col = 0
    for family in FAMILIES:
        width = len(family.names)
        block = np.broadcast_to(family.compute(x), (len(candidates), width))
        np.testing.assert_array_equal(matrix[:, col : col + width], flush_tiny(block.copy()))
        col += width
    # The recent position and time: the first match in the user's recent items.
    recent = found.recent
    match = candidates[:, None] == recent[None, :]
    first = match.argmax(axis=1)
    hit = match.any(axis=1)
    assert hit.sum() > 10
    got = matrix[:, FEATURE_NAMES.index("ui_recent_position")]
    np.testing.assert_array_equal(got, np.where(hit, first, np.nan))
    since = matrix[:, FEATURE_NAMES.index("ui_secs_since_item")]
    np.testing.assert_array_equal(since, np.where(hit, T0 - found.recent_ts[first], np.nan))
    # Ranks and the number of proposing lists, by dictionary.
    proposed = np.zeros(len(candidates))
    for source, listed in found.lists.items():
        where = dict(zip(listed.items.tolist()[:200], listed.rank.tolist()[:200], strict=False))
        proposed += [c in where for c in candidates.tolist()]
        name = f"src_{SOURCES[source]}_rank"
        if name in FEATURE_NAMES:
            want = [where.get(c, np.nan) for c in candidates.tolist()]
            np.testing.assert_array_equal(matrix[:, FEATURE_NAMES.index(name)], want)
    np.testing.assert_array_equal(matrix[:, FEATURE_NAMES.index("src_proposed_by")], proposed)
