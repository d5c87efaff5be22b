"""The `recsvc` command: demo, serve, seed, import, train, evaluate, generate, and more."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from features.dataset import DatasetConfig, NoTrainingGroups, SplitError
from features.logs import Catalogue, EventLog, LogFormatError, read_catalogue_report, read_log
from features.state import COL_PRICE
from features.synthetic import SyntheticConfig
from features.trainer import TrainParams
from recsvc.ab import experiments, export
from recsvc.ab import report as abreport
from recsvc.ab.rollout import RolloutError, RolloutStore
from recsvc.cli import rollouts, seed, simulate, training
from recsvc.errors import ModelRejected, StoreUnavailable
from recsvc.ops import logs
from recsvc.ops.embedded import EmbeddedRedis, EmbeddedRedisError
from recsvc.ranking import models
from recsvc.settings import Settings, SettingsError, from_env
from recsvc.store.client import connect
from recsvc.store.feature_store import FeatureStore, IncompatibleStore
from recsvc.web import server

log = logging.getLogger("recsvc")
DEMO_TRAIN_GROUPS = 30_000
MB = 1024 * 1024


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, help="overrides RECSVC_DATA_DIR")
    p.add_argument("--model-dir", type=Path, help="overrides RECSVC_MODEL_DIR")
    p.add_argument("--redis-url", help="overrides RECSVC_REDIS_URL")
    p.add_argument("--log-level", help="overrides RECSVC_LOG_LEVEL")


def _serving(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="overrides RECSVC_HOST")
    p.add_argument("--port", type=int, help="overrides RECSVC_PORT")
    p.add_argument(
        "--workers", type=int, help="overrides RECSVC_WORKERS (0 = one per available core)"
    )


def _synthetic(p: argparse.ArgumentParser) -> None:
    d = SyntheticConfig()
    p.add_argument("--users", type=int, default=d.n_users)
    p.add_argument("--items", type=int, default=d.n_items)
    p.add_argument("--events", type=int, default=d.n_events)
    p.add_argument("--seed", type=int, default=d.seed)


def _training(p: argparse.ArgumentParser, groups: int = DatasetConfig().train_groups) -> None:
    p.add_argument("--trees", type=_positive, default=TrainParams().num_trees)
    p.add_argument(
        "--train-groups",
        type=_positive,
        default=groups,
        help=f"training events sampled as ranking groups (default {groups})",
    )


def _split(p: argparse.ArgumentParser) -> None:
    d = DatasetConfig()
    p.add_argument(
        "--holdout",
        type=_fraction,
        default=d.holdout,
        help=f"share of the log's events held out (the last ones; default {d.holdout})",
    )
    p.add_argument(
        "--split-at", type=float, help="hold out the events from this time on (seconds since epoch)"
    )
    p.add_argument(
        "--groups",
        type=_positive,
        default=d.eval_groups,
        help=f"held-out events sampled for evaluation (default {d.eval_groups})",
    )
    p.add_argument(
        "--exclude-seen",
        choices=("auto", "always", "never"),
        default="auto",
        help="never recommend items the user touched: auto = when the log's users hardly "
        "repeat items",
    )


def _impressions(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--impressions",
        type=Path,
        metavar="DIR",
        help=f"logged impressions and outcomes (impressions-*.jsonl, outcomes-*.jsonl): {what}",
    )
    p.add_argument(
        "--label-window",
        type=_seconds,
        default=DatasetConfig().label_window,
        metavar="SECS",
        help="outcomes label an impression this long after it "
        f"(default {DatasetConfig().label_window:.0f})",
    )


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _megabytes(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1e9:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of MB")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="recsvc", description=__doc__)
    sub = root.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="zero setup: embedded Redis, seed, train, serve")
    _common(demo)
    _serving(demo)
    _synthetic(demo)
    # Fewer groups than `train`: the demo should serve within a few minutes.
    _training(demo, groups=DEMO_TRAIN_GROUPS)

    serve = sub.add_parser("serve", help="serve against RECSVC_REDIS_URL (or --embedded)")
    _common(serve)
    _serving(serve)
    serve.add_argument(
        "--embedded",
        action="store_true",
        help="start a private redis-server when no Redis URL is set",
    )

    sd = sub.add_parser("seed", help="load the synthetic shop into an empty Redis")
    _common(sd)
    _synthetic(sd)
    sd.add_argument("--embedded", action="store_true")

    imp = sub.add_parser(
        "import", help="load an event log (recsvc or RetailRocket layout) into Redis"
    )
    _common(imp)
    imp.add_argument("--events", type=Path, required=True, help="events CSV")
    imp.add_argument(
        "--items", type=Path, help="items CSV: item_id,category,price or itemid,categoryid[,price]"
    )
    imp.add_argument(
        "--append",
        action="store_true",
        help="add to a Redis that already holds data (importing a log twice counts it twice)",
    )
    imp.add_argument("--embedded", action="store_true", help="into the data dir's own Redis")

    cat = sub.add_parser("catalogue", help="create, update and delete catalogue items in Redis")
    cat_sub = cat.add_subparsers(dest="catalogue_command", required=True)
    up = cat_sub.add_parser(
        "upsert",
        help="create or update items (category, price); events for items outside the "
        "catalogue are then refused (RECSVC_UNKNOWN_ITEMS=auto)",
    )
    _common(up)
    up.add_argument(
        "--items", type=Path, required=True, help="item_id,category,price or itemid,categoryid"
    )
    up.add_argument(
        "--prune",
        action="store_true",
        help="also delete every item the file does not list (e.g. made by events before "
        "the catalogue was loaded)",
    )
    up.add_argument("--embedded", action="store_true", help="the data dir's own Redis")
    rm = cat_sub.add_parser("delete", help="delete items: never served again")
    _common(rm)
    rm.add_argument("item_ids", nargs="*", help="ids to delete")
    rm.add_argument("--ids-file", type=Path, help="a file with one id per line")
    rm.add_argument("--embedded", action="store_true", help="the data dir's own Redis")

    md = sub.add_parser("models", help="the model registry")
    md_sub = md.add_subparsers(dest="models_command", required=True)
    _common(md_sub.add_parser("list", help="every version under the model directory"))
    pro = md_sub.add_parser(
        "promote",
        help="serve a version: to everyone now, or as a canary stepped up by its guardrails",
    )
    _common(pro)
    pro.add_argument("name", help="model name")
    pro.add_argument("version", help="version directory name (see `recsvc models list`)")
    pro.add_argument("--canary", help="first share of users, e.g. 5%%; without: everyone now")
    pro.add_argument("--steps", help="shares after the first, e.g. 25%%,50%% (default 25,50)")
    pro.add_argument(
        "--min-exposures",
        type=int,
        default=2000,
        help="canary impressions per step before it may step up (default 2000)",
    )
    pro.add_argument("--stable", help="the version the canary is compared with")
    pro.add_argument("--embedded", action="store_true", help="the data dir's own Redis")
    for verb, text in (
        ("status", "roll-outs: what serves whom, the guardrails, the history"),
        ("abort", "roll a running canary back now"),
        ("unpin", "forget a model's roll-out record: its newest version serves again"),
    ):
        p = md_sub.add_parser(verb, help=text)
        _common(p)
        p.add_argument("name", nargs="?" if verb == "status" else None, help="model name")
        p.add_argument("--embedded", action="store_true", help="the data dir's own Redis")
        if verb == "status":
            p.add_argument("--json", action="store_true", help="machine-readable output")

    ab = sub.add_parser("ab-report", help="experiment results from the exposure log")
    _common(ab)
    ab.add_argument("--experiment", help="only this experiment")
    ab.add_argument("--since", type=float, default=0.0, help="seconds since epoch")
    ab.add_argument(
        "--from",
        dest="exported",
        type=Path,
        help="also read the files export-impressions wrote in this directory",
    )
    ab.add_argument("--json", action="store_true", help="machine-readable output")
    ab.add_argument("--embedded", action="store_true", help="the data dir's own Redis")

    ex = sub.add_parser(
        "export-impressions",
        help="the impression and outcome streams into rotating JSON-lines files, durably",
    )
    _common(ex)
    ex.add_argument("--out", type=Path, required=True, help="directory of the files")
    ex.add_argument("--follow", action="store_true", help="keep exporting until SIGTERM or SIGINT")
    ex.add_argument(
        "--rotate-mb", type=_megabytes, default=64.0, help="complete a file at this size"
    )
    ex.add_argument(
        "--rotate-secs",
        type=_seconds,
        default=600.0,
        help="complete a file this old (with --follow; default 600)",
    )
    ex.add_argument(
        "--max-mb",
        type=_megabytes,
        default=1024.0,
        help="delete the oldest complete files above this (at least twice --rotate-mb)",
    )
    ex.add_argument(
        "--trim",
        action="store_true",
        help="remove exported entries from Redis (ab-report --from DIR reads them from the files)",
    )
    ex.add_argument("--embedded", action="store_true", help="the data dir's own Redis")

    sim = sub.add_parser(
        "simulate", help="synthetic shoppers (known tastes) against a running service"
    )
    _common(sim)
    sim.add_argument("--host", default="http://127.0.0.1:8080", help="loopback only")
    sim.add_argument("--users", type=int, default=2000, help="shoppers (demo users u0..)")
    sim.add_argument("--duration", type=float, default=60.0, help="seconds at most")
    sim.add_argument("--requests", type=int, default=20_000, help="recommendations at most")
    sim.add_argument("--concurrency", type=int, default=8)
    sim.add_argument("--seed", type=int, default=1)
    sim.add_argument(
        "--events-log",
        type=Path,
        metavar="FILE",
        help="append every applied event (ts,user_id,item_id,type, the time the service "
        "recorded) to this event log CSV, e.g. a copy of the demo's events.csv",
    )
    sim.add_argument(
        "--impressions-out",
        type=Path,
        metavar="DIR",
        help="write what was shown and what came of it as impressions-*.jsonl and "
        "outcomes-*.jsonl (what `recsvc train --impressions` reads)",
    )
    sim.add_argument(
        "--json", action="store_true", help="the per-version figures as one JSON object on stdout"
    )

    tr = sub.add_parser("train", help="train a ranker from an event log")
    _common(tr)
    tr.add_argument(
        "--events", type=Path, help="events CSV, recsvc or RetailRocket layout (default: synthetic)"
    )
    tr.add_argument("--items", type=Path, help="items CSV")
    tr.add_argument("--name", help="model name (default RECSVC_MODEL_NAME)")
    _training(tr)
    _split(tr)
    _impressions(
        tr,
        "train on what was shown (groups of shown items, graded by outcomes, position "
        "debiased) beside sampled negatives, and report the impression protocol",
    )
    tr.add_argument(
        "--shuffle-labels",
        action="store_true",
        help="for testing guardrails only: permute labels within each group, so the "
        "model learns nothing real",
    )
    tr.add_argument("--seed", type=int, default=TrainParams().seed)

    ev = sub.add_parser(
        "evaluate",
        help="served-list quality of a trained model on a log, against baselines (trains nothing)",
    )
    _common(ev)
    ev.add_argument("--events", type=Path, required=True, help="events CSV")
    ev.add_argument("--items", type=Path, help="items CSV")
    ev.add_argument("--name", help="model name (default RECSVC_MODEL_NAME)")
    ev.add_argument("--version", help="model version (default: the newest usable one)")
    _split(ev)
    _impressions(ev, "also report the impression protocol on the held-out ones")
    ev.add_argument("--seed", type=int, default=DatasetConfig().seed)
    ev.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ev.add_argument(
        "--allow-overlap",
        action="store_true",
        help="report even when the model was trained on held-out events (inflated figures)",
    )

    gen = sub.add_parser("generate", help="write the synthetic shop as CSV files")
    _common(gen)
    _synthetic(gen)
    return root


def _settings(args: argparse.Namespace) -> Settings:
    base = from_env()
    return base.replace(
        data_dir=getattr(args, "data_dir", None),
        model_dir=getattr(args, "model_dir", None),
        redis_url=getattr(args, "redis_url", None),
        log_level=getattr(args, "log_level", None),
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
        workers=getattr(args, "workers", None),
    )


@contextmanager
def _redis(settings: Settings, embedded: bool) -> Iterator[str]:
    """The Redis URL to use, starting a private server when asked and none is set."""
    if settings.redis_url:
        yield settings.redis_url
        return
    if not embedded:
        raise SettingsError("RECSVC_REDIS_URL is not set (use `recsvc demo` or --embedded)")
    with EmbeddedRedis(settings.data_dir / "redis", settings.redis_server_bin) as r:
        log.info("embedded redis-server started", extra={"pid": r.pid, "url": r.url})
        yield r.url


def _synthetic_config(args: argparse.Namespace) -> SyntheticConfig:
    return SyntheticConfig(
        n_users=args.users, n_items=args.items, n_events=args.events, seed=args.seed
    )


async def _seed_if_empty(
    url: str,
    settings: Settings,
    events: Path,
    items: Path | None,
    snapshot: bool = False,
    rebuild: bool = False,
) -> None:
    """Seed an empty Redis. ``rebuild``: our own embedded data in an older storage
    format is wiped and seeded again (never done to a Redis the user gave us)."""
    client = connect(url, settings, writes=True)
    try:
        try:
            await FeatureStore(client, settings).check_format()
        except IncompatibleStore as exc:
            if not rebuild:
                raise
            print(f"{exc}\nRebuilding the demo data.", file=sys.stderr)
            await client.flushdb()
        if await seed.is_seeded(client):
            print("Redis already holds item data; not seeding again.", file=sys.stderr)
            return
        catalogue, event_log = seed.load_files(events, items)
        summary = await seed.seed(
            client, settings, catalogue, event_log, progress=sys.stderr.isatty()
        )
        print(
            f"seeded {summary.events} events, {summary.items} items, {summary.users} users "
            f"in {summary.seconds:.1f}s",
            file=sys.stderr,
        )
        if snapshot:  # our own embedded server: persist now, not only at clean shutdown
            await client.save()
    finally:
        await client.aclose()


def _train(
    settings: Settings,
    events: Path,
    items: Path | None,
    name: str,
    data: DatasetConfig,
    params: TrainParams,
    impressions: Path | None = None,
) -> None:
    outcome = training.train_files(
        events,
        items,
        settings.models_path,
        name,
        data,
        params,
        progress=sys.stderr.isatty(),
        keep=settings.model_keep_versions,
        impressions_path=impressions,
    )
    for report in outcome.reports:
        print(report.summary(), file=sys.stderr)
        for example in report.examples:
            print(f"  {example}", file=sys.stderr)
    print(f"model {outcome.path} trained in {outcome.seconds:.1f}s", file=sys.stderr)
    print(training.metrics_table(outcome.report), file=sys.stderr)


def _announce(url: str) -> None:
    print(
        f"\nrecsvc is serving on {url}\n  try: curl -s -X POST {url}/v1/recommendations "
        '-H \'content-type: application/json\' -d \'{"user_id": "u1", "n": 10}\'\n',
        file=sys.stderr,
        flush=True,
    )


def cmd_demo(args: argparse.Namespace) -> None:
    settings = _settings(args)
    settings.check_exposure()  # before minutes of seeding and training
    started = time.perf_counter()
    events, items = seed.ensure_synthetic(settings.data_dir, _synthetic_config(args))
    with _redis(settings, embedded=True) as url:
        own = not settings.redis_url
        asyncio.run(_seed_if_empty(url, settings, events, items, snapshot=own, rebuild=own))
        if models.load_latest(settings.models_path, settings.model_name) is None:
            data = DatasetConfig(
                train_groups=args.train_groups,
                candidates=settings.candidate_config,
                exclude_seen=_seen(settings.exclude_seen),
            )
            params = TrainParams(num_trees=args.trees)
            _train(settings, events, items, settings.model_name, data, params)
        print(f"ready after {time.perf_counter() - started:.1f}s", file=sys.stderr)
        server.run(settings, url, on_ready=_announce, workers=settings.worker_count)


def cmd_serve(args: argparse.Namespace) -> None:
    settings = _settings(args)
    settings.check_exposure()  # before Redis, before anything listens
    with _redis(settings, embedded=args.embedded) as url:
        server.run(settings, url, on_ready=_announce, workers=settings.worker_count)


def cmd_seed(args: argparse.Namespace) -> None:
    settings = _settings(args)
    events, items = seed.ensure_synthetic(settings.data_dir, _synthetic_config(args))
    with _redis(settings, embedded=args.embedded) as url:
        asyncio.run(_seed_if_empty(url, settings, events, items))


async def _import(
    url: str, settings: Settings, catalogue: Catalogue | None, log_: EventLog, append: bool
) -> seed.SeedSummary:
    client = connect(url, settings, writes=True)
    try:
        await FeatureStore(client, settings).check_format()
        if await seed.is_seeded(client) and not append:
            raise SettingsError(
                "Redis already holds item data; importing the same log twice would count "
                "its events twice. Use --append to add a different log."
            )
        return await seed.seed(client, settings, catalogue, log_, progress=sys.stderr.isatty())
    finally:
        await client.aclose()


def cmd_import(args: argparse.Namespace) -> None:
    settings = _settings(args)
    catalogue = None
    if args.items:
        catalogue, items_report = read_catalogue_report(args.items)
        print(items_report.summary(), file=sys.stderr)
    event_log, report = read_log(args.events)
    print(report.summary(), file=sys.stderr)
    with _redis(settings, embedded=args.embedded) as url:
        done = asyncio.run(_import(url, settings, catalogue, event_log, args.append))
    print(
        f"imported {done.events} events of {done.users} users ({done.items} items in Redis) "
        f"in {done.seconds:.1f}s: {done.events / max(done.seconds, 1e-9):,.0f} events/s; "
        f"skipped {report.rows - report.kept} rows",
        file=sys.stderr,
    )


async def _ab_report(url: str, settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    config = None
    if settings.experiments is not None:
        # The variants' order, and weights for exposures logged without them (the
        # others carry their own); models need not be loaded to read a report.
        try:
            text = settings.experiments.read_text()
        except OSError as exc:
            print(
                f"warning: {settings.experiments}: {exc.strerror}; the ratio check uses the "
                "weights recorded with the exposures",
                file=sys.stderr,
            )
        else:
            config = experiments.parse(text, str(settings.experiments), None)
    client = connect(url, settings, writes=True)
    try:
        table = await FeatureStore(client, settings).item_table()
        prices = {
            item: float(price)
            for item, price in zip(table.ids, table.raw[:, COL_PRICE].tolist(), strict=True)
            if item and price > 0
        }
        return await abreport.report(
            client, config, args.experiment, args.since, prices, args.exported
        )
    finally:
        await client.aclose()


async def _catalogue(url: str, settings: Settings, args: argparse.Namespace) -> str:
    client = connect(url, settings, writes=True)
    try:
        store = FeatureStore(client, settings)
        await store.check_format()
        if args.catalogue_command == "upsert":
            catalogue, report = read_catalogue_report(args.items)
            print(report.summary(), file=sys.stderr)
            rows = list(
                zip(
                    catalogue.item_ids,
                    catalogue.categories,
                    catalogue.prices.tolist(),
                    strict=True,
                )
            )
            for k in range(0, len(rows), seed.BATCH):
                await store.upsert_items(
                    rows[k : k + seed.BATCH], catalogue=k + seed.BATCH >= len(rows)
                )
            done = f"upserted {len(rows)} items"
            if args.prune:  # every item the file does not list
                listed = set(catalogue.item_ids)
                stale = [i for i in await store.item_ids() if i not in listed]
                for k in range(0, len(stale), seed.BATCH):
                    await store.delete_items(stale[k : k + seed.BATCH])
                done += f", deleted {len(stale)} items not in the file"
            return done
        ids = list(args.item_ids)
        if args.ids_file:
            ids += [line.strip() for line in args.ids_file.read_text().splitlines()]
        ids = list(dict.fromkeys(i for i in ids if i))
        if not ids:
            raise SettingsError("no item ids to delete (give ids or --ids-file)")
        deleted = 0
        for k in range(0, len(ids), seed.BATCH):
            deleted += sum(await store.delete_items(ids[k : k + seed.BATCH]))
        return f"deleted {deleted} of {len(ids)} items ({len(ids) - deleted} not in Redis)"
    finally:
        await client.aclose()


def cmd_catalogue(args: argparse.Namespace) -> None:
    settings = _settings(args)
    with _redis(settings, embedded=args.embedded) as url:
        print(asyncio.run(_catalogue(url, settings, args)), file=sys.stderr)


def cmd_ab_report(args: argparse.Namespace) -> None:
    settings = _settings(args)
    if args.exported is not None and not args.exported.is_dir():
        raise SettingsError(f"--from {args.exported}: no such directory")
    with _redis(settings, embedded=args.embedded) as url:
        try:
            result = asyncio.run(_ab_report(url, settings, args))
        except abreport.ExportedFileError as exc:
            raise SettingsError(f"--from: {exc}") from None
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(abreport.format_report(result))


async def _export(url: str, settings: Settings, args: argparse.Namespace) -> export.Summary:
    client = connect(url, settings, writes=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    if args.follow:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    try:
        exporter = export.Exporter(
            client,
            args.out,
            rotate_bytes=int(args.rotate_mb * MB),
            max_bytes=int(args.max_mb * MB),
            rotate_secs=args.rotate_secs,
            trim=args.trim,
        )
        return await exporter.run(args.follow, stop)
    finally:
        await client.aclose()


def cmd_export_impressions(args: argparse.Namespace) -> None:
    settings = _settings(args)
    if args.max_mb < 2 * args.rotate_mb:  # each stream's open file may reach --rotate-mb
        raise SettingsError(
            f"--max-mb {args.max_mb:g} is less than twice --rotate-mb {args.rotate_mb:g}"
        )
    with _redis(settings, embedded=args.embedded) as url:
        summary = asyncio.run(_export(url, settings, args))
    print(summary.line())


def cmd_simulate(args: argparse.Namespace) -> None:
    try:
        done = asyncio.run(
            simulate.simulate(
                args.host,
                args.users,
                args.duration,
                args.requests,
                SyntheticConfig(),
                concurrency=args.concurrency,
                seed=args.seed,
                # Like the load test's: from the environment, never argv (ps shows it).
                key=os.environ.get("RECSVC_LOADTEST_KEY", ""),
                events_log=args.events_log,
                impressions_out=args.impressions_out,
            )
        )
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    print(
        f"simulated {done.requests} recommendations, {done.clicks} clicks, "
        f"{done.purchases} purchases in {done.seconds:.1f}s ({done.errors} errors)",
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps(done.report(), indent=2))
    else:
        print(simulate.served_table(done), file=sys.stderr)


def cmd_models(args: argparse.Namespace) -> None:
    settings = _settings(args)
    if args.models_command != "list":
        with _redis(settings, embedded=args.embedded) as url:
            print(asyncio.run(_rollout_command(url, settings, args)))
        return
    root = settings.models_path
    rows = [("name", "version", "created (UTC)", "served ndcg@10", "popular", "status")]
    for name in models.names(root):
        found = models.versions(root, name)
        # A name a roll-out record pins serves the record's versions, not the
        # newest: which those are is in Redis (`recsvc models status`), not here.
        pinned = {p.name for p in found if (p / models.PINNED_FILE).exists()}
        for k, path in enumerate(found):
            try:
                meta = models.load(path).meta
                if pinned:
                    status = "pinned (see: recsvc models status)" if path.name in pinned else "ok"
                else:
                    status = "serving" if k == 0 else "ok"
            except ModelRejected as exc:
                meta, status = models.read_meta(path), f"refused: {exc.args[0].split(': ', 1)[-1]}"
            metrics = meta.get("metrics", {})
            rows.append(
                (
                    name,
                    path.name,
                    str(meta.get("created_at", ""))[:19],
                    _fmt(metrics.get("ndcg_at_10")),
                    _fmt(metrics.get("popular_ndcg_at_10")),
                    status,
                )
            )
    if len(rows) == 1:
        print(f"no models under {root}", file=sys.stderr)
        return
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=False)) + "  " + r[-1])


async def _rollout_command(url: str, settings: Settings, args: argparse.Namespace) -> str:
    client = connect(url, settings, writes=True)
    store = RolloutStore(client)
    try:
        if args.models_command == "promote":
            r = await rollouts.promote(
                store,
                settings.models_path,
                args.name,
                args.version,
                args.canary,
                args.steps,
                args.min_exposures,
                args.stable,
            )
            return rollouts.format_status({r.name: r})
        if args.models_command == "abort":
            r = await rollouts.abort(store, args.name)
            return rollouts.format_status({r.name: r})
        if args.models_command == "unpin":
            await rollouts.unpin(store, args.name, settings.models_path)
            return f"{args.name}: no roll-out record; its newest version serves"
        records = await store.all()
        if args.name:
            records = {k: v for k, v in records.items() if k == args.name}
        if args.json:
            return json.dumps({k: v.body() for k, v in records.items()}, indent=2)
        return rollouts.format_status(records)
    except RolloutError as exc:
        raise SettingsError(str(exc)) from None
    finally:
        await client.aclose()


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


def cmd_train(args: argparse.Namespace) -> None:
    settings = _settings(args)
    if args.events:
        events, items = args.events, args.items
    else:
        events, items = seed.synthetic_paths(settings.data_dir)
        if not events.is_file():
            raise SettingsError(f"no event log at {events}: run `recsvc generate` or pass --events")
    params = TrainParams(num_trees=args.trees, seed=args.seed, shuffle_labels=args.shuffle_labels)
    data = DatasetConfig(
        train_groups=args.train_groups,
        eval_groups=args.groups,
        holdout=args.holdout,
        split_at=args.split_at,
        seed=args.seed,
        candidates=settings.candidate_config,
        exclude_seen=_seen(args.exclude_seen),
        label_window=args.label_window,
    )
    name = args.name or settings.model_name
    _train(settings, events, items, name, data, params, args.impressions)


def _seen(choice: str) -> bool | None:
    return {"auto": None, "always": True, "never": False}[choice]


def cmd_evaluate(args: argparse.Namespace) -> None:
    settings = _settings(args)
    name = args.name or settings.model_name
    root = settings.models_path
    if args.version:
        path = root / name / args.version
    else:
        latest = models.load_latest(root, name)
        if latest is None:
            raise SettingsError(f"no usable model {name!r} under {root}")
        path = latest.path
    data = DatasetConfig(
        eval_groups=args.groups,
        holdout=args.holdout,
        split_at=args.split_at,
        seed=args.seed,
        candidates=settings.candidate_config,
        label_window=args.label_window,
    )
    report, files = training.evaluate_files(
        args.events,
        args.items,
        path,
        data,
        progress=sys.stderr.isatty(),
        exclude_seen=_seen(args.exclude_seen),
        impressions_path=args.impressions,
    )
    for f in files:
        print(f.summary(), file=sys.stderr)
    if not report["groups"]:
        raise SettingsError(
            f"no held-out event of a user with history to evaluate on "
            f"({report['held_out_events']} held-out events)"
        )
    if "warning" in report:
        if not args.allow_overlap:
            raise SettingsError(f"{report['warning']} (--allow-overlap reports it anyway)")
        print(f"warning: {report['warning']}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(training.metrics_table(report))


def cmd_generate(args: argparse.Namespace) -> None:
    settings = _settings(args)
    events, items = seed.ensure_synthetic(settings.data_dir, _synthetic_config(args))
    print(f"wrote {events} and {items}", file=sys.stderr)


COMMANDS = {
    "demo": cmd_demo,
    "serve": cmd_serve,
    "seed": cmd_seed,
    "import": cmd_import,
    "catalogue": cmd_catalogue,
    "models": cmd_models,
    "ab-report": cmd_ab_report,
    "export-impressions": cmd_export_impressions,
    "simulate": cmd_simulate,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "generate": cmd_generate,
}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = _settings(args)
        logs.setup(settings.log_level)
        COMMANDS[args.command](args)
    except (
        SettingsError,
        EmbeddedRedisError,
        LogFormatError,
        IncompatibleStore,
        FileNotFoundError,
        experiments.ExperimentsError,
        server.WorkerError,
        NoTrainingGroups,
        SplitError,
        ModelRejected,
        StoreUnavailable,
        export.ExportError,
    ) as exc:
        print(f"recsvc: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
