"""`recsvc ab-report` from what the service logged: the sample-ratio check uses the
weights recorded with each exposure, and an outcome counts only for its own user."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from recsvc.ab import report as abreport
from recsvc.ab.experiments import parse
from recsvc.cli import main as cli
from recsvc.store import keys
from recsvc.web.app import create_app
from tests.conftest import settings_for

SPLIT = """
[[experiment]]
name = "split"
salt = "srm-1"
traffic = 1.0
  [[experiment.variant]]
  name = "control"
  weight = {control}
  [[experiment.variant]]
  name = "treatment"
  weight = {treatment}
  strategy = "popular"
"""
USERS = 400


async def serve_each_user_once(redis_url: str, model_dir: Path, path: Path, users: int) -> None:
    app = create_app(settings_for(model_dir, experiments=path), redis_url)
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        for k in range(users):  # unknown users: cheap default answers, still exposures
            resp = await c.post("/v1/recommendations", json={"user_id": f"visitor-{k}", "n": 2})
            assert resp.status == 200
    # Leaving the server flushed its impression log.


@pytest.mark.asyncio
async def test_a_90_10_split_passes_the_ratio_check_after_the_file_changed(
    seeded: Redis,
    redis_url: str,
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "experiments.toml"
    path.write_text(SPLIT.format(control=90, treatment=10))
    await serve_each_user_once(redis_url, model_dir, path, USERS)
    monkeypatch.setenv("RECSVC_EXPERIMENTS", str(path))
    argv = ["--json", "--redis-url", redis_url]

    async def report() -> dict[str, Any]:
        """`recsvc ab-report --json` in-process (a thread: it runs its own loop)."""
        capsys.readouterr()
        assert await asyncio.to_thread(cli.main, ["ab-report", *argv]) == 0
        [section] = json.loads(capsys.readouterr().out)["experiments"]
        return dict(section)

    healthy = await report()
    control, treatment = healthy["variants"]
    assert control["users"] + treatment["users"] == USERS
    assert 0.85 < control["users"] / USERS < 0.95
    assert not healthy["srm_alarm"] and healthy["srm_weights"] == {"recorded": USERS}
    # Someone edits the file (or it is gone): the split that served is still 90/10.
    path.write_text(SPLIT.format(control=50, treatment=50))
    edited = await report()
    assert edited["srm_pvalue"] == healthy["srm_pvalue"] and not edited["srm_alarm"]
    path.unlink()
    assert (await report())["srm_pvalue"] == healthy["srm_pvalue"]
    # Against the edited file's weights, as the report used to check, it alarms.
    stripped = [dict(e, weights=None) for e in await exposures(seeded)]
    config = parse(SPLIT.format(control=50, treatment=50), "edited", None)
    [old_way] = abreport.build(stripped, [], config)["experiments"]
    assert old_way["srm_alarm"] and old_way["srm_pvalue"] < 1e-20


async def exposures(redis: Redis) -> list[dict[str, Any]]:
    return await abreport.read_exposures(redis, 0.0)


@pytest.mark.asyncio
async def test_exposures_logged_without_weights_use_the_file_and_the_report_says_so(
    aredis: Redis,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Exposures as the service logged them before impressions ({ab}:exposures,
    one field per attribute) are still reported, checked against the file."""
    config = parse(SPLIT.format(control=90, treatment=10), "split", None)
    for k in range(200):
        user = f"old-{k}"
        variant = config.assign(user).variants["split"]
        await aredis.xadd(
            keys.LEGACY_EXPOSURES,
            {
                "request_id": f"r{k}",
                "user_id": user,
                "ts": "1796000000.000",
                "experiments": orjson.dumps({"split": variant}),
                "forced": b"[]",
                "items": orjson.dumps(["i1", "i2"]),
                "strategy": "model",
            },
        )
    await aredis.xadd(
        keys.OUTCOMES,
        {"request_id": "r0", "user_id": "old-0", "item_id": "i2", "type": "click", "ts": "1"},
    )
    path = tmp_path / "experiments.toml"
    path.write_text(SPLIT.format(control=90, treatment=10))
    monkeypatch.setenv("RECSVC_EXPERIMENTS", str(path))
    argv = ["ab-report", "--redis-url", redis_url]
    assert await asyncio.to_thread(cli.main, argv) == 0
    text = capsys.readouterr().out
    assert "200 users' from the experiments file" in text, text
    assert "SAMPLE RATIO MISMATCH" not in text
    assert await asyncio.to_thread(cli.main, [*argv, "--json"]) == 0
    [section] = json.loads(capsys.readouterr().out)["experiments"]
    assert section["srm_weights"] == {"file": 200} and not section["srm_alarm"]
    assert sum(v["clicks"] for v in section["variants"]) == 1


