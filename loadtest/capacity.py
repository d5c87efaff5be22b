"""What one configuration of a running recsvc delivers: answers per second, latency,
the share of answers that were ``strategy: model`` and the workers' CPU per model
answer, all from one run.

Two drivers, both bounded:

- ``--requests N --connections C``: a closed loop of exactly N requests over C
  keep-alive connections (our own lean client, no dependency). Use it for CPU
  per answer: the workers' CPU is read from ``/proc/<pid>/stat`` before and
  after, so the figure is the service's, not the client's.
- ``--wrk SECONDS --connections C``: the same through wrk (when installed), for
  throughput and latency percentiles from a client written in C.

Answers by strategy and fallback reason come from ``/metrics`` deltas (summed
over workers), so nothing the client cannot see is hidden. The workers are the
processes listening on the port. Pin the client away from the service when
measuring, e.g. ``taskset -c 1 python loadtest/capacity.py ...``.

    python loadtest/capacity.py --host http://127.0.0.1:8080 --requests 20000 --connections 4
    python loadtest/capacity.py --host http://127.0.0.1:8080 --wrk 20 --connections 16
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import Request, urlopen

import orjson

USERS = 5_000
# A service with API keys: RECSVC_LOADTEST_KEY, a key with the recommend scope
# (and admin for /metrics on the main listener).
KEY = os.environ.get("RECSVC_LOADTEST_KEY", "")
AUTH_HEADERS = {"Authorization": f"Bearer {KEY}"} if KEY else {}
AUTH_LINE = f"Authorization: Bearer {KEY}\r\n".encode() if KEY else b""
CLK_TCK = os.sysconf("SC_CLK_TCK")
_SAMPLE = re.compile(r"^(\w+)(?:\{(.*)\})? ([0-9.eE+-]+|NaN)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def listening_pids(port: int) -> list[int]:
    """The processes with a TCP socket listening on ``port`` (any address)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                inodes.add(fields[9])
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    pids.append(int(entry.name))
                    break
        except OSError:
            continue
    return sorted(pids)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of ``pids`` (all their threads) so far."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    with urlopen(Request(base + "/metrics", headers=AUTH_HEADERS), timeout=10) as response:
        text = response.read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            labels = tuple(sorted(_LABEL.findall(m.group(2) or "")))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def answers(
    before: dict[tuple[str, tuple[tuple[str, str], ...]], float],
    after: dict[tuple[str, tuple[tuple[str, str], ...]], float],
) -> dict[str, int]:
    """Recommendation answers between two scrapes: one entry per strategy
    ("model", "popular" when an experiment chose it) and one per fallback reason."""

    def delta(name: str, label: str) -> dict[str, int]:
        sums: dict[str, int] = {}
        for (sample, labels), value in after.items():
            if sample == name:
                key = dict(labels).get(label, "")
                sums[key] = sums.get(key, 0) + round(value - before.get((sample, labels), 0.0))
        return {k: v for k, v in sums.items() if v}

    out = delta("recsvc_recommendation_duration_seconds_count", "strategy")
    out.pop("fallback", None)  # listed by reason instead
    out.setdefault("model", 0)
    out.update(delta("recsvc_fallbacks_total", "reason"))
    return out


def _request(user: str) -> bytes:
    body = orjson.dumps({"user_id": user, "n": 10})
    return (
        b"POST /v1/recommendations HTTP/1.1\r\nHost: recsvc\r\n%s"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (AUTH_LINE, len(body), body)
    )


