"""The study's numbers: leakage and utility of groups of trained models, and their differences, with intervals
over training seeds and images.

A *cell* is one setting trained with S ≥ 1 seeds; every model is attacked on the same member and non-member images
and sampled with the same prompts and noise seeds. A value of a cell, and a difference between two cells (e.g.
Mixup-I 0.5 vs clean, same method), carries two sources of uncertainty: which images were drawn (the members and
non-members are a sample) and which training run was drawn (another seed gives another model).

- Images: `image_bootstrap` redraws the test members and non-members B times; the same draws serve every model, so
  every comparison is paired on images.
- Seeds: seed k of one setting shares batch order, crops and noise with seed k of every other setting, so
  differences are paired by seed (`paired_difference`). With few seeds a percentile bootstrap over seeds is
  dishonest (3 seeds have 10 distinct resamples), so the interval is a t interval:
  value ± t_{0.975, S−1} · √(V_images + s²_seeds / S) (`seed_and_image_interval`).

Leakage is measured the way an attacker would get it: for each model and attack, the direction (members lower or
higher) and the threshold are fixed on a calibration half of the images (`metrics.calibration_split`), and
measured on the other half, the *test* rows:
- AUC_a = the test-row AUC of attack a in the calibration-chosen direction;
- TPR_a = the fraction of test members flagged by the calibration threshold at FPR ≤ 1% (`calibrated_predictions`);
- the *worst case* of a model is the attack with the largest calibration-half AUC (`ModelLeakage.worst_attack`),
  measured on the test half: the attack is chosen without looking at the rows it is scored on.
"""

import math

import numpy as np
from scipy import stats

from mixsyn_utils.metrics import calibration_split, roc_metrics

TARGET_FPR = 0.01
CONFIDENCE = 0.95
# "No detectable difference" needs the whole interval inside ±margin (fixed before any study number was computed).
# An interval that contains 0 but reaches beyond the margin cannot tell a difference from none.
EQUIVALENCE_MARGINS = {"auc": 0.02, "tpr": 0.02, "rprecision": 2.0, "fidelity": 0.05}


