"""Membership-inference metrics. Convention everywhere: a higher score means "more likely a member"."""

import numpy as np


def roc_metrics(member_scores, nonmember_scores):
    """AUC, TPR at FPR ≤ 1% and ≤ 0.1% (largest TPR among ROC points with FPR ≤ x), via scikit-learn."""
    from sklearn.metrics import roc_auc_score, roc_curve

    member_scores = np.asarray(member_scores, dtype=np.float64)
    nonmember_scores = np.asarray(nonmember_scores, dtype=np.float64)
    labels = np.concatenate([np.ones(len(member_scores)), np.zeros(len(nonmember_scores))])
    scores = np.concatenate([member_scores, nonmember_scores])
    fpr, tpr, _ = roc_curve(labels, scores)
    return {
        "auc": float(roc_auc_score(labels, scores)),
        "tpr_at_1pct_fpr": float(tpr[fpr <= 0.01].max()),
        "tpr_at_0.1pct_fpr": float(tpr[fpr <= 0.001].max()),
    }
