"""The study's numbers: leakage and utility of groups of trained models, and their differences, with CIs over
training seeds and images.

A *cell* is one setting trained with S ≥ 1 seeds; every model is attacked on the same member and non-member images
and sampled with the same prompts and noise seeds. A value of a cell, and a difference between two cells (e.g.
Mixup-I 0.5 vs clean, same method), carries two sources of uncertainty: which images were drawn (the members and
non-members are a sample) and which training run was drawn (another seed gives another model).
`two_level_bootstrap` resamples both.

Leakage is measured the way an attacker would get it: for each model and attack, the direction (members lower or
higher) and the threshold are fixed on a calibration half of the images (`metrics.calibration_split`), and
measured on the other half, the *test* rows:
- AUC_a = the test-row AUC of attack a in the calibration-chosen direction;
- TPR_a = the fraction of test members flagged by the calibration threshold at FPR ≤ 1% (`calibrated_predictions`);
- the *worst case* of a model is max over attacks of each (the strongest attack we can run).
"""

import numpy as np

from mixsyn_utils.metrics import calibration_split, roc_metrics

TARGET_FPR = 0.01


def _percentile_interval(samples, confidence):
    tail = 100.0 * (1.0 - confidence) / 2.0
    return [float(np.percentile(samples, tail)), float(np.percentile(samples, 100.0 - tail))]


def calibrated_predictions(scores, is_member, calibration, target_fpr=TARGET_FPR):
    """Member predictions on every row from a threshold fit on the calibration rows only (scores oriented,
    higher = member): τ = the largest-TPR threshold with calibration FPR ≤ target; predicted ⇔ score ≥ τ."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(is_member[calibration].astype(float), scores[calibration],
                                     drop_intermediate=False)
    allowed = np.flatnonzero(fpr <= target_fpr)
    return scores >= thresholds[allowed[np.argmax(tpr[allowed])]]


def oriented(scores, is_member, calibration):
    """(sign, oriented scores): the direction in which the calibration rows' AUC is ≥ 0.5 (higher = member)."""
    auc = roc_metrics(scores[calibration & is_member], scores[calibration & ~is_member])["auc"]
    sign = 1.0 if auc >= 0.5 else -1.0
    return sign, sign * scores


class ModelLeakage:
    """One model's attack scores on the study's rows, reduced to what a bootstrap over test rows needs.

    `scores`: {attack: (N,) membership scores, higher = member}; `is_member`, `calibration`: (N,) booleans.
    For each attack: the pairwise comparison matrix of the test members against the test non-members
    (C[i, j] = 1[s_i > s_j] + ½·1[s_i = s_j], so AUC = mean C) and the test members' calibrated predictions.
    """

    def __init__(self, scores, is_member, calibration, target_fpr=TARGET_FPR):
        test = ~calibration
        self.attacks = list(scores)
        self.comparisons, self.flagged, self.directions = {}, {}, {}
        for attack, values in scores.items():
            sign, oriented_scores = oriented(values, is_member, calibration)
            members, nonmembers = oriented_scores[test & is_member], oriented_scores[test & ~is_member]
            difference = members[:, None] - nonmembers[None, :]
            self.comparisons[attack] = (difference > 0) + 0.5 * (difference == 0)
            predicted = calibrated_predictions(oriented_scores, is_member, calibration, target_fpr)
            self.flagged[attack] = predicted[test & is_member].astype(float)
            self.directions[attack] = "higher_is_member" if sign > 0 else "lower_is_member"

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
    """{metric name: (B,) values} of one model: auc:<attack>, tpr:<attack>, and the worst case over `attacks`."""
    auc, tpr = model.metrics(member_weights, nonmember_weights)
    values = {f"auc:{a}": auc[a] for a in attacks} | {f"tpr:{a}": tpr[a] for a in attacks}
    values["auc:worst"] = np.max([auc[a] for a in attacks], axis=0)
    values["tpr:worst"] = np.max([tpr[a] for a in attacks], axis=0)
    return values


def _multiplicities(rng, count, num_resamples):
    """(B, count) how many times each row is drawn in each of B resamples with replacement (row 0: no resampling)."""
    weights = np.ones((num_resamples + 1, count))
    for b in range(1, num_resamples + 1):
        weights[b] = np.bincount(rng.integers(0, count, count), minlength=count)
    return weights


def two_level_bootstrap(cells, value_fn, row_counts, num_resamples=1000, seed=0):
    """Per cell, (B + 1,) values of m̄ = mean over its seeds of a metric; resample b ≥ 1 redraws rows and seeds.

    `cells`: {cell: [model, ...]} (one entry per training seed). `value_fn(model, *weights) -> {metric: (B+1,)}`
    with one multiplicity matrix per row group (`row_counts`, e.g. test members and test non-members; the same
    draws for every cell, so comparisons are paired on images). Seeds are drawn with replacement per cell
    (independent training runs). Row 0 of every array is the point estimate (all rows, all seeds once).
    Returns {cell: {metric: (B + 1,) array}}.
    """
    rng = np.random.default_rng(seed)
    weights = [_multiplicities(rng, count, num_resamples) for count in row_counts]
    results = {}
    for cell, models in cells.items():
        per_seed = [value_fn(model, *weights) for model in models]
        seed_draws = np.vstack([np.arange(len(models))[None, :],
                                rng.integers(0, len(models), (num_resamples, len(models)))])
        results[cell] = {metric: np.stack([values[metric] for values in per_seed])[
            seed_draws, np.arange(num_resamples + 1)[:, None]].mean(1) for metric in per_seed[0]}
    return results


def summarize(samples, confidence=0.95):
    """{value, ci} from bootstrap samples whose row 0 is the point estimate."""
    return {"value": float(samples[0]), "ci": _percentile_interval(samples[1:], confidence)}


def difference(samples_a, samples_b, confidence=0.95):
    """{delta, ci} of A − B from two cells' bootstrap samples drawn with the same image resamples."""
    delta = samples_a - samples_b
    return {"delta": float(delta[0]), "ci": _percentile_interval(delta[1:], confidence)}


def study_split(is_member, domains, seed=0):
    """The calibration half of the study's rows (the same for every model): `metrics.calibration_split`."""
    return calibration_split(is_member, domains, seed)


def verdict(ci, claimed_direction, premise_failure=None):
    """One of the four words a comparison may end with.

    `claimed_direction` is +1 when the claim says the difference is positive, −1 when negative. Not testable
    here (the failed premise named) > supported (the CI excludes 0 on the claimed side) > contradicted (the CI
    excludes 0 on the other side) > no detectable difference (the CI includes 0).
    """
    if premise_failure:
        return f"not testable here ({premise_failure})"
    low, high = ci
    if (low > 0 and claimed_direction > 0) or (high < 0 and claimed_direction < 0):
        return "supported"
    if low > 0 or high < 0:
        return "contradicted"
    return "no detectable difference"
