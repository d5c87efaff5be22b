"""How often the canary guardrails roll back a version as good as the stable one
(A/A), and how often they catch a worse one (power), with looks as the
controller takes them.

One step of a roll-out is simulated: ``--users`` shoppers, each with their own
click propensity (drawn around ``--ctr``: normal with sd ctr/3, or with
``--concentration c`` from Beta(c * ctr, c * (1 - ctr)), where a small c makes
users very unlike each other), a ``--share`` of them on the canary,
whose propensity is scaled by ``1 + --lift``. Impressions arrive one user at a
time; every ``--look-every`` impressions the controller's evaluation runs
(``recsvc.ab.guardrails.evaluate``, early bound until the canary has
``--min-exposures`` impressions, then the final look). Each run ends in the
first failing guardrail or "held". Pure Python, no Redis: the statistics only.

    .venv/bin/python -m loadtest.guardrails_aa --runs 300 --lift 0      # false rollbacks
    .venv/bin/python -m loadtest.guardrails_aa --runs 100 --lift -0.25  # power
    .venv/bin/python -m loadtest.guardrails_aa --runs 5000 --users 400 --share 0.25 \
        --ctr 0.45 --min-exposures 150 --look-every 5 --concentration 0.7   # a small shop
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from typing import Any

from recsvc.ab.guardrails import ArmStats, evaluate


def one_step(
    seed: int,
    users: int,
    share: float,
    lift: float,
    ctr: float,
    min_exposures: int,
    look_every: int,
    concentration: float | None = None,
) -> str:
    """The first failing guardrail of one simulated step, or "held"."""
    rng = random.Random(seed)
    ids = [f"u{k}" for k in range(users)]
    if concentration is None:
        propensity = {u: min(0.95, max(0.01, rng.gauss(ctr, ctr / 3))) for u in ids}
    else:
        a, b = concentration * ctr, concentration * (1.0 - ctr)
        propensity = {u: rng.betavariate(a, b) for u in ids}
    on_canary = set(rng.sample(ids, round(share * users)))
    canary, other = ArmStats(), ArmStats()
    k = 0
    while True:
        user = rng.choice(ids)
        mine = user in on_canary
        p = propensity[user] * (1.0 + lift if mine else 1.0)
        arm = canary if mine else other
        arm.answer(user, "model", None, 5.0)
        arm.matured(user, rng.random() < p, rng.random() < p / 5)
        k += 1
        if k % look_every:
            continue
        final = canary.impressions >= min_exposures
        failed = [c.name for c in evaluate(canary, other, share, final) if c.ok is False]
        if failed:
            return failed[0]
        if final:
            return "held"


def measure(
    runs: int,
    lift: float,
    users: int = 2000,
    share: float = 0.1,
    ctr: float = 0.35,
    min_exposures: int = 400,
    look_every: int = 20,
    seconds: float = 600.0,
    concentration: float | None = None,
) -> dict[str, Any]:
    started = time.monotonic()
    outcomes: Counter[str] = Counter()
    for seed in range(runs):
        if time.monotonic() - started > seconds:
            break
        outcomes[
            one_step(seed, users, share, lift, ctr, min_exposures, look_every, concentration)
        ] += 1
    done = sum(outcomes.values())
    return {
        "lift": lift,
        "concentration": concentration,
        "runs": done,
        "outcomes": dict(outcomes),
        "rolled_back": (done - outcomes["held"]) / done if done else None,
        "looks_per_step": min_exposures / share / look_every,
        "seconds": round(time.monotonic() - started, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=300)
    p.add_argument("--lift", type=float, default=0.0)
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--share", type=float, default=0.1)
    p.add_argument("--ctr", type=float, default=0.35)
    p.add_argument("--min-exposures", type=int, default=400)
    p.add_argument("--look-every", type=int, default=20)
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--concentration", type=float, default=None)
    a = p.parse_args()
    if not 0.0 < a.ctr < 1.0:
        p.error("--ctr must be between 0 and 1")
    if a.concentration is not None and not a.concentration > 0.0:
        p.error("--concentration must be above 0")
    result = measure(
        a.runs,
        a.lift,
        a.users,
        a.share,
        a.ctr,
        a.min_exposures,
        a.look_every,
        a.seconds,
        a.concentration,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
