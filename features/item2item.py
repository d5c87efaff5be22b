"""Learning the item-to-item neighbour table from a training log (offline only).

Two kinds of neighbours, each the top few per item (``LearnConfig``):

- ``related``: items the same user touched within ``window_secs`` of each other
  (at most ``max_lag`` events apart), counted once per user and pair, cosine
  normalised by the items' user counts: ``c(i, j) / sqrt(u(i) u(j))``. Symmetric.
- ``collaborative``: EASE (Steck, "Embarrassingly Shallow Autoencoders", 2019),
  the closed-form linear item-item model over the users' item sets, for the
  ``ease_items`` items with the most users (it inverts an items x items
  matrix: O(items^3) time, O(items^2) memory). Row ``i`` keeps the items with
  the largest positive weights ``B[i, j]``: what a history holding ``i`` points to.

scipy (a dependency of LightGBM) builds the sparse user x item matrix here; the
serving side (``features.neighbours``) needs numpy only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import scipy.linalg
import scipy.sparse

from features.neighbours import KINDS, NeighbourTable


@dataclass(frozen=True, slots=True)
class LearnConfig:
    # A session: a user's events at most an hour apart...
    window_secs: float = 3600.0
    # ...and at most this many events apart (a long burst pairs locally, and the
    # pair count stays linear in the log: at most max_lag pairs per event).
    max_lag: int = 50
    # Neighbours kept per item and kind (each costs 4 + 4 * kinds bytes). The
    # collaborative kind is learned on the ease_items most active items only;
    # its source sums the truncated rows of the user's last ten items.
    related: int = 100
    collaborative: int = 100
    # EASE items, and its L2 weight (larger: closer to plain co-occurrence).
    ease_items: int = 8192
    ease_l2: float = 200.0
    # Items need this many distinct users to get neighbours (one user says nothing).
    min_users: int = 2


def learn(
    ts: np.ndarray,
    user: np.ndarray,
    item: np.ndarray,
    item_ids: list[str],
    config: LearnConfig,
    progress: Callable[[str], None] | None = None,
) -> NeighbourTable:
    """The neighbour table of a training log given as parallel arrays (``item``
    indexes ``item_ids``). Deterministic for the same input."""
    say = progress or (lambda _stage: None)
    # Compact vocabulary: the items the training log touches.
    used, item = np.unique(np.asarray(item, dtype=np.int64), return_inverse=True)
    user = np.unique(np.asarray(user, dtype=np.int64), return_inverse=True)[1]
    v = len(used)
    ids = [item_ids[k] for k in used.tolist()]
    pairs_ui = np.unique(user * v + item)
    users_per_item = np.bincount(pairs_ui % v, minlength=v)
    say("related")
    related = _related(np.asarray(ts, np.float64), user, item, v, users_per_item, config)
    say("collaborative")
    collaborative = _ease(pairs_ui // v, pairs_ui % v, v, users_per_item, config)
    indptr, nbr, score = _merge([related, collaborative], v)
    lengths = np.diff(indptr)
    info: dict[str, object] = {
        **asdict(config),
        "items": v,
        "users": int(user.max(initial=-1)) + 1,
        "events": len(ts),
        "neighbours": len(nbr),
        "items_with_neighbours": int(np.count_nonzero(lengths)),
        "bytes": int(indptr.nbytes + nbr.nbytes + score.nbytes),
    }
    return NeighbourTable(ids, indptr, nbr, score, users_per_item.astype(np.float32), KINDS, info)


Edges = tuple[np.ndarray, np.ndarray, np.ndarray]  # source row, neighbour row, score


def _related(
    ts: np.ndarray,
    user: np.ndarray,
    item: np.ndarray,
    v: int,
    users_per_item: np.ndarray,
    config: LearnConfig,
    pack: bool = True,
) -> Edges:
    """Co-occurrence within a session: cosine of users per pair. ``pack``: one
    int64 per (pair, user) where the ids' bits fit (the default)."""
    # By user, then time (a stable sort by user when the log is in time order).
    in_order = bool(np.all(ts[1:] >= ts[:-1]))
    order = np.argsort(user, kind="stable") if in_order else np.lexsort((ts, user))
    u = user[order].astype(np.int32 if user.max(initial=0) < 2**31 else np.int64)
    i = item[order].astype(np.int32 if v < 2**31 else np.int64)
    t = ts[order]
    del order
    n_users = int(u.max(initial=-1)) + 1
    user_bits = max(1, n_users.bit_length())
    # One int64 per (pair, user) when the bits allow: half the memory of two
    # arrays, and each lag's share deduplicated at once (a user's repeated pair
    # counts once anyway), so the peak is the distinct (pair, user) count.
    packed = pack and (2 * max(v, 1).bit_length()) + user_bits <= 63
    found: list[np.ndarray] = []
    found_u: list[np.ndarray] = []
    for lag in range(1, config.max_lag + 1):
        same_user = u[lag:] == u[:-lag]
        if not same_user.any():
            break
        ok = same_user & (t[lag:] - t[:-lag] <= config.window_secs)
        del same_user
        ok &= i[lag:] != i[:-lag]
        if not ok.any():
            continue
        a = i[lag:][ok].astype(np.int64)
        b = i[:-lag][ok].astype(np.int64)
        key = np.minimum(a, b) * v + np.maximum(a, b)
        del a, b
        who = u[lag:][ok].astype(np.int64)
        if packed:
            found.append(np.unique((key << user_bits) | who))
        else:
            found.append(key)
            found_u.append(who)
    if not found:
        return _empty_edges()
    if packed:
        pair_users = np.unique(np.concatenate(found))
        del found
        keys, counts = np.unique(pair_users >> user_bits, return_counts=True)  # users per pair
        del pair_users
    else:
        key, who = np.concatenate(found), np.concatenate(found_u)
        del found, found_u
        by = np.lexsort((who, key))
        key, who = key[by], who[by]
        first = np.concatenate([[True], (key[1:] != key[:-1]) | (who[1:] != who[:-1])])
        keys, counts = np.unique(key[first], return_counts=True)  # users per pair
    lo, hi = keys // v, keys % v
    cos = counts / np.sqrt(users_per_item[lo] * users_per_item[hi])
    strong = (users_per_item[lo] >= config.min_users) & (users_per_item[hi] >= config.min_users)
    lo, hi, cos = lo[strong], hi[strong], cos[strong]
    src, dst = np.concatenate([lo, hi]), np.concatenate([hi, lo])
    return _top(src, dst, np.concatenate([cos, cos]), config.related)


