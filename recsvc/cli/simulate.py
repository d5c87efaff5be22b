"""`recsvc simulate`: synthetic shoppers against a running service, over HTTP.

The shoppers are the demo population (same generator, same seed), so their
latent tastes are known: each asks for recommendations, clicks a shown item
with a probability that grows with how well it fits them (and falls with its
rank), sometimes buys it, and posts those events with the recommendation's
request_id — enough to run an experiment end to end and read it with
`recsvc ab-report`. Bounded by a request count and a duration; loopback only.

What it was shown can be kept for training (``events_log``: every applied
event in the event-log CSV layout, with the time the service recorded;
``impressions_out``: impression and outcome JSONL files as the service's export
writes them), and the answers are scored per model version served
(``SimSummary.served``): NDCG@10 graded by the shoppers' own clicks and
purchases on each answer, NDCG@10 against their hidden preference
(``Latent.match``, the ideal being the catalogue's best ten for them), CTR and
conversion.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import aiohttp
import numpy as np

from features.evaluation import clustered_stderr
from features.events import EVENT_BY_NAME
from features.impression_eval import gain
from features.impressions import GRADES, ImpressionWriter, impression_record, outcome_record
from features.logs import RECSVC_EVENTS_HEADER
from features.synthetic import Latent, SyntheticConfig, generate

CLICK_BASE, CLICK_MATCH, BUY_MATCH = 0.01, 0.30, 0.35
TOP_N = 10


@dataclass(slots=True)
class Served:
    """One model version's (or strategy's) answers on the simulated traffic."""

    users: list[int] = field(default_factory=list)
    click_ndcg: list[float] = field(default_factory=list)
    oracle_ndcg: list[float] = field(default_factory=list)
    clicked: list[bool] = field(default_factory=list)
    bought: list[bool] = field(default_factory=list)

    def add(
        self, user: int, click_ndcg: float, oracle_ndcg: float, clicked: bool, bought: bool
    ) -> None:
        self.users.append(user)
        self.click_ndcg.append(click_ndcg)
        self.oracle_ndcg.append(oracle_ndcg)
        self.clicked.append(clicked)
        self.bought.append(bought)

    def report(self) -> dict[str, float]:
        """Means with their standard errors clustered by shopper (a shopper's
        answers are not independent draws)."""
        users = np.asarray(self.users, dtype=np.int64)
        out: dict[str, float] = {
            "requests": float(len(users)),
            "users": float(len(set(self.users))),
        }
        for name, values in (
            (f"click_ndcg_at_{TOP_N}", self.click_ndcg),
            (f"oracle_ndcg_at_{TOP_N}", self.oracle_ndcg),
            ("ctr", self.clicked),
            ("conversion", self.bought),
        ):
            v = np.asarray(values, dtype=np.float64)
            out[name] = float(v.mean()) if len(v) else 0.0
            out[f"{name}_stderr"] = clustered_stderr(v, users)
        return out


@dataclass(slots=True)
class SimSummary:
    requests: int = 0
    clicks: int = 0
    purchases: int = 0
    errors: int = 0
    seconds: float = 0.0
    # Per model version served ("<name>/<version>"; the strategy for answers
    # without a model, e.g. "fallback:unknown_user").
    served: dict[str, Served] = field(default_factory=dict)

    def report(self) -> dict[str, dict[str, float]]:
        return {key: s.report() for key, s in sorted(self.served.items())}


def check_loopback(host: str) -> None:
    name = urlparse(host).hostname or ""
    try:
        loopback = name == "localhost" or ipaddress.ip_address(name).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"simulate only talks to a service on loopback, not {host!r}")


class EventsLog:
    """Appends applied events to an event-log CSV (the header when it is new)."""

    def __init__(self, path: Path) -> None:
        new = not path.exists() or path.stat().st_size == 0
        self.file: IO[str] = path.open("a", encoding="utf-8", newline="")
        if new:
            self.file.write(RECSVC_EVENTS_HEADER + "\n")

    def add(self, ts: float, user_id: str, item_id: str, kind: str) -> None:
        self.file.write(f"{ts:.3f},{user_id},{item_id},{kind}\n")

    def close(self) -> None:
        self.file.close()


@dataclass(slots=True)
class Oracle:
    """What each shopper would like best (the ideal of the oracle NDCG), cached."""

    latent: Latent
    ideal: dict[int, float] = field(default_factory=dict)

    def ndcg(self, user: int, match: np.ndarray) -> float:
        best = self.ideal.get(user)
        if best is None:
            every = self.latent.match(user, np.arange(len(self.latent.item_category)))
            top = np.sort(every)[::-1][:TOP_N]
            best = self.ideal[user] = float(np.sum(top / np.log2(np.arange(len(top)) + 2.0)))
        got = float(np.sum(match[:TOP_N] / np.log2(np.arange(len(match[:TOP_N])) + 2.0)))
        return got / best if best > 0 else 0.0


def click_ndcg(grades: list[int]) -> float:
    """NDCG of one answer graded by what the shopper did with it (0: nothing)."""
    gains = np.asarray([gain(g) for g in grades[:TOP_N]])
    ideal = np.sort(np.asarray([gain(g) for g in grades]))[::-1][:TOP_N]
    discount = 1.0 / np.log2(np.arange(TOP_N) + 2.0)
    best = float(ideal @ discount[: len(ideal)])
    return float(gains @ discount[: len(gains)]) / best if best > 0 else 0.0


def _served_key(body: dict[str, Any]) -> str:
    model = body.get("model")
    if body.get("strategy") == "model" and isinstance(model, dict):
        return f"{model.get('name')}/{model.get('version')}"
    reason = body.get("fallback_reason")
    return f"{body.get('strategy')}:{reason}" if reason else str(body.get("strategy"))


@dataclass(slots=True)
class Outputs:
    """Where a simulation keeps what it was shown (each optional)."""

    events: EventsLog | None = None
    impressions: ImpressionWriter | None = None


async def _shopper(
    session: aiohttp.ClientSession,
    host: str,
    latent: Latent,
    users: int,
    deadline: float,
    budget: list[int],
    rng: random.Random,
    out: SimSummary,
    oracle: Oracle,
    outputs: Outputs,
) -> None:
    index_of = {f"i{k}": k for k in range(len(latent.item_category))}
    while time.monotonic() < deadline and budget[0] > 0:
        budget[0] -= 1
        u = rng.randrange(users)
        user_id = f"u{u}"
        asked = time.time()
        async with session.post(
            f"{host}/v1/recommendations", json={"user_id": user_id, "n": TOP_N}
        ) as resp:
            out.requests += 1
            if resp.status != 200:
                out.errors += 1
                continue
            body = await resp.json()
        latency_ms = (time.time() - asked) * 1000.0
        items = [i["item_id"] for i in body["items"]]
        if outputs.impressions is not None:
            outputs.impressions.impression(
                impression_record(
                    body["request_id"],
                    user_id,
                    round(asked, 3),
                    items,
                    sources=[i.get("source") for i in body["items"]],
                    strategy=body.get("strategy", "model"),
                    fallback_reason=body.get("fallback_reason"),
                    model=(body.get("model") or {}).get("name"),
                    version=(body.get("model") or {}).get("version"),
                    experiments=body.get("experiments"),
                    forced=body.get("forced"),
                    latency_ms=round(latency_ms, 3),
                )
            )
        known = np.asarray([index_of.get(i, -1) for i in items], dtype=np.int64)
        match = np.where(known >= 0, latent.match(u, np.maximum(known, 0)), 0.0)
        events = []
        for rank, (item, m) in enumerate(zip(items, match.tolist(), strict=True)):
            p_click = CLICK_BASE + CLICK_MATCH * m / math.log2(rank + 2)
            if item in index_of and rng.random() < p_click:
                events.append((rank, item, "click"))
                if rng.random() < BUY_MATCH * m:
                    events.append((rank, item, "purchase"))
        grades = [0] * len(items)
        for rank, item, kind in events:
            ts = round(time.time(), 3)  # sent, so the service records this very time
            event = {
                "event_id": uuid.uuid4().hex,
                "user_id": user_id,
                "item_id": item,
                "type": kind,
                "ts": ts,
                "request_id": body["request_id"],
            }
            async with session.post(f"{host}/v1/events", json=event) as resp:
                applied = resp.status == 200 and (await resp.json()).get("accepted") == 1
            if not applied:
                out.errors += 1
                continue
            if kind == "click":
                out.clicks += 1
            else:
                out.purchases += 1
            grades[rank] = max(grades[rank], GRADES[EVENT_BY_NAME[kind]])
            if outputs.events is not None:
                outputs.events.add(ts, user_id, item, kind)
            if outputs.impressions is not None:
                outputs.impressions.outcome(
                    outcome_record(body["request_id"], user_id, item, EVENT_BY_NAME[kind], ts)
                )
        served = out.served.setdefault(_served_key(body), Served())
        served.add(
            u,
            click_ndcg(grades),
            oracle.ndcg(u, match),
            any(g > 0 for g in grades),
            any(g >= GRADES[EVENT_BY_NAME["purchase"]] for g in grades),
        )


async def simulate(
    host: str,
    users: int,
    duration: float,
    max_requests: int,
    config: SyntheticConfig,
    concurrency: int = 8,
    seed: int = 1,
    key: str = "",
    events_log: Path | None = None,
    impressions_out: Path | None = None,
    budget: list[int] | None = None,
) -> SimSummary:
    """``key``: an API key with the recommend and events scopes, for a service
    that needs keys (sent as a bearer token). ``events_log``: a CSV to append the
    applied events to; ``impressions_out``: a directory for impression files.
    ``budget``: ``[requests left]``, shared with the caller, who may set it to 0
    to stop the shoppers early (their summary is still returned)."""
    check_loopback(host)
    latent = generate(config, end_ts=time.time()).latent
    assert latent is not None
    users = min(users, config.n_users)
    out = SimSummary()
    started = time.monotonic()
    if budget is None:
        budget = [max_requests]
    timeout = aiohttp.ClientTimeout(total=10)
    headers = {"Authorization": f"Bearer {key}"} if key else None
    outputs = Outputs(
        EventsLog(events_log) if events_log is not None else None,
        ImpressionWriter(impressions_out, f"sim-{time.time_ns()}-{seed}")
        if impressions_out is not None
        else None,
    )
    oracle = Oracle(latent)
    try:
        async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
            await asyncio.gather(
                *(
                    _shopper(
                        session,
                        host.rstrip("/"),
                        latent,
                        users,
                        started + duration,
                        budget,
                        random.Random(seed * 1000 + k),
                        out,
                        oracle,
                        outputs,
                    )
                    for k in range(concurrency)
                )
            )
    finally:
        if outputs.events is not None:
            outputs.events.close()
        if outputs.impressions is not None:
            outputs.impressions.close()
    out.seconds = time.monotonic() - started
    return out


def served_table(summary: SimSummary) -> str:
    """Per version served: requests, NDCG@10 by clicks and by hidden preference, CTR
    and conversion (± standard errors clustered by shopper)."""
    lines = [
        f"{'served by':<36}{'requests':>9}{'click ndcg@10':>18}{'oracle ndcg@10':>18}"
        f"{'CTR':>18}{'conversion':>18}"
    ]
    for key, m in summary.report().items():
        cells = "".join(
            f"{m[name]:>10.4f} ±{m[name + '_stderr']:.4f}"
            for name in (f"click_ndcg_at_{TOP_N}", f"oracle_ndcg_at_{TOP_N}", "ctr", "conversion")
        )
        lines.append(f"{key:<36}{int(m['requests']):>9}{cells}")
    return "\n".join(lines)
