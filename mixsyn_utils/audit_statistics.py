"""The statistics evaluate.py reports around `metrics.roc_metrics`: stratified bootstrap CIs, the calibrated attack
(direction and threshold fixed on one half, measured on the other), paired differences against a reference model,
and the blind baseline (a classifier that never sees the model). Convention: a higher score means "more likely a
member".
"""

import numpy as np

from .cli import InputError
from .images import decode_rgb
from .metrics import calibration_split, roc_metrics


def _stratified_resample(rng, num_members, num_nonmembers):
    return rng.integers(0, num_members, num_members), rng.integers(0, num_nonmembers, num_nonmembers)


def _percentile_interval(samples, confidence):
    tail = 100.0 * (1.0 - confidence) / 2.0
    return [float(np.percentile(samples, tail)), float(np.percentile(samples, 100.0 - tail))]


def bootstrap_ci(member_scores, nonmember_scores, num_resamples=1000, seed=0, confidence=0.95):
    """Percentile bootstrap CIs of every `roc_metrics` value, members and non-members resampled separately.

    For b = 1..B: M*_b ~ members with replacement (|M| draws), N*_b ~ non-members (|N| draws),
    m_b = roc_metrics(M*_b, N*_b); CI = [q_{α/2}, q_{1−α/2}] of {m_b}, α = 1 − confidence.
    Stratifying keeps the class ratio fixed, so no resample is single-class.
    Returns {metric: [lo, hi]}.
    """
    member_scores = np.asarray(member_scores, dtype=np.float64)
    nonmember_scores = np.asarray(nonmember_scores, dtype=np.float64)
    rng = np.random.default_rng(seed)
    samples = {}
    for _ in range(num_resamples):
        member_index, nonmember_index = _stratified_resample(rng, len(member_scores), len(nonmember_scores))
        for key, value in roc_metrics(member_scores[member_index], nonmember_scores[nonmember_index]).items():
            samples.setdefault(key, []).append(value)
    return {key: _percentile_interval(values, confidence) for key, values in samples.items()}


def _best_threshold(member_scores, nonmember_scores, target_fpr):
    """max TPR(τ) s.t. FPR(τ) ≤ target on the given scores; predicted member ⇔ score ≥ τ."""
    from sklearn.metrics import roc_curve

    labels = np.concatenate([np.ones(len(member_scores)), np.zeros(len(nonmember_scores))])
    fpr, tpr, thresholds = roc_curve(labels, np.concatenate([member_scores, nonmember_scores]),
                                     drop_intermediate=False)
    allowed = np.flatnonzero(fpr <= target_fpr)
    best = allowed[np.argmax(tpr[allowed])]
    return float(thresholds[best]), float(tpr[best])


def calibrated_attack(scores, is_member, domains, target_fpr=0.01, seed=0):
    """The attack an adversary would run: direction and threshold fixed on calibration data, measured on test data.

    On the calibration half C (see `calibration_split`), for each direction d ∈ {+1, −1}:
        τ_d = argmax_τ TPR_C(d·s ≥ τ) subject to FPR_C(d·s ≥ τ) ≤ target_fpr,
    d* = the direction with the larger calibration TPR (ties: larger calibration AUC).
    On the test half T: TPR_T = mean_{members∈T}[d*·s ≥ τ_{d*}], FPR_T likewise over non-members.
    The test FPR may exceed the target — that is the honest estimate of what the attacker gets.
    """
    scores = np.asarray(scores, dtype=np.float64)
    is_member = np.asarray(is_member, dtype=bool)
    calibration = calibration_split(is_member, domains, seed)
    candidates = []
    for direction in (1.0, -1.0):
        member_cal = direction * scores[calibration & is_member]
        nonmember_cal = direction * scores[calibration & ~is_member]
        threshold, cal_tpr = _best_threshold(member_cal, nonmember_cal, target_fpr)
        cal_auc = roc_metrics(member_cal, nonmember_cal)["auc"]
        candidates.append((cal_tpr, cal_auc, direction, threshold))
    cal_tpr, cal_auc, direction, threshold = max(candidates)
    test = ~calibration
    predicted_member = direction * scores >= threshold
    return {
        "direction": "higher_is_member" if direction > 0 else "lower_is_member",
        # τ = +inf (flag nobody) when no threshold reaches the target FPR with any TPR: JSON null.
        "threshold": threshold * direction if np.isfinite(threshold) else None,
        "target_fpr": target_fpr,
        "calibration_tpr": cal_tpr,
        "test_tpr": float(predicted_member[test & is_member].mean()),
        "test_fpr": float(predicted_member[test & ~is_member].mean()),
        "test_auc": roc_metrics(direction * scores[test & is_member], direction * scores[test & ~is_member])["auc"],
        "num_calibration": int(calibration.sum()),
        "num_test": int(test.sum()),
        "num_test_members": int((test & is_member).sum()),
        "num_test_nonmembers": int((test & ~is_member).sum()),
    }


