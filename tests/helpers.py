"""Small helpers shared by tests (no fixtures here)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from redis.asyncio import Redis

from features.events import COVISIT_NEIGHBOURS, EventType
from features.impressions import (
    Impression,
    ImpressionLog,
    ImpressionWriter,
    Outcome,
    impression_record,
    outcome_record,
)
from features.logs import EventLog
from features.state import (
    COL_CATEGORY,
    COL_NBR,
    COL_NBR_SCORE,
    COL_PRICE,
    ItemTable,
    empty_rows,
    shard_of,
)
from features.synthetic import SyntheticData
from recsvc.cli.seed import seed
from recsvc.ops.embedded import EmbeddedRedis
from recsvc.settings import Settings


def store_settings(**overrides: object) -> Settings:
    """Settings for tests that read Redis directly: the production read deadline
    (20 ms) would turn a hiccup of this shared machine into a failed read; and
    events create the items they name, as the offline replay does (these tests
    compare the two; tests/service/test_integrity.py tests the policy)."""
    return Settings(redis_timeout_ms=2000.0, unknown_items="create").replace(**overrides)


def ids_in_shard(shard: int, count: int, prefix: str) -> list[str]:
    """``count`` item ids (``prefix`` + a number) that land in item shard ``shard``."""
    out, k = [], 0
    while len(out) < count:
        item = f"{prefix}{k}"
        if shard_of(item) == shard:
            out.append(item)
        k += 1
    return out


def dense_table(items: Iterable[tuple[str, str, float]]) -> ItemTable:
    """A table whose row k holds the k-th (item, category, price): for tests that
    address rows by position (a table built by ensure_item places items by shard)."""
    rows = list(items)
    categories = list(dict.fromkeys(c for _, c, _ in rows if c))
    by_name = {c: k for k, c in enumerate(categories)}
    raw = empty_rows(max(len(rows), 16))
    for k, (_, category, price) in enumerate(rows):
        raw[k, COL_PRICE] = price
        raw[k, COL_CATEGORY] = by_name.get(category, -1)
    return ItemTable([item for item, _, _ in rows], categories, raw)


def canonical(raw: np.ndarray) -> np.ndarray:
    """Item rows with each row's neighbour slots sorted by neighbour: which slot a
    neighbour takes depends on the order partners were listed, its count does not."""
    out = raw.copy()
    slots = out[:, COL_NBR : COL_NBR + COVISIT_NEIGHBOURS]
    scores = out[:, COL_NBR_SCORE : COL_NBR_SCORE + COVISIT_NEIGHBOURS]
    order = np.argsort(slots, axis=1, kind="stable")
    out[:, COL_NBR : COL_NBR + COVISIT_NEIGHBOURS] = np.take_along_axis(slots, order, 1)
    out[:, COL_NBR_SCORE : COL_NBR_SCORE + COVISIT_NEIGHBOURS] = np.take_along_axis(
        scores, order, 1
    )
    return out


def neighbour_counts(raw: np.ndarray) -> np.ndarray:
    """Filled co-visitation slots per item row."""
    return np.asarray((raw[:, COL_NBR : COL_NBR + COVISIT_NEIGHBOURS] > 0).sum(axis=1))


RR_EVENT = {0: "view", 2: "addtocart", 3: "transaction"}  # RetailRocket has no clicks
BAD_RR_ROWS = (
    "not,a,row",  # field_count
    "1433221332117,257597,wishlist,355908,",  # unknown_event:wishlist
    "yesterday,257597,view,355908,",  # bad_timestamp
    "1433221332117,,view,355908,",  # bad_id (empty visitor)
    "1433221332117,bad visitor,view,355908,",  # bad_id (space)
)


def write_retailrocket(events_path: Path, items_path: Path, data: SyntheticData, limit: int) -> int:
    """The synthetic log in the RetailRocket layout (ms timestamps, numeric ids, no
    clicks), unsorted as the real file is, with BAD_RR_ROWS mixed in. Returns the
    number of good rows."""
    good = []
    for k, (ts, user, item, kind) in enumerate(data.events.rows()):
        if kind in RR_EVENT:
            tid = str(k) if kind == 3 else ""
            good.append(f"{int(ts * 1000)},{user[1:]},{RR_EVENT[kind]},{item[1:]},{tid}")
        if len(good) >= limit:
            break
    rows = good[::-1]  # newest first: the reader must sort
    for k, bad in enumerate(BAD_RR_ROWS):
        rows.insert(1 + k * 97, bad)
    events_path.write_text("timestamp,visitorid,event,itemid,transactionid\n" + "\n".join(rows))
    cat = data.catalogue
    lines = [
        f"{item[1:]},{category[1:]},{price:.2f}"
        for item, category, price in zip(
            cat.item_ids, cat.categories, cat.prices.tolist(), strict=True
        )
    ]
    items_path.write_text("itemid,categoryid,price\n" + "\n".join([*lines, "x y,3,1.0"]) + "\n")
    return len(good)


async def private_seeded_redis(data: SyntheticData) -> EmbeddedRedis:
    """A started redis-server of the test's own (to stop or kill), seeded with ``data``."""
    server = EmbeddedRedis().start()
    client = Redis.from_url(server.url)
    await seed(client, Settings(), data.catalogue, data.events, progress=False)
    await client.aclose()
    return server


