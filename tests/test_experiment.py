"""The experiment runner (run_experiment.py, study/): the plan, caching, dry run, and the quick end-to-end study."""

import copy
import json
import math
import re
from pathlib import Path

import pytest

import run_experiment
from mixsyn_utils.cli import InputError
from study.plan import load_config, plan_study, steps_of_epochs
from study.runner import stage_key

TINY_CONFIG = "configs/tiny_digits.toml"
VERDICT = re.compile(r"^(supported|contradicted|no detectable difference|not testable here \(.+\))$")


def _keys(stages):
    keys = {}
    for stage in stages:
        keys[stage.name] = stage_key(stage, keys)
    return keys


def test_changed_flag_reruns_that_stage_and_its_dependents_only(tmp_path):
    config = load_config(TINY_CONFIG, quick=True)
    before = _keys(plan_study(config, tmp_path)[0])
    config["stages"]["pia"]["lp"] = 2
    after = _keys(plan_study(config, tmp_path)[0])
    changed = {name for name in before if before[name] != after[name]}
    models = ["pretrained"] + [name for name in plan_study(config, tmp_path)[1]]
    assert changed == {f"{stage}:{model}" for model in models for stage in ("pia", "evaluate")}


def test_plan_has_the_epoch_dose_response_the_mixes_and_the_random_noise_control(tmp_path):
    config = load_config(TINY_CONFIG)
    stages, models = plan_study(config, tmp_path)
    assert len({stage.name for stage in stages}) == len(stages)
    epochs, settings = config["dose_response"]["epochs"], config["dose_response"]["settings"]
    seeds = config["experiment"]["training_seeds"]
    assert len(epochs) >= 4 and min(epochs) < 1 and max(epochs) >= 50 and len(seeds) >= 3
    assert {"clean", "aspl", "random"} <= set(settings)
    dose = [spec for spec in models.values() if spec.setting in settings]
    assert len(dose) == len(epochs) * len(settings) * len(seeds)
    top = [spec for spec in models.values() if spec.setting in config["top_level"]["settings"]]
    assert {spec.epochs for spec in top} == {max(epochs)} and len(top) == len(config["top_level"]["settings"]) * len(seeds)
    by_name = {stage.name: stage for stage in stages}
    # An epoch is a pass over the 100 self-synthesized images at batch 10: 10 updates; 0.4 epoch is 4 updates.
    assert steps_of_epochs(config, 0.4) == 4 and steps_of_epochs(config, 50) == 500
    first, last = by_name["train:dreambooth-clean-e0.4-seed0"], by_name["train:dreambooth-aspl-e50-seed2"]
    assert first.flags["max_train_steps"] == first.flags["checkpointing_steps"] == 4
    assert last.flags["max_train_steps"] == 500
    # each level continues the one below from its last checkpoint, into its own empty folder
    assert "resume_from_checkpoint" not in first.flags and first.flags["overwrite"]
    assert last.flags["resume_from_checkpoint"].endswith("dreambooth-aspl-e15-seed2/checkpoint-150")
    assert "train:dreambooth-aspl-e15-seed2" in last.depends_on and "overwrite" not in last.flags
    # DreamBooth is Eq. 6 everywhere, at one learning rate and a constant schedule
    for stage in stages:
        if stage.script == "train_dreambooth_mixsyn.py":
            assert stage.flags["with_prior_preservation"] and stage.flags["train_text_encoder"]
            assert stage.flags["learning_rate"] == 2e-5 and stage.flags["lr_scheduler"] == "constant"
    # the control is ±η noise of the ASPL budget, and each setting reads the set of its noise
    random_stage, aspl_stage = by_name["perturbed:random"], by_name["perturbed:aspl"]
    assert random_stage.flags["method"] == "random" and random_stage.flags["pgd_eps"] == aspl_stage.flags["pgd_eps"]
    assert random_stage.exclusive and "perturbed:random" in aspl_stage.depends_on  # it makes the class images first
    assert aspl_stage.flags["max_train_steps"] == 50 and aspl_stage.flags["max_adv_train_steps"] == 6
    assert by_name["train:dreambooth-random-image-0.5-e50-seed1"].flags["perturbed_dataset_name"].endswith("random")
    assert by_name["train:dreambooth-aspl-e5-seed1"].flags["perturbed_dataset_name"].endswith("aspl")
    assert "perturbed_dataset_name" not in by_name["train:dreambooth-clean-e5-seed1"].flags
    assert sum(stage.name.startswith("extraction:") for stage in stages) == 1 + len(config["extraction"]["settings"])


