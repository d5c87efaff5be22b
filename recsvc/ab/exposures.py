"""Exposure and outcome logging for experiments: capped Redis streams, written by a
background task so an answer never waits for it.

``{ab}:exposures``: one entry per recommendation answered inside an experiment
(request id, user, time, assignments, forced ones, items shown in order).
``{ab}:outcomes``: one entry per applied event that carries a ``request_id``.
The report joins them by request id. When the queue is full (Redis slow or
down), entries are dropped and counted rather than held in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import orjson
from redis.typing import EncodableT, FieldT

from recsvc.ops import metrics
from recsvc.store import keys
from recsvc.store.client import REDIS_FAILURES, RedisClient

log = logging.getLogger(__name__)
Fields = dict[FieldT, EncodableT]
QUEUE_MAX = 10_000
BATCH = 500


class ExposureLog:
    def __init__(self, client: RedisClient, maxlen: int) -> None:
        self.client = client
        self.maxlen = maxlen
        self.queue: asyncio.Queue[tuple[str, Fields]] = asyncio.Queue(QUEUE_MAX)
        self.dropped = 0
        self.written = 0

    def _put(self, stream: str, fields: Fields) -> None:
        try:
            self.queue.put_nowait((stream, fields))
        except asyncio.QueueFull:
            self.dropped += 1
            metrics.EXPOSURES_DROPPED.inc()

    def exposure(
        self,
        request_id: str,
        user_id: str,
        experiments: dict[str, str],
        forced: frozenset[str],
        items: list[str],
        strategy: str,
    ) -> None:
        self._put(
            keys.EXPOSURES,
            {
                "request_id": request_id,
                "user_id": user_id,
                "ts": f"{time.time():.3f}",
                "experiments": orjson.dumps(experiments),
                "forced": orjson.dumps(sorted(forced)),
                "items": orjson.dumps(items),
                "strategy": strategy,
            },
        )

    def outcome(self, request_id: str, user_id: str, item_id: str, kind: str, ts: float) -> None:
        self._put(
            keys.OUTCOMES,
            {
                "request_id": request_id,
                "user_id": user_id,
                "item_id": item_id,
                "type": kind,
                "ts": f"{ts:.3f}",
            },
        )

    async def _write(self, batch: list[tuple[str, Fields]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for stream, fields in batch:
            pipe.xadd(stream, fields, maxlen=self.maxlen, approximate=True)
        await pipe.execute()
        self.written += len(batch)

    async def run(self, stop: asyncio.Event) -> None:
        """Write batches until ``stop``, then flush what is queued (bounded)."""
        failing = False
        while not (stop.is_set() and self.queue.empty()):
            batch: list[tuple[str, Fields]] = []
            with contextlib.suppress(TimeoutError):
                batch.append(await asyncio.wait_for(self.queue.get(), 0.2))
            while batch and len(batch) < BATCH and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            if not batch:
                continue
            try:
                async with asyncio.timeout(2.0):
                    await self._write(batch)
                failing = False
            except REDIS_FAILURES as exc:
                self.dropped += len(batch)
                metrics.EXPOSURES_DROPPED.inc(len(batch))
                metrics.REDIS_ERRORS.labels("exposures", type(exc).__name__).inc()
                if not failing:
                    log.warning("exposure log write failed, dropping entries: %r", exc)
                failing = True
                if stop.is_set():
                    return
