"""Reading co-visitation neighbours from the item rows (pure numpy, no per-item loops)."""

from __future__ import annotations

import numpy as np

from features import arrays
from features.events import COVISIT_HALF_LIFE, COVISIT_NEIGHBOURS
from features.state import COL_NBR, COL_NBR_REF, COL_NBR_SCORE, ItemTable


def neighbours(table: ItemTable, items: np.ndarray, now: float) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour indices and their pair counts decayed to ``now``, shape
    (len(items), COVISIT_NEIGHBOURS); empty slots have index -1 and count 0."""
    rows = table.raw[items]
    idx = rows[:, COL_NBR : COL_NBR + COVISIT_NEIGHBOURS].astype(np.int64) - 1
    # A serving table may not hold a neighbour yet (created in another shard
    # after this process last read that shard): an empty slot until it does.
    inside = idx < table.n
    idx = np.where(inside & table.present[np.where(inside, idx, -1)], idx, -1)
    dt = np.maximum(now - rows[:, COL_NBR_REF], 0.0)
    scores = (
        rows[:, COL_NBR_SCORE : COL_NBR_SCORE + COVISIT_NEIGHBOURS]
        * np.exp2(-dt / COVISIT_HALF_LIFE)[:, None]
    )
    return idx, np.where(idx >= 0, scores, 0.0)


Slots = tuple[np.ndarray, np.ndarray]


def aggregate(
    table: ItemTable, items: np.ndarray, now: float, slots: Slots | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Neighbours of ``items`` with their summed counts, strongest first
    (``slots``: ``neighbours(table, items, now)`` when already read)."""
    idx, scores = slots if slots is not None else neighbours(table, items, now)
    keep = idx.ravel() >= 0
    flat_idx, flat_scores = idx.ravel()[keep], scores.ravel()[keep]
    if not len(flat_idx):
        return flat_idx, flat_scores
    unique, inverse = arrays.group(flat_idx, table.n)
    totals = np.bincount(inverse, weights=flat_scores)
    order = np.argsort(-totals, kind="stable")
    return unique[order], totals[order]


def scores_for(
    table: ItemTable,
    items: np.ndarray,
    candidates: np.ndarray,
    now: float,
    slots: Slots | None = None,
    match: arrays.CandidateMatch | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """For each candidate, its summed co-visit counts with all of ``items`` and with
    the first of them (the user's newest): a map from item row to candidate (or a
    sort and a search on a large catalogue), two bincounts; repeated candidates
    get the same sums. ``match``: the candidates' ``arrays.match`` when built."""
    n = len(candidates)
    idx, scores = slots if slots is not None else neighbours(table, items, now)
    if not n or not idx.size:
        return np.zeros(n), np.zeros(n)
    flat = idx.ravel()  # empty slots (-1) match no candidate
    if match is None:
        match = arrays.match(candidates, table.n, len(flat))
    at = match.at(flat)
    hit = at >= 0
    weights = scores.ravel()
    # The newest item's slots are the first row's.
    at_last, hit_last, weights_last = at[: idx.shape[1]], hit[: idx.shape[1]], scores[0]
    out_all = np.bincount(at[hit], weights=weights[hit], minlength=match.n_rows)
    out_last = np.bincount(
        at_last[hit_last], weights=weights_last[hit_last], minlength=match.n_rows
    )
    return out_all[match.rows], out_last[match.rows]
