#!/usr/bin/env python
"""Acceptance figures of the embedded victim, measured in one run.

Builds the full victim with `make_tiny_victim.py`'s defaults (or reads `--victim_dir`), then reports:
- build time on this machine (target ≤ 6 min on 2 cores) and determinism (a second build, same seed, same weights);
- the loss-threshold attack AUC (mean denoising MSE at t ∈ {50, 100, 200, 300}, fixed noise) for 3 attack seeds
  (target: in [0.70, 0.90] and on the same side of 0.5 for every seed);
- the blind baseline (logistic regression on pixels + caption words, 5-fold CV; target: 95% CI contains 0.5).

    python benchmarks/bench_victim.py --output benchmarks/results/victim.json [--check_determinism]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import make_tiny_victim  # noqa: E402


def weights_equal(dir_a, dir_b):
    for module in ("unet", "vae"):
        a = load_file(str(Path(dir_a) / "pipeline" / module / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(Path(dir_b) / "pipeline" / module / "diffusion_pytorch_model.safetensors"))
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            return False
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victim_dir", default=None, help="Measure an existing victim instead of building one.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check_determinism", action="store_true", help="Build a second time and compare weights.")
    parser.add_argument("--output", default=None, help="Write the figures as JSON here.")
    args = parser.parse_args()

    work_dir = Path(tempfile.mkdtemp(prefix="bench_victim_"))
    figures = {"torch_threads": torch.get_num_threads()}
    victim_dir = args.victim_dir
    if victim_dir is None:
        victim_dir = work_dir / "victim"
        start = time.time()
        make_tiny_victim.main(make_tiny_victim.parse_args(["--output_dir", str(victim_dir), "--seed", str(args.seed),
                                                           "--skip_report"]))
        figures["build_seconds"] = round(time.time() - start, 1)
    if args.check_determinism:
        make_tiny_victim.main(make_tiny_victim.parse_args(["--output_dir", str(work_dir / "again"), "--seed",
                                                           str(args.seed), "--skip_report"]))
        figures["deterministic"] = weights_equal(victim_dir, work_dir / "again")
    start = time.time()
    figures.update(make_tiny_victim.victim_membership_figures(victim_dir))
    figures["report_seconds"] = round(time.time() - start, 1)
    loss_aucs = [v for k, v in figures.items() if k.startswith("loss_attack_auc_seed")]
    figures["loss_auc_in_0.70_0.90"] = all(0.70 <= auc <= 0.90 for auc in loss_aucs)
    figures["loss_auc_same_side"] = len({auc > 0.5 for auc in loss_aucs}) == 1
    low, high = figures["blind_baseline_auc_ci"]
    figures["blind_ci_contains_0.5"] = low <= 0.5 <= high
    print(json.dumps(figures, indent=2))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
