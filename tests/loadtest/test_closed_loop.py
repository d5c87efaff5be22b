"""loadtest/closed_loop.py end to end at its tiny size: a first simulated period
served by the demo's model, models trained from it (with the position ablation
arm), all served to a second."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest import closed_loop


def test_the_closed_loop_compares_both_models_on_later_traffic(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    closed_loop.main(["--tiny", "--ablate-positions", "--work", str(tmp_path)])
    arms = (*closed_loop.ARMS, closed_loop.NOPOS)
    result = json.loads(capsys.readouterr().out)
    [run] = result["seeds"]
    first = run["first_period"]
    assert first["summary"]["requests"] == closed_loop.TINY.first_requests
    assert first["summary"]["errors"] == 0 and first["summary"]["clicks"] > 0
    [base] = first["served"]
    assert base.startswith("ranker/")
    sampled, impress = run["models"]["sampled"], run["models"]["impress"]
    assert sampled["impressions"] is None
    info = impress["impressions"]
    assert info["train_groups_from_impressions"] > 0
    assert info["held_out_impressions"] > 0 and info["position_bias"]
    # The ablation arm: the same impression groups, every position factor held at 0.
    nopos = run["models"][closed_loop.NOPOS]["impressions"]
    assert nopos["train_groups_from_impressions"] == info["train_groups_from_impressions"]
    assert max(abs(f) for f in nopos["position_bias"].values()) < 1e-6
    assert max(abs(f) for f in info["position_bias"].values()) > 1e-3
    for model in (sampled, impress):  # both protocols, on the same held-out data
        assert model["next_event_groups"] == sampled["next_event_groups"] > 0
        assert model["impression_groups"] == sampled["impression_groups"] > 0
        assert 0.0 < model["impression_protocol"]["served_model"] <= 1.0
    # The second period: each model served about a third, and nothing else served.
    served = run["second_period"]["served"]
    assert set(served) == {f"{arm}/{run['models'][arm]['version']}" for arm in arms}
    assert sum(m["requests"] for m in served.values()) == closed_loop.TINY.second_requests
    assert all(m["requests"] > 0.2 * closed_loop.TINY.second_requests for m in served.values())
    assert set(run["ablation"]) == {"impress_minus_nopos", "nopos_minus_sampled"}
    for name in closed_loop.FIGURES:
        d = run["difference"][name]
        assert d["low"] <= d["diff"] <= d["high"]
    # The same shoppers in the first period (one model for all): where each arm started.
    before = run["first_period_same_users"]
    assert sum(before[arm]["users"] for arm in arms) <= first["served"][base]["users"]
    for name in closed_loop.FIGURES:
        change = {
            arm: served[f"{arm}/{run['models'][arm]['version']}"][name] - before[arm][name]
            for arm in closed_loop.ARMS
        }
        did = run["difference_in_differences"][name]
        assert did["diff"] == pytest.approx(change["impress"] - change["sampled"], abs=1e-4)
    summary = result["impress_minus_sampled"]
    assert summary["difference"]["oracle_ndcg_at_10"] == [
        run["difference"]["oracle_ndcg_at_10"]["diff"]
    ]
