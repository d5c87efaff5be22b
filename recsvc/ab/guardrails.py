"""Canary guardrails: the canary's answers against the rest of the traffic's.

Pure statistics over what the controller (recsvc.ab.canary) gathered from the
impression and outcome logs for one step of a roll-out:

- ``srm``: users per arm against the share recorded with each impression (a
  chi-square test; never the share the record says now, which may have moved);
- ``model_faults``: answers that fell back for a reason the model can cause
  (model_error, model_unavailable, deadline, no_candidates), one-sided
  two-proportion z-test plus an absolute margin;
- ``fallbacks``: every fallback of a known user, the same test with a wider margin;
- ``latency_p99``: the canary's p99 against the rest's, a ratio and a margin
  (both must be exceeded, on enough answers per arm);
- ``ctr`` and ``conversion``: clicks and purchases per impression (an
  impression counts once whether one or three of its items were clicked),
  users as the unit (the delta method of recsvc.ab.stats): a guardrail fails
  when the whole interval lies below zero, i.e. the canary is worse with
  confidence. An interval that straddles zero holds: guardrails stop harm,
  they do not demand a win.

Looks happen at every controller tick. Before the step's exposures are in,
a failure must pass a stricter bound (z 3.5, one-sided about 1 in 4,300 per
look) than at the step's end (z 3.0, about 1 in 740), so the many looks at a
healthy canary rarely roll it back (measured: an equal version went through
every step in each of the test runs), while a clearly bad one is stopped
early. The price is power: a harm of a few percent needs many impressions to
be seen, and a guardrail that cannot see it yet holds.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from recsvc.ab.stats import ratio_lift, srm_pvalue

# Fallback reasons the serving model can cause (recsvc.service.recommend).
MODEL_FAULTS = frozenset({"model_error", "model_unavailable", "deadline", "no_candidates"})
# Fallbacks that are not a model's doing at all.
NOT_FALLBACKS = frozenset({"unknown_user"})
LATENCY_KEEP = 20_000


@dataclass(slots=True)
class ArmStats:
    """One arm's figures for one step."""

    answers: int = 0
    seen: set[str] = field(default_factory=set)  # users with an answer
    faults: int = 0
    fallbacks: int = 0
    latency_seen: int = 0
    latencies: list[float] = field(default_factory=list)  # a uniform sample
    # user -> [matured impressions, clicked ones, bought ones]
    users: dict[str, list[int]] = field(default_factory=dict)
    rng: random.Random = field(default_factory=lambda: random.Random(7))

    def answer(
        self, user_id: str, strategy: str, reason: str | None, latency_ms: float | None
    ) -> None:
        self.answers += 1
        self.seen.add(user_id)
        if strategy == "fallback" and reason not in NOT_FALLBACKS:
            self.fallbacks += 1
            self.faults += reason in MODEL_FAULTS
        if latency_ms is not None:
            self.latency_seen += 1
            if len(self.latencies) < LATENCY_KEEP:
                self.latencies.append(latency_ms)
            else:  # reservoir: every answer equally likely to be kept
                k = self.rng.randrange(self.latency_seen)
                if k < LATENCY_KEEP:
                    self.latencies[k] = latency_ms

    def matured(self, user_id: str, clicked: bool, bought: bool) -> None:
        row = self.users.setdefault(user_id, [0, 0, 0])
        row[0] += 1
        row[1] += clicked
        row[2] += bought

    @property
    def impressions(self) -> int:
        return sum(r[0] for r in self.users.values())

    def p99(self) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]

    def summary(self) -> dict[str, Any]:
        clicks = sum(r[1] for r in self.users.values())
        bought = sum(r[2] for r in self.users.values())
        n = self.impressions
        return {
            "answers": self.answers,
            "users": len(self.seen),
            "impressions": n,
            "ctr": clicks / n if n else None,
            "conversion": bought / n if n else None,
            "fault_rate": self.faults / self.answers if self.answers else None,
            "fallback_rate": self.fallbacks / self.answers if self.answers else None,
            "p99_ms": self.p99(),
        }