async def _call(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    writer.write(request)
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


@dataclass
class Run:
    requests: int
    seconds: float
    latencies_ms: dict[int, list[float]]  # by HTTP status


async def closed_loop(
    host: str, port: int, requests: int, connections: int, users: int = USERS
) -> Run:
    """Exactly ``requests`` requests over ``connections`` connections, no think time."""
    conns = [await asyncio.open_connection(host, port) for _ in range(connections)]
    left = requests
    latencies: dict[int, list[float]] = {}

    async def loop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            t0 = time.perf_counter()
            status = await _call(reader, writer, _request(f"u{random.randint(1, users)}"))
            latencies.setdefault(status, []).append((time.perf_counter() - t0) * 1000.0)

    start = time.perf_counter()
    await asyncio.gather(*(loop(r, w) for r, w in conns))
    seconds = time.perf_counter() - start
    for _, w in conns:
        w.close()
    return Run(requests, seconds, latencies)


WRK_SCRIPT = """
math.randomseed(os.time())
request = function()
  local body = '{"user_id":"u' .. math.random(1, %d) .. '","n":10}'
  return wrk.format("POST", "/v1/recommendations", {["Content-Type"]="application/json"%s}, body)
end
"""


def wrk(base: str, seconds: float, connections: int, users: int = USERS) -> dict[str, float]:
    """Run wrk; its request count, rate and latency percentiles (ms)."""
    exe = shutil.which("wrk")
    if exe is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        auth = f', ["Authorization"]="Bearer {KEY}"' if KEY else ""
        script.write(WRK_SCRIPT % (users, auth))
        script.flush()
        cmd = [exe, "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", script.name]
        text = subprocess.run(
            [*cmd, base], capture_output=True, text=True, check=True, timeout=seconds + 30
        ).stdout
    out: dict[str, float] = {}
    for pct in ("50", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+([0-9.]+)(us|ms|s)$", text, re.M)
        if m:
            scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
            out[f"p{pct}_ms"] = float(m.group(1)) * scale
    m = re.search(r"(\d+) requests in ([0-9.]+)s", text)
    if m:
        out["requests"], out["seconds"] = float(m.group(1)), float(m.group(2))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    out["non_2xx"] = float(m.group(1)) if m else 0.0
    m = re.search(r"Socket errors: (.*)", text)
    out["socket_errors"] = 1.0 if m else 0.0
    return out


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 3) if values else float("nan")


def measure(
    base: str, requests: int, connections: int, wrk_secs: float = 0.0, users: int = USERS
) -> dict[str, object]:
    """One measured run against the service at ``base``; the report as a dict."""
    url = urlsplit(base)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    pids = listening_pids(port)
    if not pids:
        raise SystemExit(f"nothing listens on port {port}")
    before, cpu0 = scrape(base), cpu_seconds(pids)
    report: dict[str, object] = {"workers": len(pids), "connections": connections}
    if wrk_secs:
        result = wrk(base, wrk_secs, connections, users)
        seconds = result.pop("seconds", wrk_secs)
        report.update(result)
    else:
        run = asyncio.run(closed_loop(host, port, requests, connections, users))
        seconds = run.seconds
        every = [ms for values in run.latencies_ms.values() for ms in values]
        report.update(
            requests=run.requests,
            p50_ms=_pct(every, 0.5),
            p99_ms=_pct(every, 0.99),
            by_status={
                str(status): {
                    "count": len(values),
                    "p50_ms": _pct(values, 0.5),
                    "p99_ms": _pct(values, 0.99),
                }
                for status, values in sorted(run.latencies_ms.items())
            },
        )
    cpu = cpu_seconds(pids) - cpu0
    by = answers(before, scrape(base))
    total = sum(by.values())
    model = by.get("model", 0)
    report.update(
        seconds=round(seconds, 3),
        answers=by,
        answers_per_s=round(total / seconds, 1),
        model_answers_per_s=round(model / seconds, 1),
        model_share=round(model / total, 5) if total else 0.0,
        cpu_seconds=round(cpu, 3),
        cpu_ms_per_model_answer=round(cpu / model * 1000.0, 4) if model else None,
    )
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="http://127.0.0.1:8080")
    p.add_argument("--requests", type=int, default=20_000, help="closed-loop request count")
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--wrk", type=float, default=0.0, help="run wrk for this many seconds instead")
    p.add_argument("--user-ids", type=int, default=USERS, help="requests go to users u1..uN")
    args = p.parse_args()
    if args.requests < 1 or args.connections < 1 or args.wrk < 0:
        p.error("--requests and --connections must be >= 1, --wrk >= 0")
    report = measure(
        args.host.rstrip("/"), args.requests, args.connections, args.wrk, args.user_ids
    )
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
