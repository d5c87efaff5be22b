"""The closed loop, measured: does a model trained from impressions serve better
lists than one trained from sampled negatives, on later simulated traffic?

Per seed, on a synthetic shop whose shoppers' tastes are known (`recsvc demo`'s
generator and sizes unless told otherwise):

1. generate the shop's log and train the demo's model on it;
2. serve it (a private redis-server seeded with the log, the service in this
   process on a free loopback port) to a first simulated period, keeping the
   applied events (appended to a copy of the log) and the impressions;
3. train (a) ``sampled`` on the extended log and (b) ``impress`` on the log plus
   the impressions, both split at the same time (the last quarter of the
   period's impressions held out), and evaluate both models with both protocols
   on those held-out data;
4. serve both to a second simulated period, 50/50 by an A/B experiment, and
   score each version's answers (`recsvc simulate`'s per-version figures).

Prints one JSON object: per seed, each version's figures and the difference
impress - sampled with a 95% interval, raw and net of where each arm's shoppers
started (their first-period figures, when one model served everyone);
``--ablate-positions`` adds a third arm trained from the impressions without
position debiasing. ``--tiny`` is a size the test suite affords. Bounded: each
period stops at its request count or ``--duration`` seconds; the sizes bound
the training (a seed at the demo's size takes about 11 minutes on one core).

    taskset -c 0 .venv/bin/python loadtest/closed_loop.py [--seeds 1 2 3] [--tiny]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web
from redis.asyncio import Redis

from features.dataset import DatasetConfig
from features.impressions import read_impressions
from features.logs import write_catalogue, write_events
from features.synthetic import SyntheticConfig, generate
from features.trainer import TrainParams
from recsvc.cli import seed as seeding
from recsvc.cli import simulate, training
from recsvc.ops.embedded import EmbeddedRedis
from recsvc.ranking import models
from recsvc.settings import Settings
from recsvc.web.app import create_app

# Share of the first period's impressions held out for evaluation (by time).
HELD_OUT_SHARE = 0.25
FIGURES = ("click_ndcg_at_10", "oracle_ndcg_at_10", "ctr", "conversion")
ARMS = ("sampled", "impress")
# --ablate-positions: a third arm trained from the impressions too, but with the
# position bias factors held at 0 (an L2 penalty LightGBM cannot move them
# against): what the position debiasing itself is worth.
NOPOS = "impress_nopos"
NO_DEBIAS = {"lambdarank_position_bias_regularization": 1e9}


@dataclass(frozen=True, slots=True)
class Plan:
    shop: SyntheticConfig
    shoppers: int = 2000
    first_requests: int = 20_000
    second_requests: int = 20_000
    duration: float = 600.0
    concurrency: int = 8
    train_groups: int = 30_000
    eval_groups: int = 3000
    trees: int = 100
    label_window: float = 1800.0
    ablate_positions: bool = False

    @property
    def arms(self) -> tuple[str, ...]:
        return (*ARMS, NOPOS) if self.ablate_positions else ARMS


TINY = Plan(
    shop=SyntheticConfig(n_users=300, n_items=200, n_events=12_000, n_categories=10, seed=3),
    shoppers=200,
    first_requests=400,
    second_requests=400,
    duration=60.0,
    concurrency=4,
    train_groups=800,
    eval_groups=200,
    trees=20,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _settings(work: Path, experiments: Path | None = None) -> Settings:
    """The service as the demo runs it, but with the native scorer (no compile
    work on this core) and deadlines a shared core does not trip: every answer
    should come from a model, or the comparison would be of fallbacks."""
    return Settings(
        model_dir=work / "models",
        data_dir=work,
        port=_free_port(),
        scorer="native",
        experiments=experiments,
        request_deadline_ms=5000.0,
        admission_target_ms=5000.0,
        redis_timeout_ms=2000.0,
    )


async def _period(
    url: str,
    settings: Settings,
    plan: Plan,
    requests: int,
    sim_seed: int,
    events_log: Path | None = None,
    impressions_out: Path | None = None,
) -> simulate.SimSummary:
    runner = web.AppRunner(create_app(settings, url), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", settings.port).start()
        return await simulate.simulate(
            f"http://127.0.0.1:{settings.port}",
            plan.shoppers,
            plan.duration,
            requests,
            plan.shop,
            concurrency=plan.concurrency,
            seed=sim_seed,
            events_log=events_log,
            impressions_out=impressions_out,
        )
    finally:
        await runner.cleanup()


def _experiment(path: Path, salt: str, arms: tuple[str, ...]) -> Path:
    variants = "".join(
        f'  [[experiment.variant]]\n  name = "{arm}"\n  weight = 50\n  model = "{arm}"\n'
        for arm in arms
    )
    path.write_text(
        f'[[experiment]]\nname = "closed-loop"\nsalt = "{salt}"\nenabled = true\n'
        f"traffic = 1.0\n{variants}"
    )
    return path


def _split_at(impressions: Path) -> float:
    times = sorted(imp.ts for imp in read_impressions(impressions).impressions)
    if len(times) < 8:
        raise SystemExit(f"only {len(times)} impressions in the first period: too few to split")
    return float(times[int(len(times) * (1.0 - HELD_OUT_SHARE))])


def _brief(report: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of an evaluation: both protocols, model and baselines."""
    out: dict[str, Any] = {
        "next_event": {name: round(m["ndcg_at_10"], 4) for name, m in report["served"].items()},
        "next_event_groups": report["groups"],
    }
    imp = report.get("impressions")
    if imp is not None:
        out["impression_protocol"] = {
            **{f"served_{k}": round(m["ndcg_at_10"], 4) for k, m in imp["served"].items()},
            **{
                f"reranked_{k}": round(m["ndcg_at_10"], 4) for k, m in imp["reranked_shown"].items()
            },
        }
        out["impression_groups"] = imp["groups"]
    return out


