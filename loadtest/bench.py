"""In-process recommendation benchmark: the orchestration without HTTP, real Redis and model.

Uses the demo's data directory (run `recsvc demo` once first): the synthetic
log is loaded into a private redis-server (from the demo's snapshot when it
has one) and the demo's newest model scores. Prints per-stage and total
latency over N requests for random known users. Not a test: numbers vary with
the machine; compare medians and ratios measured in one run.

    .venv/bin/python loadtest/bench.py [--data-dir recsvc-data] [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from redis.asyncio import Redis

from features.candidates import CandidateConfig
from recsvc import seed
from recsvc.embedded import EmbeddedRedis
from recsvc.itemcache import ItemCache
from recsvc.models import ModelRegistry
from recsvc.recommend import Query, Recommender
from recsvc.settings import Settings
from recsvc.store import FeatureStore, connect

WARMUP = 200


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000.0


async def run(url: str, settings: Settings, requests: int, n: int, explicit: int) -> None:
    loader = Redis.from_url(url)
    if not await seed.is_seeded(loader):
        events, items = seed.synthetic_paths(settings.data_dir)
        catalogue, log = seed.load_files(events, items)
        print("seeding a private redis-server from", events)
        await seed.seed(loader, settings, catalogue, log, progress=False)
    await loader.aclose()

    client = connect(url, settings)
    store = FeatureStore(client, settings)
    items = ItemCache(store)
    await items.refresh()
    registry = ModelRegistry(settings.models_path, settings.model_name)
    registry.load_now()
    if registry.current is None:
        raise SystemExit(f"no model in {settings.models_path}: run `recsvc demo` first")
    rec = Recommender(store, items, registry, CandidateConfig(cap=settings.candidate_cap))
    rng = np.random.default_rng(0)
    users = [f"u{u}" for u in rng.integers(0, 20_000, size=requests + WARMUP)]
    ids = items.view.table.ids
    totals: list[float] = []
    stages: dict[str, list[float]] = {}
    n_cands: list[int] = []
    strategies: dict[str, int] = {}
    for k, user in enumerate(users):
        cands = None
        if explicit:
            cands = [ids[i] for i in rng.choice(len(ids), size=explicit, replace=False)]
        q = Query(request_id=uuid.uuid4().hex, user_id=user, n=n, candidates=cands)
        t0 = time.perf_counter()
        result = await rec.recommend(q)
        elapsed = time.perf_counter() - t0
        if k < WARMUP:
            continue
        totals.append(elapsed)
        strategies[result.strategy] = strategies.get(result.strategy, 0) + 1
        for stage, secs in result.timer.stages.items():
            stages.setdefault(stage, []).append(secs)
        if result.strategy == "model":
            n_cands.append(len(cands) if cands else settings.candidate_cap)
    await client.aclose()

    print(
        f"model {registry.current.version}, {requests} requests, n={n}, "
        f"candidates={'explicit ' + str(explicit) if explicit else 'from sources (cap 200)'}"
    )
    print(f"strategies: {strategies}")
    print(f"{'stage':<12}{'median ms':>10}{'p95 ms':>9}{'p99 ms':>9}")
    for stage, values in stages.items():
        print(
            f"{stage:<12}{_pct(values, 50):>10.3f}{_pct(values, 95):>9.3f}{_pct(values, 99):>9.3f}"
        )
    print(f"{'total':<12}{_pct(totals, 50):>10.3f}{_pct(totals, 95):>9.3f}{_pct(totals, 99):>9.3f}")
    print(f"median total: {statistics.median(totals) * 1000:.3f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=Settings().data_dir)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--n", type=int, default=10)
    p.add_argument(
        "--explicit-candidates",
        type=int,
        default=0,
        help="send this many random candidates instead of generating them",
    )
    args = p.parse_args()
    settings = Settings(data_dir=args.data_dir)
    snapshot = args.data_dir / "redis" / "dump.rdb"
    tmp = Path(tempfile.mkdtemp(prefix="recsvc-bench-"))
    try:
        if snapshot.is_file():
            shutil.copy(snapshot, tmp / "dump.rdb")
        with EmbeddedRedis(tmp) as server:
            asyncio.run(run(server.url, settings, args.requests, args.n, args.explicit_candidates))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
