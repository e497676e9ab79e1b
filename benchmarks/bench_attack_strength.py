#!/usr/bin/env python
"""Every attack at its script's defaults on one victim: AUC [95% CI], direction, per-t AUC, UNet calls, worst case.

Runs attack_pia.py, attack_secmi.py, attack_loss.py (loss and SimA), attack_clid.py and attack_pfami.py with
their defaults (the authors' Stable Diffusion settings, see each script's docstring), plus their DDPM papers' two
cheaper settings (PIA t 200 without guidance, SecMI t_sec 100), then `evaluate.py` on all the score
sets: its per-attack blocks and its worst case are what this prints. AUC is in the members-lower convention of
the scores: below 0.5 means members have the LARGER score ("inverted"), which an attacker exploits as well.

    HF_HUB_OFFLINE=1 python benchmarks/bench_attack_strength.py --victim_dir outputs/victim \\
        --output benchmarks/results/attack_strength.json
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import datasets

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attack_clid  # noqa: E402
import attack_loss  # noqa: E402
import attack_pfami  # noqa: E402
import attack_pia  # noqa: E402
import attack_secmi  # noqa: E402
import evaluate  # noqa: E402
import make_tiny_victim  # noqa: E402
from mixsyn_utils.audit_report import format_with_ci  # noqa: E402

ATTACKS = {
    "pia": (attack_pia, []),
    "pia_w1_t200": (attack_pia, ["--attack_timesteps", "200", "--guidance_scale", "1"]),
    "secmi": (attack_secmi, []),
    "secmi_t100": (attack_secmi, ["--t_sec", "100"]),
    "loss": (attack_loss, ["--method", "loss"]),
    "sima": (attack_loss, ["--method", "sima"]),
    "clid": (attack_clid, []),
    "pfami": (attack_pfami, []),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victim_dir", default=None,
                        help="A make_tiny_victim.py output folder; default: build one with the builder's defaults.")
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    parser.add_argument("--output", default=None, help="Write the figures as JSON here.")
    cli = parser.parse_args()
    work_dir = Path(tempfile.mkdtemp(prefix="bench_strength_"))
    victim = Path(cli.victim_dir) if cli.victim_dir else work_dir / "victim"
    if not cli.victim_dir:
        make_tiny_victim.main(make_tiny_victim.parse_args(["--output_dir", str(victim), "--skip_report"]))
    data = ["--member_dataset", str(victim / "members"), "--nonmember_dataset", str(victim / "nonmembers")]
    seconds, infos = {}, {}
    for name in cli.attacks:
        script, flags = ATTACKS[name]
        start = time.time()
        script.main(script.parse_args(["--pretrained_model_name_or_path", str(victim / "pipeline"), *data,
                                       "--batch_size", str(cli.batch_size), "--output_dir", str(work_dir / name),
                                       *flags]))
        seconds[name] = round(time.time() - start, 1)
        infos[name] = json.loads(datasets.load_from_disk(str(work_dir / name)).info.description)
    results = evaluate.main(evaluate.parse_args(["--scores", *[str(work_dir / name) for name in cli.attacks], *data,
                                                 "--bootstrap", str(cli.bootstrap), "--output_dir",
                                                 str(work_dir / "eval")]))
    # Results name the victim by its folder name only: a committed file holds no machine path.
    worst_case = json.loads(json.dumps(results["worst_case"]).replace(str(victim), victim.name))
    figures = {"victim": victim.name, "worst_case": worst_case, "blind_baseline": results["blind_baseline"],
               "attacks": {}}
    for name in cli.attacks:
        block, info = results["privacy"][name], infos[name]
        calibration = info.get("calibration") or {}
        figures["attacks"][name] = {
            "auc": block["auc"], "auc_ci": block["auc_ci"], "direction": "inverted" if block["auc"] < 0.5 else "expected",
            "calibrated_direction": block["calibrated"]["direction"],
            "calibrated_tpr_at_1pct_fpr": block["calibrated"]["test_tpr"],
            "tpr_at_1pct_fpr": block["tpr_at_1pct_fpr"], "tpr_at_1pct_fpr_ci": block["tpr_at_1pct_fpr_ci"],
            "num_members": block["num_members"], "num_nonmembers": block["num_nonmembers"],
            "per_timestep_auc": block["per_timestep_auc"], "unet_calls_per_image": info["unet_calls_per_image"],
            "unet_rows_per_image": info.get("unet_rows_per_image", info["unet_calls_per_image"]),
            "seconds": seconds[name],
            "fitted": {key: calibration[key] for key in ("alpha", "selected_timestep") if key in calibration}}
    print("\nAUC [95% CI] (members-lower convention), calibrated TPR@1%FPR, UNet rows per image, fitted values")
    for name, row in figures["attacks"].items():
        print(f"{name:>12}: AUC {format_with_ci(row['auc'], row['auc_ci'])} ({row['direction']}), "
              f"calibrated TPR {row['calibrated_tpr_at_1pct_fpr']:.3f}, {row['unet_rows_per_image']} rows, "
              f"{row['seconds']} s {row['fitted'] or ''}")
        for column, auc in row["per_timestep_auc"].items():
            print(f"{'':>14}{column}: {auc:.3f}")
    for case in results["worst_case"]:
        print(f"worst case: {case['scores']} ({case['attack']}), calibrated TPR@1%FPR {case['calibrated_tpr']:.3f}, "
              f"AUC {case['auc']:.3f} {case['auc_ci']}")
    if cli.output:
        Path(cli.output).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
