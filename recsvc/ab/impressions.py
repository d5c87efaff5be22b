"""Impression and outcome logging: capped Redis streams, written by a background
task so an answer never waits for it.

``{ab}:impressions``: one entry per answered recommendation (every strategy,
every user, not only experiment traffic), for ``RECSVC_IMPRESSIONS_SAMPLE`` of
the answers (decided per request by one random draw). The entry is one field,
``json``, holding the impression as one JSON object (:func:`entry` defines the
shape; `recsvc export-impressions` writes these bytes as they are, one per
line). Entries whose ``experiments`` is not empty are the experiments'
exposures: `recsvc ab-report` reads those.
``{ab}:outcomes``: one entry per applied event that carries a ``request_id``
(fields request_id, user_id, item_id, type, ts).

When the queue is full (Redis slow or down) or a write fails, entries are
dropped and counted (``recsvc_exposures_dropped_total``, and by stream and cause
in ``recsvc_impression_log_total``) rather than held in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Collection
from typing import Any

import orjson

from recsvc.ops import metrics
from recsvc.store import keys
from recsvc.store.client import REDIS_FAILURES, RedisClient
from recsvc.store.scripts import run_scripts, source

log = logging.getLogger(__name__)
# An impression's JSON, or an outcome's request_id, user_id, item_id, type, ts.
Outcome = tuple[str, str, str, str, str]
Entry = tuple[str, bytes | Outcome]
# At ~1 KB an impression, 10 MB of memory at most while Redis does not keep up
# (145 MB with the largest answers the API allows: 100 items, 128-character ids).
QUEUE_MAX = 10_000
BATCH = 500
# How long entries wait to be written together (a write costs ~100 us of this
# process's CPU, however many it holds); the queue holds 10 s of them at 1,000
# answers/s, and a full batch is written at once.
FLUSH_SECS = 0.2
# The one field of an impression entry.
FIELD = "json"
STREAMS = {keys.IMPRESSIONS: "impressions", keys.OUTCOMES: "outcomes"}


def entry(
    *,
    request_id: str,
    user_id: str,
    ts: float,
    strategy: str,
    fallback_reason: str | None,
    model: dict[str, str] | None,
    arm: str | None,
    rollout: str | None,
    canary_share: float | None,
    experiments: dict[str, str],
    weights: dict[str, dict[str, Any]],
    forced: Collection[str],
    items: list[str],
    sources: list[str],
    latency_ms: float,
    sample: float,
) -> dict[str, Any]:
    """One impression, in the shape the stream and the exported files hold (the
    position of ``items[i]`` is i + 1; ``weights`` are the experiments' traffic
    share and variant weights when the answer was served)."""
    return {
        "request_id": request_id,
        "user_id": user_id,
        "ts": round(ts, 3),
        "strategy": strategy,
        "fallback_reason": fallback_reason,
        "model": model["name"] if model else None,
        "version": model["version"] if model else None,
        "arm": arm,
        "rollout": rollout,
        "canary_share": canary_share,
        "experiments": experiments,
        "weights": weights,
        "forced": sorted(forced) if forced else [],
        "items": items,
        "sources": sources,
        "latency_ms": round(latency_ms, 3),
        "sample": sample,
    }


# Redis memory of a stream entry beyond its JSON (id, field name, listpack).
ENTRY_OVERHEAD = 100


class ImpressionLog:
    def __init__(
        self, client: RedisClient, maxlen: int, sample: float = 1.0, max_bytes: int = 512 << 20
    ) -> None:
        """``maxlen``: entries kept per stream (approximate); ``max_bytes``: the
        impressions stream's memory, whatever the answers' size (its cap in
        entries follows the average entry)."""
        self.client = client
        self.maxlen = maxlen
        self.max_bytes = max_bytes
        self.entry_bytes = 0.0  # running mean of an impression's size
        self.sample = sample
        self.queue: asyncio.Queue[Entry] = asyncio.Queue(QUEUE_MAX)
        self.dropped = 0
        self.written = 0
        self._script = client.register_script(source("impressions.lua"))

    def sampled(self) -> bool:
        """Whether this answer is logged: random() is in [0, 1), so 1.0 logs every
        answer and 0.0 none."""
        return random.random() < self.sample

    def _put(self, stream: str, value: bytes | Outcome) -> None:
        try:
            self.queue.put_nowait((stream, value))
        except asyncio.QueueFull:
            self.dropped += 1
            metrics.EXPOSURES_DROPPED.inc()
            metrics.impression_log(STREAMS[stream], "queue_full")

    def impression(self, impression: dict[str, Any]) -> None:
        """Queue an impression (:func:`entry`); one JSON encoding, no waiting."""
        self._put(keys.IMPRESSIONS, orjson.dumps(impression))

    def outcome(self, request_id: str, user_id: str, item_id: str, kind: str, ts: float) -> None:
        self._put(keys.OUTCOMES, (request_id, user_id, item_id, kind, f"{ts:.3f}"))

    async def _write(self, batch: list[Entry]) -> None:
        """One script call (lua/impressions.lua) for the batch: a pipeline of XADDs
        cost ~10 us of this process's CPU per entry in its replies, the call ~1 us."""
        impressions = [v for stream, v in batch if stream == keys.IMPRESSIONS]
        outcomes = [x for stream, v in batch if stream == keys.OUTCOMES for x in v]
        caps: list[Any] = [self.impressions_cap(impressions), self.maxlen, len(impressions)]
        argv = [*caps, *impressions, *outcomes]
        await run_scripts(self.client, [(self._script, [keys.IMPRESSIONS, keys.OUTCOMES], argv)])
        self.written += len(batch)
        _count(batch, "written")

    def impressions_cap(self, batch: list[Any]) -> int:
        """Entries the impressions stream keeps: the byte budget over the entries'
        running mean size (so 100-item answers with long ids cannot make the
        entry cap hold 25 times the memory of 10-item ones), at most ``maxlen``."""
        if batch:
            size = sum(len(v) for v in batch) / len(batch) + ENTRY_OVERHEAD
            self.entry_bytes = size if not self.entry_bytes else 0.9 * self.entry_bytes + 0.1 * size
        if not self.entry_bytes:
            return self.maxlen
        return max(1, min(self.maxlen, int(self.max_bytes / self.entry_bytes)))

    async def run(self, stop: asyncio.Event) -> None:
        """Write what is queued every FLUSH_SECS until ``stop``, then flush what is
        left (bounded)."""
        failing = False
        while not (stop.is_set() and self.queue.empty()):
            if self.queue.qsize() < BATCH:
                # One write per answer was 10% of a worker's throughput.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), FLUSH_SECS)
            batch = [self.queue.get_nowait() for _ in range(min(BATCH, self.queue.qsize()))]
            if not batch:
                continue
            try:
                async with asyncio.timeout(2.0):
                    await self._write(batch)
                failing = False
            except REDIS_FAILURES as exc:
                self.dropped += len(batch)
                metrics.EXPOSURES_DROPPED.inc(len(batch))
                _count(batch, "redis_error")
                metrics.REDIS_ERRORS.labels("exposures", type(exc).__name__).inc()
                if not failing:
                    log.warning("impression log write failed, dropping entries: %r", exc)
                failing = True
                if stop.is_set():  # stopping: what is still queued is dropped too
                    rest = [self.queue.get_nowait() for _ in range(self.queue.qsize())]
                    self.dropped += len(rest)
                    metrics.EXPOSURES_DROPPED.inc(len(rest))
                    _count(rest, "redis_error")
                    return


def _count(batch: list[Entry], result: str) -> None:
    impressions = sum(1 for stream, _ in batch if stream == keys.IMPRESSIONS)
    if impressions:
        metrics.impression_log("impressions", result, impressions)
    if len(batch) - impressions:
        metrics.impression_log("outcomes", result, len(batch) - impressions)
