"""Item storage at catalogue scale: Redis memory per item, a serving process's
start-up load time, and the CPU it spends keeping its item table current while
events arrive.

Builds a generated catalogue of ``--items`` items in a private redis-server,
loads it the way a worker starts (``ItemCache.refresh``), then runs a writer
process that posts ``--rate`` events/s (shoppers browsing: co-visits touch
several shards) for ``--seconds`` while this process refreshes every
``--interval`` seconds, as a worker does, and nothing else. The refresh CPU is
this process's CPU time (all threads) over wall time. At the end the table
must equal a fresh read of every shard. Not a test: numbers vary with the
machine; compare medians and ratios measured in one run.

    .venv/bin/python -m loadtest.item_bench --items 1000000 [--rate 1000] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from redis.asyncio import Redis

from features.state import N_SHARDS, ItemTable
from recsvc.ops.embedded import EmbeddedRedis
from recsvc.service.itemcache import ItemCache
from recsvc.settings import Settings
from recsvc.store import keys
from recsvc.store.feature_store import EventWrite, FeatureStore, count_items, fresh_cursors

UPSERT_BATCH = 50_000
USERS = 200_000


@dataclass(frozen=True, slots=True)
class ItemBenchResult:
    items: int
    redis_bytes_per_item: float
    populate_seconds: float
    load_seconds: float
    load_cpu_seconds: float
    worker_rss_mib: float
    refreshes: int
    events_written: int
    events_per_second: float
    refresh_cpu_share: float  # of one core, while events arrive
    refresh_ms_median: float
    refresh_ms_max: float
    rows_changed_per_refresh: float
    table_matches_redis: bool


def _settings() -> Settings:
    return Settings(redis_timeout_ms=5000.0, redis_write_timeout_ms=30_000.0)


async def populate(url: str, n_items: int, n_categories: int) -> tuple[float, float]:
    """The catalogue into Redis; (seconds, Redis bytes per item)."""
    client = Redis.from_url(url)
    store = FeatureStore(client, _settings())
    await store.check_format()
    before = int((await client.info("memory"))["used_memory"])
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    prices = np.round(rng.lognormal(3.0, 0.8, n_items), 2).tolist()
    for start in range(0, n_items, UPSERT_BATCH):
        stop = min(start + UPSERT_BATCH, n_items)
        await store.upsert_items(
            [(f"i{k}", f"c{k % n_categories}", prices[k]) for k in range(start, stop)]
        )
    seconds = time.perf_counter() - started
    after = int((await client.info("memory"))["used_memory"])
    if await count_items(client) != n_items:
        raise SystemExit("the catalogue did not load completely")
    await client.aclose()
    return seconds, (after - before) / max(n_items, 1)


def _writer(url: str, n_items: int, rate: int, seconds: float, out: Any) -> None:
    """Events at ``rate``/s for ``seconds``, in batches every 100 ms; sends the
    number written (a separate process: its CPU is not the worker's)."""

    async def run() -> int:
        client = Redis.from_url(url)
        store = FeatureStore(client, _settings())
        rng = np.random.default_rng(1)
        # Popular items get most events (a power law over the catalogue).
        weights = 1.0 / np.arange(1, n_items + 1) ** 0.8
        cdf = np.cumsum(weights / weights.sum())
        per_batch = max(1, rate // 10)
        written, k = 0, 0
        started = time.perf_counter()
        tick = started
        while time.perf_counter() - started < seconds:
            now = time.time()
            items = np.searchsorted(cdf, rng.random(per_batch)).tolist()
            users = rng.integers(0, USERS, per_batch).tolist()
            batch = [
                EventWrite(f"u{u}", f"i{i}", int(rng.integers(0, 4)), now, f"w{k + j}")
                for j, (u, i) in enumerate(zip(users, items, strict=True))
            ]
            k += per_batch
            written += sum(await store.apply_events(batch))
            tick += 0.1
            await asyncio.sleep(max(0.0, tick - time.perf_counter()))
        await client.aclose()
        return written

    out.send(asyncio.run(run()))


async def same_as_redis(store: FeatureStore, table: ItemTable) -> bool:
    """Whether ``table`` holds exactly every shard's ids and rows, compared a few
    shards at a time (a second table of a large catalogue would not fit)."""
    cursors = fresh_cursors()
    for start in range(0, N_SHARDS, 8):
        read = await store.read_items(cursors, 0, range(start, min(start + 8, N_SHARDS)))
        for s in read.shards:
            ids = s.usable_ids
            rows = np.arange(len(ids), dtype=np.int64) * N_SHARDS + s.shard
            if int(table.shard_counts[s.shard]) != len(ids):
                return False
            if [table.ids[r] for r in rows.tolist()] != ids:
                return False
            if not np.array_equal(table.raw[rows], s.rows[: len(ids)]):
                return False
    categories = await store.client.lrange(keys.CATEGORIES, 0, -1)
    return [c.decode() if isinstance(c, bytes) else c for c in categories] == table.categories


async def measure(url: str, n_items: int, rate: int, seconds: float, interval: float) -> Any:
    client = Redis.from_url(url)
    store = FeatureStore(client, _settings())
    cache = ItemCache(store)
    wall, cpu = time.perf_counter(), time.process_time()
    await cache.refresh()
    load_seconds, load_cpu = time.perf_counter() - wall, time.process_time() - cpu
    if cache.view.table.count != n_items:
        raise SystemExit(f"loaded {cache.view.table.count} of {n_items} items")
    receive, send = multiprocessing.get_context("spawn").Pipe(duplex=False)
    writer = multiprocessing.get_context("spawn").Process(
        target=_writer, args=(url, n_items, rate, seconds, send)
    )
    writer.start()
    await asyncio.sleep(min(1.0, seconds / 4))  # the writer under way
    took: list[float] = []
    changed: list[int] = []
    wall, cpu = time.perf_counter(), time.process_time()
    until = wall + seconds - min(1.0, seconds / 4)
    while time.perf_counter() < until:
        start = time.perf_counter()
        await cache.refresh()
        took.append(time.perf_counter() - start)
        changed.append(cache.last_changed)
        await asyncio.sleep(max(0.0, interval - (time.perf_counter() - start)))
    share = (time.process_time() - cpu) / (time.perf_counter() - wall)
    written = int(receive.recv())
    writer.join()
    await cache.refresh()
    matches = await same_as_redis(store, cache.view.table)
    await client.aclose()
    return {
        "load_seconds": load_seconds,
        "load_cpu_seconds": load_cpu,
        "refreshes": len(took),
        "events_written": written,
        "events_per_second": written / seconds,
        "refresh_cpu_share": share,
        "refresh_ms_median": 1000.0 * statistics.median(took) if took else 0.0,
        "refresh_ms_max": 1000.0 * max(took) if took else 0.0,
        "rows_changed_per_refresh": statistics.mean(changed) if changed else 0.0,
        "table_matches_redis": matches,
    }


def run(
    n_items: int,
    rate: int,
    seconds: float,
    interval: float = 2.0,
    n_categories: int = 1000,
    url: str | None = None,
) -> ItemBenchResult:
    def body(redis_url: str) -> ItemBenchResult:
        populate_s, per_item = asyncio.run(populate(redis_url, n_items, n_categories))
        got = asyncio.run(measure(redis_url, n_items, rate, seconds, interval))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        return ItemBenchResult(
            items=n_items,
            redis_bytes_per_item=per_item,
            populate_seconds=populate_s,
            worker_rss_mib=rss,
            **got,
        )

    if url is not None:
        return body(url)
    with EmbeddedRedis() as server:
        return body(server.url)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--rate", type=int, default=1000, help="events/s while measuring")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--interval", type=float, default=2.0, help="refresh interval (s)")
    p.add_argument("--categories", type=int, default=1000)
    args = p.parse_args()
    result = run(args.items, args.rate, args.seconds, args.interval, args.categories)
    print(json.dumps(asdict(result), indent=2))


if __name__ == "__main__":
    main()
