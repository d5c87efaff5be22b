"""In-process recommendation benchmark: every stage of a request without the network.

Uses the demo's data directory (run `recsvc demo` once first): the demo's Redis
snapshot (or its synthetic log) goes into a private redis-server and the demo's
newest model scores. For 50, 200 and 500 candidates (from the real sources,
padded with popular items to exactly that many) and for each scorer, it times
the stages a request goes through — validate (msgspec decode of the JSON
body), redis, candidates, matrix, score, serialise (orjson) — and the CPU time
of this process per request. Not a test: numbers vary with the machine;
compare medians and ratios measured in one run.

    .venv/bin/python loadtest/bench.py [--data-dir recsvc-data] [--requests 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import orjson
from redis.asyncio import Redis

from features.candidates import CandidateConfig
from recsvc.cli import seed
from recsvc.ops.embedded import EmbeddedRedis
from recsvc.ranking.models import ModelRegistry
from recsvc.ranking.scoring import Compiler, available
from recsvc.service.itemcache import ItemCache
from recsvc.service.recommend import Query, Recommender
from recsvc.settings import Settings
from recsvc.store.client import connect
from recsvc.store.feature_store import FeatureStore
from recsvc.web.api import RecommendRequest, decode_json

WARMUP = 100
SIZES = (50, 200, 500)
STAGES = ("validate", "redis", "candidates", "matrix", "score", "serialise")


def _ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000.0


async def _load(url: str, settings: Settings) -> None:
    loader = Redis.from_url(url)
    if not await seed.is_seeded(loader):
        events, items = seed.synthetic_paths(settings.data_dir)
        catalogue, log = seed.load_files(events, items)
        print("seeding a private redis-server from", events)
        await seed.seed(loader, settings, catalogue, log, progress=False)
    await loader.aclose()


async def _measure(
    rec: Recommender, users: list[str], n: int
) -> tuple[dict[str, list[float]], list[float], float, int, Counter[str]]:
    """Stage times of the answers the model served (the others are counted by
    fallback reason, never timed: a fast fallback is not a fast recommendation)."""
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    totals: list[float] = []
    cpu = 0.0
    served = 0
    fallbacks: Counter[str] = Counter()
    for k, user in enumerate(users):
        body = orjson.dumps({"user_id": user, "n": n})
        c0, t0 = time.process_time(), time.perf_counter()
        req = decode_json(body, RecommendRequest)
        t1 = time.perf_counter()
        q = Query(request_id=uuid.uuid4().hex, user_id=req.user_id, n=int(req.n) if req.n else n)
        result = await rec.recommend(q)
        t2 = time.perf_counter()
        orjson.dumps(result.body())
        t3, c1 = time.perf_counter(), time.process_time()
        if k < WARMUP:
            continue
        if result.strategy != "model":
            fallbacks[result.fallback_reason or result.strategy] += 1
            continue
        served += 1
        timer = result.timer.stages
        for name, secs in (
            ("validate", t1 - t0),
            ("redis", timer["redis"]),
            ("candidates", timer["candidates"]),
            ("matrix", timer["features"]),
            ("score", timer["score"]),
            ("serialise", t3 - t2),
        ):
            stages[name].append(secs)
        totals.append(t3 - t0)
        cpu += c1 - c0
    return stages, totals, cpu / max(served, 1) * 1000.0, served, fallbacks


async def run(
    url: str,
    settings: Settings,
    requests: int,
    n: int,
    scorers: list[str],
    sizes: tuple[int, ...] = SIZES,
    n_users: int = 20_000,
) -> None:
    await _load(url, settings)
    client = connect(url, settings)
    store = FeatureStore(client, settings)
    items = ItemCache(store)
    await items.refresh()
    registry = ModelRegistry(settings.models_path, settings.model_name, binder=items.bind_now)
    registry.load_now()
    items.neighbours = registry.neighbour_tables
    await items.refresh()
    model = registry.current
    if model is None:
        raise SystemExit(f"no model in {settings.models_path}: run `recsvc demo` first")
    native = model.scorer
    compiled = None
    if "lleaves" in scorers:
        if not available():
            raise SystemExit("lleaves is not installed")
        compiler = Compiler(Path(tempfile.mkdtemp(prefix="recsvc-bench-cache-")))
        compiled = await compiler.compiled(model.path / "model.txt")
        compiler.close()
    trees = model.booster.num_trees()
    print(
        f"model {model.name} {model.version}: {trees} trees, "
        f"{model.booster.num_feature()} features; {requests} requests per row, n={n}"
    )
    header = "".join(f"{s:>11}" for s in STAGES)
    print(
        f"{'scorer':<9}{'cands':>6}{header}{'total p50':>11}{'total p99':>11}{'CPU ms':>8}"
        f"{'model %':>8}"
    )
    rng = np.random.default_rng(0)
    for scorer in scorers:
        model.scorer = compiled if scorer == "lleaves" and compiled is not None else native
        for size in sizes:
            config = CandidateConfig(cap=size, popular=size)
            rec = Recommender(store, items, registry, config, settings.exclude_seen)
            users = [f"u{u}" for u in rng.integers(0, n_users, size=requests + WARMUP)]
            stages, totals, cpu, served, fallbacks = await _measure(rec, users, n)
            if not served:
                print(f"{model.scorer.name:<9}{size:>6}  no model answers: {dict(fallbacks)}")
                continue
            cells = "".join(f"{_ms(stages[s], 50):>11.3f}" for s in STAGES)
            others = ", ".join(f"{reason} {count}" for reason, count in fallbacks.items())
            print(
                f"{model.scorer.name:<9}{size:>6}{cells}"
                f"{_ms(totals, 50):>11.3f}{_ms(totals, 99):>11.3f}{cpu:>8.3f}"
                f"{100.0 * served / requests:>8.1f}"
                + (f"  (not timed: {others})" if others else "")
            )
    await client.aclose()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=Settings().data_dir)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--scorers", default="native,lleaves", help="comma list: native, lleaves")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="candidates per request")
    p.add_argument("--users", type=int, default=20_000, help="requests go to users u0..u<N-1>")
    args = p.parse_args()
    sizes = tuple(int(s) for s in args.sizes.split(","))
    settings = Settings(data_dir=args.data_dir)
    snapshot = args.data_dir / "redis" / "dump.rdb"
    tmp = Path(tempfile.mkdtemp(prefix="recsvc-bench-"))
    try:
        if snapshot.is_file():
            shutil.copy(snapshot, tmp / "dump.rdb")
        with EmbeddedRedis(tmp) as server:
            asyncio.run(
                run(
                    server.url,
                    settings,
                    args.requests,
                    args.n,
                    args.scorers.split(","),
                    sizes,
                    args.users,
                )
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
