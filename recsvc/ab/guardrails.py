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

from recsvc.ab.stats import srm_pvalue

# Fallback reasons the serving model can cause (recsvc.service.recommend).
MODEL_FAULTS = frozenset({"model_error", "model_unavailable", "deadline", "no_candidates"})
# Fallbacks that are not a model's doing at all.
NOT_FALLBACKS = frozenset({"unknown_user"})
LATENCY_KEEP = 20_000


@dataclass(slots=True)
class Moments:
    """Sums over users of x (impressions), y (clicks or purchases) and their
    squares and product: the delta method's inputs, kept current in O(1) per
    impression, so a look costs the same with 100 users or 1,000,000."""

    n: int = 0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    syy: float = 0.0
    sxy: float = 0.0

    def move(self, x: int, y: int, dx: int, dy: int, new_user: bool) -> None:
        """A user's (x, y) became (x + dx, y + dy)."""
        self.n += new_user
        x1, y1 = x + dx, y + dy
        self.sx += dx
        self.sy += dy
        self.sxx += x1 * x1 - x * x
        self.syy += y1 * y1 - y * y
        self.sxy += x1 * y1 - x * y

    def ratio(self) -> tuple[float, float] | None:
        """Σy/Σx and the delta-method variance of that ratio (users the unit)."""
        n = self.n
        if n < 2 or self.sx <= 0 or self.sy <= 0:
            return None
        mx, my = self.sx / n, self.sy / n
        r = my / mx
        vx = (self.sxx - n * mx * mx) / (n - 1)
        vy = (self.syy - n * my * my) / (n - 1)
        cxy = (self.sxy - n * mx * my) / (n - 1)
        return r, max(vy - 2 * r * cxy + r * r * vx, 0.0) / (n * mx * mx)


def ratio_lift(a: Moments, b: Moments, z: float) -> tuple[float, float, float] | None:
    """Relative lift of a's ratio over b's with a normal interval on the log ratio
    (as recsvc.ab.stats.ratio_lift, from moments)."""
    ra, rb = a.ratio(), b.ratio()
    if ra is None or rb is None:
        return None
    (r1, v1), (r0, v0) = ra, rb
    se = math.sqrt(v1 / (r1 * r1) + v0 / (r0 * r0))
    log_ratio = math.log(r1 / r0)
    return r1 / r0 - 1, math.exp(log_ratio - z * se) - 1, math.exp(log_ratio + z * se) - 1


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
    users: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    clicks: Moments = field(default_factory=Moments)
    purchases: Moments = field(default_factory=Moments)
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
        row = self.users.get(user_id)
        x, y, z = row if row is not None else (0, 0, 0)
        self.clicks.move(x, y, 1, int(clicked), row is None)
        self.purchases.move(x, z, 1, int(bought), row is None)
        # A new tuple, not a list updated in place: tuples of ints leave the
        # garbage collector's care, so a million users cost no collection time.
        self.users[user_id] = (x + 1, y + clicked, z + bought)

    @property
    def impressions(self) -> int:
        return int(self.clicks.sx)

    def quantile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]

    def p99(self) -> float | None:
        return self.quantile(0.99)

    def summary(self) -> dict[str, Any]:
        n = self.impressions
        return {
            "answers": self.answers,
            "users": len(self.seen),
            "impressions": n,
            "ctr": self.clicks.sy / n if n else None,
            "conversion": self.purchases.sy / n if n else None,
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
    """p99 from ``min_latency_answers`` answers per arm; below that, p95 (a p99
    of a few hundred answers is their two or three slowest), from ``min_answers``."""
    n = min(len(canary.latencies), len(other.latencies))
    if n < th.min_answers:
        return Check("latency_p99", None, f"{th.min_answers} answers with a latency needed")
    q = 0.99 if n >= th.min_latency_answers else 0.95
    c, o = canary.quantile(q), other.quantile(q)
    assert c is not None and o is not None
    worse = c > o * th.p99_ratio and c - o > th.p99_margin_ms
    tag = f"p{round(q * 100)}"
    return Check(
        "latency_p99",
        not worse,
        f"canary {tag} {c:.1f} ms vs other {o:.1f} ms (fails above x{th.p99_ratio} and "
        f"+{th.p99_margin_ms:.0f} ms)",
    )


def _rate(name: str, canary: Moments, other: Moments, z: float, th: Thresholds) -> Check:
    """Per-impression rate (clicks or purchases), users as the unit."""
    if min(canary.n, other.n) < th.min_users:
        return Check(name, None, f"{canary.n} canary / {other.n} other users with impressions")
    n1, n0, k1, k0 = canary.sx, other.sx, canary.sy, other.sy
    r1, r0 = k1 / n1, k0 / n0
    if k0 == 0:  # no outcome to compare with (yet, or none logged): not evidence
        return Check(name, None, f"no {name} in the other arm yet")
    if k1 == 0:
        # No interval on a zero rate: how unlikely is none at the other arm's rate?
        expected = n1 * r0
        worse = expected > z * z
        return Check(
            name,
            not worse,
            f"canary 0 of {n1:.0f} impressions, {expected:.1f} expected at {r0:.2%}",
        )
    lift = ratio_lift(canary, other, z)
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
        _rate("ctr", canary.clicks, other.clicks, z, th),
        _rate("conversion", canary.purchases, other.purchases, z, th),
    ]
