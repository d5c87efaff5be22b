"""Graceful shutdown of `recsvc serve`: SIGTERM stops accepting connections, lets
requests in flight finish, flushes the experiment log and exits 0."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from recsvc.store import keys
from tests.ab.test_experiments import AB
from tests.cli.test_cli_e2e import _free_port
from tests.helpers import serve_command

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]


async def _ready(base: str, deadline: float) -> None:
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(f"{base}/readyz") as r:
                    if r.status == 200 and (await r.json())["checks"]["model"]:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError("recsvc serve did not become ready")


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


async def test_sigterm_drains_in_flight_requests_and_flushes_exposures(
    seeded: Redis, redis_url: str, model_dir: Path, tmp_path: Path
) -> None:
    port = _free_port()
    experiments = tmp_path / "experiments.toml"
    experiments.write_text(AB)
    argv, env = serve_command(
        port, redis_url, model_dir, tmp_path / "data", experiments=str(experiments)
    )
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    try:
        await _ready(base, time.monotonic() + 90)
        async with aiohttp.ClientSession() as s:
            # Hold Redis writes: event posts (write deadline 2 s) and the exposure
            # writer wait, reads go on; then stop the service while they wait.
            await seeded.execute_command("CLIENT", "PAUSE", "1200", "WRITE")
            for k in range(30):  # each one is an exposure of experiment ranker-v2
                async with s.post(f"{base}/v1/recommendations", json={"user_id": f"u{k}"}) as r:
                    assert r.status == 200
            events = [
                s.post(
                    f"{base}/v1/events",
                    json={"event_id": f"sd{k}", "user_id": "u1", "item_id": "i1", "type": "view"},
                )
                for k in range(5)
            ]
            in_flight = [asyncio.ensure_future(e) for e in events]
            await asyncio.sleep(0.3)
            assert await seeded.xlen(keys.IMPRESSIONS) == 0  # all still queued in the service
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            assert not await asyncio.to_thread(_accepts, port)  # none accepted once stopping
            answers = await asyncio.gather(*in_flight)
            assert [a.status for a in answers] == [200] * 5  # finished, not cut off
            assert sum([(await a.json())["accepted"] for a in answers]) == 5
        code = await asyncio.wait_for(proc.wait(), 30)
        assert code == 0
        assert await seeded.xlen(keys.IMPRESSIONS) == 30  # the queue was flushed
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
