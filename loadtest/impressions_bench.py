"""What logging every answer costs: model answers per second of a real worker
(`recsvc serve`, real HTTP, real Redis) with RECSVC_IMPRESSIONS_SAMPLE=0 and =1,
alternating in one run.

Each round starts two fresh workers side by side, one per sampling rate, on
the same cores and the same Redis, and drives one, then the other (the order
flips every round), closed-loop with a fixed number of requests over a few
connections, few enough that admission control never turns one away (the
overload-free benchmark). The two bursts of a round are seconds apart, so a
machine whose load comes and goes (another job on a shared host) moves both
alike; fresh workers every round, so a process that happens to run a few per
cent faster than another (memory layout, hash seeds) is not one rate's for
the whole run. From ``/metrics`` deltas each burst takes the answers by
strategy and fallback reason, so the figure is model answers per second, not
fast fallbacks; from ``/proc`` the worker's CPU per model answer; from Redis
how many impressions it wrote (all its answers at 1, none at 0). The report
gives each burst, the medians per rate, their ratio and the ratio within each
round; the budget is a ratio of at least 0.95.

Uses the demo's data directory like loadtest/bench.py (its model; its Redis
snapshot or synthetic log, loaded into a private redis-server). The workers are
pinned to ``--server-cpus``, the redis-server to ``--redis-cpus`` (by default
the same: its work for the impressions then counts against the workers, as
it does where Redis shares their host); pin this client to another core.
Bounded: ``--rounds`` x 2 bursts of ``--requests`` requests each, and
``--max-seconds`` for the whole run (the report says when it stopped early).

    taskset -c 1 .venv/bin/python -m loadtest.impressions_bench --server-cpus 0
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import orjson
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script
from loadtest import bench
from loadtest.capacity import answers, closed_loop, cpu_seconds, listening_pids, scrape
from recsvc.ops.embedded import EmbeddedRedis
from recsvc.settings import Settings
from recsvc.store import keys

SAMPLES = (0.0, 1.0)
BUDGET = 0.95  # model answers/s at sampling 1 over sampling 0
READY_SECS = 120.0
# The first compile of a model by a fresh cache takes a few seconds.
SCORER_SECS = 120.0


@dataclass
class Run:
    sample: float
    seconds: float
    answers: dict[str, int]
    model_per_s: float
    model_share: float
    cpu_ms_per_model_answer: float | None
    impressions: int
    # Requests not answered 200 (e.g. 503 from admission control), by status.
    refused: dict[str, int] = field(default_factory=dict)


@dataclass
class Report:
    runs: list[Run] = field(default_factory=list)
    stopped_early: bool = False

    def median(self, sample: float) -> float:
        values = [r.model_per_s for r in self.runs if r.sample == sample]
        return statistics.median(values) if values else 0.0

    def median_cpu(self, sample: float) -> float:
        values = [
            r.cpu_ms_per_model_answer
            for r in self.runs
            if r.sample == sample and r.cpu_ms_per_model_answer is not None
        ]
        return statistics.median(values) if values else 0.0

    @property
    def ratio(self) -> float:
        base = self.median(0.0)
        return self.median(1.0) / base if base else 0.0

    @property
    def round_ratios(self) -> list[float]:
        """Sampling 1 over sampling 0 within each round (its two bursts are seconds
        apart)."""
        out = []
        for k in range(0, len(self.runs) - 1, 2):
            pair = {r.sample: r.model_per_s for r in self.runs[k : k + 2]}
            if pair.get(0.0):
                out.append(round(pair.get(1.0, 0.0) / pair[0.0], 4))
        return out

    @property
    def passed(self) -> bool:
        return self.ratio >= BUDGET and not self.stopped_early

    def as_dict(self) -> dict[str, Any]:
        return {
            "runs": [r.__dict__ for r in self.runs],
            "median_model_per_s": {str(s): round(self.median(s), 1) for s in SAMPLES},
            "median_cpu_ms_per_model_answer": {
                str(s): round(self.median_cpu(s), 4) for s in SAMPLES
            },
            "ratio": round(self.ratio, 4),
            "round_ratios": self.round_ratios,
            "budget": BUDGET,
            "passed": self.passed,
            "stopped_early": self.stopped_early,
        }

    def table(self) -> str:
        lines = [
            f"{'sample':>6}{'seconds':>9}{'model/s':>10}{'model %':>9}{'CPU ms':>8}"
            f"{'impressions':>13}  fallbacks, refused"
        ]
        for r in self.runs:
            others = {k: v for k, v in r.answers.items() if k != "model"}
            others |= {f"HTTP {k}": v for k, v in r.refused.items()}
            cpu = f"{r.cpu_ms_per_model_answer:.3f}" if r.cpu_ms_per_model_answer else "-"
            lines.append(
                f"{r.sample:>6g}{r.seconds:>9.2f}{r.model_per_s:>10.1f}"
                f"{100 * r.model_share:>9.2f}{cpu:>8}{r.impressions:>13}  "
                + (", ".join(f"{k} {v}" for k, v in sorted(others.items())) or "-")
            )
        lines.append(
            f"medians: sampling 0 {self.median(0.0):.1f} model answers/s "
            f"({self.median_cpu(0.0):.3f} ms CPU each), sampling 1 {self.median(1.0):.1f} "
            f"({self.median_cpu(1.0):.3f} ms); ratio {self.ratio:.4f} "
            + ("PASS" if self.passed else "FAIL")
            + f" (budget >= {BUDGET})"
            + (" -- stopped early at --max-seconds" if self.stopped_early else "")
        )
        ratios = self.round_ratios
        if ratios:
            lines.append(
                f"per round: {', '.join(f'{r:.3f}' for r in ratios)}; "
                f"median {statistics.median(ratios):.4f}"
            )
        return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> dict[str, Any] | None:
    try:
        with urlopen(url, timeout=2) as resp:
            return dict(orjson.loads(resp.read()))
    except (OSError, ValueError):
        return None


def _serve(
    redis_url: str,
    model_dir: Path,
    data_dir: Path,
    port: int,
    sample: float,
    scorer: str,
    cpus: set[int] | None,
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSVC_")}
    env |= {
        "RECSVC_IMPRESSIONS_SAMPLE": str(sample),
        "RECSVC_SCORER": scorer,
        "RECSVC_LOG_LEVEL": "WARNING",
    }
    argv = [sys.executable, "-m", "recsvc", "serve", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--workers", "1", "--redis-url", redis_url, "--model-dir", str(model_dir)]
    argv += ["--data-dir", str(data_dir)]

    def pin() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    return subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pin
    )


def _wait_ready(base: str, proc: subprocess.Popen[bytes], scorer: str) -> None:
    """Ready with a model, served by the scorer asked for."""
    want = "lleaves" if scorer == "compiled" else "native"
    deadline = time.monotonic() + READY_SECS + (SCORER_SECS if scorer == "compiled" else 0)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"recsvc serve exited with code {proc.returncode}")
        body = _get(f"{base}/readyz")
        if (
            body
            and body.get("status") == "ready"
            and (body.get("model") or {}).get("scorer") == want
        ):
            return
        time.sleep(0.2)
    raise SystemExit(f"{base} was not ready with the {want} scorer in time")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # drains, and flushes the impression log
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Worker:
    sample: float
    port: int
    proc: subprocess.Popen[bytes]
    pids: list[int] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _burst(w: Worker, requests: int, connections: int, users: int, timeout: float) -> Run:
    """One closed-loop measurement of one worker, from /metrics and /proc deltas."""
    before, cpu0 = scrape(w.base), cpu_seconds(w.pids)
    run = asyncio.run(
        asyncio.wait_for(closed_loop("127.0.0.1", w.port, requests, connections, users), timeout)
    )
    cpu = cpu_seconds(w.pids) - cpu0
    by = answers(before, scrape(w.base))
    total, model = sum(by.values()), by.get("model", 0)
    return Run(
        sample=w.sample,
        seconds=round(run.seconds, 3),
        answers=by,
        model_per_s=round(model / run.seconds, 1),
        model_share=round(model / total, 5) if total else 0.0,
        cpu_ms_per_model_answer=round(cpu / model * 1000.0, 4) if model else None,
        impressions=0,
        refused={str(k): len(v) for k, v in run.latencies_ms.items() if k != 200},
    )


def run(
    redis_url: str,
    model_dir: Path,
    data_dir: Path,
    rounds: int = 5,
    requests: int = 5_000,
    connections: int = 4,
    users: int = 5_000,
    scorer: str = "compiled",
    cpus: set[int] | None = None,
    warmup: int = 1_000,
    max_seconds: float = 900.0,
) -> Report:
    """Each round starts two fresh workers, one per sampling rate, and measures
    one, then the other (the order flipping each round)."""
    report = Report()
    started = time.monotonic()
    client = redis.Redis.from_url(redis_url)
    try:
        for k in range(rounds):
            if time.monotonic() - started >= max_seconds:
                report.stopped_early = True
                break
            client.delete(keys.IMPRESSIONS)  # every round starts from the same Redis
            workers: list[Worker] = []
            try:
                for sample in SAMPLES:
                    port = _free_port()
                    proc = _serve(redis_url, model_dir, data_dir, port, sample, scorer, cpus)
                    workers.append(Worker(sample, port, proc))
                for w in workers:
                    _wait_ready(w.base, w.proc, scorer)
                    w.pids = listening_pids(w.port)
                    left = max(1.0, max_seconds - (time.monotonic() - started))
                    asyncio.run(
                        asyncio.wait_for(
                            closed_loop("127.0.0.1", w.port, warmup, connections, users), left
                        )
                    )
                time.sleep(0.5)  # the warm-ups' impressions are written (every 200 ms)
                for w in workers if k % 2 == 0 else workers[::-1]:
                    left = max(1.0, max_seconds - (time.monotonic() - started))
                    xlen = int(client.xlen(keys.IMPRESSIONS))
                    burst = _burst(w, requests, connections, users, left)
                    time.sleep(0.5)  # the writer flushes every 200 ms
                    burst.impressions = int(client.xlen(keys.IMPRESSIONS)) - xlen
                    report.runs.append(burst)
            finally:
                for w in workers:
                    _stop(w.proc)
        return report
    finally:
        client.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=Settings().data_dir)
    p.add_argument("--rounds", type=int, default=5, help="pairs of bursts (sampling 0 and 1)")
    p.add_argument("--requests", type=int, default=5_000, help="measured requests per burst")
    p.add_argument("--warmup", type=int, default=1_000, help="requests to each worker first")
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--users", type=int, default=5_000, help="requests go to users u1..uN")
    p.add_argument("--scorer", choices=("compiled", "native"), default="compiled")
    p.add_argument("--server-cpus", default="", help="cores for the workers, e.g. 0")
    p.add_argument(
        "--redis-cpus", default=None, help="cores for the redis-server (default: --server-cpus)"
    )
    p.add_argument("--max-seconds", type=float, default=900.0, help="bound of the whole run")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    args = p.parse_args()
    if min(args.rounds, args.requests, args.connections, args.users) < 1 or args.warmup < 0:
        p.error("--rounds, --requests, --connections and --users must be >= 1")
    cpus = {int(c) for c in args.server_cpus.split(",") if c.strip()} or None
    redis_cpus = cpus
    if args.redis_cpus is not None:
        redis_cpus = {int(c) for c in args.redis_cpus.split(",") if c.strip()} or None
    settings = Settings(data_dir=args.data_dir)
    snapshot = args.data_dir / "redis" / "dump.rdb"
    tmp = Path(tempfile.mkdtemp(prefix="recsvc-impressions-bench-"))
    try:
        if snapshot.is_file():
            shutil.copy(snapshot, tmp / "dump.rdb")
        with EmbeddedRedis(tmp) as server:
            if redis_cpus and server.pid:
                os.sched_setaffinity(server.pid, redis_cpus)
            asyncio.run(bench._load(server.url, settings))
            report = run(
                server.url,
                settings.models_path,
                args.data_dir,
                args.rounds,
                args.requests,
                args.connections,
                args.users,
                args.scorer,
                cpus,
                args.warmup,
                args.max_seconds,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(orjson.dumps(report.as_dict(), option=orjson.OPT_INDENT_2).decode())
    else:
        print(report.table())


if __name__ == "__main__":
    main()