def _ease(
    user: np.ndarray, item: np.ndarray, v: int, users_per_item: np.ndarray, config: LearnConfig
) -> Edges:
    eligible = np.flatnonzero(users_per_item >= config.min_users)
    if config.ease_items <= 0 or len(eligible) < 2:
        return _empty_edges()
    # The most active items (ties: lower row), in row order.
    by_users = eligible[np.argsort(-users_per_item[eligible], kind="stable")]
    cols = np.sort(by_users[: config.ease_items])
    col_of = np.full(v, -1, np.int64)
    col_of[cols] = np.arange(len(cols))
    keep = col_of[item] >= 0
    x = scipy.sparse.csr_matrix(
        (np.ones(int(keep.sum())), (user[keep], col_of[item[keep]])),
        shape=(int(user.max(initial=-1)) + 1, len(cols)),
    )
    gram = np.asarray((x.T @ x).toarray(), dtype=np.float64)
    gram[np.diag_indices_from(gram)] += config.ease_l2
    # In place: the inverse, then the weights, are the only items^2 arrays.
    weights = scipy.linalg.inv(gram, overwrite_a=True, check_finite=False)
    del gram
    weights /= -np.diag(weights).copy()[None, :]
    np.fill_diagonal(weights, 0.0)
    k = min(config.collaborative, len(cols) - 1)
    top = np.argpartition(-weights, k - 1, axis=1)[:, :k]
    w = np.take_along_axis(weights, top, axis=1)
    src = np.repeat(cols, k)
    dst, w = cols[top.ravel()], w.ravel()
    positive = w > 0
    return _top(src[positive], dst[positive], w[positive], k)


def _top(src: np.ndarray, dst: np.ndarray, score: np.ndarray, k: int) -> Edges:
    """The k best edges per source (ties: lower neighbour row first)."""
    order = np.lexsort((dst, -score, src))
    src, dst, score = src[order], dst[order], score[order]
    starts = np.searchsorted(src, src, side="left")
    keep = np.arange(len(src)) - starts < k
    return src[keep], dst[keep], score[keep]


def _empty_edges() -> Edges:
    return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)


def _merge(kinds: list[Edges], v: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR rows (sorted by neighbour): the union of every kind's neighbours of an
    item, one score column per kind."""
    src = np.concatenate([e[0] for e in kinds])
    dst = np.concatenate([e[1] for e in kinds])
    kind = np.concatenate([np.full(len(e[0]), k) for k, e in enumerate(kinds)])
    score = np.concatenate([e[2] for e in kinds])
    if v == 0:
        return np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros((0, len(kinds)), np.float32)
    unique, inverse = np.unique(src * v + dst, return_inverse=True)
    merged = np.zeros((len(unique), len(kinds)), np.float32)
    merged[inverse, kind] = score
    indptr = np.searchsorted(unique // v, np.arange(v + 1), side="left").astype(np.int64)
    return indptr, (unique % v).astype(np.int32), merged
