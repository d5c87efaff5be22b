"""`recsvc ab-report --from DIR` against what an outside review (s26) threw at
it, over a real redis-server, a real HTTP server on 127.0.0.1 and the real
exporter: hostile lines, an export still writing with --trim, the same entries
in two files, and --since with a client clock behind. Each failed before the
fix (a traceback, 1 of 30 exposures, 40 of 20, 0 of 10 clicks)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from recsvc.ab import report as abreport
from recsvc.ab.export import Exporter
from recsvc.cli import main as cli
from recsvc.store import keys
from recsvc.web.app import create_app
from tests.ab.test_report import SPLIT
from tests.conftest import settings_for

pytestmark = pytest.mark.asyncio


def _totals(report: dict[str, Any]) -> tuple[int, int]:
    """(exposures, clicks) over every variant of every experiment."""
    rows = [v for s in report["experiments"] for v in s["variants"]]
    return sum(v["exposures"] for v in rows), sum(v["clicks"] for v in rows)


async def _serve(
    redis_url: str, model_dir: Path, tmp_path: Path, users: int, click_ts: float | None = None
) -> list[dict[str, Any]]:
    """`users` answers in experiment `split`; with click_ts, a click on each
    answer's first item sent with that event time. Returns the answers."""
    path = tmp_path / "experiments.toml"
    path.write_text(SPLIT.format(control=50, treatment=50))
    app = create_app(settings_for(model_dir, experiments=path), redis_url)
    bodies = []
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        for k in range(users):
            body = await (await c.post("/v1/recommendations", json={"user_id": f"u{k}"})).json()
            bodies.append(body)
            if click_ts is not None:
                event = {
                    "event_id": f"c-{k}",
                    "user_id": f"u{k}",
                    "item_id": body["items"][0]["item_id"],
                    "type": "click",
                    "request_id": body["request_id"],
                    "ts": click_ts,
                }
                got = await (await c.post("/v1/events", json=event)).json()
                assert got["accepted"] == 1, got
    return bodies


async def _export(client: Redis, out: Path) -> None:
    out.mkdir(exist_ok=True)  # noqa: ASYNC240
    await Exporter(client, out, rotate_bytes=64 << 20, max_bytes=1 << 30).run(follow=False)


# -- 1. lines that pass _is_exposure but crash build() -------------------------

VALID = {
    "request_id": "r-ok",
    "user_id": "u-ok",
    "ts": 0.0,
    "experiments": {"split": "control"},
    "weights": {},
    "forced": [],
    "items": ["i1"],
}


@pytest.mark.parametrize(
    "hostile",
    [
        {"items": [["i1"]]},  # unhashable item: set(e["items"])
        {"forced": [["split"]]},  # unhashable forced name: set(e["forced"])
        {"weights": {"split": 5}},  # recorded["variants"] on an int
        {"weights": {"split": {}}},  # KeyError 'variants'
        {"weights": {"split": {"variants": ["control"]}}},  # list.get
        {"weights": {"split": {"variants": {"control": 0, "treatment": 0}}}},  # w / 0
    ],
    ids=["items", "forced", "weights-int", "weights-no-variants", "variants-list", "zero"],
)
async def test_a_hostile_exported_line_is_skipped_not_a_traceback(
    seeded: Redis, redis_url: str, tmp_path: Path, hostile: dict[str, Any]
) -> None:
    out = tmp_path / "export"
    out.mkdir()
    bad = {**VALID, "request_id": "r-bad", "user_id": "u-bad", **hostile}
    (out / "impressions-20250101T000000Z-000001.jsonl").write_bytes(
        orjson.dumps(VALID) + b"\n" + orjson.dumps(bad) + b"\n"
    )
    argv = ["ab-report", "--redis-url", redis_url, "--from", str(out), "--json"]
    # Was: TypeError / KeyError / AttributeError / ZeroDivisionError out of build().
    assert await asyncio.to_thread(cli.main, argv) == 0
    report = await abreport.report(seeded, None, None, 0.0, None, out)
    assert report["exported"]["skipped"] == 1 and report["exported"]["exposures"] == 1


# -- 2. export --follow --trim: what sits in the .open file is in no source -----


@pytest.mark.timeout(120)
async def test_follow_with_trim_leaves_nothing_invisible_to_the_report(
    seeded: Redis, redis_url: str, model_dir: Path, tmp_path: Path
) -> None:
    await _serve(redis_url, model_dir, tmp_path, 30)
    streams = await abreport.report(seeded, None, None, 0.0, None)
    assert _totals(streams)[0] == 30
    out = tmp_path / "export"
    out.mkdir()
    stop = asyncio.Event()
    exporter = Exporter(
        seeded, out, rotate_bytes=64 << 20, max_bytes=1 << 30, rotate_secs=600.0, trim=True
    )
    task = asyncio.create_task(exporter.run(follow=True, stop=stop))
    try:
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline:  # exported, acknowledged and trimmed
            if (
                exporter.summary.written["impressions"] == 30
                and await seeded.xlen(keys.IMPRESSIONS) <= 1
            ):
                break
            await asyncio.sleep(0.1)
        assert exporter.summary.written["impressions"] == 30
        assert list(out.glob("impressions-*.jsonl.open"))  # the export is still running
        both = await abreport.report(seeded, None, None, 0.0, None, out)
        # Was 1 (the entry --trim keeps as its mark): 29 were only in the .open file.
        assert _totals(both)[0] == 30, both.get("exported")
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 20.0)


# -- 3. the same impression in two files counts twice --------------------------


async def test_an_impression_in_two_files_counts_once(
    seeded: Redis, redis_url: str, model_dir: Path, tmp_path: Path
) -> None:
    await _serve(redis_url, model_dir, tmp_path, 20)
    out = tmp_path / "export"
    await _export(seeded, out)
    await seeded.xtrim(keys.IMPRESSIONS, maxlen=0)
    [done] = sorted(out.glob("impressions-*.jsonl"))
    # A second copy under the exporter's own naming (an archive restored, a
    # re-export after a lost checkpoint): same request ids, counted once.
    stamp, seq = done.name.removesuffix(".jsonl").split("-")[1:]
    shutil.copy(done, out / f"impressions-{stamp}-{int(seq) + 1:06d}.jsonl")
    # A file the exporter did not name is not read at all.
    shutil.copy(done, out / done.name.replace(".jsonl", "-copy.jsonl"))
    files = await abreport.report(seeded, None, None, 0.0, None, out)
    assert _totals(files)[0] == 20, files["exported"]
    assert files["exported"]["duplicates"] == 20 and files["exported"]["files"] == 2


# -- 4. --since: streams filter outcomes by entry id, files by the event's ts ---


async def test_since_keeps_the_same_outcomes_once_the_streams_are_trimmed(
    seeded: Redis, redis_url: str, model_dir: Path, tmp_path: Path
) -> None:
    since = time.time()
    # A client clock 20 s behind: events carry their own ts (accepted, in the past).
    await _serve(redis_url, model_dir, tmp_path, 10, click_ts=since - 20.0)
    streams = await abreport.report(seeded, None, None, since, None)
    assert _totals(streams) == (10, 10)
    out = tmp_path / "export"
    await _export(seeded, out)
    await seeded.xtrim(keys.IMPRESSIONS, maxlen=0)
    await seeded.xtrim(keys.OUTCOMES, maxlen=0)
    files = await abreport.report(seeded, None, None, since, None, out)
    assert _totals(files) == _totals(streams), files["exported"]  # was (10, 0)
