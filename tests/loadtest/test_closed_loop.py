"""loadtest/closed_loop.py end to end at its tiny size: a first simulated period
served by the demo's model, two models trained from it, both served to a second."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest import closed_loop


def test_the_closed_loop_compares_both_models_on_later_traffic(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    closed_loop.main(["--tiny", "--work", str(tmp_path)])
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
    for model in (sampled, impress):  # both protocols, on the same held-out data
        assert model["next_event_groups"] == sampled["next_event_groups"] > 0
        assert model["impression_groups"] == sampled["impression_groups"] > 0
        assert 0.0 < model["impression_protocol"]["served_model"] <= 1.0
    # The second period: each model served about half, and nothing else served.
    served = run["second_period"]["served"]
    assert set(served) == {f"{arm}/{run['models'][arm]['version']}" for arm in closed_loop.ARMS}
    assert sum(m["requests"] for m in served.values()) == closed_loop.TINY.second_requests
    assert all(m["requests"] > 0.25 * closed_loop.TINY.second_requests for m in served.values())
    for name in closed_loop.FIGURES:
        d = run["difference"][name]
        assert d["low"] <= d["diff"] <= d["high"]
    # The same shoppers in the first period (one model for all): where each arm started.
    before = run["first_period_same_users"]
    assert sum(before[arm]["users"] for arm in closed_loop.ARMS) <= first["served"][base]["users"]
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