def test_sdxl_config_plans_a_dreambooth_lora_dose_response_and_scales_the_estimate(capsys):
    """SDXL has no full DreamBooth: the dose-response, the claims' cells and extraction are DreamBooth+LoRA, each level
    continuing the one below; the --dry_run estimate is the SD-1.x one × the UNet cost ratio, counting each chained
    level's own updates only."""
    config = load_config("configs/sdxl_celeb40.toml")
    stages, models = plan_study(config, Path("runs/never-written"))
    by_name = {stage.name: stage for stage in stages}
    assert not any(stage.script == "train_dreambooth_mixsyn.py" for stage in stages)
    per_epoch = 4000 // 2
    first, second = by_name["train:dreambooth_lora-aspl-e0.25-seed1"], by_name["train:dreambooth_lora-aspl-e1-seed1"]
    assert first.script == second.script == "train_lora_mixsyn.py"
    assert first.flags["max_train_steps"] == per_epoch // 4 and second.flags["max_train_steps"] == per_epoch
    assert second.flags["resume_from_checkpoint"].endswith(f"dreambooth_lora-aspl-e0.25-seed1/checkpoint-{per_epoch // 4}")
    assert run_experiment.new_training_steps(second) == per_epoch - per_epoch // 4
    assert run_experiment.new_training_steps(first) == per_epoch // 4
    assert second.flags["with_prior_preservation"] and second.flags["train_text_encoder"]
    # the attacks and evaluation load the LoRA onto the SDXL base
    attack = by_name["pia:dreambooth_lora-clean-e10-seed0"]
    assert attack.flags["pretrained_model_name_or_path"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert attack.flags["lora_weights"].endswith("models/dreambooth_lora-clean-e10-seed0")
    assert "extraction:dreambooth_lora-aspl-e10-seed0" in by_name
    assert by_name["perturbed:aspl"].flags["surrogate"] == "lora"
    assert {spec.method for spec in models.values()} == {"dreambooth_lora", "lora", "textual_inversion"}
    sd_config = copy.deepcopy(config)
    sd_config["experiment"]["architecture"] = "sd"
    assert run_experiment.gpu_hours_estimate(config, stages) == pytest.approx(
        run_experiment.UNET_COST_RATIO["sdxl"] * run_experiment.gpu_hours_estimate(sd_config, stages))
    run_experiment.main(run_experiment.parse_args(["--config", "configs/sdxl_celeb40.toml", "--output_dir",
                                                   "runs/never-written", "--dry_run"]))
    assert "GPU-hours (A100-class, sdxl" in capsys.readouterr().out
    assert not Path("runs/never-written").exists()


def test_dose_response_method_must_be_trained_by_the_study(tmp_path):
    text = Path("configs/sdxl_celeb40.toml").read_text()
    (tmp_path / "bad.toml").write_text(text.replace('methods = ["dreambooth_lora", "lora", "textual_inversion"]',
                                                    'methods = ["lora", "textual_inversion"]', 1))
    with pytest.raises(InputError, match=r"\[dose_response\] method 'dreambooth_lora' is not in \[experiment\] methods"):
        load_config(tmp_path / "bad.toml")


def test_sd14_config_dry_run_plans_without_downloading(capsys):
    run_experiment.main(run_experiment.parse_args(["--config", "configs/sd14_celeb40.toml", "--output_dir",
                                                   "runs/never-written", "--dry_run"]))
    printed = capsys.readouterr().out
    assert "CompVis/stable-diffusion-v1-4" in printed and "Estimated cost:" in printed and "GPU-hours" in printed
    assert not Path("runs/never-written").exists()


@pytest.mark.parametrize("replace, replacement, message", [
    ('"aspl-image-0.5" = { mode = "image", ratio = 0.5, noise = "aspl" }',
     '"aspl-image-0.5" = { mode = "image", ratio = 1.5, noise = "aspl" }',
     r"setting 'aspl-image-0.5' needs a ratio in \[0, 1\], got 1.5$"),
    ("t_sec = 100", "t_sec = 105", r"^stage secmi:pretrained: --t_sec must be a multiple of --k"),
    ("pgd_eps = 0.1 ", "pgd_eps = 1.5 ", r"^stage perturbed:random: --pgd_eps must be in \(0, 1\], got 1.5$"),
    ("learning_rate = 2e-5", "learning_rate = 2e-5\nnum_workers = 2",
     r"^stage train:dreambooth-clean-e0.4-seed0: .*unrecognized arguments: --num_workers 2$"),
])
def test_dry_run_checks_every_stage_with_its_scripts_own_flag_checks(tmp_path, replace, replacement, message):
    text = Path(TINY_CONFIG).read_text()
    assert replace in text
    (tmp_path / "bad.toml").write_text(text.replace(replace, replacement, 1))
    with pytest.raises(InputError, match=message):
        run_experiment.main(run_experiment.parse_args(["--config", str(tmp_path / "bad.toml"), "--output_dir",
                                                       str(tmp_path / "study"), "--dry_run"]))
    assert not (tmp_path / "study").exists()


def test_bad_config_is_one_line_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    text = Path(TINY_CONFIG).read_text()
    (tmp_path / "bad.toml").write_text(text.replace('methods = ["dreambooth"]', 'methods = ["dreambooth", "magic"]'))
    with pytest.raises(InputError, match="unknown method 'magic'"):
        load_config(tmp_path / "bad.toml")
    (tmp_path / "typo.toml").write_text(text.replace("[dose_response]", "[dose_respons]"))
    with pytest.raises(InputError, match=r"unknown section \[dose_respons\] \(did you mean \[dose_response\]\?\)"):
        load_config(tmp_path / "typo.toml")
    (tmp_path / "noise.toml").write_text(text.replace('aspl = { mode = "image", ratio = 1.0, noise = "aspl" }',
                                                      'aspl = { mode = "image", ratio = 1.0 }'))
    with pytest.raises(InputError, match="setting 'aspl' mixes a perturbed set .* exactly when it names its noise"):
        load_config(tmp_path / "noise.toml")


def _finite_with_ci(summary):
    value, (low, high) = summary["value"], summary["ci"]
    return math.isfinite(value) and low - 1e-12 <= value <= high + 1e-12


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("study") / "quick"
    summary = run_experiment.main(run_experiment.parse_args(["--config", TINY_CONFIG, "--quick", "--output_dir",
                                                             str(output_dir)]))
    return output_dir, summary


def test_quick_study_writes_a_well_formed_report(quick_study):
    output_dir, summary = quick_study
    report = (output_dir / "report" / "REPORT.md").read_text()
    for heading in ("## Premises", "## Dose-response", "Table 1", "Table 2", "## The claims, one verdict each"):
        assert heading in report
    assert (output_dir / "report" / "dose_response.png").stat().st_size > 1000
    premises = summary["premises"]
    for key in ("P1", "P2", "P4", "P6", "P7"):
        assert isinstance(premises[key]["holds"], bool) and premises[key]["measured"], key
    assert set(premises["P4"]["ratios"]) == {"aspl", "random"}
    assert [step["k"] for step in premises["P6"]["ladder"]] == [0.0, 0.2]
    assert set(premises["P3"]["cells"]) == {f"dreambooth-{s}-e{e:g}" for s in ("clean", "aspl", "random")
                                           for e in (0.5, 1)} | {"dreambooth-aspl-image-0.5-e1"}
    cells = summary["cells"]
    for name, row in cells.items():
        assert row["seeds"] == (1 if name == "pretrained" else 2)
        for metric in ("auc:loss", "auc:pia", "auc:worst", "tpr:worst", "rprecision", "fidelity"):
            assert _finite_with_ci(row[metric]), (name, metric)
        # the worst case is the attack chosen on the calibration half, not the larger test AUC
        assert row["worst_attacks"] and set(row["worst_attacks"]) <= {"loss", "pia"}
    assert summary["claims"]
    for claim in summary["claims"]:
        assert VERDICT.match(claim["verdict"]), claim["verdict"]
        # every quick level is under P3's 10 epochs: no claim may carry a verdict word
        assert claim["verdict"].startswith("not testable here (P") and claim["failed_premise"]
        delta = claim.get("delta_auc") or claim["delta_fidelity"]
        low, high = delta["ci"]
        assert low <= delta["delta"] + 1e-12 and delta["delta"] <= high + 1e-12
    for model in cells["dreambooth-clean-e1"]["models"].values():
        results = json.loads((output_dir / "eval" / model / "results.json").read_text())
        assert results["privacy"] and results["utility"]["r_precision_hits"]
        assert results["utility"]["pixel_frechet_distance"] > 0


def test_quick_study_second_run_is_fully_cached(quick_study, capsys):
    output_dir, _ = quick_study
    run_experiment.main(run_experiment.parse_args(["--config", TINY_CONFIG, "--quick", "--output_dir",
                                                   str(output_dir)]))
    printed = capsys.readouterr().out
    assert not [line for line in printed.splitlines() if line.startswith("[")]  # no stage ran
    assert re.search(r"^(\d+) of \1 stages cached", printed, flags=re.M)
