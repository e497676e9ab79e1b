#!/usr/bin/env python
"""Direction and strength of SecMI, PIA and the loss attack on the embedded victim as its training gets longer.

Builds the victim with `make_tiny_victim.py`'s defaults at each `--unet_steps` (same seed, so only the training
length differs), runs `attack_secmi.py` (t_sec 100, k 10) and `attack_pia.py` (PIA, t 200, p 4, no guidance) on its members
and non-members, and prints each AUC with a stratified bootstrap
95% CI. AUC is in the members-lower convention of the scores: below 0.5 means members have the LARGER error
("inverted"), which an attacker exploits just as well.

    HF_HUB_OFFLINE=1 python benchmarks/bench_attack_direction.py --unet_steps 150 600 1500
    HF_HUB_OFFLINE=1 python benchmarks/bench_attack_direction.py --victim_dirs outputs/demo/victim
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attack_pia  # noqa: E402
import attack_secmi  # noqa: E402
import make_tiny_victim  # noqa: E402
from mixsyn_utils.audit_report import format_with_ci  # noqa: E402
from mixsyn_utils.audit_statistics import bootstrap_ci  # noqa: E402
from mixsyn_utils.metrics import roc_metrics  # noqa: E402

ATTACKS = {
    "secmi": (attack_secmi, ["--t_sec", "100", "--k", "10"]),
    "pia": (attack_pia, ["--method", "pia", "--attack_timesteps", "200", "--lp", "4", "--guidance_scale", "1"]),
}


def attack_aucs(victim_dir, work_dir, batch_size):
    """{attack: (AUC, CI)} in the members-lower convention, from the scripts' own scores datasets."""
    figures = {}
    for name, (script, flags) in ATTACKS.items():
        output_dir = Path(work_dir) / f"{Path(victim_dir).name}-{name}"
        script.main(script.parse_args([
            "--pretrained_model_name_or_path", str(Path(victim_dir) / "pipeline"),
            "--member_dataset", str(Path(victim_dir) / "members"),
            "--nonmember_dataset", str(Path(victim_dir) / "nonmembers"),
            "--batch_size", str(batch_size), "--output_dir", str(output_dir), "--overwrite", *flags]))
        scores = datasets.load_from_disk(str(output_dir))
        values, is_member = np.asarray(scores["score"]), np.asarray(scores["is_member"], dtype=bool)
        auc = roc_metrics(-values[is_member], -values[~is_member])["auc"]
        interval = bootstrap_ci(-values[is_member], -values[~is_member])["auc"]
        figures[name] = {"auc": round(auc, 4), "auc_ci": [round(v, 4) for v in interval]}
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet_steps", type=int, nargs="+", default=[150, 600, 1500])
    parser.add_argument("--victim_dirs", nargs="+", default=None, help="Attack these victims instead of building.")
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--output", default=None, help="Write the figures as JSON here.")
    args = parser.parse_args()
    work_dir = Path(tempfile.mkdtemp(prefix="bench_direction_"))
    victims = {}
    if args.victim_dirs:
        victims = {str(path): Path(path) for path in args.victim_dirs}
    else:
        for steps in args.unet_steps:
            victim_dir = work_dir / f"victim-{steps}"
            start = time.time()
            make_tiny_victim.main(make_tiny_victim.parse_args(
                ["--output_dir", str(victim_dir), "--unet_steps", str(steps), "--skip_report"]))
            print(f"victim with {steps} UNet steps built in {time.time() - start:.0f} s")
            victims[f"{steps} UNet steps"] = victim_dir
    results = {}
    for label, victim_dir in victims.items():
        results[label] = attack_aucs(victim_dir, work_dir, args.batch_size)
    print("\nAUC [95% CI], members-lower convention (< 0.5: members have the larger error)")
    for label, figures in results.items():
        cells = [f"{name} {format_with_ci(f['auc'], f['auc_ci'])}" for name, f in figures.items()]
        print(f"{label:>16}: " + "; ".join(cells))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
