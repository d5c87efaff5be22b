"""Event ingestion benchmark and Redis memory per user and per item (not a test).

Starts a private redis-server and the real service on 127.0.0.1, loads a
catalogue of the items the events name (so every event passes the catalogue
check of RECSVC_UNKNOWN_ITEMS=auto, as in production; ``--no-catalogue``:
events create their items), posts batches of events to POST /v1/events from a
few concurrent clients, and reports the sustained rate. Then loads the demo's
synthetic log (run `recsvc demo` once first) into a fresh server and reports
Redis bytes per user and per item.

    .venv/bin/python loadtest/ingest_bench.py [--events 100000] [--batch 500] [--no-catalogue]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time
from pathlib import Path

import aiohttp
import numpy as np
from aiohttp import web
from redis.asyncio import Redis

from features.events import EVENT_NAMES
from features.state import N_SHARDS
from recsvc.cli import seed
from recsvc.ops.embedded import EmbeddedRedis
from recsvc.settings import Settings
from recsvc.store import keys
from recsvc.store.feature_store import FeatureStore, count_items
from recsvc.web.app import create_app

CLIENTS = 4
N_ITEMS = 5_000
MEMORY_SAMPLE = 2000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def ingest_rate(
    url: str, n_events: int, batch: int, catalogue: bool = True
) -> tuple[float, float]:
    """Events/s through HTTP, and Redis bytes per event of the two dedupe keys."""
    settings = Settings(port=_free_port())
    if catalogue:
        client = Redis.from_url(url)
        store = FeatureStore(client, settings)
        await store.check_format()
        await store.upsert_items([(f"i{k}", f"c{k % 50}", 10.0) for k in range(N_ITEMS)])
        await client.aclose()
    runner = web.AppRunner(create_app(settings, url), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", settings.port).start()
    rng = np.random.default_rng(0)
    now = time.time()
    users = rng.integers(0, 20_000, n_events)
    items = rng.integers(0, N_ITEMS, n_events)
    kinds = rng.choice(4, n_events, p=[0.7, 0.2, 0.07, 0.03])
    bodies = [
        {
            "events": [
                {
                    "event_id": f"b{k}",
                    "user_id": f"u{users[k]}",
                    "item_id": f"i{items[k]}",
                    "type": EVENT_NAMES[kinds[k]],
                    "ts": now - (n_events - k) * 0.001,
                }
                for k in range(start, min(start + batch, n_events))
            ]
        }
        for start in range(0, n_events, batch)
    ]
    queue: asyncio.Queue[dict[str, object]] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    accepted = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal accepted
        while not queue.empty():
            body = queue.get_nowait()
            async with session.post(
                f"http://127.0.0.1:{settings.port}/v1/events", json=body
            ) as resp:
                resp.raise_for_status()
                accepted += (await resp.json())["accepted"]

    started = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(CLIENTS)))
    elapsed = time.perf_counter() - started
    await runner.cleanup()
    if accepted != n_events:
        raise SystemExit(f"only {accepted} of {n_events} events accepted")
    client = Redis.from_url(url)
    dedupe = 0
    sample = rng.choice(n_events, min(MEMORY_SAMPLE, n_events), replace=False)
    for k in sample.tolist():
        user = f"u{users[k]}"
        # The user's key and one per item shard the event touched (its item's,
        # and each co-visit partner's).
        seen = [keys.user_event_seen(user, f"b{k}")]
        seen += [keys.shard_event_seen(s, user, f"b{k}") for s in range(N_SHARDS)]
        pipe = client.pipeline(transaction=False)
        for key in seen:
            pipe.memory_usage(key, samples=0)
        dedupe += sum(int(m or 0) for m in await pipe.execute())
    await client.aclose()
    return n_events / elapsed, dedupe / len(sample)


async def memory_per_entity(url: str, data_dir: Path) -> tuple[float, float, int, int]:
    events, items = seed.synthetic_paths(data_dir)
    catalogue, log = seed.load_files(events, items)
    client = Redis.from_url(url)
    await seed.seed(client, Settings(), catalogue, log, progress=False)
    rng = np.random.default_rng(1)
    users = [log.user_ids[u] for u in rng.choice(len(log.user_ids), MEMORY_SAMPLE, replace=False)]
    user_bytes = 0
    for u in users:
        for key in (
            keys.user_state(u),
            keys.user_recent(u),
            keys.user_purchased(u),
            keys.user_visits(u),
        ):
            user_bytes += int(await client.memory_usage(key) or 0)
    item_bytes = 0
    item_keys = [keys.CATEGORY_INDEX, keys.CATEGORIES]
    for shard in range(N_SHARDS):
        item_keys += keys.shard_keys(shard)
    for key in item_keys:
        item_bytes += int(await client.memory_usage(key, samples=0) or 0)
    n_items = await count_items(client)
    await client.aclose()
    return user_bytes / len(users), item_bytes / n_items, len(log.user_ids), n_items


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--data-dir", type=Path, default=Settings().data_dir)
    p.add_argument(
        "--no-catalogue",
        action="store_true",
        help="no catalogue: events create their items (no catalogue check)",
    )
    args = p.parse_args()
    with EmbeddedRedis() as server:
        rate, dedupe = asyncio.run(
            ingest_rate(server.url, args.events, args.batch, not args.no_catalogue)
        )
    checks = "without a catalogue" if args.no_catalogue else "with catalogue checks"
    print(
        f"ingestion through POST /v1/events {checks}: {rate:,.0f} events/s "
        f"({args.events} events, batches of {args.batch}, {CLIENTS} concurrent clients)"
    )
    print(f"dedupe keys (user + item side): {dedupe:,.0f} bytes per event id")
    if seed.synthetic_paths(args.data_dir)[0].is_file():
        with EmbeddedRedis() as server:
            per_user, per_item, n_users, n_items = asyncio.run(
                memory_per_entity(server.url, args.data_dir)
            )
        print(
            f"redis memory (demo log, {n_users} users, {n_items} items): "
            f"{per_user:,.0f} bytes per user, {per_item:,.0f} bytes per item"
        )


if __name__ == "__main__":
    main()