def paired_bootstrap_deltas(member_scores, nonmember_scores, reference_member_scores, reference_nonmember_scores,
                            num_resamples=1000, seed=0, confidence=0.95):
    """Δ = roc_metrics(model) − roc_metrics(reference) with a paired, stratified bootstrap CI.

    Rows are paired (same image in both arrays). Each resample draws the same member indices and the same
    non-member indices for both models: Δ*_b = m(model[I_b]) − m(reference[I_b]); CI = percentiles of {Δ*_b}.
    Pairing removes the between-image variance both models share, so the CI is much tighter than two
    independent CIs. Returns {metric: {"delta": Δ, "delta_ci": [lo, hi]}}.
    """
    arrays = [np.asarray(a, dtype=np.float64) for a in
              (member_scores, nonmember_scores, reference_member_scores, reference_nonmember_scores)]
    if arrays[0].shape != arrays[2].shape or arrays[1].shape != arrays[3].shape:
        raise InputError("--reference_scores must score the same members and non-members as --scores")
    point_model, point_reference = roc_metrics(arrays[0], arrays[1]), roc_metrics(arrays[2], arrays[3])
    rng = np.random.default_rng(seed)
    samples = {key: [] for key in point_model}
    for _ in range(num_resamples):
        member_index, nonmember_index = _stratified_resample(rng, len(arrays[0]), len(arrays[1]))
        model = roc_metrics(arrays[0][member_index], arrays[1][nonmember_index])
        reference = roc_metrics(arrays[2][member_index], arrays[3][nonmember_index])
        for key in samples:
            samples[key].append(model[key] - reference[key])
    return {key: {"delta": point_model[key] - point_reference[key],
                  "delta_ci": _percentile_interval(samples[key], confidence)} for key in samples}


# Cross-validation folds of the blind baseline: it needs at least this many members and non-members.
BLIND_BASELINE_FOLDS = 5


def blind_features(images, captions, pixel_size=8):
    """Model-free features: pixels downsampled to pixel_size² (box filter, RGB, [0, 1]) ⊕ caption bag-of-words."""
    from PIL import Image
    from sklearn.feature_extraction.text import CountVectorizer

    pixels = np.stack([np.asarray(decode_rgb(image).resize((pixel_size, pixel_size), Image.BOX), dtype=np.float64)
                       .reshape(-1) / 255.0 for image in images])
    words = CountVectorizer(token_pattern=r"[^\s]+", lowercase=True).fit_transform(list(captions)).toarray()
    return np.concatenate([pixels, words.astype(np.float64)], axis=1)


def blind_baseline_auc(features, is_member, num_folds=BLIND_BASELINE_FOLDS, seed=0, num_resamples=1000,
                       confidence=0.95):
    """AUC of a classifier that never sees the model: is this image/caption a member, from its content alone?

    p̂_i = P(member | features_i) from a standardized L2 logistic regression trained on the 4 folds that
    exclude i (stratified 5-fold CV, seeded); AUC = roc_auc(is_member, p̂); CI by `bootstrap_ci` over
    the out-of-fold p̂. ≈ 0.5 when members and non-members are IID; a CI entirely above 0.5 means the two
    sets differ in distribution and an attack's AUC measures that shift, not membership. A CI entirely
    *below* 0.5 is not a shift: cross-validated AUC is biased below 0.5 when there is no signal (each
    held-out fold's class balance is the mirror of its training folds'), strongest for small sets.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    is_member = np.asarray(is_member, dtype=bool)
    if min(is_member.sum(), (~is_member).sum()) < num_folds:
        raise InputError(f"blind baseline needs ≥ {num_folds} members and non-members, got "
                         f"{is_member.sum()} and {(~is_member).sum()}")
    classifier = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    folds = StratifiedKFold(n_splits=num_folds, shuffle=True, random_state=seed)
    member_probability = cross_val_predict(classifier, features, is_member, cv=folds, method="predict_proba")[:, 1]
    auc = roc_metrics(member_probability[is_member], member_probability[~is_member])["auc"]
    auc_ci = bootstrap_ci(member_probability[is_member], member_probability[~is_member], num_resamples, seed,
                          confidence)["auc"]
    return {"auc": auc, "auc_ci": auc_ci, "distribution_shift": bool(auc_ci[0] > 0.5),
            "num_folds": num_folds}
