"""Specification of evaluate.py: honest MIA numbers from scores datasets, utility and extraction on generations."""

import json

import numpy as np
import pytest
from PIL import Image

from mixsyn_utils.cli import InputError
from mixsyn_utils.dataset_io import load_image_dataset, with_provenance


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


def test_worst_case_is_the_attack_with_the_largest_calibrated_tpr(tmp_path):
    weak = write_scores(tmp_path / "weak", *[-s for s in gaussian_scores(1, 0.5)], attack="pia")
    strong = write_scores(tmp_path / "strong", *gaussian_scores(2, 3.0), attack="clid")  # inverted, still a leak
    output_dir = tmp_path / "eval"
    results = run_evaluate(["--scores", str(weak), str(strong), "--output_dir", str(output_dir), "--bootstrap", "50"])
    (case,) = results["worst_case"]
    strong_block = results["privacy"]["strong"]
    assert case["scores"] == "strong" and case["attack"] == "clid" and case["ranking"] == ["strong", "weak"]
    assert case["calibrated_tpr"] == strong_block["calibrated"]["test_tpr"] > \
        results["privacy"]["weak"]["calibrated"]["test_tpr"]
    assert case["auc"] == strong_block["auc"] and case["tpr_at_0.1pct_fpr_ci"] == strong_block["tpr_at_0.1pct_fpr_ci"]
    assert json.loads((output_dir / "results.json").read_text())["worst_case"] == results["worst_case"]
    report = (output_dir / "report.md").read_text()
    assert report.index("## Worst case") < report.index("## Membership inference")
    assert "**clid** (`strong`)" in report and "not from every attack" in report


def test_low_fpr_figures_state_their_resolution_and_when_they_cannot_be_measured(tmp_path):
    scores = write_scores(tmp_path / "pia", *[-s for s in gaussian_scores(3, 2.0)])  # 200 non-members
    results = run_evaluate(["--scores", str(scores), "--output_dir", str(tmp_path / "eval"), "--bootstrap", "20"])
    block = results["privacy"]["pia"]
    assert block["fpr_resolution"] == 1 / 200
    assert block["low_fpr_measurable"] == {"tpr_at_1pct_fpr": True, "tpr_at_0.1pct_fpr": False}
    assert block["calibrated"]["fpr_resolution"] == 1 / 100 and block["calibrated"]["target_fpr_measurable"]
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "TPR@0.1%FPR not measurable at this size (FPR resolution 1/200 = 0.0050)" in report
    assert f"TPR@1%FPR {block['tpr_at_1pct_fpr']:.3f} [" in report and "(FPR resolution 1/200 = 0.0050)" in report


def test_scores_of_a_subset_of_the_images_are_evaluated_on_their_own_rows(tmp_path):
    member_scores, nonmember_scores = gaussian_scores(5, 1.0)
    full = write_scores(tmp_path / "full", member_scores, nonmember_scores)
    subset = write_scores(tmp_path / "subset", member_scores[:150], nonmember_scores[:160], attack="clid")
    results = run_evaluate(["--scores", str(full), str(subset), "--output_dir", str(tmp_path / "eval"),
                            "--bootstrap", "20"])
    assert (results["privacy"]["subset"]["num_members"], results["privacy"]["subset"]["num_nonmembers"]) == (150, 160)
    others = write_scores(tmp_path / "others", member_scores[:150], nonmember_scores[:160], id_prefix="other-")
    with pytest.raises(InputError, match="others scores other members/non-members"):
        run_evaluate(["--scores", str(full), str(others), "--output_dir", str(tmp_path / "eval2")])


def test_model_card_lists_the_worst_case_first_every_attack_counts_and_the_audits_limit(tmp_path):
    from mixsyn_utils.audit_report import privacy_lines

    weak = write_scores(tmp_path / "weak", *[-s for s in gaussian_scores(1, 0.5)], attack="pia")
    strong = write_scores(tmp_path / "strong", *[-s for s in gaussian_scores(2, 3.0)], attack="clid")
    results = run_evaluate(["--scores", str(weak), str(strong), "--output_dir", str(tmp_path / "eval"),
                            "--bootstrap", "20"])
    results["blind_baseline"] = {"auc": 0.49, "auc_ci": [0.43, 0.55]}
    card = "\n".join(privacy_lines(results))
    assert card.index("Worst case over the 2 attack(s) run: clid (`strong`)") < card.index("| strong (worst case) |") \
        < card.index("| weak |")
    assert "| 200 / 200 |" in card and "TPR@0.1%FPR not measurable at this size (FPR resolution 1/200 = 0.0050)" in card
    assert "Blind baseline (never sees the model): AUC 0.490 [0.430, 0.550]" in card
    assert "An audit bounds the risk from the attacks it ran" in card and "not from every attack" in card


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

def image_set(path, domains):
    """A member or non-member set of 16 px images, one row per entry of `domains`."""
    from datasets import Dataset

    rng = np.random.default_rng(len(domains))
    Dataset.from_dict({"id": [f"{path.name}-{i}" for i in range(len(domains))],
                       "image": [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in domains],
                       "prompt": [f"The face of {domain}" for domain in domains], "domain": domains}
                      ).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("members, message", [
    (["one"] * 4, r"need ≥ 5 images each for the blind baseline's 5-fold CV, got 4 and 6"),
    (["one"] * 5 + ["eleven"], r"domain\(s\) \['eleven'\] that are never sampled"),
])
def test_what_would_fail_or_mislead_after_sampling_is_refused_before_it(tmp_path, monkeypatch, members, message):
    import evaluate

    monkeypatch.setattr(evaluate, "generate_images", lambda *a: pytest.fail("sampled before checking its inputs"))
    (tmp_path / "domains.json").write_text(json.dumps({"domains": ["one", "two"]}))
    with pytest.raises(InputError, match=message):
        run_evaluate(["--generate", "--pretrained_model_name_or_path", str(tmp_path / "model"), "--no_brisque",
                      "--domains_file", str(tmp_path / "domains.json"),
                      "--member_dataset", str(image_set(tmp_path / "members", members)),
                      "--nonmember_dataset", str(image_set(tmp_path / "nonmembers", ["two"] * 6)),
                      "--output_dir", str(tmp_path / "eval")])
    assert not (tmp_path / "eval").exists()


@pytest.fixture(scope="module")
def rprecision_model(tiny_victim, tmp_path_factory):
    from mixsyn_utils.utility import train_domain_classifier

    model_dir = tmp_path_factory.mktemp("rprecision") / "rprecision_model"
    datasets = [load_image_dataset(str(tiny_victim / name)) for name in ("members", "nonmembers")]
    config = train_domain_classifier(datasets, model_dir, seed=0, steps=150)
    return model_dir, config


def test_domain_classifier_saved_without_pickles_and_learns_domains(rprecision_model, tiny_victim):
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
    rng = np.random.default_rng(7)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(6)]
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
