"""Reading co-visitation neighbours from the item rows (pure numpy, no per-item loops)."""

from __future__ import annotations

import numpy as np

from features.events import COVISIT_HALF_LIFE, COVISIT_NEIGHBOURS
from features.state import COL_NBR, COL_NBR_REF, COL_NBR_SCORE, ItemTable


def neighbours(table: ItemTable, items: np.ndarray, now: float) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour indices and their pair counts decayed to ``now``, shape
    (len(items), COVISIT_NEIGHBOURS); empty slots have index -1 and count 0."""
    rows = table.raw[items]
    idx = rows[:, COL_NBR : COL_NBR + COVISIT_NEIGHBOURS].astype(np.int64) - 1
    dt = np.maximum(now - rows[:, COL_NBR_REF], 0.0)
    scores = (
        rows[:, COL_NBR_SCORE : COL_NBR_SCORE + COVISIT_NEIGHBOURS]
        * np.exp2(-dt / COVISIT_HALF_LIFE)[:, None]
    )
    return idx, np.where(idx >= 0, scores, 0.0)


def aggregate(table: ItemTable, items: np.ndarray, now: float) -> tuple[np.ndarray, np.ndarray]:
    """Neighbours of ``items`` with their summed counts, strongest first."""
    idx, scores = neighbours(table, items, now)
    keep = idx.ravel() >= 0
    flat_idx, flat_scores = idx.ravel()[keep], scores.ravel()[keep]
    if not len(flat_idx):
        return flat_idx, flat_scores
    unique, inverse = np.unique(flat_idx, return_inverse=True)
    totals = np.bincount(inverse, weights=flat_scores)
    order = np.argsort(-totals, kind="stable")
    return unique[order], totals[order]


def scores_for(
    table: ItemTable, items: np.ndarray, candidates: np.ndarray, now: float
) -> tuple[np.ndarray, np.ndarray]:
    """For each candidate, its summed co-visit counts with all of ``items`` and with
    the first of them (the user's newest), from one comparison matrix."""
    idx, scores = neighbours(table, items, now)
    match = candidates[:, None] == idx.ravel()[None, :]
    first = idx.shape[1]
    return np.asarray(match @ scores.ravel()), np.asarray(match[:, :first] @ scores[0])
