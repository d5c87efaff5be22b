"""`recsvc simulate`: synthetic shoppers against a running service, over HTTP.

The shoppers are the demo population (same generator, same seed), so their
latent tastes are known: each asks for recommendations, clicks a shown item
with a probability that grows with how well it fits them (and falls with its
rank), sometimes buys it, and posts those events with the recommendation's
request_id — enough to run an experiment end to end and read it with
`recsvc ab-report`. Bounded by a request count and a duration; loopback only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import random
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import aiohttp
import numpy as np

from features.synthetic import Latent, SyntheticConfig, generate

CLICK_BASE, CLICK_MATCH, BUY_MATCH = 0.01, 0.30, 0.35


@dataclass(slots=True)
class SimSummary:
    requests: int = 0
    clicks: int = 0
    purchases: int = 0
    errors: int = 0
    seconds: float = 0.0


def check_loopback(host: str) -> None:
    name = urlparse(host).hostname or ""
    try:
        loopback = name == "localhost" or ipaddress.ip_address(name).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"simulate only talks to a service on loopback, not {host!r}")


async def _shopper(
    session: aiohttp.ClientSession,
    host: str,
    latent: Latent,
    users: int,
    deadline: float,
    budget: list[int],
    rng: random.Random,
    out: SimSummary,
) -> None:
    index_of = {f"i{k}": k for k in range(len(latent.item_category))}
    while time.monotonic() < deadline and budget[0] > 0:
        budget[0] -= 1
        u = rng.randrange(users)
        user_id = f"u{u}"
        async with session.post(
            f"{host}/v1/recommendations", json={"user_id": user_id, "n": 10}
        ) as resp:
            out.requests += 1
            if resp.status != 200:
                out.errors += 1
                continue
            body = await resp.json()
        shown = [i["item_id"] for i in body["items"] if i["item_id"] in index_of]
        if not shown:
            continue
        match = latent.match(u, np.asarray([index_of[i] for i in shown]))
        events = []
        for rank, (item, m) in enumerate(zip(shown, match.tolist(), strict=True)):
            p_click = CLICK_BASE + CLICK_MATCH * m / math.log2(rank + 2)
            if rng.random() < p_click:
                events.append((item, "click"))
                if rng.random() < BUY_MATCH * m:
                    events.append((item, "purchase"))
        for item, kind in events:
            event = {
                "event_id": uuid.uuid4().hex,
                "user_id": user_id,
                "item_id": item,
                "type": kind,
                "request_id": body["request_id"],
            }
            async with session.post(f"{host}/v1/events", json=event) as resp:
                if resp.status != 200:
                    out.errors += 1
                elif kind == "click":
                    out.clicks += 1
                else:
                    out.purchases += 1


async def simulate(
    host: str,
    users: int,
    duration: float,
    max_requests: int,
    config: SyntheticConfig,
    concurrency: int = 8,
    seed: int = 1,
    key: str = "",
) -> SimSummary:
    """``key``: an API key with the recommend and events scopes, for a service
    that needs keys (sent as a bearer token)."""
    check_loopback(host)
    latent = generate(config, end_ts=time.time()).latent
    assert latent is not None
    users = min(users, config.n_users)
    out = SimSummary()
    started = time.monotonic()
    budget = [max_requests]
    timeout = aiohttp.ClientTimeout(total=10)
    headers = {"Authorization": f"Bearer {key}"} if key else None
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
                )
                for k in range(concurrency)
            )
        )
    out.seconds = time.monotonic() - started
    return out
