"""A/B assignment (golden vectors, split accuracy), validation, flags, exposure log,
and the report's statistics."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from recsvc.ab import report as abreport
from recsvc.ab.experiments import ExperimentsError, bucket, murmur3_32, parse
from recsvc.ab.stats import chi2_sf, ratio_lift, relative_lift, srm_pvalue
from recsvc.store import keys
from recsvc.web.app import create_app
from tests.conftest import settings_for
from tests.ops.test_metrics import delta, scrape

AB = """
[[experiment]]
name = "ranker-v2"
salt = "2026-11"
traffic = 1.0
allow_override = true
  [[experiment.variant]]
  name = "control"
  weight = 50
  strategy = "popular"
  [[experiment.variant]]
  name = "treatment"
  weight = 50
  model = "ranker"

[[experiment]]
name = "sources"
salt = "s1"
traffic = 0.5
allow_override = false
  [[experiment.variant]]
  name = "all"
  weight = 90
  [[experiment.variant]]
  name = "no-popular"
  weight = 10
  sources = ["recent", "covisit", "category"]
"""
TOKEN = "experiments-admin-token"


def test_murmur3_matches_the_reference_implementation() -> None:
    assert murmur3_32(b"") == 0
    assert murmur3_32(b"hello") == 0x248BFA47
    assert murmur3_32(b"hello", 1) == 0xBB4ABCAD
    assert murmur3_32(b"The quick brown fox jumps over the lazy dog") == 0x2E4FF723


@pytest.mark.parametrize(
    ("user", "traffic_bucket", "variant_bucket", "variant"),
    [
        ("u1", 2038, 6645, "treatment"),
        ("u2", 1578, 3143, "control"),
        ("user-42", 1804, 5614, "treatment"),
        ("visitor-7", 8408, 3888, "control"),
    ],
)
def test_golden_vectors(user: str, traffic_bucket: int, variant_bucket: int, variant: str) -> None:
    """Frozen: changing these reshuffles every running experiment's users."""
    assert bucket("2026-11", user, 0) == traffic_bucket
    assert bucket("2026-11", user, 86028157) == variant_bucket
    assert parse(AB, "ab", {"ranker"}).assign(user).variants["ranker-v2"] == variant


@pytest.mark.parametrize("weights", [(50, 50), (90, 10)])
def test_100k_users_split_by_weight_within_one_percent(weights: tuple[int, int]) -> None:
    text = f"""
[[experiment]]
name = "split"
salt = "split-{weights[0]}"
  [[experiment.variant]]
  name = "a"
  weight = {weights[0]}
  [[experiment.variant]]
  name = "b"
  weight = {weights[1]}
"""
    experiments = parse(text, "t", set())
    counts = {"a": 0, "b": 0}
    for k in range(100_000):
        counts[experiments.assign(f"user-{k}").variants["split"]] += 1
    share = counts["a"] / 100_000
    assert abs(share - weights[0] / 100) <= 0.01, counts
    assert srm_pvalue([counts["a"], counts["b"]], list(map(float, weights))) > 0.001


def test_traffic_share_and_no_assignment_outside_it() -> None:
    experiments = parse(AB, "ab", {"ranker"})
    inside = sum("sources" in experiments.assign(f"v{k}").variants for k in range(20_000))
    assert abs(inside / 20_000 - 0.5) < 0.015


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('model = "ranker"', 'model = "nope"'), "variant 'treatment': unknown model 'nope'"),
        (('strategy = "popular"', 'strategy = "magic"'), "unknown strategy 'magic'"),
        (("weight = 10", "weight = 0"), "variant 'no-popular': weight must be > 0"),
        (('sources = ["recent"', 'model = "ranker"\n  sources = ["recent"'), "both set 'model'"),
        (("traffic = 0.5", "traffic = 2"), "experiment 'sources': traffic must be within 0..1"),
        (("[[experiment]]", "[[experiment]"), "not valid TOML"),
    ],
)
def test_bad_files_are_refused_with_a_reason(change: tuple[str, str], message: str) -> None:
    with pytest.raises(ExperimentsError, match=message.replace("[", r"\[")):
        parse(AB.replace(*change, 1), "ab", {"ranker"})


def test_statistics() -> None:
    assert chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, abs=1e-9)
    assert chi2_sf(9.487729036781154, 4) == pytest.approx(0.05, abs=1e-9)
    assert srm_pvalue([5000, 5000], [1, 1]) == pytest.approx(1.0)
    # chi-square 36 with 1 degree of freedom: p = erfc(sqrt(18)), independently.
    assert srm_pvalue([5300, 4700], [1, 1]) == pytest.approx(math.erfc(math.sqrt(18)), rel=1e-9)
    lift = relative_lift(600, 5000, 500, 5000)
    assert lift is not None and lift[0] == pytest.approx(0.2) and 0 < lift[1] < 0.2 < lift[2]
    assert relative_lift(0, 10, 5, 10) is None


def test_lift_intervals_are_per_user() -> None:
    """One exposure per user: the delta method agrees with the independent-trials
    interval. The same totals from a few heavy users: a wider interval."""
    single = ratio_lift(
        [1.0] * 600 + [0.0] * 4400, [1.0] * 5000, [1.0] * 500 + [0.0] * 4500, [1.0] * 5000
    )
    trials = relative_lift(600, 5000, 500, 5000)
    assert single is not None and trials is not None
    assert single == pytest.approx(trials, rel=0.01)
    clustered = ratio_lift(
        [60.0] * 10 + [0.0] * 40, [100.0] * 50, [50.0] * 10 + [0.0] * 40, [100.0] * 50
    )
    assert clustered is not None and clustered[0] == pytest.approx(0.2)
    assert clustered[2] - clustered[1] > 5 * (single[2] - single[1])


