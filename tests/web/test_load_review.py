"""An outside review's reproductions of load-control faults, kept as tests: each
failed on the code it was found in (places in the admission limit leaking, the
hard cap bypassed by a late body, a hung Redis never opening the breaker, an
idle server answering slow bodies with the fallback, front-door 503s without
the caller's request id or CORS headers). Real redis-server, real server as
`recsvc serve` sets it up (front door included)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict
from redis.asyncio import Redis

from recsvc.settings import Settings
from recsvc.web import appkeys
from recsvc.web.app import create_app
from recsvc.web.server import setup_runner
from tests.conftest import settings_for

pytestmark = pytest.mark.asyncio
CAPACITY = Path(__file__).resolve().parents[2] / "loadtest" / "capacity.py"
# The production deadlines (tests/conftest.py relaxes them for the other tests).
PRODUCTION = {"request_deadline_ms": 30.0, "redis_timeout_ms": 20.0, "admission_target_ms": 15.0}


@contextlib.asynccontextmanager
async def live(settings: Settings, redis_url: str) -> AsyncIterator[tuple[web.Application, int]]:
    app = create_app(settings, redis_url)
    runner = await setup_runner(app)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield app, runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def raw(port: int, head: bytes, body: bytes = b"", delay: float = 0.0) -> bytes:
    """One request on its own connection (Connection: close); the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    if delay:
        await writer.drain()
        await asyncio.sleep(delay)
    writer.write(body)
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data


async def test_no_path_that_answers_a_recommendation_leaks_its_admission(
    seeded: Redis, redis_url: str, model_dir: Path
) -> None:
    """405s for other methods, 413s by Content-Length and chunked: the limit's
    count comes back to 0, and recommendations are still served."""
    settings = settings_for(model_dir, **PRODUCTION)
    async with live(settings, redis_url) as (app, port):
        admission = app[appkeys.ADMISSION]
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            for method in ("DELETE", "PUT", "PATCH", "OPTIONS") * 5:
                async with http.request(method, "/v1/recommendations") as resp:
                    assert resp.status == 405, (method, resp.status)
            big = b"x" * (settings.max_body_bytes + 10)
            head = b"POST /v1/recommendations HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
            for _ in range(5):
                answer = await raw(port, head + b"Content-Length: %d\r\n\r\n" % len(big), big)
                assert answer.startswith(b"HTTP/1.1 413"), answer[:40]
                chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(big), big)
                answer = await raw(port, head + b"Transfer-Encoding: chunked\r\n\r\n", chunked)
                assert answer.startswith(b"HTTP/1.1 413"), answer[:40]
            assert admission.inflight == 0
            for k in range(10):
                async with http.post("/v1/recommendations", json={"user_id": f"u{k}"}) as resp:
                    assert resp.status == 200 and (await resp.json())["strategy"] == "model"
            assert admission.inflight == 0


async def test_the_hard_cap_counts_a_request_whose_body_came_late(
    seeded: Redis, aredis: Redis, redis_url: str, model_dir: Path
) -> None:
    settings = settings_for(model_dir, max_inflight=2)
    async with live(settings, redis_url) as (_, port):
        await aredis.execute_command("CLIENT", "PAUSE", "600", "ALL")  # reads hang 600 ms
        body = b'{"user_ids": ["u1"]}'
        head = (
            b"POST /v1/features HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        )
        answers = await asyncio.gather(*(raw(port, head, body, delay=0.05) for _ in range(10)))
        assert sum(a.startswith(b"HTTP/1.1 503") for a in answers) >= 8, answers


async def _load(port: int, requests: int, connections: int) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(CAPACITY),
        *("--host", f"http://127.0.0.1:{port}", "--requests", str(requests)),
        *("--connections", str(connections), "--user-ids", "399"),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    return dict(json.loads(out))


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # the production deadlines, 32 clients during the hang
        {"request_deadline_ms": 20.0},  # a deadline no longer than the read's own
    ],
)
async def test_a_hung_redis_opens_the_breaker_whatever_the_load(
    overrides: dict[str, float], seeded: Redis, aredis: Redis, redis_url: str, model_dir: Path
) -> None:
    settings = settings_for(model_dir, **(PRODUCTION | overrides))
    async with live(settings, redis_url) as (app, port):
        await _load(port, 50, 4)
        await aredis.execute_command("CLIENT", "PAUSE", "4000", "ALL")
        await asyncio.sleep(0.05)
        report = await _load(port, 300, 32 if not overrides else 1)
        await aredis.execute_command("CLIENT", "UNPAUSE")
        assert app[appkeys.STORE].breaker.failures >= settings.breaker_failures, report
        assert "feature_store_unavailable" in report["answers"], report


@pytest.mark.parametrize("expect", [False, True])
async def test_an_idle_server_answers_slow_bodies_with_the_model(
    expect: bool, seeded: Redis, redis_url: str, model_dir: Path
) -> None:
    """A body 40 ms behind its headers (a WAN round trip, Expect: 100-continue):
    the deadline and the queue count from the body's arrival."""
    async with live(settings_for(model_dir, **PRODUCTION), redis_url) as (_, port):
        for k in range(10):
            body = orjson.dumps({"user_id": f"u{k}"})
            head = (
                b"POST /v1/recommendations HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
                b"\r\nContent-Length: %d\r\nConnection: close\r\n" % len(body)
            )
            head += b"Expect: 100-continue\r\n\r\n" if expect else b"\r\n"
            answer = await raw(port, head, body, delay=0.04)
            payload = orjson.loads(answer.rsplit(b"\r\n\r\n", 1)[1])
            assert payload["strategy"] == "model", payload


async def test_front_door_503s_carry_the_request_id_and_cors_headers(
    seeded: Redis, redis_url: str, model_dir: Path
) -> None:
    settings = settings_for(
        model_dir, admission_target_ms=0.001, admission_burst_ms=0.001, cors_origins="*"
    )
    async with (
        live(settings, redis_url) as (_, port),
        aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http,
    ):

        async def one(k: int, origin: bool) -> tuple[int, str, CIMultiDict[str]]:
            headers = {"X-Request-Id": f"trace-{k}"}
            if origin:
                headers["Origin"] = "http://shop.example"
            async with http.post(
                "/v1/recommendations", json={"user_id": f"u{k}"}, headers=headers
            ) as resp:
                await resp.read()
                return resp.status, f"trace-{k}", CIMultiDict(resp.headers)

        for origin in (False, True):
            answers = await asyncio.gather(*(one(k, origin) for k in range(30)))
            assert 503 in {status for status, _, _ in answers}
            for status, sent, headers in answers:
                assert headers["X-Request-Id"] == sent, (status, headers)
                if origin:
                    assert headers["Access-Control-Allow-Origin"] == "*", (status, headers)
