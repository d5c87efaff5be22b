"""Statistics for experiment reports: sample-ratio mismatch and lift intervals.

Pure Python (no SciPy for two formulas): the chi-square survival function via
the regularized upper incomplete gamma function (Numerical Recipes' series and
continued fraction), and a log-ratio normal interval for a relative lift.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054


def _gamma_q(a: float, x: float) -> float:
    """Regularized upper incomplete gamma Q(a, x)."""
    if x <= 0:
        return 1.0
    lg = math.lgamma(a)
    if x < a + 1:  # series for P, then Q = 1 - P
        term = total = 1.0 / a
        ap = a
        for _ in range(1000):
            ap += 1
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(-x + a * math.log(x) - lg))
    b = x + 1 - a  # continued fraction for Q (Lentz)
    c = 1.0 / 1e-300
    d = 1.0 / b
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1e-300 if abs(d) < 1e-300 else d
        c = b + an / c
        c = 1e-300 if abs(c) < 1e-300 else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return min(1.0, math.exp(-x + a * math.log(x) - lg) * h)


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for a chi-square variable with ``df`` degrees of freedom."""
    return _gamma_q(df / 2.0, x / 2.0)


def srm_pvalue(observed: list[int], weights: list[float]) -> float:
    """Chi-square test of observed counts against the configured weights; a tiny
    p-value means the split is broken (sample-ratio mismatch)."""
    total = sum(observed)
    if total == 0 or len(observed) < 2:
        return 1.0
    wsum = sum(weights)
    stat = 0.0
    for o, w in zip(observed, weights, strict=True):
        expected = total * w / wsum
        stat += (o - expected) ** 2 / expected
    return chi2_sf(stat, len(observed) - 1)


def relative_lift(k1: int, n1: int, k0: int, n0: int) -> tuple[float, float, float] | None:
    """Relative lift of rate k1/n1 over k0/n0 with a 95% interval (log ratio, normal
    approximation). None when either rate is zero or undefined."""
    if min(n1, n0, k1, k0) <= 0:
        return None
    p1, p0 = k1 / n1, k0 / n0
    se = math.sqrt((1 - p1) / k1 + (1 - p0) / k0)
    log_ratio = math.log(p1 / p0)
    return (
        p1 / p0 - 1,
        math.exp(log_ratio - Z95 * se) - 1,
        math.exp(log_ratio + Z95 * se) - 1,
    )


def _ratio(num: list[float], den: list[float]) -> tuple[float, float] | None:
    """Σnum/Σden over users and the delta-method variance of that ratio."""
    n = len(num)
    if n < 2:
        return None
    mx, my = sum(den) / n, sum(num) / n
    if mx <= 0 or my <= 0:
        return None
    r = my / mx
    vx = sum((x - mx) ** 2 for x in den) / (n - 1)
    vy = sum((y - my) ** 2 for y in num) / (n - 1)
    cxy = sum((x - mx) * (y - my) for x, y in zip(den, num, strict=True)) / (n - 1)
    return r, max(vy - 2 * r * cxy + r * r * vx, 0.0) / (n * mx * mx)


def ratio_lift(
    num1: list[float],
    den1: list[float],
    num0: list[float],
    den0: list[float],
    z: float = Z95,
) -> tuple[float, float, float] | None:
    """Relative lift of Σnum/Σden (e.g. clicks per exposure) of group 1 over group 0,
    with a 95% interval. Users are the unit of randomisation, so the variance is the
    delta method's over users: a user's repeated requests are not independent trials,
    and treating them as such would make the interval too narrow. ``z``: the
    interval's normal quantile (1.96 for 95%)."""
    a, b = _ratio(num1, den1), _ratio(num0, den0)
    if a is None or b is None:
        return None
    (r1, v1), (r0, v0) = a, b
    se = math.sqrt(v1 / (r1 * r1) + v0 / (r0 * r0))
    log_ratio = math.log(r1 / r0)
    return (
        r1 / r0 - 1,
        math.exp(log_ratio - z * se) - 1,
        math.exp(log_ratio + z * se) - 1,
    )
