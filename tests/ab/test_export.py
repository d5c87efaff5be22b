"""`recsvc export-impressions`: both streams into complete JSON-lines files, with
rotation, a bounded directory, trimming detected, and no entry lost or repeated
across crashes; against a real Redis, real files, and the command itself."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from recsvc.ab import export
from recsvc.ab.export import Exporter, ExportError, trimmed_unread
from recsvc.ab.impressions import ImpressionLog
from recsvc.cli import main as cli
from recsvc.store import keys
from recsvc.web.app import create_app
from tests.conftest import settings_for

MB = 1024 * 1024


async def fill(redis: Redis, count: int, start: int = 0, outcome_every: int = 5) -> None:
    """``count`` impressions r<start>.. (and an outcome for every ``outcome_every``-th)
    through the service's own writer."""
    log = ImpressionLog(redis, 1_000_000)
    for k in range(start, start + count):
        log.impression({"request_id": f"r{k}", "user_id": f"u{k % 97}", "experiments": {}})
        if k % outcome_every == 0:
            log.outcome(f"r{k}", f"u{k % 97}", f"i{k % 13}", "click", 1796000000.0 + k)
    stop = asyncio.Event()
    stop.set()
    await log.run(stop)
    assert log.dropped == 0


def lines(out: Path, stream: str, pattern: str = "-*.jsonl") -> list[dict[str, Any]]:
    """Every line of the complete files of ``stream``, oldest file first."""
    files = sorted(out.glob(stream + pattern), key=lambda p: int(p.name.split("-")[2][:6]))
    return [orjson.loads(line) for f in files for line in f.read_bytes().splitlines()]


def exactly_once(out: Path, count: int) -> None:
    ids = [row["request_id"] for row in lines(out, "impressions")]
    assert ids == [f"r{k}" for k in range(count)], "lost, repeated or out of order"
    assert not list(out.glob("*.open"))


def exporter(redis: Redis, out: Path, **kw: Any) -> Exporter:
    options: dict[str, Any] = {"rotate_bytes": 64 * MB, "max_bytes": 1024 * MB} | kw
    return Exporter(redis, out, **options)


