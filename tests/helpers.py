"""Small helpers shared by tests (no fixtures here)."""

from __future__ import annotations

import numpy as np

from features.events import COVISIT_NEIGHBOURS
from features.state import COL_NBR, COL_NBR_SCORE


def canonical(raw: np.ndarray) -> np.ndarray:
    """Item rows with each row's neighbour slots sorted by neighbour: which slot a
    neighbour takes depends on the order partners were listed, its count does not."""
    out = raw.copy()
    slots = out[:, COL_NBR : COL_NBR + COVISIT_NEIGHBOURS]
    scores = out[:, COL_NBR_SCORE : COL_NBR_SCORE + COVISIT_NEIGHBOURS]
    order = np.argsort(slots, axis=1, kind="stable")
    out[:, COL_NBR : COL_NBR + COVISIT_NEIGHBOURS] = np.take_along_axis(slots, order, 1)
    out[:, COL_NBR_SCORE : COL_NBR_SCORE + COVISIT_NEIGHBOURS] = np.take_along_axis(
        scores, order, 1
    )
    return out


def neighbour_counts(raw: np.ndarray) -> np.ndarray:
    """Filled co-visitation slots per item row."""
    return np.asarray((raw[:, COL_NBR : COL_NBR + COVISIT_NEIGHBOURS] > 0).sum(axis=1))
