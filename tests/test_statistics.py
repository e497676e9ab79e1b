"""The study's statistics (study/statistics.py): calibrated leakage, the two-level bootstrap, paired differences,
the four verdict words. Each checked against a float64 reference written here with plain loops."""

import itertools

import numpy as np
import pytest

from study.statistics import (
    ModelLeakage,
    difference,
    leakage_values,
    study_split,
    summarize,
    two_level_bootstrap,
    verdict,
)


def _rows(seed=0, per_domain=6, domains=("a", "b", "c")):
    rng = np.random.default_rng(seed)
    is_member = np.array([True] * per_domain * len(domains) + [False] * per_domain * len(domains))
    domain = np.array([d for _ in range(2) for d in domains for _ in range(per_domain)])
    return rng, is_member, domain


def _reference_auc(members, nonmembers):
    """P(s_m > s_n) + ½ P(s_m = s_n) by enumerating every pair, in float64."""
    total = 0.0
    for m, n in itertools.product(members, nonmembers):
        total += 1.0 if m > n else 0.5 if m == n else 0.0
    return total / (len(members) * len(nonmembers))


def test_model_leakage_point_estimate_is_the_test_half_auc_in_the_calibrated_direction():
    rng, is_member, domain = _rows()
    calibration = study_split(is_member, domain, seed=3)
    # Members LOWER (like a loss): the calibration half must learn to flip the sign.
    scores = np.where(is_member, -1.0, 0.0) + rng.normal(size=len(is_member))
    scores[0] = scores[len(is_member) // 2 + 1]  # a tie across the groups
    model = ModelLeakage({"loss": scores}, is_member, calibration)
    assert model.directions["loss"] == "lower_is_member"
    test = ~calibration
    expected = _reference_auc(-scores[test & is_member], -scores[test & ~is_member])
    ones = [np.ones((1, (test & is_member).sum())), np.ones((1, (test & ~is_member).sum()))]
    auc, tpr = model.metrics(*ones)
    assert auc["loss"][0] == pytest.approx(expected, abs=1e-12)
    # TPR: the fraction of test members at or above the calibration threshold (FPR ≤ 1% on calibration rows =
    # above every calibration non-member here), computed by hand.
    oriented = -scores
    threshold = min(s for s in oriented[calibration & is_member] if s > oriented[calibration & ~is_member].max())
    assert tpr["loss"][0] == pytest.approx(np.mean(oriented[test & is_member] >= threshold), abs=1e-12)


def test_bootstrap_weights_reproduce_a_resampled_auc():
    rng, is_member, domain = _rows(seed=1)
    calibration = study_split(is_member, domain)
    scores = rng.normal(size=len(is_member)) + 0.8 * is_member
    model = ModelLeakage({"a": scores}, is_member, calibration)
    test_members, test_nonmembers = scores[~calibration & is_member], scores[~calibration & ~is_member]
    draw_m = rng.integers(0, len(test_members), len(test_members))
    draw_n = rng.integers(0, len(test_nonmembers), len(test_nonmembers))
    weights_m = np.bincount(draw_m, minlength=len(test_members))[None, :].astype(float)
    weights_n = np.bincount(draw_n, minlength=len(test_nonmembers))[None, :].astype(float)
    auc, _ = model.metrics(weights_m, weights_n)
    assert auc["a"][0] == pytest.approx(_reference_auc(test_members[draw_m], test_nonmembers[draw_n]), abs=1e-12)


def test_worst_case_is_the_max_over_attacks_per_resample():
    rng, is_member, domain = _rows(seed=2)
    calibration = study_split(is_member, domain)
    model = ModelLeakage({"x": rng.normal(size=len(is_member)) + is_member,
                          "y": rng.normal(size=len(is_member))}, is_member, calibration)
    weights = [rng.integers(0, 3, (5, n)).astype(float) + 1 for n in (9, 9)]
    values = leakage_values(model, *weights, ["x", "y"])
    assert np.array_equal(values["auc:worst"], np.maximum(values["auc:x"], values["auc:y"]))
    assert np.array_equal(values["tpr:worst"], np.maximum(values["tpr:x"], values["tpr:y"]))


def test_two_level_bootstrap_resamples_seeds_and_pairs_images_across_cells():
    # value_fn = weighted mean of per-model numbers; with one row group the reference is computable by hand.
    models = {"A": [np.array([1.0, 2.0, 3.0]), np.array([2.0, 3.0, 4.0])], "B": [np.array([0.0, 0.0, 6.0])]}

    def value_fn(model, weights):
        return {"m": weights @ model / weights.sum(1)}

    samples = two_level_bootstrap(models, value_fn, [3], num_resamples=200, seed=7)
    # Row 0 is the point estimate: every image once, every seed once.
    assert samples["A"]["m"][0] == pytest.approx(np.mean([2.0, 3.0]))
    assert samples["B"]["m"][0] == pytest.approx(2.0)
    # Reference: regenerate the same draws with the documented generator order.
    rng = np.random.default_rng(7)
    weights = np.ones((201, 3))
    for b in range(1, 201):
        weights[b] = np.bincount(rng.integers(0, 3, 3), minlength=3)
    seed_draws_a = rng.integers(0, 2, (200, 2))
    expected_a = [np.mean([weights[b + 1] @ models["A"][s] / weights[b + 1].sum() for s in seed_draws_a[b]])
                  for b in range(200)]
    assert np.allclose(samples["A"]["m"][1:], expected_a, atol=1e-12)
    # One seed: only the images vary; the same image draws as cell A (paired).
    expected_b = [weights[b] @ models["B"][0] / weights[b].sum() for b in range(1, 201)]
    assert np.allclose(samples["B"]["m"][1:], expected_b, atol=1e-12)
    # The seed level adds variance: A's spread exceeds the spread of its seed-averaged model alone.
    averaged = (models["A"][0] + models["A"][1]) / 2
    image_only = [weights[b] @ averaged / weights[b].sum() for b in range(1, 201)]
    assert np.std(samples["A"]["m"][1:]) > np.std(image_only)


def test_summaries_and_paired_differences():
    a = np.array([0.7, 0.6, 0.8, 0.75, 0.65])
    b = np.array([0.5, 0.55, 0.5, 0.45, 0.6])
    assert summarize(a) == {"value": 0.7, "ci": [pytest.approx(np.percentile(a[1:], 2.5)),
                                                  pytest.approx(np.percentile(a[1:], 97.5))]}
    result = difference(a, b)
    assert result["delta"] == pytest.approx(0.2)
    assert result["ci"] == [pytest.approx(np.percentile((a - b)[1:], 2.5)),
                            pytest.approx(np.percentile((a - b)[1:], 97.5))]


@pytest.mark.parametrize("ci, direction, expected", [
    ([0.01, 0.2], +1, "supported"),
    ([-0.2, -0.01], -1, "supported"),
    ([0.01, 0.2], -1, "contradicted"),
    ([-0.2, -0.01], +1, "contradicted"),
    ([-0.1, 0.1], +1, "no detectable difference"),
    ([0.0, 0.1], +1, "no detectable difference"),
])
def test_verdict_words(ci, direction, expected):
    assert verdict(ci, direction) == expected


def test_a_failed_premise_wins_over_the_ci():
    assert verdict([0.1, 0.2], +1, "R-precision at chance") == "not testable here (R-precision at chance)"
