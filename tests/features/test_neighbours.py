"""The learned item-to-item table: what it learns, how it is stored, bound and read."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from features import item2item
from features.candidates import (
    RANK_DEPTH,
    SOURCE_COVISIT,
    SOURCE_POPULAR,
    SOURCE_RECENT,
    SOURCE_RELATED,
    CandidateConfig,
    Ranked,
    Retrieval,
    assemble,
    quota,
    retrieve,
)
from features.events import EventType
from features.item2item import LearnConfig, learn
from features.neighbours import (
    KINDS,
    MAX_WINDOW,
    WINDOWS,
    Affinity,
    Bound,
    NeighbourTable,
    affinity,
)
from features.popularity import PopularityIndex
from features.schema import FEATURE_NAMES, build_matrix
from features.state import COL_COUNTS, COL_REF, ItemTable, UserState, apply_user_event
from tests.helpers import dense_table

T0 = 1_790_000_000.0

# (ts, user, item): u0 touches a, b, c within an hour; u1 a then b; u2 a, then c
# two hours later (not a session); u3 only d.
LOG = [
    (0.0, 0, "a"),
    (10.0, 0, "b"),
    (20.0, 0, "c"),
    (0.0, 1, "a"),
    (100.0, 1, "b"),
    (0.0, 2, "a"),
    (7200.0, 2, "c"),
    (5.0, 3, "d"),
]


def _learn(log: list[tuple[float, int, str]], **config: object) -> NeighbourTable:
    ids = sorted({i for _, _, i in log})
    rows = sorted(log)
    return learn(
        np.asarray([t for t, _, _ in rows]),
        np.asarray([u for _, u, _ in rows]),
        np.asarray([ids.index(i) for _, _, i in rows]),
        ids,
        LearnConfig(**config),  # type: ignore[arg-type]
    )


def _score(nt: NeighbourTable, item: str, other: str, kind: str) -> float:
    scores = nt.neighbours_of(item).get(other)
    return scores[nt.kinds.index(kind)] if scores else 0.0


def test_related_items_are_session_co_occurrences_cosine_normalised() -> None:
    nt = _learn(LOG, ease_items=0)
    # a: 3 users, b: 2, c: 2. a-b: 2 users in a session; a-c and b-c: u0 only
    # (u2's a and c are two hours apart).
    assert _score(nt, "a", "b", "related") == pytest.approx(2 / np.sqrt(6), rel=1e-6)
    assert _score(nt, "b", "a", "related") == pytest.approx(2 / np.sqrt(6), rel=1e-6)
    assert _score(nt, "a", "c", "related") == pytest.approx(1 / np.sqrt(6), rel=1e-6)
    assert _score(nt, "b", "c", "related") == pytest.approx(0.5, rel=1e-6)
    assert _score(nt, "a", "d", "related") == 0.0
    assert nt.neighbours_of("d") == {}  # one user says nothing
    assert nt.score[:, nt.kinds.index("collaborative")].max() == 0.0  # EASE switched off


def test_collaborative_neighbours_are_the_ease_weights() -> None:
    rng = np.random.default_rng(3)
    log = [(float(k), int(rng.integers(0, 40)), f"i{int(rng.integers(0, 12))}") for k in range(600)]
    l2 = 5.0
    nt = _learn(log, ease_items=100, ease_l2=l2, collaborative=3, min_users=1)
    ids = nt.ids
    x = np.zeros((40, len(ids)))
    for _, u, i in log:
        x[u, ids.index(i)] = 1.0
    p = np.linalg.inv(x.T @ x + l2 * np.eye(len(ids)))
    b = p / -np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    for v, item in enumerate(ids):
        best = np.argsort(-b[v], kind="stable")[:3]
        best = best[b[v, best] > 0]
        stored = {
            other: kinds[nt.kinds.index("collaborative")]
            for other, kinds in nt.neighbours_of(item).items()
            if kinds[nt.kinds.index("collaborative")] > 0
        }
        assert stored == pytest.approx({ids[o]: b[v, o] for o in best}, rel=1e-5)


def test_a_table_survives_save_and_load(tmp_path: Path) -> None:
    nt = _learn(LOG)
    nt.save(tmp_path / "nb")
    back = NeighbourTable.load(tmp_path / "nb")
    assert back.ids == nt.ids and back.kinds == nt.kinds
    np.testing.assert_array_equal(back.indptr, nt.indptr)
    np.testing.assert_array_equal(back.nbr, nt.nbr)
    np.testing.assert_array_equal(back.score, nt.score)
    (tmp_path / "nb" / "meta.json").write_text('{"format": 99}')
    with pytest.raises(ValueError, match="format"):
        NeighbourTable.load(tmp_path / "nb")


def test_a_binding_extended_for_new_rows_equals_a_fresh_one() -> None:
    nt = _learn(LOG)
    table = ItemTable()
    for item in ["x", "c"]:
        table.ensure_item(item)
    early = nt.bind(table)
    for item in ["a", "y", "b"]:
        table.ensure_item(item)
    extended, fresh = nt.bind(table, early), nt.bind(table)
    np.testing.assert_array_equal(extended.vocab_of, fresh.vocab_of)
    np.testing.assert_array_equal(extended.row_of, fresh.row_of)
    expected = {"x": -1, "c": nt.index["c"], "a": nt.index["a"], "y": -1, "b": nt.index["b"]}
    assert {item: int(extended.vocab_of[row]) for item, row in table.index.items()} == expected
    # Empty rows (see ItemTable) map to nothing.
    assert (extended.vocab_of[~table.present] == -1).all()
    assert extended.count == table.count == 5


def test_affinity_sums_neighbour_scores_by_recency_rank() -> None:
    nt = _learn(LOG, ease_items=0)
    table = ItemTable()
    for item in ["a", "b", "c", "unknown"]:
        table.ensure_item(item)
    bound = Bound(nt, nt.bind(table))
    # Newest first: b, then an item the table never saw, then c.
    recent = np.asarray([table.index["b"], table.index["unknown"], table.index["c"]])
    scores = affinity(bound, recent)
    got = dict(zip(scores.items.tolist(), scores.lookup(scores.items).tolist(), strict=True))
    a = got[table.index["a"]]
    ab, ac = 2 / np.sqrt(6), 1 / np.sqrt(6)
    related = [scores.column("related", w) for w in WINDOWS]
    # Window 1: b alone; windows 5 and 10: b at weight 1, c (third newest) at 1/3.
    assert [a[c] for c in related] == pytest.approx([ab, ab + ac / 3, ab + ac / 3])
    assert scores.ranked("related", 5)[0] == table.index["a"]
    assert scores.lookup(np.asarray([table.index["unknown"]])).sum() == 0.0


def _random_table(rng: np.random.Generator, n_vocab: int) -> NeighbourTable:
    lengths = rng.integers(0, 12, n_vocab)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    nbr = np.concatenate([rng.choice(n_vocab, size=k, replace=False) for k in lengths]).astype(
        np.int32
    )
    score = rng.random((len(nbr), 2)).astype(np.float32)
    ids = [f"v{v}" for v in range(n_vocab)]
    return NeighbourTable(ids, indptr, nbr, score, np.ones(n_vocab, np.float32))


def test_affinity_equals_a_plain_loop_over_the_recent_items() -> None:
    rng = np.random.default_rng(5)
    nt = _random_table(rng, 60)
    table = ItemTable()
    for item in rng.permutation([*nt.ids[:50], *(f"new{k}" for k in range(10))]).tolist():
        table.ensure_item(str(item))  # 10 of the vocabulary are not in the table
    bound = Bound(nt, nt.bind(table))
    for _ in range(30):
        recent = rng.choice(np.arange(-1, table.n), size=int(rng.integers(1, 40)))
        expected: dict[int, np.ndarray] = {}
        for position, row in enumerate(recent.tolist()[:MAX_WINDOW]):
            v = nt.index.get(table.ids[row], -1) if row >= 0 else -1
            if v < 0:
                continue
            for e in range(int(nt.indptr[v]), int(nt.indptr[v + 1])):
                to = table.index.get(nt.ids[int(nt.nbr[e])])
                if to is None:
                    continue
                acc = expected.setdefault(to, np.zeros(6))
                for k in range(2):
                    for w, window in enumerate(WINDOWS):
                        if position < window:
                            acc[k * 3 + w] += float(nt.score[e, k]) / (position + 1)
        got = affinity(bound, recent)
        assert got.items.tolist() == sorted(expected)
        everything = np.arange(table.n)
        np.testing.assert_array_equal(got.lookup(everything, table.n), got.lookup(everything))
        assert (got.lookup(everything).sum(axis=1) > 0).sum() == len(expected) or not expected
        if expected:
            want = np.asarray([expected[i] for i in sorted(expected)])
            np.testing.assert_allclose(got.values, want, rtol=1e-12)


def _affinity_by_column(bound: Bound, recent: np.ndarray) -> np.ndarray:
    """The plain definition of Affinity.values: per (kind, window), one bincount
    over the entries of the window's newest items, in the order of the entries
    (newest item first, each item's neighbours in table order)."""
    nt, b = bound.table, bound.binding
    rows, owners, scores = [], [], []
    for position, row in enumerate(recent.tolist()[:MAX_WINDOW]):
        v = int(b.vocab_of[row]) if 0 <= row < b.table_n else -1
        for e in range(int(nt.indptr[v]), int(nt.indptr[v + 1])) if v >= 0 else ():
            to = int(b.row_of[int(nt.nbr[e])])
            if to >= 0:
                rows.append(to)
                owners.append(position)
                scores.append(nt.score[e])
    items, group = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
    owner = np.asarray(owners, dtype=np.int64)
    score = np.asarray(scores, dtype=np.float32).reshape(-1, len(nt.kinds))
    values = np.zeros((len(items), len(nt.kinds) * len(WINDOWS)))
    for k in range(len(nt.kinds)):
        weighted = score[:, k] * (1.0 / (owner + 1.0))
        for w, window in enumerate(WINDOWS):
            inside = owner < window
            values[:, k * len(WINDOWS) + w] = np.bincount(
                group[inside], weights=weighted[inside], minlength=len(items)
            )
    return values


def test_affinity_sums_exactly_as_one_bincount_per_column() -> None:
    rng = np.random.default_rng(15)
    nt = _random_table(rng, 80)
    table = ItemTable()
    for item in rng.permutation([*nt.ids[:70], *(f"new{k}" for k in range(10))]).tolist():
        table.ensure_item(str(item))
    bound = Bound(nt, nt.bind(table))
    for _ in range(40):
        recent = rng.choice(np.arange(-1, table.n), size=int(rng.integers(1, 30)), replace=False)
        got = affinity(bound, recent)
        want = _affinity_by_column(bound, recent)
        np.testing.assert_array_equal(got.values, want)  # bit for bit: same order of sums
        np.testing.assert_array_equal(got.padded(), np.vstack([want, np.zeros((1, 6))]))
        plain = Affinity(got.items, got.values, got.kinds)  # no padded copy kept
        np.testing.assert_array_equal(plain.padded(), got.padded())


def test_a_binding_s_log_users_equal_the_users_of_each_row_as_it_grows() -> None:
    rng = np.random.default_rng(16)
    nt = _random_table(rng, 60)
    nt = replace(nt, users=rng.integers(1, 500, 60).astype(np.float32))
    table = ItemTable()
    order = rng.permutation([*nt.ids[:50], *(f"new{k}" for k in range(15))]).tolist()
    binding = None
    for stop in (10, 11, 40, len(order)):
        for item in order[table.count : stop]:
            table.ensure_item(str(item))
        binding = nt.bind(table, binding)  # extended, not rebuilt
        bound = Bound(nt, binding)
        rows = np.arange(table.n + 5)  # and rows past the binding
        with np.errstate(invalid="ignore"):
            want = np.log1p(bound.users_of(rows))
        np.testing.assert_array_equal(bound.log_users_of(rows), want)
        np.testing.assert_array_equal(binding.vocab_at[:-1], binding.vocab_of)
        assert binding.vocab_at[-1] == -1
    assert binding is not None and (binding.vocab_of >= 0).sum() == 50


def test_ranks_read_each_source_list_like_a_dictionary() -> None:
    rng = np.random.default_rng(6)
    lengths = {SOURCE_RECENT: 60, SOURCE_COVISIT: 0, SOURCE_POPULAR: RANK_DEPTH + 60}
    lists = {s: Ranked.of(rng.choice(400, size=k, replace=False)) for s, k in lengths.items()}
    found = Retrieval(np.zeros(0, np.int64), np.zeros(0), lists, None, np.zeros(0, np.int64))
    candidates = rng.integers(0, 400, 150)  # repeats on purpose
    sources = (SOURCE_POPULAR, SOURCE_RELATED, SOURCE_RECENT, SOURCE_COVISIT)
    got = found.ranks(candidates, sources)
    np.testing.assert_array_equal(found.ranks(candidates, sources, 400), got)  # dense maps
    for j, source in enumerate(sources):
        listed = lists.get(source)
        where: dict[int, float] = {}
        if listed is not None:  # read down to RANK_DEPTH only
            where = dict(zip(listed.items.tolist(), listed.rank.tolist(), strict=True))
            where = {item: rank for item, rank in where.items() if rank < RANK_DEPTH}
        want = [where.get(c, np.nan) for c in candidates.tolist()]
        np.testing.assert_array_equal(got[:, j], want)
    assert np.isnan(got[:, 0]).sum() < len(candidates)  # the deep list was read


def test_rank_features_do_not_depend_on_the_request_s_cap_or_exclusions() -> None:
    table = dense_table((f"i{k}", "c", 1.0) for k in range(300))
    table.raw[:, COL_COUNTS : COL_COUNTS + 4] = np.arange(300, 0, -1)[:, None]
    table.raw[:, COL_REF] = T0
    popularity = PopularityIndex.build(table, T0)
    user = UserState()
    apply_user_event(user, EventType.VIEW, T0, "i0", "c", 1.0)
    columns = [FEATURE_NAMES.index(f) for f in ("src_popular_rank", "src_proposed_by")]
    candidates = np.asarray([12, 150, 199, 250])
    seen = set()
    for cap, exclude in [(200, []), (5, []), (5, [1] * 8), (400, [3]), (1, [1, 2])]:
        config = CandidateConfig(cap=cap)
        found = retrieve(user, table, popularity, config, np.asarray(exclude, np.int64), T0)
        matrix = build_matrix(user, table, candidates, T0, dtype=np.float64, retrieval=found)
        seen.add(matrix[:, columns].tobytes())
        for ranked in found.lists.values():  # what Retrieval.ranks relies on
            assert len(np.unique(ranked.items)) == len(ranked.items)
    assert len(seen) == 1
    assert matrix[:, columns[0]].tolist()[:3] == [12.0, 150.0, 199.0]
    assert np.isnan(matrix[3, columns[0]])  # below RANK_DEPTH


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda d: (d / "meta.json").write_text('{"format": 2, "kinds": 5}'), "kinds"),
        (lambda d: (d / "meta.json").write_text('{"format": 2, "kinds": [], "info": 5}'), "info"),
        (lambda d: np.save(d / "users.npy", np.asarray(["a"] * 4)), "wrong type"),
        (lambda d: np.save(d / "scores.npy", np.full((6, 2), np.nan, np.float32)), "finite"),
        (lambda d: (d / "item_ids.txt").write_text("a\na\nb\nc\n"), "repeats"),
        (lambda d: np.save(d / "neighbours.npy", np.full(6, 9, np.int32)), "outside"),
        (lambda d: (d / "indptr.npy").unlink(), "indptr"),
    ],
)
def test_a_tampered_table_is_refused_with_a_reason(
    tmp_path: Path, tamper: Any, reason: str
) -> None:
    nt = _learn(LOG, ease_items=0)
    assert len(nt.nbr) == 6  # the sizes the tampering above assumes
    nt.save(tmp_path / "nb")
    tamper(tmp_path / "nb")
    with pytest.raises((ValueError, OSError), match=reason):
        NeighbourTable.load(tmp_path / "nb")