def calibrated_predictions(scores, is_member, calibration, target_fpr=TARGET_FPR):
    """Member predictions on every row from a threshold fit on the calibration rows only (scores oriented,
    higher = member): τ = the largest-TPR threshold with calibration FPR ≤ target; predicted ⇔ score ≥ τ."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(is_member[calibration].astype(float), scores[calibration],
                                     drop_intermediate=False)
    allowed = np.flatnonzero(fpr <= target_fpr)
    return scores >= thresholds[allowed[np.argmax(tpr[allowed])]]


def oriented(scores, is_member, calibration):
    """(sign, oriented scores, calibration AUC ≥ 0.5): the direction in which the calibration rows' AUC is ≥ 0.5
    (higher = member)."""
    auc = roc_metrics(scores[calibration & is_member], scores[calibration & ~is_member])["auc"]
    sign = 1.0 if auc >= 0.5 else -1.0
    return sign, sign * scores, max(auc, 1.0 - auc)


class ModelLeakage:
    """One model's attack scores on the study's rows, reduced to what a bootstrap over test rows needs.

    `scores`: {attack: (N,) membership scores, higher = member}; `is_member`, `calibration`: (N,) booleans.
    For each attack: the pairwise comparison matrix of the test members against the test non-members
    (C[i, j] = 1[s_i > s_j] + ½·1[s_i = s_j], so AUC = mean C), the test members' calibrated predictions, and the
    calibration-half AUC in the chosen direction (what the worst case is chosen by).
    """

    def __init__(self, scores, is_member, calibration, target_fpr=TARGET_FPR):
        test = ~calibration
        self.attacks = list(scores)
        self.comparisons, self.flagged, self.directions, self.calibration_auc = {}, {}, {}, {}
        for attack, values in scores.items():
            sign, oriented_scores, self.calibration_auc[attack] = oriented(values, is_member, calibration)
            members, nonmembers = oriented_scores[test & is_member], oriented_scores[test & ~is_member]
            difference = members[:, None] - nonmembers[None, :]
            self.comparisons[attack] = (difference > 0) + 0.5 * (difference == 0)
            predicted = calibrated_predictions(oriented_scores, is_member, calibration, target_fpr)
            self.flagged[attack] = predicted[test & is_member].astype(float)
            self.directions[attack] = "higher_is_member" if sign > 0 else "lower_is_member"

    def worst_attack(self, attacks=None):
        """The attack an attacker would pick from the calibration half alone: the largest calibration AUC (ties: the
        first in `attacks` order). Its test-half figures are the model's worst case, free of the optimism of a
        maximum taken over test figures."""
        attacks = list(attacks or self.attacks)
        return max(attacks, key=lambda attack: (self.calibration_auc[attack], -attacks.index(attack)))

    def metrics(self, member_weights, nonmember_weights):
        """{attack: (B,) AUC, (B,) TPR} for B resamples given as multiplicity matrices (B, n_members), (B, n_non)."""
        auc, tpr = {}, {}
        n_members, n_nonmembers = member_weights.sum(1), nonmember_weights.sum(1)
        for attack in self.attacks:
            auc[attack] = np.einsum("bi,ij,bj->b", member_weights, self.comparisons[attack], nonmember_weights) / (
                n_members * n_nonmembers)
            tpr[attack] = member_weights @ self.flagged[attack] / n_members
        return auc, tpr


def leakage_values(model, member_weights, nonmember_weights, attacks):
    """{metric name: (B,) values} of one model: auc:<attack>, tpr:<attack>, and auc:worst / tpr:worst, the test
    figures of the attack chosen on the calibration half (`ModelLeakage.worst_attack`)."""
    auc, tpr = model.metrics(member_weights, nonmember_weights)
    values = {f"auc:{a}": auc[a] for a in attacks} | {f"tpr:{a}": tpr[a] for a in attacks}
    worst = model.worst_attack(attacks)
    values["auc:worst"], values["tpr:worst"] = auc[worst], tpr[worst]
    return values


def _multiplicities(rng, count, num_resamples):
    """(B + 1, count) how many times each row is drawn in each of B resamples with replacement (row 0: every row
    once, the point estimate)."""
    weights = np.ones((num_resamples + 1, count))
    for b in range(1, num_resamples + 1):
        weights[b] = np.bincount(rng.integers(0, count, count), minlength=count)
    return weights


def image_bootstrap(cells, value_fn, row_counts, num_resamples=1000, seed=0):
    """{cell: {training seed: {metric: (B + 1,) values}}}: every model's metrics under the same B image resamples.

    `cells`: {cell: {training seed: model}}. `value_fn(model, *weights) -> {metric: (B + 1,)}` with one multiplicity
    matrix per row group (`row_counts`, e.g. test members and test non-members). Every model sees the same draws, so
    differences are paired on images. Row 0 is the point estimate (every image once).
    """
    rng = np.random.default_rng(seed)
    weights = [_multiplicities(rng, count, num_resamples) for count in row_counts]
    return {cell: {training_seed: value_fn(model, *weights) for training_seed, model in models.items()}
            for cell, models in cells.items()}


def seed_and_image_interval(per_seed, confidence=CONFIDENCE, key="value"):
    """{key, ci, seeds, image_se, seed_se}: the mean over seeds of a metric and its interval.

    `per_seed`: {training seed: (B + 1,) values}, row 0 the point estimate, rows 1… image resamples.
    m̄(b) = mean_k x_k(b); value = m̄(0); V_images = Var_b m̄(b) (b ≥ 1, ddof 1); V_seeds = s²/S with
    s² = Var_k x_k(0) (ddof 1); CI = value ± q · √(V_images + V_seeds), q = t_{(1+confidence)/2, S−1} for S ≥ 2 and
    the normal quantile for S = 1 (then the interval holds image noise only; `seeds` says so). NaN values (a metric
    undefined on a resample) are left out of the image variance.
    """
    values = np.stack([np.asarray(per_seed[k], dtype=np.float64) for k in sorted(per_seed)])
    num_seeds = len(values)
    mean = values.mean(0)
    point = float(mean[0])
    image_var = float(np.nanvar(mean[1:], ddof=1)) if len(mean) > 2 else 0.0
    seed_var = float(np.var(values[:, 0], ddof=1)) / num_seeds if num_seeds > 1 else 0.0
    quantile = (stats.t.ppf((1 + confidence) / 2, num_seeds - 1) if num_seeds > 1
                else stats.norm.ppf((1 + confidence) / 2))
    half = float(quantile * math.sqrt(image_var + seed_var))
    return {key: point, "ci": [point - half, point + half], "seeds": num_seeds,
            "image_se": math.sqrt(image_var), "seed_se": math.sqrt(seed_var)}


def summarize(per_seed, confidence=CONFIDENCE, bounds=(-math.inf, math.inf)):
    """A cell's value with its seed-and-image interval (`seed_and_image_interval`), the interval cut to the metric's
    range `bounds` (an AUC lies in [0, 1]: with two seeds t₀.₉₇₅,₁ = 12.7 reaches far beyond it)."""
    summary = seed_and_image_interval(per_seed, confidence)
    low, high = summary["ci"]
    summary["ci"] = [max(low, bounds[0]), min(high, bounds[1])]
    return summary


def paired_difference(per_seed_a, per_seed_b, confidence=CONFIDENCE):
    """{delta, ci, seeds, …} of A − B, paired by training seed (seed k of A against seed k of B) and by image resample.

    A reference with one model (the pre-trained one) is paired with every seed of A. Cells with other seed sets are
    compared on their common seeds only; none in common is an error.
    """
    if len(per_seed_b) == 1 and len(per_seed_a) >= 1:
        reference = next(iter(per_seed_b.values()))
        deltas = {k: np.asarray(v) - reference for k, v in per_seed_a.items()}
    else:
        common = sorted(set(per_seed_a) & set(per_seed_b))
        if not common:
            raise ValueError("the two cells share no training seed to pair")
        deltas = {k: np.asarray(per_seed_a[k]) - np.asarray(per_seed_b[k]) for k in common}
    return seed_and_image_interval(deltas, confidence, key="delta")


def study_split(is_member, domains, seed=0):
    """The calibration half of the study's rows (the same for every model): `metrics.calibration_split`."""
    return calibration_split(is_member, domains, seed)


def verdict(ci, claimed_direction, margin, premise_failure=None):
    """One of the four words a comparison may end with.

    `claimed_direction` is +1 when the claim says the difference is positive, −1 when negative; `margin` the
    equivalence margin of the metric. In order: not testable here (a failed premise, named) > supported (the CI
    excludes 0 on the claimed side) > contradicted (the CI excludes 0 on the other side) > no detectable difference
    (the CI lies inside ±margin) > not testable here (the CI contains 0 but reaches beyond the margin: the data
    cannot tell a difference from none).
    """
    if premise_failure:
        return f"not testable here ({premise_failure})"
    low, high = ci
    if (low > 0 and claimed_direction > 0) or (high < 0 and claimed_direction < 0):
        return "supported"
    if low > 0 or high < 0:
        return "contradicted"
    if -margin < low and high < margin:
        return "no detectable difference"
    return (f"not testable here (the 95% interval [{low:.3g}, {high:.3g}] contains 0 but reaches beyond the "
            f"±{margin:g} equivalence margin: too few seeds or images to tell)")