def serve_command(
    port: int, redis_url: str, model_dir: Path, data_dir: Path, *extra: str, **settings: str
) -> tuple[list[str], dict[str, str]]:
    """argv and environment of `recsvc serve` for an e2e test: this environment
    without any RECSVC_* of the caller's, the native scorer, and ``settings`` as
    RECSVC_<NAME> variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSVC_")}
    env["RECSVC_SCORER"] = "native"
    env |= {f"RECSVC_{k.upper()}": v for k, v in settings.items()}
    argv = [
        sys.executable,
        *("-m", "recsvc", "serve", "--port", str(port), "--redis-url", redis_url),
        *("--model-dir", str(model_dir), "--data-dir", str(data_dir), *extra),
    ]
    return argv, env


def impressions_for(
    log: EventLog,
    events: Iterable[int],
    seed: int = 0,
    shown: int = 10,
    lead_secs: float = 3.0,
    prefix: str = "r",
) -> ImpressionLog:
    """Logged answers that the log's events ``events`` (indices) are outcomes of:
    each event's user was shown, ``lead_secs`` before it, ``shown`` items with the
    event's item among them, at a position drawn with a strong lean to the top (as
    a user clicks what is shown first); the event is the outcome."""
    rng = np.random.default_rng(seed)
    impressions, outcomes = [], []
    n_items = len(log.item_ids)
    for k in events:
        ts, u, i, kind = float(log.ts[k]), int(log.user[k]), int(log.item[k]), int(log.type[k])
        others = [int(x) for x in rng.permutation(n_items)[: shown + 1] if int(x) != i][: shown - 1]
        position = min(int(rng.geometric(0.35)), shown)
        items = [log.item_ids[x] for x in others]
        items.insert(position - 1, log.item_ids[i])
        rid = f"{prefix}{k}"
        user = log.user_ids[u]
        impressions.append(Impression(rid, user, ts - lead_secs, tuple(items)))
        outcomes.append(Outcome(rid, user, log.item_ids[i], kind, ts))
    impressions.sort(key=lambda imp: imp.ts)
    return ImpressionLog(impressions, outcomes)


def write_impressions(directory: Path, logged: ImpressionLog, stamp: str = "1") -> None:
    """``logged`` as the complete JSONL files the export writes."""
    with ImpressionWriter(directory, stamp) as out:
        for imp in logged.impressions:
            out.impression(impression_record(imp.request_id, imp.user_id, imp.ts, list(imp.items)))
        for o in logged.outcomes:
            out.outcome(outcome_record(o.request_id, o.user_id, o.item_id, o.type, o.ts))


def click_events(log: EventLog, lo: int, hi: int, count: int, seed: int = 0) -> list[int]:
    """``count`` indices of click events among events ``lo``..``hi`` (drawn, sorted)."""
    clicks = lo + np.flatnonzero(log.type[lo:hi] == EventType.CLICK)
    rng = np.random.default_rng(seed)
    return sorted(int(k) for k in rng.choice(clicks, size=min(count, len(clicks)), replace=False))
