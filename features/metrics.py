"""Ranking metrics for one relevant item per group (the labelled event), and top n."""

from __future__ import annotations

import numpy as np


def rank_of(scores: np.ndarray, positive: int) -> float:
    """0-based rank of ``scores[positive]``; ties count half (random tie-break)."""
    s = scores[positive]
    higher = float(np.count_nonzero(scores > s))
    ties = float(np.count_nonzero(scores == s)) - 1.0
    return higher + ties / 2.0


def summarize(ranks: np.ndarray) -> dict[str, float]:
    """NDCG@10, recall@10, recall@50 and MRR over groups with one relevant item."""
    if len(ranks) == 0:
        return {"ndcg_at_10": 0.0, "recall_at_10": 0.0, "recall_at_50": 0.0, "mrr": 0.0}
    ndcg = np.where(ranks < 10, 1.0 / np.log2(ranks + 2.0), 0.0)
    return {
        "ndcg_at_10": float(ndcg.mean()),
        "recall_at_10": float((ranks < 10).mean()),
        "recall_at_50": float((ranks < 50).mean()),
        "mrr": float((1.0 / (ranks + 1.0)).mean()),
    }


def top_n(scores: np.ndarray, n: int) -> np.ndarray:
    """Positions of the n best scores, best first (argpartition, then sort the few);
    ties keep the earlier position. Serving and evaluation both rank with this."""
    if n >= len(scores):
        return np.argsort(-scores, kind="stable")
    part = np.sort(np.argpartition(-scores, n - 1)[:n])
    return part[np.argsort(-scores[part], kind="stable")]
