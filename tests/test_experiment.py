"""The experiment runner (run_experiment.py): caching, dry run, and the quick end-to-end study."""

import json
import math
from pathlib import Path

import pytest

import run_experiment
from mixsyn_utils.cli import InputError
from study.plan import load_config, plan_stages
from study.runner import stage_key

TINY_CONFIG = "configs/tiny_digits.toml"


def _keys(stages):
    keys = {}
    for stage in stages:
        keys[stage.name] = stage_key(stage, keys)
    return keys


def test_changed_flag_reruns_that_stage_and_its_dependents_only(tmp_path):
    config = load_config(TINY_CONFIG, quick=True)
    before = _keys(plan_stages(config, tmp_path)[0])
    config["stages"]["train_lora"]["rank"] = 8
    after = _keys(plan_stages(config, tmp_path)[0])
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {"train:lora-clean", "secmi:lora-clean", "pia:lora-clean", "evaluate:lora-clean",
                       "train:lora-image-0.5", "secmi:lora-image-0.5", "pia:lora-image-0.5",
                       "evaluate:lora-image-0.5"}


def test_models_are_deduplicated_across_tables_and_figure(tmp_path):
    stages, models = plan_stages(load_config(TINY_CONFIG), tmp_path)
    assert len({stage.name for stage in stages}) == len(stages)
    # ratio 0 and ratio 1 are one model each whatever the mode; Table 3's image-0.5 is reused by Figure 4
    assert "dreambooth-clean" in models and "dreambooth-perturbed" in models and "dreambooth-pixel-0" not in models
    assert sum(name.startswith("dreambooth-") for name in models) == 1 + 1 + 2 * 4


def test_sd14_config_dry_run_plans_without_downloading(capsys):
    run_experiment.main(run_experiment.parse_args(["--config", "configs/sd14_celeb40.toml", "--output_dir",
                                                   "runs/never-written", "--dry_run"]))
    printed = capsys.readouterr().out
    assert "CompVis/stable-diffusion-v1-4" in printed and "Estimated cost:" in printed and "GPU-hours" in printed
    assert not Path("runs/never-written").exists()


@pytest.mark.parametrize("replace, replacement, message", [
    ("mixup_ratio = 0.5", "mixup_ratio = 1.5",
     r"^stage train:dreambooth-image-1.5: --mixup_ratio must be in \[0, 1\], got 1.5$"),
    ("t_sec = 100", "t_sec = 105", r"^stage secmi:pretrained: --t_sec must be a multiple of --k"),
    ("pgd_eps = 0.05", "pgd_eps = 1.5", r"^stage perturbed: --pgd_eps must be in \(0, 1\], got 1.5$"),
    ("lp = 4", "lp = 4\nnum_workers = 2", r"^stage pia:pretrained: .*unrecognized arguments: --num_workers 2$"),
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
    (tmp_path / "bad.toml").write_text('[experiment]\nmethods = ["dreambooth", "magic"]\n[tables]\n[stages]\n')
    with pytest.raises(InputError, match="unknown method 'magic'"):
        load_config(tmp_path / "bad.toml")


def _finite_with_ci(value, ci):
    return value is not None and math.isfinite(value) and ci[0] - 1e-12 <= value <= ci[1] + 1e-12


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("study") / "quick"
    summary = run_experiment.main(run_experiment.parse_args(["--config", TINY_CONFIG, "--quick", "--output_dir",
                                                             str(output_dir)]))
    return output_dir, summary


def test_quick_study_writes_a_well_formed_report(quick_study):
    output_dir, summary = quick_study
    report = (output_dir / "report" / "REPORT.md").read_text()
    for heading in ("Table 1", "Table 3", "Figure 4", "Does this run support the paper's claims?", "Blind baseline"):
        assert heading in report
    assert (output_dir / "report" / "figure4.png").stat().st_size > 1000
    rows = summary["rows"]
    assert set(rows) == {"pretrained", "dreambooth-clean", "lora-clean", "dreambooth-image-0.5", "lora-image-0.5"}
    for row in rows.values():
        for attack in ("secmi", "pia"):
            assert _finite_with_ci(row[f"{attack}_auc"], row[f"{attack}_auc_ci"])
            assert _finite_with_ci(row[f"{attack}_tpr1"], row[f"{attack}_tpr1_ci"])
        assert 0 <= row["r_precision"] <= 100 and math.isfinite(row["brisque"])
    for name in rows:
        results = json.loads((output_dir / "eval" / name / "results.json").read_text())
        assert results["privacy"] and results["utility"]


def test_quick_study_second_run_is_fully_cached(quick_study, capsys):
    output_dir, _ = quick_study
    run_experiment.main(run_experiment.parse_args(["--config", TINY_CONFIG, "--quick", "--output_dir",
                                                   str(output_dir)]))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert lines and all(line.endswith(": cached") for line in lines)
