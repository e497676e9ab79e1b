"""Specifications of evaluate.py and mixsyn_utils.metrics: honest MIA numbers, blind baseline, extraction."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from mixsyn_utils.data import InputError, with_provenance
from mixsyn_utils.metrics import (
    blind_baseline_auc,
    blind_features,
    bootstrap_ci,
    calibrated_attack,
    calibration_split,
    eidetic_extraction,
    paired_bootstrap_deltas,
    roc_metrics,
    tiled_l2_distances,
)


def write_scores(path, member_scores, nonmember_scores, attack="pia", member_is_lower=True, id_prefix=""):
    """A scores dataset as attack_*.py writes it (errors: members lower), 5 domains round-robin."""
    from datasets import Dataset

    num_members, num_nonmembers = len(member_scores), len(nonmember_scores)
    dataset = Dataset.from_dict({
        "id": [f"{id_prefix}m{i:04d}" for i in range(num_members)] + [f"n{i:04d}" for i in range(num_nonmembers)],
        "domain": [f"d{i % 5}" for i in range(num_members)] + [f"d{i % 5}" for i in range(num_nonmembers)],
        "is_member": [True] * num_members + [False] * num_nonmembers,
        "score": np.concatenate([member_scores, nonmember_scores]).astype(np.float64),
    })
    with_provenance(dataset, json.dumps({"attack": attack, "model": {"pretrained_model_name_or_path": "tiny"},
                                         "member_is_lower": member_is_lower}))
    dataset.save_to_disk(str(path))
    return path


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


# ------------------------------------------------------------------------------------------------
# evaluate.py end to end and its input checks
# ------------------------------------------------------------------------------------------------

def run_evaluate(argv):
    import evaluate

    return evaluate.main(evaluate.parse_args(argv))


def test_evaluate_writes_results_report_and_loglog_roc(tmp_path):
    pia = write_scores(tmp_path / "pia", *[-s for s in gaussian_scores(4, 2.0)])
    inverted = write_scores(tmp_path / "secmi", *gaussian_scores(4, 2.0), attack="secmi")  # members HIGHER error
    output_dir = tmp_path / "eval"
    run_evaluate(["--scores", str(pia), str(inverted), "--output_dir", str(output_dir), "--bootstrap", "100"])
    results = json.loads((output_dir / "results.json").read_text())
    leak, flipped = results["privacy"]["pia"], results["privacy"]["secmi"]
    assert leak["auc"] > 0.9 and leak["verdict"] == "leak" and leak["auc_ci"][0] > 0.85
    assert flipped["auc"] < 0.1 and flipped["verdict"] == "inverted signal — still a leak"
    assert flipped["calibrated"]["direction"] == "higher_is_member" and flipped["calibrated"]["test_tpr"] > 0.3
    assert "inverted signal — still a leak" in (output_dir / "report.md").read_text()
    assert (output_dir / "roc_loglog.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_reports_reference_delta(tmp_path):
    reference_members, nonmember_scores = gaussian_scores(6, 2.0)
    reference = write_scores(tmp_path / "before", -reference_members, -nonmember_scores)
    after = write_scores(tmp_path / "after", -(reference_members - 2.0), -nonmember_scores)
    results = run_evaluate(["--scores", str(after), "--reference_scores", str(reference), "--bootstrap", "100",
                            "--output_dir", str(tmp_path / "eval")])
    assert results["privacy"]["after"]["reference"]["auc"]["delta_ci"][1] < 0


def test_evaluate_rejects_scores_of_different_member_sets(tmp_path):
    first = write_scores(tmp_path / "a", *gaussian_scores(0, 1.0, 20))
    second = write_scores(tmp_path / "b", *gaussian_scores(0, 1.0, 20), id_prefix="other-")
    with pytest.raises(InputError, match="other members"):
        run_evaluate(["--scores", str(first), str(second), "--output_dir", str(tmp_path / "eval")])


def test_evaluate_rejects_single_class_scores(tmp_path):
    only_members = write_scores(tmp_path / "a", np.arange(10.0), np.array([]))
    with pytest.raises(InputError, match="only members"):
        run_evaluate(["--scores", str(only_members), "--output_dir", str(tmp_path / "eval")])


def test_evaluate_rejects_nan_scores(tmp_path):
    member_scores, nonmember_scores = gaussian_scores(0, 1.0, 20)
    member_scores[3] = np.nan
    scores = write_scores(tmp_path / "a", member_scores, nonmember_scores)
    with pytest.raises(InputError, match="NaN"):
        run_evaluate(["--scores", str(scores), "--output_dir", str(tmp_path / "eval")])


# ------------------------------------------------------------------------------------------------
# Utility and extraction on the tiny victim (one shared, short generation run)
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rprecision_model(tiny_victim, tmp_path_factory):
    from mixsyn_utils.data import load_image_dataset
    from mixsyn_utils.utility import train_domain_classifier

    model_dir = tmp_path_factory.mktemp("rprecision") / "rprecision_model"
    datasets = [load_image_dataset(str(tiny_victim / name)) for name in ("members", "nonmembers")]
    config = train_domain_classifier(datasets, model_dir, seed=0, steps=150)
    return model_dir, config


def test_domain_classifier_saved_without_pickles_and_learns_domains(rprecision_model, tiny_victim):
    from mixsyn_utils.data import load_image_dataset
    from mixsyn_utils.utility import classifier_r_precision_hits

    model_dir, config = rprecision_model
    assert sorted(path.name for path in model_dir.iterdir()) == ["config.json", "model.safetensors"]
    members = load_image_dataset(str(tiny_victim / "members"))
    hits = classifier_r_precision_hits(model_dir, list(members["image"]), list(members["domain"]))
    assert hits.mean() > 0.9 and len(config["domain_names"]) == 10


def test_evaluate_generates_and_reports_utility_and_extraction(tiny_victim, rprecision_model, tmp_path):
    output_dir = tmp_path / "eval"
    results = run_evaluate([
        "--generate", "--pretrained_model_name_or_path", str(tiny_victim / "pipeline"),
        "--domains_file", str(tiny_victim / "domains.json"), "--num_images_per_prompt", "1",
        "--num_inference_steps", "3", "--sample_batch_size", "20", "--rprecision_model", str(rprecision_model[0]),
        "--member_dataset", str(tiny_victim / "members"), "--nonmember_dataset", str(tiny_victim / "nonmembers"),
        "--bootstrap", "50", "--output_dir", str(output_dir)])
    utility, extraction = results["utility"], results["extraction"]
    assert utility["num_images"] == 20 and utility["scorer"].startswith("domain classifier")  # 10 domains × 2 templates
    assert 0.0 <= utility["r_precision_top1_x100"] <= 100.0 and np.isfinite(utility["brisque_mean"])
    assert extraction["num_generations"] == 20 and set(extraction["extracted_per_domain"]) == set(
        json.loads((tiny_victim / "domains.json").read_text())["domains"])
    saved = json.loads((output_dir / "results.json").read_text())
    assert saved["utility"]["brisque_direction"].startswith("lower is better") and (output_dir / "generations").is_dir()
    assert not (tmp_path / "eval.partial").exists()


@pytest.fixture(scope="module")
def tiny_clip_checkpoint(tmp_path_factory):
    """A randomly initialised, tiny open_clip model saved as safetensors (the --clip_pretrained local-path route)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    config_dir = tmp_path_factory.mktemp("clip_config")
    (config_dir / "mixsyn-test-tiny-clip.json").write_text(json.dumps({
        "embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(config_dir)
    torch.manual_seed(0)
    model = open_clip.create_model("mixsyn-test-tiny-clip")
    checkpoint = config_dir / "tiny_clip.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(checkpoint))
    return "mixsyn-test-tiny-clip", checkpoint


def test_clip_r_precision_ranks_the_prompt_against_every_domain(tiny_clip_checkpoint):
    import open_clip
    import torch

    from mixsyn_utils.utility import clip_r_precision_hits

    model_name, checkpoint = tiny_clip_checkpoint
    images, _ = random_images_and_captions(7, 6)
    domain_names = ["one", "two", "three"]
    domains = [domain_names[i % 3] for i in range(6)]
    prompts = [f"The face of {domain}" for domain in domains]
    hits = clip_r_precision_hits(images, prompts, domains, domain_names, model_name, str(checkpoint))
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(checkpoint))
    tokenizer = open_clip.get_tokenizer(model_name)
    with torch.no_grad():
        text = torch.nn.functional.normalize(model.eval().encode_text(tokenizer(
            [f"The face of {name}" for name in domain_names])), dim=-1)
        pictures = torch.nn.functional.normalize(model.encode_image(torch.stack([preprocess(i) for i in images])), dim=-1)
    expected = [domain_names[int(row.argmax())] == domain for row, domain in zip(pictures @ text.T, domains)]
    assert hits.tolist() == expected


def test_killed_generation_resumes_without_resampling_finished_batches(tiny_victim, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    original_call, calls = StableDiffusionPipeline.__call__, []

    def killed_on_second_batch(pipeline, *args, **kwargs):
        calls.append(len(args[0]))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return original_call(pipeline, *args, **kwargs)

    argv = ["--generate", "--pretrained_model_name_or_path", str(tiny_victim / "pipeline"), "--no_brisque",
            "--domains_file", str(tiny_victim / "domains.json"), "--num_images_per_prompt", "1",
            "--num_inference_steps", "2", "--sample_batch_size", "10", "--output_dir", str(tmp_path / "eval"),
            "--member_dataset", str(tiny_victim / "members"), "--nonmember_dataset", str(tiny_victim / "nonmembers")]
    monkeypatch.setattr(StableDiffusionPipeline, "__call__", killed_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run_evaluate(argv)
    calls.clear()
    monkeypatch.setattr(StableDiffusionPipeline, "__call__", lambda p, *a, **k: calls.append(1) or original_call(p, *a, **k))
    results = run_evaluate(argv)
    assert len(calls) == 1 and results["extraction"]["num_generations"] == 20
