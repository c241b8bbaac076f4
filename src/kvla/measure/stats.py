"""Interval estimates for success rates, and for the paired difference of two methods' success
rates over the same seeds.

Closed-loop success is binary and methods run on the same seeds, so the comparison with `full` is
a paired 2x2 table. A normal approximation to the mean paired difference collapses exactly where
it matters (no discordant seeds gives a zero-width interval whatever the number of episodes), so
the paired interval is Newcombe's hybrid score interval, built from the Wilson intervals of the
two marginal success rates.
"""

from __future__ import annotations

import math
from statistics import NormalDist

Z95 = NormalDist().inv_cdf(0.975)  # 1.95996...


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a success rate (Wilson 1927; Newcombe 1998, Stat Med 17:857, method 3)."""
    if trials == 0:
        return (math.nan, math.nan)
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact at the ends, not rounding off them
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return (low, high)


def newcombe_paired_interval(both: int, first_only: int, second_only: int, neither: int,
                             z: float = Z95) -> tuple[float, float]:
    """Interval for p1 - p2 from a paired 2x2 table: Newcombe's hybrid score interval.

    Newcombe (1998), "Improved confidence intervals for the difference between binomial
    proportions based on paired data", Stat Med 17:2635, method 10. With a = both, b = first_only,
    c = second_only, d = neither, n = a + b + c + d, the marginals p1 = (a+b)/n and p2 = (a+c)/n
    get Wilson intervals (l1, u1) and (l2, u2), and

        L = (p1 - p2) - sqrt((p1 - l1)^2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)^2)
        U = (p1 - p2) + sqrt((p2 - l2)^2 - 2 phi (p2 - l2)(u1 - p1) + (u1 - p1)^2)

    where phi is the phi coefficient of the table with Newcombe's correction of its numerator
    C = ad - bc: C - n/2 if C > n/2, 0 if 0 <= C <= n/2, C if C < 0; and phi = 0 when any
    marginal total (a+b, c+d, a+c, b+d) is 0.
    """
    n = both + first_only + second_only + neither
    if n == 0:
        return (math.nan, math.nan)
    p1, p2 = (both + first_only) / n, (both + second_only) / n
    l1, u1 = wilson_interval(both + first_only, n, z)
    l2, u2 = wilson_interval(both + second_only, n, z)
    margins = (both + first_only) * (second_only + neither) * (both + second_only) * (first_only + neither)
    if margins == 0:
        phi = 0.0
    else:
        numerator = both * neither - first_only * second_only
        if numerator > n / 2:
            numerator -= n / 2
        elif numerator >= 0:
            numerator = 0
        phi = numerator / math.sqrt(margins)
    below = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    above = math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    return (p1 - p2 - below, p1 - p2 + above)


def paired_difference(method: list[bool], reference: list[bool], z: float = Z95) -> tuple[float, tuple[float, float]]:
    """Mean paired difference of success (method - reference) over the same seeds, and its
    Newcombe hybrid score interval (see `newcombe_paired_interval`)."""
    if len(method) != len(reference):
        raise ValueError(f"paired outcomes differ in length: {len(method)} method vs {len(reference)} reference")
    if not method:
        return math.nan, (math.nan, math.nan)
    pairs = [(bool(m), bool(r)) for m, r in zip(method, reference)]
    both = sum(m and r for m, r in pairs)
    method_only = sum(m and not r for m, r in pairs)
    reference_only = sum(r and not m for m, r in pairs)
    neither = len(pairs) - both - method_only - reference_only
    mean = (method_only - reference_only) / len(pairs)
    return mean, newcombe_paired_interval(both, method_only, reference_only, neither, z)
