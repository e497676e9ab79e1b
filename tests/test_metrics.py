"""mixsyn_utils.metrics, audit_statistics and extraction: ROC figures, bootstrap CIs, calibrated attack, paired
deltas, blind baseline, extraction."""

import math

import numpy as np
import pytest
from PIL import Image

from mixsyn_utils.audit_statistics import (
    blind_baseline_auc,
    blind_features,
    bootstrap_ci,
    calibrated_attack,
    paired_bootstrap_deltas,
)
from mixsyn_utils.extraction import eidetic_extraction, tiled_l2_distances
from mixsyn_utils.metrics import calibration_split, roc_metrics


def gaussian_scores(seed, mean_gap, size=200):
    rng = np.random.default_rng(seed)
    return rng.normal(mean_gap, 1.0, size), rng.normal(0.0, 1.0, size)


# ------------------------------------------------------------------------------------------------
# roc_metrics against hand-computed cases
# ------------------------------------------------------------------------------------------------

def test_roc_metrics_perfect_separation():
    assert roc_metrics([3.0, 4.0], [1.0, 2.0]) == {"auc": 1.0, "tpr_at_1pct_fpr": 1.0, "tpr_at_0.1pct_fpr": 1.0,
                                                   "balanced_accuracy": 1.0}


def test_roc_metrics_inverted_scores_give_zero_auc():
    metrics = roc_metrics([1.0, 2.0], [3.0, 4.0])
    assert metrics["auc"] == 0.0 and metrics["tpr_at_1pct_fpr"] == 0.0


def test_roc_metrics_ties_count_half():
    # Pairs (m, n): (1,1) tie ½, (1,0) win, (0,1) loss, (0,0) tie ½  →  AUC = 2/4.
    assert roc_metrics([1.0, 0.0], [1.0, 0.0])["auc"] == 0.5
    assert roc_metrics([5.0] * 3, [5.0] * 4)["tpr_at_1pct_fpr"] == 0.0


def test_roc_metrics_random_scores_near_half():
    member_scores, nonmember_scores = gaussian_scores(0, 0.0, size=5000)
    assert abs(roc_metrics(member_scores, nonmember_scores)["auc"] - 0.5) < 0.02


def test_tpr_at_fpr_is_largest_tpr_within_fpr_and_fpr_resolution():
    nonmember_scores = np.arange(100.0)  # FPR moves in steps of 1/100
    member_scores = np.array([200, 201, 202, 203, 204, 98.6, 98.5, 97.5, 10, 11], dtype=float)
    metrics = roc_metrics(member_scores, nonmember_scores)
    # Above 99 (FPR 0): 5 members; down to 98.5 (FPR 1/100): 7 members; 97.5 needs FPR 2/100.
    assert metrics["tpr_at_1pct_fpr"] == pytest.approx(0.7)
    # 0.1% < 1/100: the only admissible points have FPR = 0.
    assert metrics["tpr_at_0.1pct_fpr"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------
# Confidence intervals, calibration, reference deltas
# ------------------------------------------------------------------------------------------------

def test_bootstrap_ci_covers_true_auc_in_90pct_of_repetitions():
    mean_gap = 1.0
    true_auc = 0.5 * (1.0 + math.erf(mean_gap / 2.0))  # Φ(μ/√2) for N(μ,1) vs N(0,1)
    covered = 0
    for repetition in range(50):
        member_scores, nonmember_scores = gaussian_scores(100 + repetition, mean_gap, size=100)
        lo, hi = bootstrap_ci(member_scores, nonmember_scores, num_resamples=200, seed=repetition)["auc"]
        covered += lo <= true_auc <= hi
    assert covered >= 45


def test_calibration_split_halves_every_domain_and_class():
    is_member = np.array([True] * 20 + [False] * 20)
    domains = np.array(["a", "b"] * 20)
    calibration = calibration_split(is_member, domains, seed=3)
    for label in (True, False):
        for domain in ("a", "b"):
            assert calibration[(is_member == label) & (domains == domain)].sum() == 5


def test_calibrated_attack_learns_inverted_direction():
    member_scores, nonmember_scores = gaussian_scores(1, -3.0)  # members LOWER than non-members
    scores = np.concatenate([member_scores, nonmember_scores])
    is_member = np.arange(len(scores)) < len(member_scores)
    domains = np.array([f"d{i % 4}" for i in range(len(scores))])
    result = calibrated_attack(scores, is_member, domains, target_fpr=0.01, seed=0)
    assert result["direction"] == "lower_is_member"
    assert result["test_tpr"] > 0.5 and result["test_fpr"] < 0.05
    assert result["test_auc"] > 0.95


def test_paired_bootstrap_delta_of_identical_models_is_exactly_zero():
    member_scores, nonmember_scores = gaussian_scores(2, 1.0)
    deltas = paired_bootstrap_deltas(member_scores, nonmember_scores, member_scores, nonmember_scores, 100, 0)
    assert deltas["auc"] == {"delta": 0.0, "delta_ci": [0.0, 0.0]}


def test_paired_bootstrap_detects_weaker_leak_after_fine_tuning():
    reference_members, nonmember_scores = gaussian_scores(3, 1.5)
    weaker_members = reference_members - 1.0  # same images, signal reduced
    deltas = paired_bootstrap_deltas(weaker_members, nonmember_scores, reference_members, nonmember_scores, 300, 0)
    assert deltas["auc"]["delta"] < 0 and deltas["auc"]["delta_ci"][1] < 0


# ------------------------------------------------------------------------------------------------
# Blind baseline
# ------------------------------------------------------------------------------------------------

def random_images_and_captions(seed, count, brightness=0):
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(np.clip(rng.integers(0, 200, (16, 16, 3)) + brightness, 0, 255).astype(np.uint8))
              for _ in range(count)]
    captions = [f"{rng.choice(['The face of', 'A photo of'])} {rng.choice(['one', 'two', 'three'])}"
                for _ in range(count)]
    return images, captions


