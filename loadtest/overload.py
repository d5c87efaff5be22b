"""Overload test: measure capacity closed-loop, then offer a multiple of it at a fixed
rate and report latency per answer status (accepted 200s vs shed 503s).

locust cannot offer three times recsvc's capacity from the same small machine, so
this uses a lean client: keep-alive raw sockets, prebuilt requests, latency taken
from each request's *scheduled* time (so a client that falls behind cannot hide
queueing). Run it pinned to other cores than the service, e.g.:

    taskset -c 0 recsvc serve ... &        # the service on core 0
    taskset -c 1 .venv/bin/python loadtest/overload.py --host http://127.0.0.1:8080

Bounded: --capacity-time and --run-time seconds, --connections sockets.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from urllib.parse import urlsplit

import orjson
import uvloop

USERS = 20_000


def _request(user: str) -> bytes:
    body = orjson.dumps({"user_id": user, "n": 10})
    return (
        b"POST /v1/recommendations HTTP/1.1\r\nHost: recsvc\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def call(self, request: bytes) -> int:
        self.writer.write(request)
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        await self.reader.readexactly(length)
        return status


async def _open(host: str, port: int, n: int) -> list[Connection]:
    return [Connection(*await asyncio.open_connection(host, port)) for _ in range(n)]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000.0


async def capacity(host: str, port: int, users: int, seconds: float) -> float:
    """Closed loop: ``users`` connections, no think time; answers per second."""
    conns = await _open(host, port, users)
    done = 0
    end = time.perf_counter() + seconds

    async def loop(c: Connection) -> None:
        nonlocal done
        while time.perf_counter() < end:
            await c.call(_request(f"u{random.randrange(1, USERS)}"))
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(loop(c) for c in conns))
    for c in conns:
        c.writer.close()
    return done / (time.perf_counter() - start)


async def fixed_rate(
    host: str, port: int, rate: float, seconds: float, connections: int
) -> dict[str, object]:
    free: asyncio.Queue[Connection] = asyncio.Queue()
    for c in await _open(host, port, connections):
        free.put_nowait(c)
    latencies: dict[int, list[float]] = {}
    unsent = 0
    tasks: set[asyncio.Task[None]] = set()

    async def one(scheduled: float, request: bytes) -> None:
        conn = await free.get()
        status = await conn.call(request)
        latencies.setdefault(status, []).append(time.perf_counter() - scheduled)
        free.put_nowait(conn)

    start = time.perf_counter()
    k = 0
    while (now := time.perf_counter()) - start < seconds:
        due = start + k / rate
        if due > now:
            await asyncio.sleep(due - now)
            continue
        if free.empty() and len(tasks) >= connections * 4:
            unsent += 1  # the client itself is saturated: counted, not hidden
        else:
            task = asyncio.create_task(one(due, _request(f"u{random.randrange(1, USERS)}")))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        k += 1
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    return {
        "offered_per_s": round(k / elapsed, 1),
        "unsent": unsent,
        "by_status": {
            str(status): {
                "count": len(v),
                "per_s": round(len(v) / elapsed, 1),
                "p50_ms": round(_pct(v, 0.5), 2),
                "p99_ms": round(_pct(v, 0.99), 2),
                "max_ms": round(max(v) * 1000.0, 2),
            }
            for status, v in sorted(latencies.items())
        },
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="http://127.0.0.1:8080")
    ap.add_argument("--multiple", type=float, default=3.0, help="offered load / capacity")
    ap.add_argument("--capacity-time", type=float, default=10.0)
    ap.add_argument("--run-time", type=float, default=20.0)
    ap.add_argument("--users", type=int, default=32, help="closed-loop connections")
    ap.add_argument("--connections", type=int, default=512, help="fixed-rate connections")
    args = ap.parse_args()
    url = urlsplit(args.host)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    cap = await capacity(host, port, args.users, args.capacity_time)
    print(f"capacity (closed loop, {args.users} connections): {cap:.0f} answers/s")
    result = await fixed_rate(host, port, cap * args.multiple, args.run_time, args.connections)
    print(f"offered {args.multiple:g}x capacity for {args.run_time:g} s:")
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    uvloop.run(main())
