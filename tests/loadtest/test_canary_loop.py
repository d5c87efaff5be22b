"""loadtest/canary_loop.py end to end at its tiny size: shoppers, the service's
own impression log, its export, a version trained from it, and the canary the
service steps up to everyone with no hand step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest import canary_loop


@pytest.mark.timeout(300)
def test_the_whole_loop_trains_from_the_services_impressions_and_canaries_the_result(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    canary_loop.main(["--tiny", "--work", str(tmp_path)])
    result = json.loads(capsys.readouterr().out)
    assert result["first_period"]["requests"] == canary_loop.TINY.first_requests
    # The service's log, exported: every first-period answer is an impression.
    assert f"exported {canary_loop.TINY.first_requests} impressions" in result["export"]["line"]
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "impressions").glob("*.jsonl")) == [
        "impressions",
        "outcomes",
    ]
    info = result["candidate"]["impressions"]
    assert info["train_groups_from_impressions"] > 0 and info["held_out_impressions"] > 0
    canary = result["canary"]
    assert canary["status"] == "promoted", canary["reason"]
    assert canary["shares"] == [0.1, 0.25, 0.5]
    assert canary["serving"] == result["candidate"]["version"]
    assert canary["history"][-4:] == ["started", "stepped_up", "stepped_up", "promoted"]
    assert {v.split("/")[1] for v in canary["served"]} >= {
        result["stable"],
        result["candidate"]["version"],
    }
