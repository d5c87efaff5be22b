"""Load a catalogue and an event log into Redis through the serving update path."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from features.logs import (
    Catalogue,
    EventLog,
    read_catalogue,
    read_events,
    write_catalogue,
    write_events,
)
from features.synthetic import GENERATOR_VERSION, SyntheticConfig, generate
from recsvc.settings import Settings
from recsvc.store.client import RedisClient
from recsvc.store.feature_store import EventWrite, FeatureStore, count_items

# Events per pipeline. Seeding walks the log user by user (each user's events
# still in time order; users are independent), so a batch is a few hundred
# script calls rather than one per event.
BATCH = 10_000
# Pipelines in flight: the client builds the next while Redis runs one.
IN_FLIGHT = 2
EVENTS_FILE = "events.csv"
ITEMS_FILE = "items.csv"


@dataclass(frozen=True, slots=True)
class SeedSummary:
    events: int
    items: int
    users: int
    seconds: float


def synthetic_paths(data_dir: Path) -> tuple[Path, Path]:
    base = data_dir / "synthetic" / f"v{GENERATOR_VERSION}"
    return base / EVENTS_FILE, base / ITEMS_FILE


def ensure_synthetic(data_dir: Path, config: SyntheticConfig) -> tuple[Path, Path]:
    """Write the synthetic shop under ``data_dir/synthetic`` unless it is already there."""
    events_path, items_path = synthetic_paths(data_dir)
    if events_path.is_file() and items_path.is_file():
        return events_path, items_path
    events_path.parent.mkdir(parents=True, exist_ok=True)
    data = generate(config, end_ts=time.time())
    write_catalogue(items_path, data.catalogue)
    tmp = events_path.with_suffix(".tmp")
    write_events(tmp, data.events)
    tmp.rename(events_path)
    return events_path, items_path


async def is_seeded(client: RedisClient) -> bool:
    return await count_items(client) > 0


def _apply(store: FeatureStore, batch: list[EventWrite]) -> Coroutine[Any, Any, list[int]]:
    """A log is history: an item it names outside the catalogue is created, as
    the offline replay does (the unknown-item policy is for live events)."""
    return store.apply_events(batch, dedupe=False, unknown_items="create")


async def seed(
    client: RedisClient,
    settings: Settings,
    catalogue: Catalogue | None,
    log: EventLog,
    progress: bool = True,
) -> SeedSummary:
    """Apply the catalogue, then every event in time order, with a progress bar."""
    started = time.perf_counter()
    store = FeatureStore(client, settings)
    await store.check_format()
    if catalogue is not None:
        rows = list(
            zip(catalogue.item_ids, catalogue.categories, catalogue.prices.tolist(), strict=True)
        )
        for k in range(0, len(rows), BATCH):
            await store.upsert_items(rows[k : k + BATCH], catalogue=k + BATCH >= len(rows))
    meta = (
        dict(
            zip(
                catalogue.item_ids,
                zip(catalogue.categories, catalogue.prices.tolist(), strict=True),
                strict=True,
            )
        )
        if catalogue
        else {}
    )
    bar = tqdm(total=len(log), unit="ev", desc="seed", disable=not progress, mininterval=0.5)
    pending: set[asyncio.Task[list[int]]] = set()
    batch: list[EventWrite] = []
    by_user = np.argsort(log.user, kind="stable")
    users, items = log.user_ids, log.item_ids
    for ts, u, i, event_type in zip(
        log.ts[by_user].tolist(),
        log.user[by_user].tolist(),
        log.item[by_user].tolist(),
        log.type[by_user].tolist(),
        strict=True,
    ):
        user_id, item_id = users[u], items[i]
        category, price = meta.get(item_id, ("", 0.0))
        batch.append(EventWrite(user_id, item_id, event_type, ts, "", category, price))
        if len(batch) >= BATCH:
            pending.add(asyncio.create_task(_apply(store, batch)))
            bar.update(len(batch))
            batch = []
            if len(pending) >= IN_FLIGHT:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
    if batch:
        pending.add(asyncio.create_task(_apply(store, batch)))
        bar.update(len(batch))
    for task in pending:
        await task
    bar.close()
    return SeedSummary(
        events=len(log),
        items=await count_items(client),
        users=len(log.user_ids),
        seconds=time.perf_counter() - started,
    )


def load_files(events_path: Path, items_path: Path | None) -> tuple[Catalogue | None, EventLog]:
    catalogue = read_catalogue(items_path) if items_path else None
    return catalogue, read_events(events_path)