def one_seed(plan: Plan, seed: int, work: Path) -> dict[str, Any]:
    """The whole loop for one seed under ``work``; its figures. The seed picks the
    shop, the training samples, the shoppers' draws and the experiment's salt."""
    started = time.monotonic()
    # Seed 1 is the demo's own shop; each further seed a different one.
    plan = replace(plan, shop=replace(plan.shop, seed=plan.shop.seed + seed - 1))
    shop = generate(plan.shop, end_ts=time.time())
    events, items = work / "events.csv", work / "items.csv"
    write_events(events, shop.events)
    write_catalogue(items, shop.catalogue)
    data = DatasetConfig(train_groups=plan.train_groups, eval_groups=plan.eval_groups, seed=seed)
    params = TrainParams(num_trees=plan.trees, num_threads=1, seed=seed)
    model_dir = work / "models"
    training.train_files(events, items, model_dir, "ranker", data, params, progress=False)
    extended = work / "events-extended.csv"
    shutil.copy(events, extended)
    impressions = work / "impressions"
    out: dict[str, Any] = {"seed": seed, "shop_seed": plan.shop.seed}
    with EmbeddedRedis(work / "redis") as server:

        async def load() -> None:
            client = Redis.from_url(server.url)
            try:
                await seeding.seed(client, Settings(), shop.catalogue, shop.events, progress=False)
            finally:
                await client.aclose()

        asyncio.run(load())
        first = asyncio.run(
            _period(
                server.url,
                _settings(work),
                plan,
                plan.first_requests,
                seed * 1000 + 1,
                events_log=extended,
                impressions_out=impressions,
            )
        )
        out["first_period"] = {"summary": _counts(first), "served": first.report()}
        split_at = _split_at(impressions)
        config = replace(data, split_at=split_at, label_window=plan.label_window)
        trained: dict[str, Any] = {}
        for arm in plan.arms:
            path = training.train_files(
                extended,
                items,
                model_dir,
                arm,
                config,
                replace(params, extra=NO_DEBIAS) if arm == NOPOS else params,
                progress=False,
                impressions_path=impressions if arm != "sampled" else None,
            ).path
            meta = models.read_meta(path)
            report, _ = training.evaluate_files(
                extended, items, path, config, progress=False, impressions_path=impressions
            )
            trained[arm] = {
                "version": path.name,
                "train_groups": meta["data"]["train_groups"],
                "impressions": meta["data"].get("impressions"),
                **_brief(report),
            }
        out["split_at"] = split_at
        out["models"] = trained
        experiments = _experiment(work / "experiments.toml", f"closed-loop-{seed}", plan.arms)
        second = asyncio.run(
            _period(
                server.url,
                _settings(work, experiments),
                plan,
                plan.second_requests,
                seed * 1000 + 2,
            )
        )
    out["second_period"] = {"summary": _counts(second), "served": second.report()}
    arms = {arm: second.served.get(f"{arm}/{trained[arm]['version']}") for arm in plan.arms}
    now = {arm: a.report() for arm, a in arms.items() if a is not None}
    if len(now) == len(plan.arms):
        out["difference"] = _difference(now["impress"], now["sampled"])
        # The arms are different shoppers: the first period's answers (one model
        # for all) to each arm's shoppers show how far apart they started.
        [base] = first.served.values()
        before = {
            arm: _same_users(base, set(a.users)).report()
            for arm, a in arms.items()
            if a is not None
        }
        out["first_period_same_users"] = before
        out["difference_in_differences"] = _difference(
            now["impress"], now["sampled"], before["impress"], before["sampled"]
        )
        if NOPOS in now:
            out["ablation"] = {
                "impress_minus_nopos": _difference(
                    now["impress"], now[NOPOS], before["impress"], before[NOPOS]
                ),
                "nopos_minus_sampled": _difference(
                    now[NOPOS], now["sampled"], before[NOPOS], before["sampled"]
                ),
            }
    out["seconds"] = round(time.monotonic() - started, 1)
    return out


