"""Background tasks end at shutdown even when a cancellation is lost.

The roll-out poller once kept a shutdown waiting forever: the cleanup's
cancellation landed while a Redis call timed out under ``CLIENT PAUSE``, came
back as that call's error, was caught as a Redis failure, and the loop went
on (tests/web/test_load_review.py hung in about one CI run in two)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from redis.asyncio import Redis

from recsvc.ab.rollout import RolloutStore
from recsvc.ranking.models import ModelRegistry
from recsvc.web.app import _cancel, _rollouts_poll

pytestmark = pytest.mark.asyncio


async def test_a_task_that_swallows_its_cancellation_still_ends() -> None:
    """As a library that turns a cancellation into its own error would: the first
    cancel is caught and the loop goes on; the next one ends it."""
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0.02)
    await asyncio.wait_for(_cancel(task, every=0.05), timeout=5)
    assert task.cancelled() and swallowed == 1


async def test_the_roll_out_poller_stops_at_once_while_redis_hangs(
    aredis: Redis, redis_url: str, tmp_path: Path
) -> None:
    client = Redis.from_url(redis_url, socket_timeout=5)
    try:
        registry = ModelRegistry(tmp_path, "ranker")
        stop = asyncio.Event()
        poller = asyncio.create_task(
            _rollouts_poll(registry, RolloutStore(client), 0.01, 5.0, stop)
        )
        await asyncio.sleep(0.05)
        await aredis.execute_command("CLIENT", "PAUSE", "3000", "ALL")
        try:
            await asyncio.sleep(0.1)  # the poller is inside a read Redis holds
            started = time.monotonic()
            stop.set()
            await asyncio.wait_for(_cancel(poller), timeout=10)
            took = time.monotonic() - started
        finally:
            await aredis.execute_command("CLIENT", "UNPAUSE")
        assert poller.done() and took < 2.5, took
    finally:
        await client.aclose()
