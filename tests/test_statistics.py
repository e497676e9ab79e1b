"""The study's statistics (study/statistics.py): calibrated leakage, the worst case chosen on the calibration half,
the image bootstrap, the seed-and-image interval, seed-paired differences, the four verdict words. Each checked
against a float64 reference written here with plain loops."""

import itertools
import math

import numpy as np
import pytest

from study.statistics import (
    ModelLeakage,
    image_bootstrap,
    leakage_values,
    paired_difference,
    seed_and_image_interval,
    study_split,
    summarize,
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


def test_worst_case_is_the_attack_chosen_on_the_calibration_half_and_measured_on_the_test_half():
    rng, is_member, domain = _rows(seed=2, per_domain=10)
    calibration = study_split(is_member, domain)
    # "x" separates the calibration rows and not the test rows; "y" separates the calibration rows less well and
    # the test rows perfectly.
    x = np.where(calibration, is_member * 5.0, 0.0) + rng.normal(size=len(is_member))
    y = np.where(calibration, is_member * 0.8, is_member * 5.0) + rng.normal(size=len(is_member))
    model = ModelLeakage({"x": x, "y": y}, is_member, calibration)
    assert model.worst_attack() == "x"
    weights = [rng.integers(0, 3, (5, n)).astype(float) + 1 for n in ((~calibration & is_member).sum(),
                                                                     (~calibration & ~is_member).sum())]
    values = leakage_values(model, *weights, ["x", "y"])
    assert np.array_equal(values["auc:worst"], values["auc:x"]) and np.array_equal(values["tpr:worst"], values["tpr:x"])
    assert (values["auc:worst"] < values["auc:y"]).all()  # the maximum over test figures would have picked y


def test_image_bootstrap_gives_every_model_the_same_draws():
    models = {"A": {0: np.array([1.0, 2.0, 3.0]), 1: np.array([2.0, 3.0, 4.0])}, "B": {0: np.array([0.0, 0.0, 6.0])}}

    def value_fn(model, weights):
        return {"m": weights @ model / weights.sum(1)}

    samples = image_bootstrap(models, value_fn, [3], num_resamples=200, seed=7)
    rng = np.random.default_rng(7)
    weights = np.ones((201, 3))
    for b in range(1, 201):
        weights[b] = np.bincount(rng.integers(0, 3, 3), minlength=3)
    for cell, per_seed in models.items():
        for training_seed, model in per_seed.items():
            expected = [weights[b] @ model / weights[b].sum() for b in range(201)]
            assert np.allclose(samples[cell][training_seed]["m"], expected, atol=1e-12)


def test_seed_and_image_interval_matches_a_float64_reference():
    rng = np.random.default_rng(3)
    per_seed = {k: 0.7 + 0.03 * k + rng.normal(0, 0.01, 401) for k in range(3)}
    result = seed_and_image_interval(per_seed)
    stacked = np.array([per_seed[k] for k in range(3)], dtype=np.float64)
    mean = stacked.mean(0)
    image_var = sum((m - mean[1:].mean()) ** 2 for m in mean[1:]) / (len(mean) - 2)
    seed_var = sum((x - stacked[:, 0].mean()) ** 2 for x in stacked[:, 0]) / 2 / 3
    half = 4.302652729911275 * math.sqrt(image_var + seed_var)  # t_{0.975, 2}, from a table
    assert result["value"] == pytest.approx(mean[0], abs=1e-12)
    assert result["ci"] == [pytest.approx(mean[0] - half, abs=1e-10), pytest.approx(mean[0] + half, abs=1e-10)]
    assert result["seeds"] == 3
    one = seed_and_image_interval({0: per_seed[0]})
    assert one["seed_se"] == 0.0 and one["ci"][1] - one["ci"][0] == pytest.approx(
        2 * 1.959963984540054 * np.std(per_seed[0][1:], ddof=1), rel=1e-9)


def test_a_cells_interval_is_cut_to_the_metrics_range_and_its_value_kept():
    per_seed = {0: np.full(11, 0.95), 1: np.full(11, 0.55)}  # two seeds: t₀.₉₇₅,₁ = 12.7
    wide = seed_and_image_interval(per_seed)
    assert wide["ci"][0] < 0 and wide["ci"][1] > 1
    cut = summarize(per_seed, bounds=(0.0, 1.0))
    assert cut["value"] == pytest.approx(0.75) and cut["ci"] == [0.0, 1.0]
    inside = summarize({0: np.full(11, 0.70), 1: np.full(11, 0.72)}, bounds=(0.0, 1.0))
    assert inside["ci"] == seed_and_image_interval({0: np.full(11, 0.70), 1: np.full(11, 0.72)})["ci"]


def test_differences_are_paired_by_seed():
    rng = np.random.default_rng(4)
    image_noise = rng.normal(0, 0.01, 201)
    # Seed k moves both settings alike (shared batch order and noise); B is A lowered by 0.05 on every seed.
    a = {k: 0.6 + 0.1 * k + image_noise for k in range(3)}
    b = {k: 0.55 + 0.1 * k + image_noise for k in range(3)}
    paired = paired_difference(a, b)
    assert paired["delta"] == pytest.approx(0.05, abs=1e-12)
    assert paired["ci"][1] - paired["ci"][0] < 1e-9  # no seed or image variance left in the paired difference
    unpaired_seed_spread = np.std([a[k][0] for k in range(3)], ddof=1)
    assert unpaired_seed_spread > 0.05  # an unpaired interval would be wider than the effect
    reference = {"pretrained": 0.5 + image_noise}
    against_reference = paired_difference(a, reference)
    assert against_reference["delta"] == pytest.approx(np.mean([0.1, 0.2, 0.3]), abs=1e-12)
    assert against_reference["seeds"] == 3
    with pytest.raises(ValueError, match="share no training seed"):
        paired_difference({0: a[0], 1: a[1]}, {5: b[0], 6: b[1]})


@pytest.mark.parametrize("ci, direction, expected", [
    ([0.01, 0.2], +1, "supported"),
    ([-0.2, -0.01], -1, "supported"),
    ([0.01, 0.2], -1, "contradicted"),
    ([-0.2, -0.01], +1, "contradicted"),
    ([-0.015, 0.015], +1, "no detectable difference"),
    ([0.0, 0.019], -1, "no detectable difference"),
])
def test_verdict_words(ci, direction, expected):
    assert verdict(ci, direction, margin=0.02) == expected


def test_an_interval_around_zero_wider_than_the_margin_is_not_testable():
    result = verdict([-0.1, 0.1], +1, margin=0.02)
    assert result.startswith("not testable here (the 95% interval [-0.1, 0.1] contains 0 but reaches beyond the "
                             "±0.02 equivalence margin")


def test_a_failed_premise_wins_over_the_ci():
    assert verdict([0.1, 0.2], +1, 0.02, "R-precision at chance") == "not testable here (R-precision at chance)"
