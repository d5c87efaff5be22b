"""The impression protocol's arithmetic on a case small enough to do by hand."""

from __future__ import annotations

import numpy as np
import pytest

from features.impression_eval import (
    NOTE,
    ImpressionEvalGroup,
    ImpressionEvalSet,
    evaluate,
    ndcg,
)


def _d(k: int) -> float:
    """The discount of 0-based rank k."""
    return float(1.0 / np.log2(k + 2.0))


def test_graded_ndcg_uses_the_labelled_items_best_first_as_the_ideal() -> None:
    grades = {7: 4, 3: 2}  # gains 15 and 3
    assert ndcg(np.asarray([7, 3, 1]), grades, 10) == pytest.approx(1.0)
    got = 3 * _d(0) + 15 * _d(2)
    assert ndcg(np.asarray([3, 1, 7]), grades, 10) == pytest.approx(got / (15 + 3 * _d(1)))
    assert ndcg(np.asarray([3, 1, 7]), grades, 2) == pytest.approx(3 / (15 + 3 * _d(1)))
    assert ndcg(np.asarray([1, 2]), grades, 10) == 0.0
    assert ndcg(np.asarray([1, 2]), {}, 10) == 0.0


def _group(
    candidates: list[int], shown: list[int], grades: dict[int, int], user: int
) -> ImpressionEvalGroup:
    # One feature column holding the item id: the "model" below scores by it.
    cand = np.asarray(candidates, dtype=np.int64)
    seen = np.asarray(shown, dtype=np.int64)
    return ImpressionEvalGroup(
        candidates=cand,
        matrix=cand[:, None].astype(np.float32),
        baselines={
            "popular": np.asarray([9, 8], np.int64),
            "recent": seen[::-1].copy(),
            "cooccurrence": np.zeros(0, np.int64),
        },
        shown=seen,
        shown_matrix=seen[:, None].astype(np.float32),
        grades=grades,
        user=user,
    )


def test_the_report_scores_served_and_reranked_lists_against_the_impressions_outcomes() -> None:
    test = ImpressionEvalSet(
        groups=[
            # The model serves the highest ids first: [5, 4, 3] of the candidates.
            _group([1, 3, 4, 5], shown=[3, 4, 6], grades={3: 2}, user=0),
            # Nothing labelled among its candidates: the served list scores 0.
            _group([1, 2], shown=[6, 7], grades={7: 4}, user=1),
        ],
        top_n=3,
        held_out=5,
        labelled=2,
        sampled=2,
    )
    report = evaluate(test, lambda m: m[:, 0].astype(np.float64))
    assert report["note"] == NOTE and "never shown" in NOTE
    assert (report["groups"], report["held_out_impressions"], report["top_n"]) == (2, 5, 3)
    served = report["served"]
    assert served["model"]["ndcg_at_3"] == pytest.approx((_d(2) + 0.0) / 2)
    assert served["model"]["hit_at_3"] == 0.5
    assert served["popular"]["ndcg_at_3"] == 0.0
    # "recent" here is the shown list reversed: [6, 4, 3] and [7, 6].
    assert served["recent"]["ndcg_at_3"] == pytest.approx((_d(2) + 1.0) / 2)
    shown = report["reranked_shown"]
    # Re-ranked by id: [6, 4, 3] and [7, 6]; the logged order: [3, 4, 6] and [6, 7].
    assert shown["model"]["ndcg_at_3"] == pytest.approx((_d(2) + 1.0) / 2)
    assert shown["logged_order"]["ndcg_at_3"] == pytest.approx((1.0 + _d(1)) / 2)
    assert report["candidate_recall"] == pytest.approx(0.5)
    baselines_only = evaluate(test, None)
    assert "model" not in baselines_only["served"]
    assert baselines_only["served"]["recent"] == served["recent"]
