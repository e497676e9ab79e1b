#!/usr/bin/env python
"""Speed of evaluate.py's inner loops, measured in one run (ratios, not absolute targets).

- roc_metrics (one `roc_curve`, trapezoid AUC) vs the two-call form (`roc_curve` + `roc_auc_score`): the
  bootstrap calls it B times per scores dataset (3B with a reference model), so this decides its cost.
- bootstrap_ci with B = 1000 at 500 + 500 images (the tiny victim's default split is 250 + 250).
- tiled_l2_distances at SD-1.4 resolution vs the 16-px victim, per pair.

    python benchmarks/bench_evaluate.py
"""

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, like the scripts


def seconds(function, repeats):
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def main():
    from sklearn.metrics import roc_auc_score, roc_curve

    from mixsyn_utils.audit_statistics import bootstrap_ci
    from mixsyn_utils.extraction import tiled_l2_distances
    from mixsyn_utils.metrics import roc_metrics

    rng = np.random.default_rng(0)
    member_scores, nonmember_scores = rng.normal(0.5, 1, 500), rng.normal(0, 1, 500)
    labels = np.r_[np.ones(500), np.zeros(500)]
    scores = np.r_[member_scores, nonmember_scores]

    def two_calls():
        roc_curve(labels, scores, drop_intermediate=False)
        roc_auc_score(labels, scores)

    ours, theirs = seconds(lambda: roc_metrics(member_scores, nonmember_scores), 300), seconds(two_calls, 300)
    print(f"roc_metrics: {1e3 * ours:.2f} ms/call vs roc_curve+roc_auc_score {1e3 * theirs:.2f} ms "
          f"(speed-up x{theirs / ours:.2f})")
    start = time.perf_counter()
    bootstrap_ci(member_scores, nonmember_scores, num_resamples=1000)
    print(f"bootstrap_ci, B=1000, 500+500 scores: {time.perf_counter() - start:.2f} s")

    small_a, small_b = rng.random((250, 16, 16, 3)), rng.random((200, 16, 16, 3))
    large_a, large_b = rng.random((8, 512, 512, 3)), rng.random((8, 512, 512, 3))
    small = seconds(lambda: tiled_l2_distances(small_a, small_b), 3) / (250 * 200)
    large = seconds(lambda: tiled_l2_distances(large_a, large_b), 1) / 64
    print(f"tiled ℓ2: {1e6 * small:.2f} µs/pair at 16 px, {1e3 * large:.2f} ms/pair at 512 px "
          f"(ratio x{large / small:.0f} for x1024 pixels)")


if __name__ == "__main__":
    main()
