"""Membership-inference metrics and the fits an attack makes on calibration rows. Convention everywhere: a higher
score means "more likely a member".

Each quantity lives in one function with its formula in the docstring:

- `roc_metrics`               AUC, TPR at FPR ≤ 1% / 0.1%, best balanced accuracy (in-sample)
- `low_fpr_measurable`        whether a TPR at FPR ≤ x can be measured with n non-members (x ≥ 1/n)
- `calibration_split`         seeded split (half by default), stratified by (class, domain)
- `most_separating`           the candidate score (a timestep, a weight) with the best calibration AUC
- `clid_threshold_fit/score`  CLiD_th: robust-scaled loss and discrepancy mixed by α, fitted on calibration rows

Their uncertainty (bootstrap CIs, the calibrated attack) is in `audit_statistics.py`.
"""

import numpy as np


def roc_metrics(member_scores, nonmember_scores):
    """AUC, TPR at FPR ≤ 1% and ≤ 0.1%, and the best balanced accuracy, from scikit-learn's `roc_curve`.

    AUC = ∫ TPR dFPR (trapezoids over all ROC points) = P(s_member > s_nonmember) + ½ P(tie) = roc_auc_score.

    TPR@x = max { TPR(τ) : FPR(τ) ≤ x } over all ROC points (not the point "closest" to x).
    With n₀ non-members the smallest non-zero FPR is 1/n₀; when 1/n₀ > x this is the TPR at FPR = 0.
    balanced_accuracy = max_τ (TPR(τ) + 1 − FPR(τ)) / 2 — chosen in-sample, so optimistic (see
    `calibrated_attack` for the honest held-out number).
    """
    from sklearn.metrics import roc_curve

    member_scores = np.asarray(member_scores, dtype=np.float64)
    nonmember_scores = np.asarray(nonmember_scores, dtype=np.float64)
    labels = np.concatenate([np.ones(len(member_scores)), np.zeros(len(nonmember_scores))])
    scores = np.concatenate([member_scores, nonmember_scores])
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return {
        # Trapezoids over roc_curve's points: exactly what roc_auc_score computes (tied scores count ½),
        # without its second input validation — this function runs thousands of times per bootstrap.
        "auc": float(np.trapezoid(tpr, fpr)),
        "tpr_at_1pct_fpr": float(tpr[fpr <= 0.01].max()),
        "tpr_at_0.1pct_fpr": float(tpr[fpr <= 0.001].max()),
        "balanced_accuracy": float(((tpr + 1.0 - fpr) / 2.0).max()),
    }


def low_fpr_measurable(fpr, num_nonmembers):
    """TPR at FPR ≤ x is measurable with n non-members iff x ≥ 1/n (below, it is the TPR at FPR = 0)."""
    return fpr * num_nonmembers >= 1.0


def calibration_split(is_member, domains, seed=0, fraction=0.5):
    """Boolean mask of the calibration rows: within every (is_member, domain) stratum, a seeded ⌈fraction·n⌉.

    rng = numpy `default_rng(seed)`; strata in the order (member, then non-member) × sorted domains; each takes
    the first ⌈fraction·n⌉ rows of `rng.permutation(its row indices)`.
    """
    is_member = np.asarray(is_member, dtype=bool)
    domains = np.asarray(domains).astype(str)
    rng = np.random.default_rng(seed)
    calibration = np.zeros(len(is_member), dtype=bool)
    for label in (True, False):
        for domain in np.unique(domains):
            rows = np.flatnonzero((is_member == label) & (domains == domain))
            # ⌈fraction·n⌉ without float noise (0.3·10 is 3.0000000000000004 in binary)
            calibration[rng.permutation(rows)[: int(np.ceil(round(fraction * len(rows), 9)))]] = True
    return calibration


def most_separating(candidate_scores, is_member):
    """argmax_k AUC_k over candidate score arrays {k: s_k} with members LOWER (the first k of a tie).

    AUC_k = P(s_k(non-member) > s_k(member)) + ½ P(tie) (`roc_metrics` of −s_k). Fit on calibration rows only:
    choosing on the rows that are then reported would be the oracle choice the attack papers make.
    Returns (k, {k: AUC_k}).
    """
    is_member = np.asarray(is_member, dtype=bool)
    aucs = {key: roc_metrics(-np.asarray(values)[is_member], -np.asarray(values)[~is_member])["auc"]
            for key, values in candidate_scores.items()}
    best = max(aucs, key=lambda key: (aucs[key], -list(aucs).index(key)))
    return best, aucs


def _robust_centre_and_scale(values):
    """(median, IQR) of `values`, an IQR of 0 replaced by 1: sklearn's `RobustScaler()` defaults."""
    low, median, high = np.percentile(np.asarray(values, dtype=np.float64), [25.0, 50.0, 75.0])
    return float(median), float(high - low) if high > low else 1.0


def clid_threshold_score(fit, losses, discrepancies):
    """CLiD_th score (Zhai et al. 2024, Eq. 16): s = (1 − α) · (L − m_L) / q_L + α · (−D − m_D) / q_D.

    L = the caption's loss, D = the mean conditional likelihood discrepancy, (m, q) = the median and IQR of
    L and of −D on the calibration rows, α from `clid_threshold_fit`. Members have a low L and a high D:
    members score LOWER.
    """
    scaled_loss = (np.asarray(losses, dtype=np.float64) - fit["loss_median"]) / fit["loss_iqr"]
    minus_discrepancy = -np.asarray(discrepancies, dtype=np.float64)
    scaled_discrepancy = (minus_discrepancy - fit["discrepancy_median"]) / fit["discrepancy_iqr"]
    return (1.0 - fit["alpha"]) * scaled_loss + fit["alpha"] * scaled_discrepancy


CLID_ALPHAS = tuple(round(0.1 * step, 1) for step in range(11))  # the authors' grid, cal_clid_th.py


def clid_threshold_fit(losses, discrepancies, is_member):
    """CLiD_th's scalers and α from calibration rows (the authors' `cal_clid_th.py`, fitted there on a shadow model).

    (m_L, q_L), (m_D, q_D) = median and IQR of L and of −D (sklearn's `RobustScaler`); α = `most_separating`
    over `CLID_ALPHAS` of `clid_threshold_score`. Returns {alpha, loss_median, loss_iqr, discrepancy_median,
    discrepancy_iqr, calibration_auc}.
    """
    loss_median, loss_iqr = _robust_centre_and_scale(losses)
    discrepancy_median, discrepancy_iqr = _robust_centre_and_scale(-np.asarray(discrepancies, dtype=np.float64))
    fit = {"loss_median": loss_median, "loss_iqr": loss_iqr, "discrepancy_median": discrepancy_median,
           "discrepancy_iqr": discrepancy_iqr}
    candidates = {alpha: clid_threshold_score(dict(fit, alpha=alpha), losses, discrepancies) for alpha in CLID_ALPHAS}
    alpha, aucs = most_separating(candidates, is_member)
    return dict(fit, alpha=alpha, calibration_auc=aucs[alpha])
