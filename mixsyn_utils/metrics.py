"""Membership-inference and extraction metrics. Convention everywhere: a higher score means "more likely a member".

Each quantity lives in one function with its formula in the docstring:

- `roc_metrics`               AUC, TPR at FPR ≤ 1% / 0.1%, best balanced accuracy (in-sample)
- `bootstrap_ci`              stratified percentile bootstrap CIs of `roc_metrics`
- `low_fpr_measurable`        whether a TPR at FPR ≤ x can be measured with n non-members (x ≥ 1/n)
- `calibration_split`         seeded split (half by default), stratified by (class, domain)
- `calibrated_attack`         direction + threshold chosen on a calibration half, TPR/FPR measured on the test half
- `most_separating`           the candidate score (a timestep, a weight) with the best calibration AUC
- `clid_threshold_fit/score`  CLiD_th: robust-scaled loss and discrepancy mixed by α, fitted on calibration rows
- `paired_bootstrap_deltas`   model − reference differences with a paired bootstrap CI
- `blind_baseline_auc`        a model-free classifier (5-fold CV logistic regression) and its AUC CI
- `tiled_l2_distances`        Carlini et al. (2023) tiled ℓ2: max over tiles of the RMS pixel distance
- `eidetic_extraction`        (k, ℓ2, δ)-eidetic memorization: extracted members, true positives, precision
"""

import numpy as np

from .cli import InputError


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

    from .images import decode_rgb

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


def tiled_l2_distances(images_a, images_b, num_tiles=4):
    """Carlini et al. (2023) tiled ℓ2 between every pair: D[i, j] = max_t RMS(a_i[t] − b_j[t]).

    Images are float arrays (N, H, W, C) in [0, 1] at the same resolution (after the shared preprocessing).
    Each image is cut into num_tiles × num_tiles non-overlapping tiles t (H and W divisible by num_tiles);
    RMS(u) = sqrt(mean(u²)) over the tile's pixels and channels. The max over tiles makes a copy with one
    altered region still far, and a copy with a faint global change still close. Computed in float64.
    """
    a = np.asarray(images_a, dtype=np.float64)
    b = np.asarray(images_b, dtype=np.float64)
    height, width = a.shape[1:3]
    if a.shape[1:] != b.shape[1:] or height % num_tiles or width % num_tiles:
        raise InputError(f"tiled ℓ2 needs equal image shapes divisible by --extraction_tiles {num_tiles}, "
                         f"got {a.shape[1:]} and {b.shape[1:]}")
    tile_h, tile_w = height // num_tiles, width // num_tiles
    distances = np.zeros((len(a), len(b)))
    for row in range(num_tiles):
        for col in range(num_tiles):
            tile_a = a[:, row * tile_h:(row + 1) * tile_h, col * tile_w:(col + 1) * tile_w].reshape(len(a), -1)
            tile_b = b[:, row * tile_h:(row + 1) * tile_h, col * tile_w:(col + 1) * tile_w].reshape(len(b), -1)
            squared = (tile_a ** 2).sum(1)[:, None] + (tile_b ** 2).sum(1)[None, :] - 2.0 * tile_a @ tile_b.T
            distances = np.maximum(distances, np.sqrt(np.clip(squared, 0.0, None) / tile_a.shape[1]))
    return distances


def eidetic_extraction(member_images, generated_images, nonmember_images=None, k=10, delta=0.1, num_tiles=4):
    """(k, ℓ2, δ)-eidetic memorization (Carlini et al. 2023, "Extracting Training Data from Diffusion Models").

    A member x is extracted iff ∃ generation x̂ with ℓ2(x, x̂) ≤ δ AND |{x' ∈ members : ℓ2(x, x') ≤ δ}| ≤ k
    (the count includes x itself, so x is eidetic when it appears at most k times in the training set).
    ℓ2 is `tiled_l2_distances`. Non-members are the control: a non-member that some generation matches
    (same two conditions, duplicates counted in the non-member set) is a false positive — the model
    produced a generic image, not a memorized one. true_positives = extracted members,
    precision = TP / (TP + FP) (None when nothing matched).
    Returns per-row boolean arrays and the counts.
    """
    def matched_and_rare(images):
        matched = (tiled_l2_distances(images, generated_images, num_tiles) <= delta).any(axis=1)
        duplicates = (tiled_l2_distances(images, images, num_tiles) <= delta).sum(axis=1)
        return matched, duplicates <= k, matched & (duplicates <= k)

    member_matched, member_rare, member_extracted = matched_and_rare(member_images)
    result = {"member_extracted": member_extracted, "member_matched": member_matched,
              "member_excluded_by_k": member_matched & ~member_rare,
              "true_positives": int(member_extracted.sum()), "false_positives": None, "precision": None}
    if nonmember_images is not None and len(nonmember_images):
        nonmember_extracted = matched_and_rare(nonmember_images)[2]
        result["nonmember_extracted"] = nonmember_extracted
        result["false_positives"] = int(nonmember_extracted.sum())
        flagged = result["true_positives"] + result["false_positives"]
        result["precision"] = result["true_positives"] / flagged if flagged else None
    return result


def extraction_metrics(members, nonmembers, generations, k=10, delta=0.1, num_tiles=4):
    """`eidetic_extraction` on datasets (column `image`; members also `domain`), summarised for a report.

    All images go through the shared preprocessing (`resize_and_crop` to the members' shorter side, bicubic)
    and are scaled to [0, 1] before the tiled ℓ2. Returns counts: true/false positives, precision,
    members matched but excluded by k, and extracted members per domain.
    """
    from .images import resize_and_crop

    resolution = min(members[0]["image"].size)

    def pixels(images):
        return np.stack([np.asarray(resize_and_crop(image, resolution), dtype=np.float64) / 255.0 for image in images])

    result = eidetic_extraction(pixels(members["image"]), pixels(generations["image"]),
                                pixels(nonmembers["image"]) if nonmembers is not None else None, k, delta, num_tiles)
    domains = np.asarray(members["domain"]).astype(str)
    return {"k": k, "delta": delta, "num_tiles": num_tiles, "num_generations": len(generations),
            "num_members": len(members), "true_positives": result["true_positives"],
            "false_positives": result["false_positives"], "precision": result["precision"],
            "excluded_by_k": int(result["member_excluded_by_k"].sum()),
            "extracted_per_domain": {domain: int(result["member_extracted"][domains == domain].sum())
                                     for domain in sorted(set(domains))}}
