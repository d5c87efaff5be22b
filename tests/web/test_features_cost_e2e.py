"""POST /v1/features under load of its own size (issue 17, finding 4): the
user x item rows are capped, and a large answer never holds the event loop."""

from __future__ import annotations

import asyncio
import gc
import itertools
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from features.synthetic import SyntheticData
from recsvc.service.online import FeaturesGate
from recsvc.settings import Settings
from recsvc.web import appkeys
from recsvc.web.app import create_app
from tests.conftest import settings_for

pytestmark = pytest.mark.asyncio
Client = TestClient[Any, Any]


def _ids(data: SyntheticData, users: int, items: int) -> dict[str, list[str]]:
    known = list(dict.fromkeys(u for _, u, _, _ in data.events.rows()))
    return {"user_ids": known[:users], "item_ids": data.catalogue.item_ids[:items]}


async def test_users_times_items_past_the_cap_is_a_400_naming_the_field(
    client: Client, small_data: SyntheticData
) -> None:
    cap = Settings().features_max_cells
    assert cap == 2_000
    for users, items in [(21, 100), (100, 21)]:
        resp = await client.post("/v1/features", json=_ids(small_data, users, items))
        assert resp.status == 400, (users, items)
        error = (await resp.json())["error"]
        assert error["field"] == "item_ids" and str(cap) in error["message"]
    resp = await client.post("/v1/features", json=_ids(small_data, 20, 100))
    assert resp.status == 200
    body = await resp.json()
    assert sum(len(u["items"]) for u in body["users"]) == cap
    assert all(u["known"] for u in body["users"])


class Ticker:
    """A 1 ms callback on the running loop recording ``clock()`` at each tick,
    from ``start()`` to ``stop()``: the gaps show how long the loop was held."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.ticks: list[float] = []
        self.running = False

    def _tick(self) -> None:
        self.ticks.append(self.clock())
        if self.running:
            asyncio.get_running_loop().call_later(0.001, self._tick)

    def start(self) -> None:
        self.running = True
        self._tick()

    def stop(self) -> None:
        self.running = False

    def gaps(self) -> list[float]:
        return sorted(b - a for a, b in itertools.pairwise(self.ticks))


@pytest.fixture
def frozen_heap() -> Iterator[None]:
    """The heap as a served process has it (recsvc.web.server freezes it after
    start-up): a full collection of the test session's objects is not the
    request's doing."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


async def test_a_large_features_answer_never_holds_the_event_loop(
    seeded: Redis, redis_url: str, model_dir: Path, small_data: SyntheticData, frozen_heap: None
) -> None:
    """100 users x 100 items (the cap raised to allow it: a ~20 MB answer) while
    a 1 ms ticker runs on the loop: the most CPU the loop's thread spends
    between two ticks is a small share of the CPU the request costs. Before,
    the answer was encoded (and copied) in one piece on the loop: one stretch
    took a fifth of it (60-70 ms of ~300). CPU time, not wall time, so a busy
    machine that preempts the process does not fail the test."""
    app = create_app(settings_for(model_dir, features_max_cells=10_000), redis_url)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        await client.post("/v1/features", json=_ids(small_data, 2, 5))  # warm up
        ticker = Ticker(time.thread_time)
        ticker.start()
        spent = time.process_time()
        resp = await client.post("/v1/features", json=_ids(small_data, 100, 100))
        size = 0
        async for chunk in resp.content.iter_any():  # no one copy of it all here either
            size += len(chunk)
        spent = time.process_time() - spent
        ticker.stop()
    assert resp.status == 200 and size == int(resp.headers["Content-Length"]) > 10_000_000
    gaps = ticker.gaps()
    longest = gaps[-1]
    assert len(gaps) > 20
    assert longest < 0.10 * spent, (longest, spent)  # before: ~0.2; now ~0.03-0.05


