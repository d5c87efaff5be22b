"""The whole loop on the demo, no hand step: shoppers react to what they are
shown, the service logs its impressions, `export-impressions` moves them to
files, a new version is trained from them, canaried, and promoted or rolled
back by the service's own controller.

1. generate the shop (the demo's generator; shoppers with known tastes),
   train the stable version ``ranker`` and pin it (`recsvc models promote`);
2. serve it (private redis-server, the service in this process on a free
   loopback port) to a first simulated period; the applied events are appended
   to a copy of the log, the impressions are the service's own log;
3. export the impression and outcome streams with the export command's code;
4. train a new version of ``ranker`` from the extended log and the exported
   impressions (``--bad``: with shuffled labels instead, which must be rolled
   back);
5. start it as a canary (``--canary``, then 25% and 50%) and run shoppers until
   the record says promoted or rolled back (or the budget ends), then report
   the record: status, reason, the shares it went through, the last guardrail
   figures, and each version's served-list quality in that period.

One JSON object on stdout. ``--tiny`` is the size the test suite runs.

    taskset -c 0 .venv/bin/python -m loadtest.canary_loop [--bad] [--tiny]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from aiohttp import web
from redis.asyncio import Redis

from features.dataset import DatasetConfig
from features.logs import write_catalogue, write_events
from features.synthetic import SyntheticConfig, generate
from features.trainer import TrainParams
from loadtest.closed_loop import _free_port, _split_at
from recsvc.ab import export
from recsvc.ab.rollout import Rollout, RolloutStore
from recsvc.cli import rollouts, simulate, training
from recsvc.cli import seed as seeding
from recsvc.ops.embedded import EmbeddedRedis
from recsvc.settings import Settings
from recsvc.web.app import create_app


@dataclass(frozen=True, slots=True)
class Loop:
    shop: SyntheticConfig
    shoppers: int = 2000
    first_requests: int = 20_000
    canary_requests: int = 60_000
    duration: float = 900.0
    concurrency: int = 8
    train_groups: int = 30_000
    trees: int = 100
    canary: str = "5%"
    min_exposures: int = 2000
    outcome_wait: float = 5.0


TINY = Loop(
    shop=SyntheticConfig(n_users=400, n_items=300, n_events=15_000, n_categories=12, seed=3),
    shoppers=400,
    first_requests=1500,
    canary_requests=12_000,
    duration=120.0,
    concurrency=4,
    train_groups=1500,
    trees=30,
    canary="10%",
    min_exposures=150,
    outcome_wait=0.5,
)


def _settings(work: Path, loop: Loop) -> Settings:
    """The demo's service with the native scorer, deadlines a shared core does not
    trip, and roll-out timings for a run of minutes."""
    return Settings(
        model_dir=work / "models",
        data_dir=work,
        port=_free_port(),
        scorer="native",
        request_deadline_ms=5000.0,
        admission_target_ms=5000.0,
        redis_timeout_ms=2000.0,
        rollout_poll_secs=0.5,
        canary_tick_secs=0.5,
        canary_outcome_wait_secs=loop.outcome_wait,
    )


async def _serve(
    url: str,
    settings: Settings,
    loop: Loop,
    requests: int,
    seed: int,
    events_log: Path | None = None,
    until: Any = None,
) -> tuple[simulate.SimSummary, Rollout | None, list[float]]:
    """Shoppers against the service until ``requests`` are made, or until the
    roll-out record satisfies ``until``; the record then and its shares."""
    runner = web.AppRunner(create_app(settings, url), access_log=None)
    await runner.setup()
    client = Redis.from_url(url)
    store = RolloutStore(client)
    shares: list[float] = []
    record = None
    try:
        await web.TCPSite(runner, "127.0.0.1", settings.port).start()
        budget = [requests]
        shop = asyncio.create_task(
            simulate.simulate(
                f"http://127.0.0.1:{settings.port}",
                loop.shoppers,
                loop.duration,
                requests,
                loop.shop,
                concurrency=loop.concurrency,
                seed=seed,
                events_log=events_log,
                budget=budget,
            )
        )
        while not shop.done():
            await asyncio.sleep(0.25)
            if until is None:
                continue
            record = await store.get("ranker")
            if record is not None and record.share and (not shares or shares[-1] != record.share):
                shares.append(record.share)
            if record is not None and until(record):
                budget[0] = 0  # the shoppers stop after their current request
        summary = await shop
        record = await store.get("ranker")
        return summary, record, shares
    finally:
        await client.aclose()
        await runner.cleanup()


async def _export(url: str, out: Path) -> dict[str, Any]:
    client = Redis.from_url(url)
    try:
        exporter = export.Exporter(client, out, rotate_bytes=64 << 20, max_bytes=1 << 30)
        summary = await exporter.run(False)
        return {"line": summary.line()}
    finally:
        await client.aclose()


def run(loop: Loop, work: Path, bad: bool, seed: int = 1) -> dict[str, Any]:
    started = time.monotonic()
    shop = generate(loop.shop, end_ts=time.time())
    events, items = work / "events.csv", work / "items.csv"
    write_events(events, shop.events)
    write_catalogue(items, shop.catalogue)
    data = DatasetConfig(train_groups=loop.train_groups, eval_groups=500, seed=seed)
    params = TrainParams(num_trees=loop.trees, num_threads=1, seed=seed)
    models_dir = work / "models"
    stable = training.train_files(
        events, items, models_dir, "ranker", data, params, progress=False
    ).path.name
    extended = work / "events-extended.csv"
    shutil.copy(events, extended)
    out: dict[str, Any] = {"stable": stable, "bad": bad}
    with EmbeddedRedis(work / "redis") as server:

        async def prepare() -> None:
            client = Redis.from_url(server.url)
            try:
                await seeding.seed(client, Settings(), shop.catalogue, shop.events, progress=False)
                await rollouts.promote(
                    RolloutStore(client), models_dir, "ranker", stable, None, None, 1
                )
            finally:
                await client.aclose()

        asyncio.run(prepare())
        first, _, _ = asyncio.run(
            _serve(server.url, _settings(work, loop), loop, loop.first_requests, 11, extended)
        )
        out["first_period"] = {"requests": first.requests, "served": first.report()}
        out["export"] = asyncio.run(_export(server.url, work / "impressions"))
        candidate = training.train_files(
            extended,
            items,
            models_dir,
            "ranker",
            # The last quarter of the period's impressions held out (by time),
            # the rest trained on, as loadtest/closed_loop.py does.
            replace(data, label_window=1800.0, split_at=_split_at(work / "impressions")),
            replace(params, shuffle_labels=bad),
            progress=False,
            impressions_path=None if bad else work / "impressions",
        )
        meta_data = json.loads((candidate.path / "meta.json").read_text())["data"]
        out["candidate"] = {
            "version": candidate.path.name,
            "impressions": meta_data.get("impressions"),
            "train_groups": meta_data.get("train_groups"),
        }

        async def start() -> Rollout:
            client = Redis.from_url(server.url)
            try:
                return await rollouts.promote(
                    RolloutStore(client),
                    models_dir,
                    "ranker",
                    candidate.path.name,
                    loop.canary,
                    "25%,50%",
                    loop.min_exposures,
                )
            finally:
                await client.aclose()

        asyncio.run(start())
        second, record, shares = asyncio.run(
            _serve(
                server.url,
                _settings(work, loop),
                loop,
                loop.canary_requests,
                12,
                until=lambda r: not r.running,
            )
        )
    assert record is not None
    out["canary"] = {
        "status": record.status,
        "reason": record.reason,
        "shares": shares,
        "serving": record.stable,
        "history": [h["event"] for h in record.history],
        "checks": record.checks,
        "requests": second.requests,
        "served": second.report(),
    }
    out["seconds"] = round(time.monotonic() - started, 1)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the test suite's size")
    p.add_argument("--bad", action="store_true", help="canary a shuffled-label version")
    p.add_argument("--canary", help="first share (default 5%%, tiny 10%%)")
    p.add_argument("--min-exposures", type=int, help="canary impressions per step")
    p.add_argument("--work", type=Path, help="keep the files here (default: a temp dir)")
    a = p.parse_args(argv)
    loop = TINY if a.tiny else Loop(shop=SyntheticConfig())
    if a.canary:
        loop = replace(loop, canary=a.canary)
    if a.min_exposures:
        loop = replace(loop, min_exposures=a.min_exposures)
    if a.work is not None:
        a.work.mkdir(parents=True, exist_ok=True)
        result = run(loop, a.work, a.bad)
    else:
        with tempfile.TemporaryDirectory(prefix="recsvc-canary-loop-") as tmp:
            result = run(loop, Path(tmp), a.bad)
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