@pytest.mark.parametrize("limit", [0, 1, 7, 40, 500])
def test_a_limited_ranking_is_the_head_of_the_full_one(limit: int) -> None:
    rng = np.random.default_rng(limit)
    values = rng.integers(0, 6, (300, 6)).astype(np.float64)  # many ties, some zeros
    scores = Affinity(np.arange(300) * 3, values, KINDS)
    for kind in KINDS:
        for window in WINDOWS:
            full = scores.ranked(kind, window)
            np.testing.assert_array_equal(scores.ranked(kind, window, limit), full[:limit])


def test_assemble_equals_the_plain_definition() -> None:
    rng = np.random.default_rng(11)
    for _ in range(200):
        lists = {
            s: Ranked.of(rng.choice(120, size=int(rng.integers(0, 60)), replace=False))
            for s in rng.choice(np.arange(1, 9), size=int(rng.integers(0, 8)), replace=False)
        }
        ban = rng.integers(0, 120, int(rng.integers(0, 30)))
        found = Retrieval(np.zeros(0, np.int64), np.zeros(0), lists, None, ban)
        config = CandidateConfig(
            cap=int(rng.integers(1, 150)),
            recent=int(rng.integers(0, 40)),
            covisit=int(rng.integers(0, 40)),
            popular=int(rng.integers(0, 70)),
        )
        want_items: list[int] = []
        want_sources: list[int] = []
        for source in sorted(lists):
            allowed = [i for i in lists[source].items.tolist() if i not in set(ban.tolist())]
            for item in allowed[: quota(config, source)]:
                if item not in want_items:
                    want_items.append(item)
                    want_sources.append(source)
        for size in (None, 120):  # np.isin, then the position map
            got = assemble(replace(found, size=size), config)
            assert got.index.tolist() == want_items[: config.cap]
            assert got.source.tolist() == want_sources[: config.cap]


@pytest.mark.parametrize("in_time_order", [True, False])
def test_related_pairs_packed_or_not_are_the_same(in_time_order: bool) -> None:
    """One int64 per (pair, user) (the default, half the memory on a 50M log) and
    two arrays (ids too wide to pack) count the same users per pair, whether
    the events come in time order (a stable sort by user) or not."""
    rng = np.random.default_rng(3)
    n, users, items = 20_000, 300, 400
    ts = np.sort(rng.uniform(0, 30 * 86400, n))
    user = rng.integers(0, users, n)
    item = rng.integers(0, items, n)
    if not in_time_order:
        shuffle = rng.permutation(n)
        ts, user, item = ts[shuffle], user[shuffle], item[shuffle]
    per_item = np.bincount(np.unique(user * items + item) % items, minlength=items)
    config = LearnConfig()
    packed = item2item._related(ts, user, item, items, per_item, config)
    plain = item2item._related(ts, user, item, items, per_item, config, pack=False)
    assert len(packed[0]) > 1000
    for a, b in zip(packed, plain, strict=True):
        assert np.array_equal(a, b)