def _same_users(served: simulate.Served, users: set[int]) -> simulate.Served:
    """The answers of ``served`` to ``users`` only."""
    out = simulate.Served()
    for k, u in enumerate(served.users):
        if u in users:
            out.add(
                u, served.click_ndcg[k], served.oracle_ndcg[k], served.clicked[k], served.bought[k]
            )
    return out


def _counts(s: simulate.SimSummary) -> dict[str, float]:
    return {
        "requests": s.requests,
        "clicks": s.clicks,
        "purchases": s.purchases,
        "errors": s.errors,
        "seconds": round(s.seconds, 1),
    }


def _difference(
    a: dict[str, float],
    b: dict[str, float],
    a0: dict[str, float] | None = None,
    b0: dict[str, float] | None = None,
) -> dict[str, dict[str, float]]:
    """a - b per figure, with a 95% interval (the arms' users are disjoint: the
    variances add); given a0 and b0, (a - a0) - (b - b0) with the four variances
    added (wider than need be: a shopper's two periods move together)."""
    out = {}
    for name in FIGURES:
        terms = [m for m in (a, b, a0, b0) if m is not None]
        d = a[name] - b[name]
        if a0 is not None and b0 is not None:
            d -= a0[name] - b0[name]
        se = float(np.sqrt(sum(m[f"{name}_stderr"] ** 2 for m in terms)))
        out[name] = {
            "diff": round(d, 4),
            "low": round(d - 1.96 * se, 4),
            "high": round(d + 1.96 * se, 4),
        }
    return out


def run(plan: Plan, seeds: list[int], work: Path) -> dict[str, Any]:
    results = []
    for s in seeds:
        target = work / f"seed-{s}"
        target.mkdir(parents=True, exist_ok=True)
        results.append(one_seed(plan, s, target))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    summary = {
        kind: {name: [r[kind][name]["diff"] for r in results if kind in r] for name in FIGURES}
        for kind in ("difference", "difference_in_differences")
    }
    return {"plan": _plan(plan), "seeds": results, "impress_minus_sampled": summary}


def _plan(plan: Plan) -> dict[str, Any]:
    shop = plan.shop
    return {
        "users": shop.n_users,
        "items": shop.n_items,
        "events": shop.n_events,
        "shoppers": plan.shoppers,
        "first_requests": plan.first_requests,
        "second_requests": plan.second_requests,
        "train_groups": plan.train_groups,
        "trees": plan.trees,
        "label_window": plan.label_window,
        "arms": list(plan.arms),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d, demo = Plan(shop=SyntheticConfig()), SyntheticConfig()
    p.add_argument("--tiny", action="store_true", help="the test suite's size")
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--users", type=int, default=demo.n_users)
    p.add_argument("--items", type=int, default=demo.n_items)
    p.add_argument("--events", type=int, default=demo.n_events)
    p.add_argument("--shoppers", type=int, default=d.shoppers)
    p.add_argument("--first-requests", type=int, default=d.first_requests)
    p.add_argument("--second-requests", type=int, default=d.second_requests)
    p.add_argument("--duration", type=float, default=d.duration, help="seconds per period at most")
    p.add_argument("--train-groups", type=int, default=d.train_groups)
    p.add_argument("--trees", type=int, default=d.trees)
    p.add_argument("--label-window", type=float, default=d.label_window)
    p.add_argument(
        "--ablate-positions",
        action="store_true",
        help=f"a third arm, {NOPOS}: from impressions without position debiasing",
    )
    p.add_argument("--work", type=Path, help="keep the runs here (default: a temporary directory)")
    args = p.parse_args(argv)
    if args.tiny:
        plan = replace(TINY, ablate_positions=args.ablate_positions)
    else:
        shop = replace(demo, n_users=args.users, n_items=args.items, n_events=args.events)
        plan = Plan(
            shop=shop,
            shoppers=args.shoppers,
            first_requests=args.first_requests,
            second_requests=args.second_requests,
            duration=args.duration,
            train_groups=args.train_groups,
            trees=args.trees,
            label_window=args.label_window,
            ablate_positions=args.ablate_positions,
        )
    if args.work is not None:
        result = run(plan, args.seeds, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="closed-loop-") as tmp:
            result = run(plan, args.seeds, Path(tmp))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