def blind_auc(brightness):
    member_images, member_captions = random_images_and_captions(0, 60)
    nonmember_images, nonmember_captions = random_images_and_captions(1, 60, brightness)
    features = blind_features(member_images + nonmember_images, member_captions + nonmember_captions)
    return blind_baseline_auc(features, np.arange(120) < 60, seed=0, num_resamples=200)


def test_blind_baseline_near_half_on_iid_split():
    result = blind_auc(brightness=0)
    assert abs(result["auc"] - 0.5) < 0.15 and not result["distribution_shift"]


def test_blind_baseline_flags_brightened_nonmembers():
    result = blind_auc(brightness=40)
    assert result["auc"] > 0.9 and result["distribution_shift"]


# ------------------------------------------------------------------------------------------------
# (k, ℓ2, δ)-eidetic extraction
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def member_pixels():
    return np.random.default_rng(0).random((6, 16, 16, 3))


def test_tiled_l2_is_max_over_tiles_of_rms():
    base = np.zeros((1, 16, 16, 3))
    one_tile_changed = base.copy()
    one_tile_changed[0, :4, :4] = 0.15  # global RMS 0.15/4, but that tile's RMS is 0.15
    assert tiled_l2_distances(base, one_tile_changed)[0, 0] == pytest.approx(0.15)
    assert tiled_l2_distances(base, one_tile_changed, num_tiles=1)[0, 0] == pytest.approx(0.0375)


def test_extraction_finds_member_copied_into_generations(member_pixels):
    generations = np.random.default_rng(1).random((5, 16, 16, 3))
    generations[2] = member_pixels[4] + 0.01
    result = eidetic_extraction(member_pixels, generations)
    assert result["member_extracted"].tolist() == [False, False, False, False, True, False]


def test_extraction_ignores_copy_shifted_beyond_delta_in_one_tile(member_pixels):
    copy = member_pixels[4:5].copy()
    copy[0, 4:8, 8:12] = np.clip(copy[0, 4:8, 8:12] + 0.3, 0, 1)
    assert eidetic_extraction(member_pixels, copy)["true_positives"] == 0


def test_extraction_excludes_member_with_11_near_duplicates(member_pixels):
    duplicated = np.concatenate([member_pixels, member_pixels[:1] + np.linspace(0, 0.02, 10)[:, None, None, None]])
    generations = duplicated[:1] + 0.005
    result = eidetic_extraction(duplicated, generations, k=10)
    assert result["true_positives"] == 0 and result["member_excluded_by_k"].sum() == 11
    # Drop one copy: 10 occurrences ≤ k, so all of them count as extracted.
    assert eidetic_extraction(duplicated[:-1], generations, k=10)["true_positives"] == 10


def test_extraction_counts_matched_nonmembers_as_false_positives(member_pixels):
    nonmember_pixels = np.random.default_rng(5).random((4, 16, 16, 3))
    generations = np.stack([member_pixels[0], nonmember_pixels[1], nonmember_pixels[2]])
    result = eidetic_extraction(member_pixels, generations, nonmember_pixels)
    assert (result["true_positives"], result["false_positives"], result["precision"]) == (1, 2, pytest.approx(1 / 3))


def test_pixel_frechet_distance_matches_a_float64_reference_with_a_matrix_square_root():
    """FD = ‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^{1/2}), the square root by scipy's sqrtm here; and a resample's
    multiplicities weigh rows as if they were repeated."""
    from scipy import linalg

    from mixsyn_utils.utility import frechet_distance, gaussian_moments

    rng = np.random.default_rng(0)
    a = rng.normal(0.3, 0.1, (200, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(0.5, 0.2, (150, 6)) @ rng.normal(size=(6, 6))
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a = sum(np.outer(x - mean_a, x - mean_a) for x in a) / (len(a) - 1)
    cov_b = sum(np.outer(x - mean_b, x - mean_b) for x in b) / (len(b) - 1)
    reference = ((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * np.real(linalg.sqrtm(cov_a @ cov_b)))
    assert frechet_distance(gaussian_moments(a), gaussian_moments(b)) == pytest.approx(reference, rel=1e-9)
    assert frechet_distance(gaussian_moments(a), gaussian_moments(a)) == pytest.approx(0.0, abs=1e-9)
    counts = rng.integers(0, 3, len(a))
    repeated = np.repeat(a, counts, axis=0)
    weighted, plain = gaussian_moments(a, counts), gaussian_moments(repeated)
    assert np.allclose(weighted[0], plain[0], atol=1e-12) and np.allclose(weighted[1], plain[1], atol=1e-12)


def test_pixel_features_are_grey_box_filtered_to_8x8_in_unit_range():
    from mixsyn_utils.utility import pixel_features

    image = Image.fromarray(np.kron(np.eye(2, dtype=np.uint8) * 255, np.ones((16, 16), np.uint8))).convert("RGB")
    features = pixel_features([image])
    assert features.shape == (1, 64)
    grid = features.reshape(8, 8)
    assert grid[0, 0] == pytest.approx(1.0) and grid[0, 7] == pytest.approx(0.0)  # a 2×2 checker of 16-px blocks
