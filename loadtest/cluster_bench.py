"""Item-side ingestion on a Redis Cluster: how the Redis CPU of item writes
spreads over the masters.

Starts a local cluster (``--masters`` masters on loopback, equal slot ranges),
applies ``--events`` generated events through ``FeatureStore.apply_events``
and reads ``INFO commandstats`` (microseconds spent in EVALSHA) from every
master. User-side and item-side scripts are both EVALSHA, so the run is made
once per master with every user id chosen to hash to that master: in run k
the other masters do item-side work only. A master's item-side time is its
EVALSHA time in the runs where the users lived elsewhere (the item stream is
the same in every run, into a flushed cluster), averaged; its process CPU
(INFO cpu) over those runs is reported beside it. Reports each master's share
against an even share. Not a test: numbers vary with the
machine; the tests run it at a tiny size.

    .venv/bin/python -m loadtest.cluster_bench [--events 100000] [--masters 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass

import numpy as np
from redis.crc import key_slot

from loadtest.cluster import SLOTS, LocalCluster
from recsvc.settings import Settings
from recsvc.store.client import connect
from recsvc.store.feature_store import EventWrite, FeatureStore

BATCH = 200


@dataclass(frozen=True, slots=True)
class ClusterBenchResult:
    events: int
    masters: int
    item_usec: list[float]  # item-side EVALSHA microseconds per master (commandstats)
    item_share: list[float]  # of the total item-side time
    worst_deviation: float  # largest |share / even share - 1|
    item_cpu_seconds: list[float]  # the master process's CPU (INFO cpu) in those runs
    cpu_share: list[float]
    cpu_worst_deviation: float
    item_calls: list[int]  # item-side EVALSHA calls per master
    events_per_second: list[float]  # per run (the Python client is the bottleneck here)


def _master_of(slot: int, masters: int) -> int:
    """The master owning a slot in LocalCluster's equal contiguous ranges."""
    bounds = [SLOTS * k // masters for k in range(masters + 1)]
    return next(k for k in range(masters) if bounds[k] <= slot < bounds[k + 1])


def user_names(masters: int, home: int, count: int) -> list[str]:
    """``count`` user ids whose {u:<id>} keys live on master ``home``."""
    out: list[str] = []
    k = 0
    while len(out) < count:
        name = f"m{home}u{k}"
        if _master_of(key_slot(f"{{u:{name}}}:s".encode()), masters) == home:
            out.append(name)
        k += 1
    return out


def stream(
    n_events: int, n_items: int, n_users: int, seed: int = 0
) -> list[tuple[int, int, int, float]]:
    """(user index, item index, type, ts): shoppers browsing a power-law
    catalogue in sessions (same hour: co-visits, which touch partner shards)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_items + 1) ** 0.8
    cdf = np.cumsum(weights / weights.sum())
    items = np.searchsorted(cdf, rng.random(n_events))
    users = rng.integers(0, n_users, n_events)
    types = rng.choice(4, n_events, p=[0.7, 0.2, 0.07, 0.03])
    t0 = time.time() - 3 * 3600.0
    ts = t0 + np.sort(rng.uniform(0, 3 * 3600.0, n_events))
    return list(zip(users.tolist(), items.tolist(), types.tolist(), ts.tolist(), strict=True))


def _evalsha(cluster: LocalCluster) -> list[tuple[int, float]]:
    out = []
    for port in cluster.ports:
        stats = cluster.node(port).info("commandstats").get("cmdstat_evalsha", {})
        out.append((int(stats.get("calls", 0)), float(stats.get("usec", 0))))
    return out


def _cpu(cluster: LocalCluster) -> list[float]:
    """Each master's process CPU so far (user + system seconds)."""
    out = []
    for port in cluster.ports:
        info = cluster.node(port).info("cpu")
        out.append(float(info["used_cpu_user"]) + float(info["used_cpu_sys"]))
    return out


async def _apply(url: str, events: list[EventWrite]) -> float:
    settings = Settings(redis_timeout_ms=5000.0, redis_write_timeout_ms=30_000.0)
    client = connect(url, settings, writes=True)
    store = FeatureStore(client, settings)
    await store.check_format()
    started = time.perf_counter()
    for k in range(0, len(events), BATCH):
        await store.apply_events(events[k : k + BATCH])
    elapsed = time.perf_counter() - started
    await store.aclose()
    return len(events) / elapsed


def run(
    n_events: int, masters: int = 3, n_items: int = 20_000, n_users: int = 5_000
) -> ClusterBenchResult:
    plan = stream(n_events, n_items, n_users)
    usec: list[list[float]] = [[] for _ in range(masters)]
    cpu: list[list[float]] = [[] for _ in range(masters)]
    calls: list[list[int]] = [[] for _ in range(masters)]
    rates = []
    with LocalCluster(masters) as cluster:
        # One run per master holding the users; every other master's EVALSHA
        # time in that run is item-side only. Each master is measured masters-1
        # times and averaged (usec is elapsed time: a shared machine adds noise).
        for home in range(masters):
            names = user_names(masters, home, n_users)
            events = [
                EventWrite(names[u], f"i{i}", t, ts, f"e{k}")
                for k, (u, i, t, ts) in enumerate(plan)
            ]
            cluster.each("FLUSHALL")
            cluster.each("CONFIG", "RESETSTAT")
            before = _cpu(cluster)
            rates.append(asyncio.run(_apply(cluster.url, events)))
            after = _cpu(cluster)
            for m, (n_calls, spent) in enumerate(_evalsha(cluster)):
                if m != home:
                    calls[m].append(n_calls)
                    usec[m].append(spent)
                    cpu[m].append(after[m] - before[m])
    mean_usec = [float(np.mean(u)) for u in usec]
    mean_cpu = [float(np.mean(c)) for c in cpu]
    shares = [u / sum(mean_usec) for u in mean_usec]
    cpu_shares = [c / sum(mean_cpu) for c in mean_cpu]
    return ClusterBenchResult(
        events=n_events,
        masters=masters,
        item_usec=mean_usec,
        item_share=shares,
        worst_deviation=max(abs(s * masters - 1.0) for s in shares),
        item_cpu_seconds=mean_cpu,
        cpu_share=cpu_shares,
        cpu_worst_deviation=max(abs(s * masters - 1.0) for s in cpu_shares),
        item_calls=[int(np.mean(c)) for c in calls],
        events_per_second=rates,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--masters", type=int, default=3)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--users", type=int, default=5_000)
    args = p.parse_args()
    result = run(args.events, args.masters, args.items, args.users)
    print(json.dumps(asdict(result), indent=2))


if __name__ == "__main__":
    main()