@dataclass(frozen=True, slots=True)
class Thresholds:
    z_early: float = 3.5
    z_final: float = 3.0
    srm_alpha: float = 0.001  # at a step's end
    srm_alpha_early: float = 0.0001  # at the looks before
    fault_margin: float = 0.01
    fallback_margin: float = 0.02
    p99_ratio: float = 1.5
    p99_margin_ms: float = 5.0
    # Per arm, before a check may fail: answers, and users with an impression.
    min_answers: int = 100
    min_users: int = 20
    # A p99 from fewer answers is mostly noise (its top few values).
    min_latency_answers: int = 1000


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool | None  # None: not enough data yet
    detail: str

    def body(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


def _proportion(
    name: str, k1: int, n1: int, k0: int, n0: int, margin: float, z: float, th: Thresholds
) -> Check:
    if min(n1, n0) < th.min_answers:
        return Check(name, None, f"{n1} canary / {n0} other answers, {th.min_answers} needed")
    p1, p0 = k1 / n1, k0 / n0
    pooled = (k1 + k0) / (n1 + n0)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n0)) if 0 < pooled < 1 else 0.0
    stat = (p1 - p0) / se if se > 0 else 0.0
    worse = stat > z and p1 - p0 > margin
    return Check(
        name,
        not worse,
        f"canary {p1:.2%} vs other {p0:.2%} of answers (z {stat:.2f}, fails above {z:.2f} "
        f"and +{margin:.0%})",
    )


def _latency(canary: ArmStats, other: ArmStats, th: Thresholds) -> Check:
    if min(len(canary.latencies), len(other.latencies)) < th.min_latency_answers:
        return Check(
            "latency_p99", None, f"{th.min_latency_answers} answers with a latency needed per arm"
        )
    c, o = canary.p99(), other.p99()
    assert c is not None and o is not None
    worse = c > o * th.p99_ratio and c - o > th.p99_margin_ms
    return Check(
        "latency_p99",
        not worse,
        f"canary p99 {c:.1f} ms vs other {o:.1f} ms (fails above x{th.p99_ratio} and "
        f"+{th.p99_margin_ms:.0f} ms)",
    )


def _rate(name: str, k: int, canary: ArmStats, other: ArmStats, z: float, th: Thresholds) -> Check:
    """Per-impression rate of column ``k`` (1 clicks, 2 purchases), users as the unit."""
    mine, base = list(canary.users.values()), list(other.users.values())
    if min(len(mine), len(base)) < th.min_users:
        return Check(name, None, f"{len(mine)} canary / {len(base)} other users with impressions")
    n1, n0 = sum(r[0] for r in mine), sum(r[0] for r in base)
    k1, k0 = sum(r[k] for r in mine), sum(r[k] for r in base)
    r1, r0 = k1 / n1, k0 / n0
    if k0 == 0:  # no outcome to compare with (yet, or none logged): not evidence
        return Check(name, None, f"no {name} in the other arm yet")
    if k1 == 0:
        # No interval on a zero rate: how unlikely is none at the other arm's rate?
        expected = n1 * r0
        worse = expected > z * z
        return Check(
            name, not worse, f"canary 0 of {n1} impressions, {expected:.1f} expected at {r0:.2%}"
        )
    lift = ratio_lift(
        [float(r[k]) for r in mine],
        [float(r[0]) for r in mine],
        [float(r[k]) for r in base],
        [float(r[0]) for r in base],
        z=z,
    )
    if lift is None:
        return Check(name, None, "no interval yet")
    point, lo, hi = lift
    return Check(
        name,
        hi >= 0.0,
        f"canary {r1:.2%} vs other {r0:.2%} per impression, lift {point:+.1%} "
        f"[{lo:+.1%}, {hi:+.1%}] (fails when the whole interval is below 0)",
    )


def evaluate(
    canary: ArmStats,
    other: ArmStats,
    share: float,
    final: bool,
    th: Thresholds = Thresholds(),
) -> list[Check]:
    """Every guardrail for one step; ``final``: the step's exposures are in."""
    z = th.z_final if final else th.z_early
    users = [len(canary.seen), len(other.seen)]
    if min(users) < th.min_users:
        srm = Check("srm", None, f"{users[0]} canary / {users[1]} other users")
    else:
        p = srm_pvalue(users, [share, 1.0 - share])
        srm = Check(
            "srm",
            p >= (th.srm_alpha if final else th.srm_alpha_early),
            f"{users[0]} canary / {users[1]} other users for a {share:.0%} share (p {p:.2g})",
        )
    return [
        srm,
        _proportion(
            "model_faults",
            canary.faults,
            canary.answers,
            other.faults,
            other.answers,
            th.fault_margin,
            z,
            th,
        ),
        _proportion(
            "fallbacks",
            canary.fallbacks,
            canary.answers,
            other.fallbacks,
            other.answers,
            th.fallback_margin,
            z,
            th,
        ),
        _latency(canary, other, th),
        _rate("ctr", 1, canary, other, z, th),
        _rate("conversion", 2, canary, other, z, th),
    ]