def test_report_counts_clicks_on_shown_items_and_leaves_forced_out() -> None:
    def exp(rid: str, variant: str, items: list[str], forced: bool = False) -> dict[str, Any]:
        return {
            "request_id": rid,
            "user_id": f"user-{rid}",
            "experiments": {"ranker-v2": variant},
            "forced": ["ranker-v2"] if forced else [],
            "items": items,
            "weights": None,
        }

    exposures = [
        exp("r1", "control", ["a", "b"]),
        exp("r2", "control", ["a"]),
        exp("r3", "treatment", ["c"]),
        exp("r4", "treatment", ["d"], forced=True),
    ]
    outcomes = [
        {"request_id": rid, "user_id": f"user-{rid}", "item_id": item, "type": kind}
        for rid, item, kind in [
            ("r1", "z", "click"),  # not shown: not counted
            ("r2", "a", "click"),
            ("r3", "c", "click"),
            ("r3", "c", "purchase"),
            ("r4", "d", "click"),
        ]
    ]
    result = abreport.build(exposures, outcomes, parse(AB, "ab", {"ranker"}), None, {"c": 9.5})
    [section] = result["experiments"]
    control, treatment = section["variants"]
    assert (control["exposures"], control["clicks"], control["purchases"]) == (2, 1, 0)
    assert (treatment["exposures"], treatment["clicks"], treatment["purchases"]) == (1, 1, 1)
    assert treatment["revenue"] == 9.5 and section["forced_excluded"] == 1
    # A variant since removed from the file still gets a report, not a crash.
    exposures.append(exp("r5", "retired", ["e"]))
    result = abreport.build(exposures, outcomes, parse(AB, "ab", {"ranker"}), None, None)
    assert [v["variant"] for v in result["experiments"][0]["variants"]][-1] == "retired"


@pytest.mark.asyncio
async def test_experiments_through_the_service(
    seeded: Redis, redis_url: str, model_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "experiments.toml"
    path.write_text(AB)
    settings = settings_for(model_dir, experiments=path, admin_token=TOKEN)
    async with TestClient(TestServer(create_app(settings, redis_url), host="127.0.0.1")) as c:
        assigned = await (await c.get("/v1/experiments/u1")).json()
        assert assigned["experiments"]["ranker-v2"] == "treatment"
        before = await scrape(c)
        body = await (await c.post("/v1/recommendations", json={"user_id": "u1"})).json()
        assert body["experiments"]["ranker-v2"] == "treatment" and "forced" not in body
        assert body["strategy"] == "model"
        # Forced by body and by header where allowed; ignored where not.
        forced = await (
            await c.post(
                "/v1/recommendations",
                json={"user_id": "u1", "flags": {"ranker-v2": "control"}},
            )
        ).json()
        assert forced["strategy"] == "popular" and forced["forced"] == ["ranker-v2"]
        # Latency per variant and strategy: once per experiment the request is in.
        after, count = await scrape(c), "recsvc_variant_recommendation_duration_seconds_count"
        for answer in (body, forced):
            for experiment, variant in answer["experiments"].items():
                labels = {"experiment": experiment, "variant": variant}
                assert delta(before, after, count, strategy=answer["strategy"], **labels) == 1
        header = {"X-Recsvc-Flags": "ranker-v2=control,sources=no-popular"}
        by_header = await (
            await c.post("/v1/recommendations", json={"user_id": "u1"}, headers=header)
        ).json()
        assert by_header["experiments"]["ranker-v2"] == "control"
        assert by_header["forced"] == ["ranker-v2"]  # 'sources' does not allow overrides
        bad = await c.post(
            "/v1/recommendations", json={"user_id": "u1"}, headers={"X-Recsvc-Flags": "oops"}
        )
        assert bad.status == 400
        assert (await bad.json())["error"]["field"] == "header:X-Recsvc-Flags"
        # Outcomes attributed by request_id, exposures logged off the response path.
        event = {
            "event_id": "ab-click-1",
            "user_id": "u1",
            "item_id": body["items"][0]["item_id"],
            "type": "click",
            "request_id": body["request_id"],
        }
        assert (await (await c.post("/v1/events", json=event)).json())["accepted"] == 1
        for _ in range(100):  # written by a background task: up to 5 s
            if await seeded.xlen(keys.OUTCOMES) >= 1:
                break
            await asyncio.sleep(0.05)
        assert await seeded.xlen(keys.IMPRESSIONS) == 3
        report = await abreport.report(seeded, None, "ranker-v2", 0.0, None)
        [section] = report["experiments"]
        assert section["forced_excluded"] == 2
        [treatment] = [v for v in section["variants"] if v["variant"] == "treatment"]
        assert (treatment["exposures"], treatment["clicks"]) == (1, 1)
        # A bad file on reload is refused with the reason; the old one keeps serving.
        path.write_text(AB.replace('model = "ranker"', 'model = "missing"'))
        auth = {"Authorization": f"Bearer {TOKEN}"}
        resp = await c.post("/admin/experiments/reload", headers=auth)
        assert resp.status == 409
        assert "unknown model 'missing'" in (await resp.json())["message"]
        again = await (await c.post("/v1/recommendations", json={"user_id": "u1"})).json()
        assert again["experiments"]["ranker-v2"] == "treatment" and again["strategy"] == "model"
        path.write_text(AB.replace('salt = "2026-11"', 'salt = "2026-12"'))
        resp = await c.post("/admin/experiments/reload", headers=auth)
        assert resp.status == 200 and (await resp.json())["loaded"] is True
