"""Success-rate intervals and the paired method-vs-full interval, against published worked examples."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvla.measure.stats import newcombe_paired_interval, paired_difference, wilson_interval


def _outcomes(both, method_only, reference_only, neither):
    """Per-seed (method, reference) successes with the given paired 2x2 table."""
    method = [True] * both + [True] * method_only + [False] * reference_only + [False] * neither
    reference = [True] * both + [False] * method_only + [True] * reference_only + [False] * neither
    return method, reference


# Newcombe (1998), "Two-sided confidence intervals for the single proportion", Stat Med 17:857,
# the score (Wilson) interval of his four examples.
@pytest.mark.parametrize("successes,trials,low,high", [
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_wilson_matches_newcombe_single_proportion_examples(successes, trials, low, high):
    assert wilson_interval(successes, trials) == pytest.approx((low, high), abs=5e-5)


def test_wilson_edges():
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


# (both, first only, second only, neither) -> 95 % interval of p1 - p2, Newcombe's method 10.
PUBLISHED_PAIRED = [
    # Newcombe (1998), Stat Med 17:2635, the worked example; without the continuity correction of
    # phi the same formula gives 0.0182 to 0.2892, so this also pins the correction.
    ((12, 9, 2, 21), (0.0112, 0.2954), 5e-5),
    # Fagerland, Lydersen & Laake (2014), Stat Med 33:2850, Table V (Bentur et al. 2009 data).
    ((1, 1, 7, 12), (-0.507, -0.026), 5e-4),
    # Fagerland, Lydersen & Laake (2017), Statistical Analysis of Contingency Tables, ch. 8
    # (Cavo et al. 2012 data), "Newcombe square-and-add".
    ((59, 6, 16, 80), (-0.1186, -0.0046), 5e-5),
]


@pytest.mark.parametrize("table,interval,tolerance", PUBLISHED_PAIRED)
def test_paired_interval_matches_published_examples(table, interval, tolerance):
    assert newcombe_paired_interval(*table) == pytest.approx(interval, abs=tolerance)
    # the same table given as per-seed outcomes, method as the first margin
    mean, ci = paired_difference(*_outcomes(*table))
    assert mean == pytest.approx((table[1] - table[2]) / sum(table))
    assert ci == pytest.approx(interval, abs=tolerance)


@pytest.mark.parametrize("rate", [0.5, 1.0, 0.0])
def test_no_discordant_pairs_still_has_width_that_shrinks_with_episodes(rate):
    widths = []
    for n in (20, 50, 200, 1000):
        successes = round(rate * n)
        mean, (low, high) = paired_difference(*_outcomes(successes, 0, 0, n - successes))
        assert mean == 0.0 and low < 0.0 < high
        widths.append(high - low)
    assert all(a > b for a, b in zip(widths, widths[1:]))


# One discordant seed in 200 gives the same per-seed differences whatever the concordant split,
# so the normal approximation always claimed 0.005 +- 1.96 * sd / sqrt(200) = -0.48..+1.48 points.
NORMAL_APPROXIMATION_ONE_IN_200 = (-0.0048, 0.0148)


@pytest.mark.parametrize("both", [199, 180, 100, 20, 0])
def test_one_discordant_pair_in_200_is_wider_than_the_normal_approximation(both):
    mean, (low, high) = paired_difference(*_outcomes(both, 1, 0, 199 - both))
    assert mean == pytest.approx(0.005)
    assert low < NORMAL_APPROXIMATION_ONE_IN_200[0] and high > NORMAL_APPROXIMATION_ONE_IN_200[1]


@pytest.mark.parametrize("both", [199, 180, 20, 0])
def test_one_discordant_pair_near_a_boundary_is_asymmetric(both):
    """Longer towards the observed difference where a success rate is near 0 or 1 (the normal
    approximation is symmetric about the mean whatever the rates)."""
    mean, (low, high) = paired_difference(*_outcomes(both, 1, 0, 199 - both))
    assert (high - mean) - (mean - low) > 1e-3


@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=300))
def test_interval_contains_the_estimate_and_negates_under_swapping(pairs):
    method, reference = [m for m, _ in pairs], [r for _, r in pairs]
    mean, (low, high) = paired_difference(method, reference)
    assert -1.0 - 1e-12 <= low <= mean <= high <= 1.0 + 1e-12
    swapped_mean, (swapped_low, swapped_high) = paired_difference(reference, method)
    assert swapped_mean == pytest.approx(-mean)
    assert (swapped_low, swapped_high) == pytest.approx((-high, -low), abs=1e-12)


def test_paired_difference_rejects_unpaired_and_empty_is_nan():
    with pytest.raises(ValueError, match="differ in length"):
        paired_difference([True, False], [True])
    mean, (low, high) = paired_difference([], [])
    assert math.isnan(mean) and math.isnan(low) and math.isnan(high)


def test_success_by_variant_pairs_by_task_and_seed_and_splits_variants():
    """scripts/success_by_variant.py: the paired difference per variant and overall, the speed-up,
    the guard's check-weighted deviation, and refusals of unpaired or duplicated episodes."""
    import importlib.util
    from pathlib import Path

    import pytest

    path = Path(__file__).resolve().parents[1] / "scripts" / "success_by_variant.py"
    spec = importlib.util.spec_from_file_location("success_by_variant", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def episode(method, task, seed, success, ms=50.0, guard=None):
        return {"method": method, "task": task, "seed": seed, "success": success, "step_ms_median": ms,
                "reuse_ratio": 0.0 if method == "full" else 0.2, **({"guard": guard} if guard else {})}

    guard = lambda checks, deviation: {"checks": checks, "breaches": 1, "mean_deviation": deviation,  # noqa: E731
                                       "guard_share_of_step": 0.05}
    episodes = []
    for seed, (full_ok, method_ok) in enumerate([(True, True), (True, False), (False, False), (True, True)]):
        for task in ("reach-v3@flicker", "reach-v3"):
            episodes.append(episode("full", task, seed, full_ok))
            episodes.append(episode("m|guard", task, seed, method_ok, ms=40.0,
                                    guard=guard(1 if seed else 3, 0.1 if seed else 0.5)))
    text = script.tables(episodes)
    row = next(line for line in text.split("\n\nflicker")[0].splitlines() if line.startswith("| m\\|guard"))
    # all 8 episodes: seed 1 lost against full in both variants -> -25 points; 50 ms / 40 ms;
    # checks 3 + 1 + 1 + 1 per variant, deviation weighted by them (3 * 0.5 + 3 * 0.1) / 6
    expected_diff, (low, high) = paired_difference([True, False, False, True] * 2, [True, True, False, True] * 2)
    assert f"{100 * expected_diff:+.1f} ({100 * low:+.1f}..{100 * high:+.1f})" in row and expected_diff == -0.25
    assert "| 1.25x |" in row and "| 12 / 8 |" in row and "| 0.300 |" in row
    assert "flicker (4 episodes per method)" in text and "plain (4 episodes per method)" in text
    with pytest.raises(ValueError, match="ran .* twice"):
        script.tables(episodes + episodes[:1])
    with pytest.raises(ValueError, match="lacks 1 of full's episodes"):
        script.tables([e for e in episodes if not (e["method"] != "full" and e["seed"] == 0 and "@" in e["task"])])
