"""The study's comparisons: differences between two groups of trained models, with CIs over seeds and images.

A *cell* is one setting (method, mixup, strength) trained with S ≥ 1 seeds; each trained model is attacked on the
same N member and non-member images. A comparison between cells A and B (e.g. Mixup-I 0.5 vs clean, same method)
must carry two sources of uncertainty: which images were drawn (the pretraining members and non-members are a
sample) and which training run was drawn (a second seed gives another model). `seed_image_bootstrap` resamples both.
"""

import numpy as np

from mixsyn_utils.metrics import calibration_split, roc_metrics


def _percentile_interval(samples, confidence):
    tail = 100.0 * (1.0 - confidence) / 2.0
    return [float(np.percentile(samples, tail)), float(np.percentile(samples, 100.0 - tail))]


def oriented_auc(scores, is_member):
    """AUC with higher score = member (scores already oriented), on all given rows."""
    return roc_metrics(scores[is_member], scores[~is_member])["auc"]


def calibrated_predictions(scores, is_member, calibration, target_fpr=0.01):
    """Member predictions on every row from a threshold fit on the calibration rows only.

    τ = the largest-TPR threshold with calibration FPR ≤ target (predicted member ⇔ score ≥ τ; scores oriented,
    higher = member). Rows outside `calibration` are the test rows whose TPR/FPR are honest estimates.
    """
    from sklearn.metrics import roc_curve

    labels = is_member[calibration].astype(float)
    fpr, tpr, thresholds = roc_curve(labels, scores[calibration], drop_intermediate=False)
    allowed = np.flatnonzero(fpr <= target_fpr)
    threshold = thresholds[allowed[np.argmax(tpr[allowed])]]
    return scores >= threshold


def cell_metric_matrix(cell_scores, is_member, test_rows, metric, target_fpr=0.01, seed=0, domains=None):
    """Per model of a cell, what a bootstrap needs: for `auc` the oriented scores of the test rows; for
    `calibrated_tpr` the test rows' member predictions (threshold fit on the calibration rows).

    `cell_scores`: (S, N) oriented scores of the S seeds' models. Returns an (S, n_test) array.
    """
    if metric == "auc":
        return np.asarray(cell_scores)[:, test_rows]
    calibration = ~test_rows
    return np.stack([calibrated_predictions(np.asarray(scores), is_member, calibration, target_fpr)[test_rows]
                     for scores in cell_scores]).astype(float)


def _cell_value(matrix, metric, member_rows, nonmember_rows, seed_rows):
    """Mean over the (resampled) seeds of the metric on the (resampled) test images."""
    values = []
    for s in seed_rows:
        if metric == "auc":
            values.append(roc_metrics(matrix[s, member_rows], matrix[s, nonmember_rows])["auc"])
        else:  # calibrated TPR: the fraction of test members flagged
            values.append(matrix[s, member_rows].mean())
    return float(np.mean(values))


def seed_image_bootstrap(cell_a, cell_b, is_member_test, metric, num_resamples=1000, seed=0, confidence=0.95):
    """Δ = m̄(A) − m̄(B) with a CI over training seeds and images (a two-level bootstrap).

    m̄(X) = mean over X's seeds s of m(model_s on the test images); m = AUC or calibrated TPR@1%FPR.
    Resample b: the test members and non-members are drawn with replacement once and shared by A and B (the same
    images are scored by both, so the comparison is paired on images); A's seeds and B's seeds are each drawn with
    replacement (independent training runs). Δ*_b = m̄_b(A) − m̄_b(B); CI = percentiles of {Δ*_b}. With one seed
    per cell the seed level is degenerate and the CI covers image sampling only — the caller reports S.
    `cell_a`, `cell_b`: outputs of `cell_metric_matrix` for the same test rows. Returns {delta, ci, seeds_a, seeds_b}.
    """
    cell_a, cell_b = np.asarray(cell_a, dtype=float), np.asarray(cell_b, dtype=float)
    members, nonmembers = np.flatnonzero(is_member_test), np.flatnonzero(~is_member_test)
    all_seeds_a, all_seeds_b = np.arange(len(cell_a)), np.arange(len(cell_b))
    delta = (_cell_value(cell_a, metric, members, nonmembers, all_seeds_a)
             - _cell_value(cell_b, metric, members, nonmembers, all_seeds_b))
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(num_resamples):
        member_rows = rng.choice(members, len(members))
        nonmember_rows = rng.choice(nonmembers, len(nonmembers))
        seeds_a = rng.choice(all_seeds_a, len(all_seeds_a))
        seeds_b = rng.choice(all_seeds_b, len(all_seeds_b))
        samples.append(_cell_value(cell_a, metric, member_rows, nonmember_rows, seeds_a)
                       - _cell_value(cell_b, metric, member_rows, nonmember_rows, seeds_b))
    return {"delta": delta, "ci": _percentile_interval(samples, confidence), "seeds_a": len(cell_a),
            "seeds_b": len(cell_b)}


def cell_interval(cell, is_member_test, metric, num_resamples=1000, seed=0, confidence=0.95):
    """m̄(A) with the same two-level bootstrap CI (for plotted points): images and seeds resampled."""
    cell = np.asarray(cell, dtype=float)
    members, nonmembers = np.flatnonzero(is_member_test), np.flatnonzero(~is_member_test)
    all_seeds = np.arange(len(cell))
    value = _cell_value(cell, metric, members, nonmembers, all_seeds)
    rng = np.random.default_rng(seed)
    samples = [_cell_value(cell, metric, rng.choice(members, len(members)), rng.choice(nonmembers, len(nonmembers)),
                           rng.choice(all_seeds, len(all_seeds))) for _ in range(num_resamples)]
    return {"value": value, "ci": _percentile_interval(samples, confidence), "seeds": len(cell)}


def study_split(is_member, domains, seed=0):
    """The study's calibration/test split of the attacked images (the same for every model): `calibration_split`."""
    return calibration_split(is_member, domains, seed)


def verdict(ci, claimed_direction, premise_failure=None):
    """One of the four words a comparison may end with.

    `claimed_direction` is +1 when the claim says the difference is positive, −1 when negative.
    not testable here (premise named) > supported (CI excludes 0 on the claimed side) > contradicted (CI excludes
    0 on the other side) > no detectable difference (CI includes 0).
    """
    if premise_failure:
        return f"not testable here ({premise_failure})"
    low, high = ci
    if (low > 0 and claimed_direction > 0) or (high < 0 and claimed_direction < 0):
        return "supported"
    if low > 0 or high < 0:
        return "contradicted"
    return "no detectable difference"
