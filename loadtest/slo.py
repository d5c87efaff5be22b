"""The SLO gate's arithmetic and its summary table (no locust import: unit-testable)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

RECOMMEND = "/v1/recommendations"
EVENTS = "/v1/events"


@dataclass(frozen=True, slots=True)
class Row:
    """One endpoint's figures over a run (milliseconds; locust rounds them to whole ms
    below 100 ms)."""

    name: str
    requests: int
    failures: int
    rps: float
    p50: float
    p95: float
    p99: float
    max: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def table(rows: list[Row]) -> str:
    head = f"{'endpoint':<22}{'requests':>9}{'RPS':>8}{'p50':>7}{'p95':>7}{'p99':>7}{'max':>8}"
    lines = [head + f"{'failures':>10}"]
    for r in rows:
        lines.append(
            f"{r.name:<22}{r.requests:>9}{r.rps:>8.1f}{r.p50:>7.0f}{r.p95:>7.0f}{r.p99:>7.0f}"
            f"{r.max:>8.0f}{r.failures:>10}"
        )
    return "\n".join(lines)


def model_share(answers: dict[str, int]) -> float:
    """Share of ``answers`` (counts by "model" or fallback reason) that were the model's."""
    total = sum(answers.values())
    return answers.get("model", 0) / total if total else 0.0


def answers_line(answers: dict[str, int]) -> str:
    """'model 99.2% of 1,234 answers for known users (fallbacks: overloaded 3, ...)'."""
    total = sum(answers.values())
    others = ", ".join(
        f"{k} {v}" for k, v in sorted(answers.items(), key=lambda kv: -kv[1]) if k != "model"
    )
    line = f"model {model_share(answers):.2%} of {total:,} answers for known users"
    return line + (f" (fallbacks: {others})" if others else "")


def verdict(
    rows: list[Row],
    slo_p99_ms: float,
    max_failure_ratio: float,
    answers: dict[str, int] | None = None,
    min_model_share: float = 0.99,
) -> tuple[bool, list[str]]:
    """Pass when the recommendation endpoint's p99 is within the SLO, failures
    (over every endpoint) are at most the ratio, and (``answers`` given: counts by
    strategy or fallback reason of the requests that should get the model, known
    users) at least ``min_model_share`` of them were the model's: a fast answer
    that fell back to popular items is not what the load test measures. No
    recommendation requests: fail. Returns (passed, the reasons)."""
    rec = next((r for r in rows if r.name == RECOMMEND), None)
    if rec is None or rec.requests == 0:
        return False, [f"no {RECOMMEND} requests were made"]
    total = sum(r.requests for r in rows)
    failed = sum(r.failures for r in rows)
    problems = []
    if answers is not None and model_share(answers) < min_model_share:
        problems.append(f"{answers_line(answers)} < {min_model_share:.0%}")
    if rec.p99 > slo_p99_ms:
        problems.append(f"{RECOMMEND} p99 {rec.p99:.0f} ms > SLO {slo_p99_ms:g} ms")
    if failed > max_failure_ratio * total:
        problems.append(f"{failed} failures in {total} requests > {max_failure_ratio:.2%}")
    if problems:
        return False, problems
    reasons = [
        f"{RECOMMEND} p99 {rec.p99:.0f} ms <= SLO {slo_p99_ms:g} ms; "
        f"{failed} failures in {total} requests <= {max_failure_ratio:.2%}"
    ]
    if answers is not None:
        reasons.append(f"{answers_line(answers)} >= {min_model_share:.0%}")
    return True, reasons
