"""The experiment runner (run_experiment.py, study/): the plan, caching, dry run, and the quick end-to-end study."""

import json
import math
import re
from pathlib import Path

import pytest

import run_experiment
from mixsyn_utils.cli import InputError
from study.plan import load_config, plan_phase1, plan_phase2
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
    before = _keys(plan_phase1(config, tmp_path)[0])
    config["stages"]["train_dreambooth_lora"]["rank"] = 8
    after = _keys(plan_phase1(config, tmp_path)[0])
    changed = {name for name in before if before[name] != after[name]}
    models = [f"dreambooth_lora-{setting}-seed{seed}" for setting in ("clean", "image-0.5") for seed in (0, 1)]
    assert changed == {f"{stage}:{model}" for model in models for stage in ("train", "loss", "pia", "evaluate")}


def test_plan_has_the_dose_grid_the_method_cells_and_shared_models(tmp_path):
    config = load_config(TINY_CONFIG)
    stages, models = plan_phase1(config, tmp_path)
    assert len({stage.name for stage in stages}) == len(stages)
    levels, settings = config["strength"]["levels"], config["strength"]["settings"]
    seeds = config["experiment"]["training_seeds"]
    assert len(levels) >= 4 and len(seeds) >= 3 and {"clean", "perturbed", "image-0.5", "pixel-0.3-block"} <= set(settings)
    dose = [spec for spec in models.values() if spec.method == "dreambooth"]
    assert len(dose) == len(levels) * len(settings) * len(seeds)
    # DreamBooth is Eq. 6 everywhere: prior preservation and the text encoder, in every DreamBooth stage
    for stage in stages:
        if stage.script == "train_dreambooth_mixsyn.py":
            assert stage.flags["with_prior_preservation"] and stage.flags["train_text_encoder"]
    phase2_stages, phase2_models = plan_phase2(config, tmp_path, levels[1]["name"])
    # Table 5's "DreamBooth" row (UNet + text encoder) is the study's DreamBooth model, not a second one
    table5 = [spec for spec in phase2_models.values() if spec.setting == "image-0.3"]
    assert sorted(str(spec.trainable_modules) for spec in table5) == sorted(
        ["None", "('unet',)", "('vae_encoder',)", "('text_embeddings',)"])
    # both Mixup-P readings at the default strength
    assert [spec.seed for spec in phase2_models.values() if spec.setting == "pixel-0.3-random"] == [0]
    assert not set(phase2_models) & set(models)
    assert sum(stage.name.startswith("extraction:") for stage in phase2_stages) == 1 + len(config["extraction"]["settings"])


def test_sd14_config_dry_run_plans_without_downloading(capsys):
    run_experiment.main(run_experiment.parse_args(["--config", "configs/sd14_celeb40.toml", "--output_dir",
                                                   "runs/never-written", "--dry_run"]))
    printed = capsys.readouterr().out
    assert "CompVis/stable-diffusion-v1-4" in printed and "Estimated cost:" in printed and "GPU-hours" in printed
    assert not Path("runs/never-written").exists()


@pytest.mark.parametrize("replace, replacement, message", [
    ('"image-0.5" = { mode = "image", ratio = 0.5 }', '"image-0.5" = { mode = "image", ratio = 1.5 }',
     r"setting 'image-0.5' needs mode 'image' or 'pixel' and a ratio in \[0, 1\]$"),
    ("t_sec = 100", "t_sec = 105", r"^stage secmi:pretrained: --t_sec must be a multiple of --k"),
    ("pgd_eps = 0.05", "pgd_eps = 1.5", r"^stage perturbed: --pgd_eps must be in \(0, 1\], got 1.5$"),
    ("rank = 4", "rank = 4\nnum_workers = 2",
     r"^stage train:lora-clean-seed0: .*unrecognized arguments: --num_workers 2$"),
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
    (tmp_path / "bad.toml").write_text('[experiment]\nmethods = ["dreambooth", "magic"]\n[settings]\n[strength]\n'
                                       '[tables]\n[stages]\n')
    with pytest.raises(InputError, match="unknown method 'magic'"):
        load_config(tmp_path / "bad.toml")


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
    for heading in ("## Premises", "## Fine-tuning strength", "Table 1", "Table 3", "## Figure 4",
                    "The paper's claims, one verdict each", "## Data extraction"):
        assert heading in report
    assert summary["default_strength"]["level"] in ("s1", "s2") and "Fixed before" in summary["default_strength"]["rule"]
    for figure in ("figure4.png", "dose_response.png"):
        assert (output_dir / "report" / figure).stat().st_size > 1000
    cells = summary["cells"]
    assert {"pretrained", "dreambooth-clean-s1", "dreambooth-image-0.5-s2", "dreambooth_lora-clean",
            "dreambooth_lora-image-0.5"} <= set(cells)
    for name, row in cells.items():
        assert row["seeds"] == (1 if name == "pretrained" else 2)
        for metric in ("auc:loss", "auc:pia", "auc:worst", "tpr:worst", "rprecision", "brisque"):
            assert _finite_with_ci(row[metric]), (name, metric)
        assert row["auc:worst"]["value"] == max(row["auc:loss"]["value"], row["auc:pia"]["value"])
    assert summary["claims"]
    for claim in summary["claims"]:
        assert VERDICT.match(claim["verdict"]) and VERDICT.match(claim["verdict_tpr"]), claim["verdict"]
        low, high = claim["delta_auc"]["ci"]
        assert low <= claim["delta_auc"]["delta"] + 1e-12 and claim["delta_auc"]["delta"] <= high + 1e-12
    for model in cells["dreambooth-clean-s1"]["models"]:
        results = json.loads((output_dir / "eval" / model / "results.json").read_text())
        assert results["privacy"] and results["utility"]["r_precision_hits"]


def test_quick_study_second_run_is_fully_cached(quick_study, capsys):
    output_dir, _ = quick_study
    run_experiment.main(run_experiment.parse_args(["--config", TINY_CONFIG, "--quick", "--output_dir",
                                                   str(output_dir)]))
    printed = capsys.readouterr().out
    assert not [line for line in printed.splitlines() if line.startswith("[")]  # no stage ran
    assert re.search(r"^(\d+) of \1 stages cached", printed, flags=re.M)