@pytest.mark.asyncio
async def test_an_outcome_posted_under_another_users_request_id_is_not_counted(
    seeded: Redis, redis_url: str, model_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "experiments.toml"
    path.write_text(SPLIT.format(control=50, treatment=50))
    app = create_app(settings_for(model_dir, experiments=path), redis_url)
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        mine = await (await c.post("/v1/recommendations", json={"user_id": "u1"})).json()
        shown = mine["items"][0]["item_id"]
        for k, (user, kind) in enumerate([("u2", "click"), ("u2", "purchase"), ("u1", "click")]):
            event = {
                "event_id": f"mix-{k}",
                "user_id": user,
                "item_id": shown,
                "type": kind,
                "request_id": mine["request_id"],
            }
            assert (await (await c.post("/v1/events", json=event)).json())["accepted"] == 1
    report = await abreport.report(seeded, None, "split", 0.0, None)
    [section] = report["experiments"]
    [variant] = [v for v in section["variants"] if v["exposures"]]
    # u1's own click counts; u2's click and purchase under u1's answer do not.
    assert (variant["clicks"], variant["purchases"]) == (1, 0)
    assert section["outcomes_of_another_user"] == 2
    text = abreport.format_report(report)
    assert "2 outcomes posted by another user than the exposure's left out" in text


def test_a_change_of_weights_during_the_window_is_accounted_user_by_user() -> None:
    """Half the users served under 50/50, half under 90/10: the expected split is
    their mixture (70/30), not either file."""

    def row(k: int, variant: str, control: float) -> dict[str, Any]:
        weights = {"traffic": 1.0, "variants": {"control": control, "treatment": 100 - control}}
        return {
            "request_id": f"r{k}",
            "user_id": f"u{k}",
            "experiments": {"split": variant},
            "forced": [],
            "items": ["a"],
            "weights": {"split": weights},
        }

    rows = [row(k, "control" if k % 2 else "treatment", 50) for k in range(500)]
    rows += [row(k, "control" if k % 10 else "treatment", 90) for k in range(500, 1000)]
    [section] = abreport.build(rows, [], None)["experiments"]
    assert [v["users"] for v in section["variants"]] == [700, 300]
    assert section["srm_pvalue"] > 0.5 and section["srm_weights_changed"]
    # Checked against either set of weights alone, the same users alarm.
    for control in (50, 90):
        fixed = [dict(r, weights={"split": row(0, "", control)["weights"]["split"]}) for r in rows]
        assert abreport.build(fixed, [], None)["experiments"][0]["srm_alarm"]


@pytest.mark.asyncio
async def test_exposures_are_read_chunk_by_chunk_in_order(
    aredis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only impressions that carry experiments are kept, across chunk boundaries
    (the chunk made small here; a million impressions in production)."""
    monkeypatch.setattr(abreport, "READ_CHUNK", 4)
    for k in range(25):
        experiments = {"split": "control"} if k % 3 == 0 else {}
        row = {"request_id": f"r{k}", "experiments": experiments, "items": []}
        await aredis.xadd(keys.IMPRESSIONS, {"json": orjson.dumps(row)})
    got = await abreport.read_exposures(aredis, 0.0)
    assert [e["request_id"] for e in got] == [f"r{k}" for k in range(0, 25, 3)]


def _figures(report: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [
        (s["experiment"], v["variant"], v["users"], v["exposures"], v["clicks"], v["purchases"])
        for s in report["experiments"]
        for v in s["variants"]
    ]


@pytest.mark.asyncio
async def test_the_report_reads_the_exported_files_once_the_streams_lost_them(
    seeded: Redis,
    redis_url: str,
    model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`ab-report --from DIR`: the exported files and what the streams still hold,
    each entry once; after the streams were trimmed (their cap, or --trim), the
    files alone give the same report."""
    from recsvc.ab.export import Exporter

    path = tmp_path / "experiments.toml"
    path.write_text(SPLIT.format(control=50, treatment=50))
    app = create_app(settings_for(model_dir, experiments=path), redis_url)
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        for k in range(80):
            user = f"u{k}"
            body = await (await c.post("/v1/recommendations", json={"user_id": user})).json()
            for kind in ("click", "purchase")[: k % 3]:
                event = {
                    "event_id": f"x-{k}-{kind}",
                    "user_id": user,
                    "item_id": body["items"][0]["item_id"],
                    "type": kind,
                    "request_id": body["request_id"],
                }
                assert (await (await c.post("/v1/events", json=event)).json())["accepted"] == 1
    streams = await abreport.report(seeded, None, None, 0.0, None)
    assert sum(f[3] for f in _figures(streams)) == 80 and sum(f[4] for f in _figures(streams)) > 0

    out = tmp_path / "export"
    out.mkdir()
    await Exporter(seeded, out, rotate_bytes=64 << 20, max_bytes=1 << 30).run(follow=False)
    both = await abreport.report(seeded, None, None, 0.0, None, out)
    assert _figures(both) == _figures(streams)
    clicked = sum(f[4] + f[5] for f in _figures(streams))  # one outcome per click, purchase
    assert both["exported"]["also_in_stream"] == 80 + clicked, both["exported"]

    await seeded.xtrim(keys.IMPRESSIONS, maxlen=0)
    await seeded.xtrim(keys.OUTCOMES, maxlen=0)
    assert (await abreport.report(seeded, None, None, 0.0, None))["experiments"] == []
    [imp_file] = sorted(out.glob("impressions-*.jsonl"))
    with imp_file.open("ab") as f:  # lines from elsewhere: skipped and counted
        f.write(b'{"request_id": 7}\nnot json\n[1, 2]')  # (no final newline: still read)
    files = await abreport.report(seeded, None, None, 0.0, None, out)
    assert _figures(files) == _figures(streams)
    assert files["exported"]["skipped"] == 3 and files["exported"]["also_in_stream"] == 0
    assert files["exported"]["exposures"] == 80

    argv = ["ab-report", "--redis-url", redis_url, "--from", str(out)]
    assert await asyncio.to_thread(cli.main, argv) == 0
    text = capsys.readouterr().out
    assert "experiment split" in text and "80 exposures" in text and "3 lines skipped" in text
    assert await asyncio.to_thread(cli.main, [*argv[:-1], str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
