"""Load control: admission, truthful attribution of lost time, slow bodies, arrival time.

Real redis-server, real HTTP servers on 127.0.0.1; the overload is made by a tiny
admission target or by blocking the event loop, never by mocking our code.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from features.state import UserState
from recsvc.errors import Overloaded, StoreUnavailable
from recsvc.ops.looplag import LoopLag
from recsvc.service.admission import Admission
from recsvc.settings import Settings
from recsvc.store.client import connect
from recsvc.store.feature_store import FeatureStore
from recsvc.web.app import create_app
from recsvc.web.server import LINGERING_SECS, setup_runner
from tests.conftest import settings_for

Client = TestClient[Any, Any]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_admission_admits_what_fits_in_the_target_and_always_the_first() -> None:
    # Units are seconds; round numbers keep the arithmetic exact.
    clock = Clock()
    adm = Admission(target=10.0, max_inflight=100, initial_service=2.0, clock=clock)
    assert adm.limit == 5
    tickets = [adm.admit(0.0) for _ in range(5)]  # the fifth ends at 5 * 2 = 10
    assert None not in tickets and adm.inflight == 5
    assert adm.admit(0.0) is None  # a sixth would end at 12
    assert adm.admit(3.0) is None
    # Completions 2 apart while busy: the estimate stays at 2.
    for k, ticket in enumerate(tickets):
        clock.now = 2.0 * (k + 1)
        adm.done(ticket or 0.0)
    assert adm.inflight == 0 and adm.service == 2.0
    # Idle, then one request alone: its latency (with the Redis round trip and
    # the wait before it) is not a sample of the cost of one more request.
    clock.now = 100.0
    alone = adm.admit(50.0)  # nothing ahead: even a late request gets its chance
    clock.now = 109.0
    adm.done(alone or 0.0)
    assert adm.service == 2.0
    # Busy with completions 4 apart: a larger estimate, a smaller limit.
    for _ in range(300):
        first, second = adm.admit(0.0), adm.admit(0.0)
        clock.now += 4.0
        adm.done(first or 0.0)
        clock.now += 4.0
        adm.done(second or 0.0)
    assert abs(adm.service - 4.0) < 1e-3 and adm.limit == 2
    # The cap: however slow completions get (clients hammering with retries,
    # each turned away at a cost), at most 2 x the scoring section (2.5 here).
    for _ in range(300):
        adm.computed(1.25)
    assert abs(adm.estimate - 2.5) < 1e-3 and adm.limit in (3, 4)  # 10 / 2.5000...
    # Admitted requests that miss their deadline: the section estimate was too
    # optimistic, and grows.
    for _ in range(10):
        ticket = adm.admit(0.0)
        adm.done(ticket or 0.0, missed=True)
    assert adm.estimate > 3.9 and adm.limit == 2
    hard = Admission(target=1000.0, max_inflight=2, initial_service=1.0)
    assert hard.admit(0.0) is not None and hard.admit(0.0) is not None
    assert hard.admit(0.0) is None


def test_a_burst_gets_the_burst_bound_and_a_standing_queue_the_target() -> None:
    """CoDel's distinction: the queue emptied within the last interval (a burst)
    or never did (more offered than served)."""
    clock = Clock()
    adm = Admission(
        target=10.0, max_inflight=100, initial_service=2.0, clock=clock, burst_target=20.0
    )
    assert not adm.standing
    burst = [adm.admit(0.0) for _ in range(10)]  # 10 x 2 = 20 fits the burst bound
    assert None not in burst and adm.admit(0.0) is None
    # The queue never empties for a whole interval: the target rules.
    for _ in range(3):
        clock.now += Admission.INTERVAL
        adm.admit(0.0)
    assert adm.standing and adm.admit(0.0) is None and adm.limit == 5
    # It empties; in the next interval a burst is welcome again.
    for ticket in burst:
        adm.done(ticket or 0.0)
    while adm.inflight:
        adm.done(0.0)
    clock.now += Admission.INTERVAL
    adm.admit(0.0)  # finds nothing ahead
    clock.now += Admission.INTERVAL
    adm.done(0.0)
    assert adm.admit(0.0) is not None and not adm.standing


@pytest.mark.asyncio
async def test_loop_lag_sees_a_blocked_loop_and_a_busy_thread() -> None:
    lag = LoopLag(interval=0.002)
    lag.start()
    try:
        await asyncio.sleep(0.02)
        quiet = LoopLag.mark()
        await asyncio.sleep(0.03)
        assert not lag.saturated(quiet)
        assert lag.since(quiet[0]) < 0.02
        busy = LoopLag.mark()
        time.sleep(0.03)  # noqa: ASYNC251 - the point: the loop is blocked for 30 ms
        assert lag.since(busy[0]) >= 0.02
        assert lag.saturated(busy)
        await asyncio.sleep(0.01)
        assert lag.since(busy[0]) >= 0.02  # remembered once the tick has run
    finally:
        lag.stop()


@pytest.mark.asyncio
async def test_loop_lag_sees_the_thread_waiting_for_a_cpu_another_process_holds() -> None:
    """Another busy process on the one core this process may use: the loop's
    thread is runnable but not running, which neither its CPU clock nor a late
    tick shows fully; the scheduler's run delay does."""
    core = min(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    hog = await asyncio.create_subprocess_exec(sys.executable, "-c", "while True: pass")
    lag = LoopLag(interval=0.002)
    try:
        os.sched_setaffinity(hog.pid, {core})
        os.sched_setaffinity(0, {core})
        lag.start()
        await asyncio.sleep(0.05)
        start = LoopLag.mark()
        end = time.perf_counter() + 0.1
        while time.perf_counter() < end:  # want the CPU for 100 ms; the hog shares it
            pass
        assert lag.waited_since(start[0]) > 0.02
        assert lag.saturated(start)
    finally:
        lag.stop()
        os.sched_setaffinity(0, before)
        hog.kill()
        await hog.wait()


@pytest.mark.asyncio
async def test_a_read_that_times_out_in_a_blocked_loop_is_not_blamed_on_redis(
    seeded: Redis, redis_url: str
) -> None:
    """Redis is busy for 10 ms (another client's DEBUG SLEEP), well inside the 20 ms
    read deadline; meanwhile this process blocks its own loop for 50 ms. The read
    times out, but as Overloaded: the breaker counts nothing. Without the block
    the same read succeeds."""
    settings = Settings(redis_timeout_ms=20.0, breaker_failures=1)
    store = FeatureStore(connect(redis_url, settings), settings)
    store.lag = LoopLag(interval=0.002)
    store.lag.start()
    admin = redis.Redis.from_url(redis_url)

    async def read_while_redis_sleeps(block: float) -> UserState | None:
        sleeper = asyncio.ensure_future(
            asyncio.to_thread(admin.execute_command, "DEBUG", "SLEEP", "0.01")
        )
        await asyncio.sleep(0.002)  # Redis is asleep now
        read = asyncio.ensure_future(store.fetch_user("u1"))
        await asyncio.sleep(0.003)  # the read waits for its reply
        time.sleep(block)  # noqa: ASYNC251 - the point: this process's loop is held
        try:
            return await read
        finally:
            await sleeper

    try:
        assert await read_while_redis_sleeps(0.0) is not None
        for _ in range(3):
            with pytest.raises(Overloaded):
                await read_while_redis_sleeps(0.05)
            assert store.breaker.state == "closed" and store.breaker.failures == 0
        assert await store.fetch_user("u1") is not None
    finally:
        store.lag.stop()
        admin.close()
        await store.aclose()


@pytest.mark.asyncio
async def test_a_dead_redis_still_counts_toward_the_breaker(model_dir: Path) -> None:
    settings = Settings(breaker_failures=2)
    store = FeatureStore(connect("unix:///nonexistent/recsvc.sock", settings), settings)
    store.lag = LoopLag()
    store.lag.start()
    try:
        for _ in range(2):
            with pytest.raises(StoreUnavailable):
                await store.fetch_user("u1")
        assert store.breaker.state == "open"
    finally:
        store.lag.stop()
        await store.aclose()


async def _burst(client: Client, n: int) -> list[tuple[int, dict[str, str], dict[str, Any]]]:
    async def one(k: int) -> tuple[int, dict[str, str], dict[str, Any]]:
        resp = await client.post("/v1/recommendations", json={"user_id": f"u{k % 50}"})
        return resp.status, dict(resp.headers), await resp.json()

    return list(await asyncio.gather(*(one(k) for k in range(n))))


def _shed(text: str) -> float:
    for line in text.splitlines():
        if line.startswith('recsvc_shed_requests_total{cause="admission"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.asyncio
async def test_over_the_admission_limit_answers_503_at_once_with_retry_after(
    seeded: Redis, redis_url: str, model_dir: Path
) -> None:
    # A target far below one request's cost: only a request with nothing
    # ahead of it is admitted.
    app = create_app(
        settings_for(model_dir, admission_target_ms=0.001, admission_burst_ms=0.001), redis_url
    )
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        shed_before = _shed(await (await client.get("/metrics")).text())  # per process
        answers = await _burst(client, 40)
        statuses = [status for status, _, _ in answers]
        assert 200 in statuses and 503 in statuses, statuses
        for status, headers, body in answers:
            if status == 503:
                assert headers["Retry-After"] == "1"
                assert body["error"]["code"] == "overloaded"
            else:
                assert status == 200 and body["strategy"] == "model", body
        shed = _shed(await (await client.get("/metrics")).text())
        assert shed - shed_before == statuses.count(503)
        # Probes and scrapes are never shed.
        assert (await client.get("/readyz")).status == 200


@pytest.mark.asyncio
async def test_overload_response_default_serves_popular_items_with_the_reason(
    seeded: Redis, redis_url: str, model_dir: Path
) -> None:
    settings = settings_for(
        model_dir,
        admission_target_ms=0.001,
        admission_burst_ms=0.001,
        overload_response="default",
    )
    async with TestClient(TestServer(create_app(settings, redis_url), host="127.0.0.1")) as client:
        answers = await _burst(client, 40)
        reasons = {body.get("fallback_reason") for _, _, body in answers}
        assert {status for status, _, _ in answers} == {200}
        assert "overloaded" in reasons, reasons
        for _, _, body in answers:
            assert len(body["items"]) == 10
            if body["fallback_reason"] == "overloaded":
                assert body["strategy"] == "fallback" and body["model"] is None


def _slow_body(port: int) -> socket.socket:
    """A connection that sends its headers and 10 of the 200 body bytes it announced."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /v1/recommendations HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b'Content-Length: 200\r\n\r\n{"user_id"'
    )
    return sock


@pytest.mark.asyncio
async def test_slow_bodies_are_cut_off_and_never_hold_up_other_requests(
    seeded: Redis, redis_url: str, model_dir: Path
) -> None:
    # 64 slow bodies against a hard cap of 16 and an admission target of 1 ms:
    # neither counts a request whose body is still arriving.
    settings = settings_for(
        model_dir,
        body_timeout_ms=500.0,
        admission_target_ms=1.0,
        admission_burst_ms=1.0,
        max_inflight=16,
    )
    runner = await setup_runner(create_app(settings, redis_url))  # as `recsvc serve` does
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            async with http.get("/metrics") as resp:  # counters are per process
                shed_before = _shed(await resp.text())
            slow = [_slow_body(port) for _ in range(64)]
            started = time.monotonic()
            for k in range(20):  # served while 64 bodies trickle (and never admitted)
                async with http.post("/v1/recommendations", json={"user_id": f"u{k}"}) as resp:
                    assert resp.status == 200 and (await resp.json())["strategy"] == "model"
                    # The deadline and the Server-Timing count from arrival.
                    assert resp.headers["Server-Timing"].startswith("queue;dur=")
            await asyncio.sleep(max(0.0, 0.8 - (time.monotonic() - started)))
            for sock in slow:  # answered, then closed after the lingering time
                sock.settimeout(LINGERING_SECS + 5)
                reply = b""
                while chunk := await asyncio.to_thread(sock.recv, 65536):
                    reply += chunk  # until the server closes the connection
                head, _, body = reply.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 408"), head
                assert orjson.loads(body)["error"]["code"] == "body_timeout"
                sock.close()
            async with http.get("/metrics") as resp:
                assert _shed(await resp.text()) == shed_before
    finally:
        await runner.cleanup()
