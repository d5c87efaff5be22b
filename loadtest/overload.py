"""Overload test: measure what the service delivers closed-loop (capacity C, model
answers within the deadline per second), then offer a multiple of C at a fixed
rate and report, per HTTP status and strategy, what came back and how fast,
timed from each request's *scheduled* start (a client that falls behind cannot
hide queueing).

A 2-core machine cannot offer three times a worker's capacity from a client on
the same box unless the service is made slower. ``--throttle 0.5`` puts the
processes listening on the port into a cgroup v1 CPU quota (half a core, in
2 ms periods, so the CPU is slower rather than stop-and-go) for the run and
takes them out afterwards; run the client pinned to another core:

    taskset -c 0 recsvc demo --workers 1 &
    taskset -c 1 .venv/bin/python loadtest/overload.py --throttle 0.5

The report says whether the run held: goodput (model answers within the
deadline) at least ``--min-goodput`` x C, every rejection within
``--max-reject-ms``, the circuit never open and no ``feature_store_unavailable``.
Bounded: ``--capacity-time`` and ``--run-time`` seconds, ``--connections`` sockets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import orjson
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script
from loadtest.capacity import AUTH_LINE, cpu_seconds, listening_pids, scrape

USERS = 5_000
CGROUP = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 2_000
Key = tuple[int, str]  # (status, strategy or fallback reason)


def _request(user: str) -> bytes:
    body = orjson.dumps({"user_id": user, "n": 10})
    return (
        b"POST /v1/recommendations HTTP/1.1\r\nHost: recsvc\r\n%s"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (AUTH_LINE, len(body), body)
    )


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def call(self, request: bytes) -> Key:
        """Status and, for a 200, the strategy ("model") or the fallback reason."""
        self.writer.write(request)
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        body = orjson.loads(await self.reader.readexactly(length))
        if status != 200:
            return status, body.get("error", {}).get("code", "")
        return status, body.get("fallback_reason") or body.get("strategy", "")


async def _open(host: str, port: int, n: int) -> list[Connection]:
    return [Connection(*await asyncio.open_connection(host, port)) for _ in range(n)]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000.0, 2)


USER_IDS = [USERS]  # set from --user-ids


def _user() -> bytes:
    return _request(f"u{random.randint(1, USER_IDS[0])}")


async def capacity(host: str, port: int, users: int, seconds: float, deadline: float) -> float:
    """Closed loop, ``users`` connections, no think time: model answers within the
    deadline per second."""
    conns = await _open(host, port, users)
    good = 0
    end = time.perf_counter() + seconds

    async def loop(c: Connection) -> None:
        nonlocal good
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            status, what = await c.call(_user())
            if status == 200 and what == "model" and time.perf_counter() - t0 <= deadline:
                good += 1

    start = time.perf_counter()
    await asyncio.gather(*(loop(c) for c in conns))
    for c in conns:
        c.writer.close()
    return good / (time.perf_counter() - start)


async def fixed_rate(
    host: str, port: int, rate: float, seconds: float, connections: int
) -> tuple[dict[Key, list[float]], int, float, int]:
    """Offer ``rate`` requests/s for ``seconds``. Returns latencies from scheduled
    start by (status, strategy), requests the client could not send (all
    connections busy: counted, not hidden), the elapsed time and the requests sent."""
    free: asyncio.Queue[Connection] = asyncio.Queue()
    for c in await _open(host, port, connections):
        free.put_nowait(c)
    latencies: dict[Key, list[float]] = {}
    unsent = 0
    tasks: set[asyncio.Task[None]] = set()

    async def one(scheduled: float) -> None:
        conn = await free.get()
        key = await conn.call(_user())
        latencies.setdefault(key, []).append(time.perf_counter() - scheduled)
        free.put_nowait(conn)

    start = time.perf_counter()
    k = 0
    while (now := time.perf_counter()) - start < seconds:
        due = start + k / rate
        if due > now:
            await asyncio.sleep(due - now)
            continue
        if free.empty() and len(tasks) >= connections:
            unsent += 1
        else:
            task = asyncio.create_task(one(due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        k += 1
    await asyncio.gather(*tasks)
    return latencies, unsent, time.perf_counter() - start, k - unsent


@contextlib.contextmanager
def throttled(port: int, share: float) -> Iterator[list[int]]:
    """The processes listening on ``port`` in a cgroup v1 CPU quota of ``share``
    of one core (2 ms periods) for the duration; moved back out afterwards."""
    pids = listening_pids(port)
    if not pids:
        raise SystemExit(f"nothing listens on port {port}")
    group = CGROUP / "recsvc-overload"
    group.mkdir(exist_ok=True)
    (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
    (group / "cpu.cfs_quota_us").write_text(str(max(1000, int(PERIOD_US * share))))
    for pid in pids:
        (group / "cgroup.procs").write_text(str(pid))
    try:
        yield pids
    finally:
        for pid in pids:
            with contextlib.suppress(OSError):
                (CGROUP / "cgroup.procs").write_text(str(pid))
        with contextlib.suppress(OSError):
            group.rmdir()


def _delta(
    before: dict[tuple[str, tuple[tuple[str, str], ...]], float],
    after: dict[tuple[str, tuple[tuple[str, str], ...]], float],
    name: str,
    label: str,
) -> dict[str, int]:
    out: dict[str, int] = {}
    for (sample, labels), value in after.items():
        if sample == name:
            key = dict(labels).get(label, "")
            out[key] = out.get(key, 0) + round(value - before.get((sample, labels), 0.0))
    return {k: v for k, v in out.items() if v}


async def run(args: argparse.Namespace) -> dict[str, object]:
    url = urlsplit(args.host)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    deadline = args.deadline_ms / 1000.0
    cap = await capacity(host, port, args.users, args.capacity_time, deadline)
    before = scrape(args.host)
    pids = listening_pids(port)
    cpu0 = cpu_seconds(pids)
    circuit: list[float] = []
    limits: list[float] = []

    async def watch_circuit() -> None:
        while True:  # the breaker's state and the admission limit every 200 ms
            state = await asyncio.to_thread(scrape, args.host)
            circuit.append(state.get(("recsvc_redis_circuit_state", ()), 0.0))
            limits.append(state.get(("recsvc_admission_limit", ()), 0.0))
            await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch_circuit())
    rate = cap * args.multiple
    latencies, unsent, elapsed, sent = await fixed_rate(
        host, port, rate, args.run_time, args.connections
    )
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    after = scrape(args.host)
    cpu = cpu_seconds(pids) - cpu0
    by_answer = {
        f"{status} {what}": {
            "count": len(v),
            "per_s": round(len(v) / elapsed, 1),
            "p50_ms": _pct(v, 0.5),
            "p99_ms": _pct(v, 0.99),
            "max_ms": _pct(v, 1.0),
        }
        for (status, what), v in sorted(latencies.items())
    }
    model = latencies.get((200, "model"), [])
    goodput = sum(1 for s in model if s <= deadline) / elapsed
    rejected = [s for (status, _), v in latencies.items() if status == 503 for s in v]
    reasons = _delta(before, after, "recsvc_fallbacks_total", "reason")
    checks = {
        "goodput": goodput >= args.min_goodput * cap,
        "rejections_fast": not rejected or max(rejected) * 1000.0 <= args.max_reject_ms,
        "circuit_never_open": max(circuit, default=0.0) < 2.0,
        "no_feature_store_unavailable": "feature_store_unavailable" not in reasons,
        "nothing_unsent": unsent == 0,
    }
    return {
        "capacity_per_s": round(cap, 1),
        "offered_per_s": round(sent / elapsed, 1),
        "unsent": unsent,
        "goodput_per_s": round(goodput, 1),
        "goodput_over_capacity": round(goodput / cap, 3) if cap else 0.0,
        "rejected": len(rejected),
        "rejected_max_ms": _pct(rejected, 1.0),
        "answers": by_answer,
        "fallbacks_by_reason": reasons,
        "shed_by_cause": _delta(before, after, "recsvc_shed_requests_total", "cause"),
        "redis_read_errors": _delta(before, after, "recsvc_redis_errors_total", "error"),
        "circuit_max": max(circuit, default=0.0),
        "admission_limit_median": sorted(limits)[len(limits) // 2] if limits else None,
        "service_cpu_share": round(cpu / elapsed, 3),
        "checks": checks,
        "passed": all(checks.values()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="http://127.0.0.1:8080")
    ap.add_argument("--multiple", type=float, default=3.0, help="offered load / capacity")
    ap.add_argument("--capacity-time", type=float, default=10.0)
    ap.add_argument("--run-time", type=float, default=30.0)
    ap.add_argument("--users", type=int, default=16, help="closed-loop connections")
    ap.add_argument("--connections", type=int, default=256, help="fixed-rate connections")
    ap.add_argument("--deadline-ms", type=float, default=30.0, help="the service's deadline")
    ap.add_argument("--throttle", type=float, default=0.0, help="CPU quota, share of a core")
    ap.add_argument("--min-goodput", type=float, default=0.9, help="share of capacity")
    ap.add_argument("--max-reject-ms", type=float, default=5.0)
    ap.add_argument("--user-ids", type=int, default=USERS, help="requests go to users u1..uN")
    args = ap.parse_args()
    USER_IDS[0] = args.user_ids
    args.host = args.host.rstrip("/")
    port = urlsplit(args.host).port or 80
    with throttled(port, args.throttle) if args.throttle else contextlib.nullcontext():
        report = uvloop.run(run(args))
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