@pytest.mark.asyncio
async def test_one_shot_writes_what_the_service_logged_into_complete_files(
    seeded: Redis,
    redis_url: str,
    model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    app = create_app(settings_for(model_dir), redis_url)
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        answers = [
            await (await c.post("/v1/recommendations", json={"user_id": user})).json()
            for user in ("u1", "u2", "nobody")
        ]
        event = {
            "event_id": "exp-1",
            "user_id": "u1",
            "item_id": answers[0]["items"][0]["item_id"],
            "type": "click",
            "request_id": answers[0]["request_id"],
            "ts": time.time() - 5,
        }
        assert (await (await c.post("/v1/events", json=event)).json())["accepted"] == 1
    out = tmp_path / "out"
    argv = ["export-impressions", "--out", str(out), "--redis-url", redis_url]
    assert await asyncio.to_thread(cli.main, argv) == 0
    assert capsys.readouterr().out.startswith("exported 3 impressions and 1 outcomes; 2 files")
    [impressions] = out.glob("impressions-*.jsonl")
    [outcomes] = out.glob("outcomes-*.jsonl")
    assert not list(out.glob("*.open"))
    logged = [orjson.loads(f[b"json"]) for _, f in await seeded.xrange(keys.IMPRESSIONS)]
    assert [orjson.loads(line) for line in impressions.read_bytes().splitlines()] == logged
    assert [row["request_id"] for row in logged] == [a["request_id"] for a in answers]
    [outcome] = [orjson.loads(line) for line in outcomes.read_bytes().splitlines()]
    assert outcome == {
        "request_id": answers[0]["request_id"],
        "user_id": "u1",
        "item_id": event["item_id"],
        "type": "click",
        "ts": pytest.approx(event["ts"], abs=0.001),
    }
    # Nothing new: nothing written, no empty file; the entries stay for ab-report.
    assert await asyncio.to_thread(cli.main, argv) == 0
    assert capsys.readouterr().out.startswith("exported 0 impressions and 0 outcomes; 0 files")
    assert len(list(out.glob("*.jsonl"))) == 2 and await seeded.xlen(keys.IMPRESSIONS) == 3


@pytest.mark.asyncio
async def test_files_rotate_by_size_and_the_oldest_go_over_the_limit(
    aredis: Redis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await fill(aredis, 3000)
    out = tmp_path / "out"
    run = exporter(aredis, out, rotate_bytes=20_000, max_bytes=10 * MB, batch=100)
    summary = await run.run(follow=False)
    assert summary.written == {"impressions": 3000, "outcomes": 600}
    files = sorted(out.glob("impressions-*.jsonl"))
    assert len(files) > 5 and summary.files == len(list(out.glob("*.jsonl")))
    # A file is completed once a batch takes it to 20,000 bytes.
    assert all(20_000 <= f.stat().st_size < 20_000 + 100 * 100 for f in files[:-1])
    exactly_once(out, 3000)
    assert len(lines(out, "outcomes")) == 600
    # Over the limit: the oldest complete files go, logged and counted; the rest stay whole.
    await fill(aredis, 3000, start=3000)
    caplog.set_level(logging.WARNING, logger="recsvc.ab.export")
    run = exporter(aredis, out, rotate_bytes=20_000, max_bytes=100_000, batch=100)
    summary = await run.run(follow=False)
    kept = [f.stat().st_size for f in out.glob("*.jsonl")]
    assert sum(kept) <= 100_000 and summary.deleted_files > 0
    deleted = [r for r in caplog.records if "over --max-mb" in r.getMessage()]
    assert len(deleted) == summary.deleted_files
    ids = [int(row["request_id"][1:]) for row in lines(out, "impressions")]
    assert ids == list(range(ids[0], 6000)) and ids[0] > 3000  # the newest, contiguous


class Crash(Exception):
    """Stands for the process dying at that point (nothing after it runs)."""


class Crashing(Exporter):
    """An exporter that dies at one point of its ``crash_on``-th batch."""

    crash_on = 1

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches = 0

    def dies(self) -> bool:
        self.batches += 1
        return self.batches >= self.crash_on


class CrashBeforeAck(Crashing):
    """Dies after its lines are fsynced and checkpointed, before XACK."""

    async def _ack(self, name: str, entries: list[Any]) -> None:
        if self.dies():
            raise Crash
        await super()._ack(name, entries)


class CrashBeforeCheckpoint(Crashing):
    """Dies after its lines are fsynced, before the checkpoint records them."""

    def _append(self, s: export.StreamState, data: bytes) -> None:
        super()._append(s, data)
        if self.dies():
            raise Crash


class CrashBeforeWrite(Crashing):
    """Dies after reading a batch, before writing any of it."""

    def _append(self, s: export.StreamState, data: bytes) -> None:
        if self.dies():
            raise Crash
        super()._append(s, data)


@pytest.mark.asyncio
@pytest.mark.parametrize("crash_on", [1, 2])
@pytest.mark.parametrize("crashing", [CrashBeforeAck, CrashBeforeCheckpoint, CrashBeforeWrite])
async def test_a_crash_anywhere_in_a_batch_loses_and_repeats_nothing(
    aredis: Redis, tmp_path: Path, crashing: type[Crashing], crash_on: int
) -> None:
    """Crashing in its first batch, the run leaves a new file no checkpoint names;
    in its second, lines past the checkpoint of a file it had opened."""
    await fill(aredis, 450, outcome_every=10**9)
    out = tmp_path / "out"
    await exporter(aredis, out, rotate_bytes=20_000, batch=100).run(follow=False)
    exactly_once(out, 450)
    await fill(aredis, 450, start=450, outcome_every=10**9)
    run = crashing(aredis, out, rotate_bytes=20_000, max_bytes=MB, batch=100)
    run.crash_on = crash_on
    with pytest.raises(Crash):
        await run.run(follow=False)
    opened = crashing is not CrashBeforeWrite or crash_on > 1
    assert bool(list(out.glob("*.jsonl.open"))) == opened  # left as by a killed process
    pending = (await aredis.xpending(keys.IMPRESSIONS, export.GROUP))["pending"]
    assert pending == 100  # read, never acknowledged
    await fill(aredis, 100, start=900, outcome_every=10**9)
    summary = await exporter(aredis, out, rotate_bytes=20_000, batch=100).run(follow=False)
    exactly_once(out, 1000)
    # What the crashed run had checkpointed is not written again; the rest is.
    checkpointed = run.summary.written["impressions"]
    assert checkpointed == 100 * (crash_on - 1) + (100 if crashing is CrashBeforeAck else 0)
    assert summary.written["impressions"] == 550 - checkpointed
    assert (await aredis.xpending(keys.IMPRESSIONS, export.GROUP))["pending"] == 0


@pytest.mark.asyncio
async def test_entries_trimmed_before_export_are_reported(
    aredis: Redis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await fill(aredis, 200)
    out = tmp_path / "out"
    assert (await exporter(aredis, out).run(follow=False)).written["impressions"] == 200
    # The cap cuts past the last exported entry before the next export.
    await fill(aredis, 500, start=200)
    await aredis.xtrim(keys.IMPRESSIONS, maxlen=100, approximate=False)
    caplog.set_level(logging.WARNING, logger="recsvc.ab.export")
    summary = await exporter(aredis, out).run(follow=False)
    assert summary.written["impressions"] == 100
    version = int((await aredis.info("server"))["redis_version"].split(".")[0])
    if version >= 7:  # entries-added: counted
        assert summary.trimmed["impressions"] == 400
    else:
        assert summary.trimmed_uncounted["impressions"] == 1
    assert any("trimmed" in r.getMessage() for r in caplog.records)
    assert "trimmed by the stream cap before export: impressions " in summary.line()
    # Delivered, then trimmed before a crashed run could write them: counted exactly.
    await fill(aredis, 100, start=700)
    with pytest.raises(Crash):
        await CrashBeforeWrite(aredis, out, rotate_bytes=MB, max_bytes=2 * MB, batch=60).run(False)
    await aredis.xtrim(keys.IMPRESSIONS, maxlen=0, approximate=False)
    summary = await exporter(aredis, out).run(follow=False)
    assert summary.trimmed["impressions"] >= 60 and summary.written["impressions"] == 0


def test_trimming_is_counted_from_redis_7_fields() -> None:
    """XINFO STREAM / XINFO GROUPS as Redis 7 answers them (entries-added,
    entries-read), and as Redis 6 does (without)."""
    info = {"length": 100, "first-entry": (b"50-0", {}), "last-generated-id": b"149-0"}
    group = {"last-delivered-id": b"9-0"}
    assert trimmed_unread(info | {"entries-added": 150}, group | {"entries-read": 10}) == 40
    assert trimmed_unread(info, group) is None  # Redis 6: a gap it cannot count
    assert trimmed_unread(info, {"last-delivered-id": b"50-0"}) == 0  # the mark is still there
    assert trimmed_unread(info, {"last-delivered-id": b"0-0"}) == 0  # never read: cannot tell
    empty = {"length": 0, "first-entry": None, "last-generated-id": b"149-0"}
    assert trimmed_unread(empty, {"last-delivered-id": b"149-0"}) == 0
    assert trimmed_unread(empty, group) is None
    assert trimmed_unread(empty | {"entries-added": 150}, group | {"entries-read": 10}) == 140


@pytest.mark.asyncio
async def test_trim_removes_what_was_exported_and_keeps_the_mark(
    aredis: Redis, tmp_path: Path
) -> None:
    await fill(aredis, 300)
    out = tmp_path / "out"
    summary = await exporter(aredis, out, trim=True, batch=100).run(follow=False)
    assert summary.written["impressions"] == 300
    assert await aredis.xlen(keys.IMPRESSIONS) == 1  # the last exported entry
    await fill(aredis, 10, start=300)
    summary = await exporter(aredis, out, trim=True).run(follow=False)
    assert summary.trimmed_uncounted["impressions"] == 0 and summary.trimmed["impressions"] == 0
    exactly_once(out, 310)


@pytest.mark.asyncio
async def test_trim_keeps_what_a_running_canary_step_still_reads(
    aredis: Redis, tmp_path: Path
) -> None:
    """A controller taking over rebuilds its step from the streams: --trim leaves
    every entry from the step's start while the roll-out runs."""
    from dataclasses import replace

    from recsvc.ab.rollout import PROMOTED, RolloutStore, new_rollout

    await aredis.delete("{rollout}:state")
    await fill(aredis, 300)
    await asyncio.sleep(0.02)
    seconds, micros = await aredis.time()
    store = RolloutStore(aredis)
    r = new_rollout("ranker", "v1", "v2", 0.1, (0.5,), 100)
    r = replace(r, step_started_at=int(seconds) + int(micros) / 1e6)
    stored = await store.put(r, 0)
    assert stored is not None
    await asyncio.sleep(0.02)
    await fill(aredis, 10, start=300)  # within the step
    out = tmp_path / "out"
    summary = await exporter(aredis, out, trim=True, batch=100).run(follow=False)
    assert summary.written["impressions"] == 310
    kept = await aredis.xrange(keys.IMPRESSIONS)
    assert len(kept) == 10, len(kept)  # the step's, not only the last exported one
    assert await aredis.xlen(keys.OUTCOMES) == 2  # r300, r305
    # The roll-out ends: the next export trims up to its last exported entry.
    assert await store.put(replace(stored, status=PROMOTED, share=0.0), stored.rev)
    await fill(aredis, 5, start=310)
    await exporter(aredis, out, trim=True).run(follow=False)
    assert await aredis.xlen(keys.IMPRESSIONS) == 1
    exactly_once(out, 315)


@pytest.mark.asyncio
async def test_a_second_export_into_the_same_directory_is_refused(
    aredis: Redis, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    stop = asyncio.Event()
    running = asyncio.create_task(exporter(aredis, out).run(follow=True, stop=stop))
    for _ in range(100):
        if (out / export.STATE).exists():
            break
        await asyncio.sleep(0.02)
    with pytest.raises(ExportError, match="another export is writing"):
        await exporter(aredis, out).run(follow=False)
    stop.set()
    await running


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


@pytest.mark.e2e
@pytest.mark.asyncio
async def test_follow_exports_until_sigterm_and_survives_kill_9(
    aredis: Redis, redis_url: str, tmp_path: Path
) -> None:
    """The command as an operator runs it: --follow picks up entries as they come,
    a SIGKILL in the middle of its work (three times, at random moments) loses
    and repeats nothing, and SIGTERM completes the files and exits 0."""
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "recsvc", "export-impressions", "--follow", "--out", str(out)]
    argv += ["--redis-url", redis_url, "--rotate-mb", "0.05", "--rotate-secs", "1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSVC_")}
    rng = random.Random(7)
    written = 0
    for kill in range(4):
        await fill(aredis, 5000, start=written)
        written += 5000
        before = _mtime(out / export.STATE)
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        try:
            for _ in range(3000):  # until it has started (its checkpoint is written): 30 s
                if _mtime(out / export.STATE) != before:
                    break
                await asyncio.sleep(0.01)
            await fill(aredis, 2000, start=written)  # more arrive while it works
            written += 2000
            if kill < 3:
                await asyncio.sleep(rng.uniform(0.0, 0.2))
                proc.kill()  # wherever it is in a batch
                await asyncio.wait_for(proc.wait(), 30)
                continue
            for _ in range(150):  # complete files appear within --rotate-secs: 30 s at most
                if len(lines(out, "impressions")) >= written:
                    break
                await asyncio.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            stdout, _ = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0
    assert stdout.decode().startswith("exported "), stdout
    exactly_once(out, written)
    assert len(lines(out, "outcomes")) == written // 5


def test_a_limit_below_two_open_files_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["export-impressions", "--out", str(tmp_path), "--redis-url", "redis://127.0.0.1:1"]
    assert cli.main([*argv, "--rotate-mb", "64", "--max-mb", "100"]) == 2
    assert "--max-mb 100 is less than twice --rotate-mb 64" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*argv, "--rotate-mb", "0"])


@pytest.mark.asyncio
async def test_a_file_error_stops_the_export_instead_of_being_retried(
    aredis: Redis, tmp_path: Path
) -> None:
    """A disk error is not a Redis failure to wait out: --follow stops (the next
    run repairs the files from the checkpoint) and nothing is lost."""
    out = tmp_path / "out"
    running = asyncio.create_task(exporter(aredis, out).run(follow=True, stop=asyncio.Event()))
    for _ in range(250):  # started: its checkpoint is written
        if (out / export.STATE).exists():
            break
        await asyncio.sleep(0.02)
    (out / (export.STATE + ".tmp")).mkdir()  # the next checkpoint cannot be written
    await fill(aredis, 50)
    with pytest.raises(ExportError, match="cannot write the export"):
        await asyncio.wait_for(running, 10)
    (out / (export.STATE + ".tmp")).rmdir()
    await exporter(aredis, out).run(follow=False)
    exactly_once(out, 50)