# Four callers at once in another process (so this loop only serves them).
CALLERS = """
import asyncio, sys, aiohttp
async def main():
    async with aiohttp.ClientSession() as s:
        async def call():
            async with s.post(sys.argv[1], data=sys.argv[2],
                              headers={"Content-Type": "application/json"}) as r:
                async for _ in r.content.iter_any():
                    pass
                return r.status
        print(*await asyncio.gather(*(call() for _ in range(4))))
asyncio.run(main())
"""


async def test_concurrent_features_callers_take_turns_and_leave_the_loop_free(
    seeded: Redis, redis_url: str, model_dir: Path, small_data: SyntheticData, frozen_heap: None
) -> None:
    """From the outside review: four callers at the cap at once held the loop
    for 50-100 ms of wall time (their builds took turns holding the
    interpreter lock, which thread CPU time does not show). Builds now go one
    at a time per process and hand the lock to the loop between users: the
    loop's wall-clock gaps stay at a few ms (the callers run in another
    process, so this loop only serves them), well inside the 30 ms
    recommendation deadline; a caller that waits too long for its turn is
    turned away with 503 overloaded, never left hanging."""
    app = create_app(settings_for(model_dir), redis_url)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        await client.post("/v1/features", json=_ids(small_data, 2, 5))  # warm up
        ticker = Ticker(time.perf_counter)
        url = str(client.make_url("/v1/features"))
        body = orjson.dumps(_ids(small_data, 20, 100)).decode()
        callers = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CALLERS, url, body, stdout=asyncio.subprocess.PIPE
        )
        ticker.start()
        out, _ = await asyncio.wait_for(callers.communicate(), 60)
        ticker.stop()
    statuses = out.split()
    assert set(statuses) <= {b"200", b"503"} and b"200" in statuses, out
    gaps = ticker.gaps()
    assert len(gaps) > 20
    # Gaps over 6 ms: none here as a rule (the longest ~3-5 ms), one allowed
    # for a hiccup of the machine; the code before took 4-6 of 6-18 ms.
    assert sum(g > 0.006 for g in gaps) <= 1, gaps[-5:]


async def test_a_client_that_does_not_read_the_answer_is_cut_off_and_holds_no_one_up(
    seeded: Redis, redis_url: str, model_dir: Path, small_data: SyntheticData
) -> None:
    """From the outside review: answers were handed to aiohttp after the handler
    returned, so callers that never read held ~4 MB each, with no limit and no
    timeout, counted as 200. Now the answer is sent inside the process's
    features gate: a caller that does not read is cut off after the gate's
    send time (counted as 499), and meanwhile another caller waits at most the
    gate's wait time for a 503 overloaded."""
    app = create_app(settings_for(model_dir), redis_url)
    app[appkeys.FEATURES_GATE] = FeaturesGate(wait_secs=0.3, send_secs=1.0)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        body = orjson.dumps(_ids(small_data, 20, 100))
        # A small receive window (as a slow client over a real network has):
        # on loopback the kernel would otherwise take the whole answer at once.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", client.port))
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(
            b"POST /v1/features HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        await asyncio.sleep(0.3)  # the slow caller holds the gate, reading nothing
        other = await client.post("/v1/features", json=_ids(small_data, 2, 5))
        assert other.status == 503
        assert (await other.json())["error"]["code"] == "overloaded"
        await asyncio.sleep(1.5)  # past the send time
        received = b""
        while chunk := await asyncio.wait_for(reader.read(1 << 20), 5.0):  # to the close
            received += chunk
        writer.close()
        head, _, answer = received.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        assert 0 < len(answer) < length  # part of the answer, then the close
        after = await client.post("/v1/features", json=_ids(small_data, 2, 5))
        assert after.status == 200  # the gate is free again
        metrics = await (await client.get("/metrics")).text()
    cut = '{method="POST",route="/v1/features",status="499"}'
    assert f"recsvc_http_request_duration_seconds_count{cut} 1.0" in metrics
