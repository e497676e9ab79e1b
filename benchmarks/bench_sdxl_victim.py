#!/usr/bin/env python
"""Acceptance figures of the embedded SDXL-architecture victim (`make_tiny_victim.py --architecture sdxl`).

Builds the victim with the builder's defaults (or `--victim_dir`) and reports:
- R-precision of the victim's own samples: `StableDiffusionXLPipeline` (its Euler scheduler, 25 steps, guidance
  7.5, unconditional = zeros as the pipeline's `force_zeros_for_empty_prompt`), domains × the two paper templates ×
  `--num_samples_per_prompt` seeds, scored by an independent scikit-learn LogisticRegression fitted on all of
  `load_digits` at the builder's resize (bicubic to the victim's size, RGB), as benchmarks/bench_victim.py; and by
  the builder's offline classifier. Chance 0.10; target ≥ 0.60.
- the loss attack (`make_tiny_victim.victim_membership_figures`: mean ‖ε − ε̂(z_t, t, c)‖² over t ∈ {50, 100, 200,
  300}, fixed noise, SDXL time ids (R, R, 0, 0, R, R)): AUC with a 95% bootstrap CI for attack seeds 0 / 1 / 2.
  Target [0.65, 0.90].
With `--snapshot_steps`, one build to the largest of them is measured at EMA snapshots after each listed step:
a snapshot at n steps of a longer run has a cosine schedule that has not decayed yet, so it is a guide to the step
count, not the figure of an n-step build (the committed figure is a real default build).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/bench_sdxl_victim.py \\
        --output benchmarks/results/sdxl_victim.json
"""

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import make_tiny_victim  # noqa: E402
from mixsyn_utils.audit_statistics import bootstrap_ci  # noqa: E402
from mixsyn_utils.dataset_io import load_image_dataset  # noqa: E402
from mixsyn_utils.domains import PAPER_PROMPT_TEMPLATES  # noqa: E402
from mixsyn_utils.metrics import roc_metrics  # noqa: E402
from mixsyn_utils.models import load_components  # noqa: E402
from mixsyn_utils.utility import classifier_r_precision_hits  # noqa: E402

LOSS_TIMESTEPS = (50, 100, 200, 300)
TARGETS = {"r_precision": 0.6, "loss_attack_auc": (0.65, 0.9)}


def independent_digit_scorer(resolution):
    """LogisticRegression on all sklearn digits at the builder's path (`make_tiny_victim.digit_image`)."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    features = np.stack([np.asarray(make_tiny_victim.digit_image(digits, index, resolution), dtype=np.float64)
                         .reshape(-1) / 255.0 for index in range(len(digits.images))])
    return LogisticRegression(max_iter=5000).fit(features, digits.target)


def r_precision(pipeline, victim_dir, domains, samples_per_prompt, resolution, scorer):
    pipeline.set_progress_bar_config(disable=True)
    plan = [(domain, template.format(domain), seed) for domain in domains for template, _ in PAPER_PROMPT_TEMPLATES
            for seed in range(samples_per_prompt)]
    images = []
    for start in range(0, len(plan), 100):
        chunk = plan[start:start + 100]
        images += pipeline([prompt for _, prompt, _ in chunk], num_inference_steps=25, guidance_scale=7.5,
                           generator=[torch.Generator().manual_seed(1000 + seed) for *_, seed in chunk],
                           height=resolution, width=resolution).images
    sample_domains = [domain for domain, _, _ in plan]
    features = np.stack([np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1) / 255.0 for image in images])
    independent = scorer.predict(features) == np.array([domains.index(domain) for domain in sample_domains])
    offline = classifier_r_precision_hits(Path(victim_dir) / "rprecision_model", images, sample_domains)
    return {"num_samples": len(images), "chance": 1 / len(domains),
            "independent_logistic_regression": float(independent.mean()), "offline_classifier": float(offline.mean())}


def loss_attack(components, victim_dir):
    members = load_image_dataset(str(Path(victim_dir) / "members"), required_columns=("image", "prompt"))
    nonmembers = load_image_dataset(str(Path(victim_dir) / "nonmembers"), required_columns=("image", "prompt"))
    figures = {}
    for seed in (0, 1, 2):
        member = make_tiny_victim.loss_attack_member_scores(components, members, LOSS_TIMESTEPS, seed)
        nonmember = make_tiny_victim.loss_attack_member_scores(components, nonmembers, LOSS_TIMESTEPS, seed)
        figures[f"seed{seed}"] = {"auc": roc_metrics(member, nonmember)["auc"],
                                  "auc_ci": bootstrap_ci(member, nonmember)["auc"]}
    return figures


def measure(victim_dir, num_samples_per_prompt, scorer, unet=None, text_encoders=None):
    """R-precision and loss attack of the victim folder, with its UNet and text encoders replaced when given."""
    from diffusers import StableDiffusionXLPipeline

    start = time.time()
    pipeline = StableDiffusionXLPipeline.from_pretrained(str(Path(victim_dir) / "pipeline"), add_watermarker=False)
    if unet is not None:
        pipeline.unet, pipeline.text_encoder, pipeline.text_encoder_2 = unet, *text_encoders
    info = json.loads((Path(victim_dir) / "victim_info.json").read_text())
    domains = json.loads((Path(victim_dir) / "domains.json").read_text())["domains"]
    figures = {"r_precision": r_precision(pipeline, victim_dir, domains, num_samples_per_prompt, info["image_size"],
                                          scorer)}
    components = load_components(str(Path(victim_dir) / "pipeline"))
    if unet is not None:
        components.unet, components.text_encoder, components.text_encoder_2 = unet, *text_encoders
    figures["loss_attack"] = loss_attack(components, victim_dir)
    aucs = [value["auc"] for value in figures["loss_attack"].values()]
    low, high = TARGETS["loss_attack_auc"]
    figures["meets_targets"] = bool(figures["r_precision"]["independent_logistic_regression"] >= TARGETS["r_precision"]
                                    and all(low <= auc <= high for auc in aucs))
    figures["measure_seconds"] = round(time.time() - start, 1)
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victim_dir", default=None, help="Measure this built victim instead of building one.")
    parser.add_argument("--seed", type=int, default=0, help="Build seed.")
    parser.add_argument("--snapshot_steps", type=int, nargs="+", default=None,
                        help="Build to the largest and measure EMA snapshots after each (a guide, see the doc).")
    parser.add_argument("--num_samples_per_prompt", type=int, default=10,
                        help="Samples per domain and template (10 → 200 samples for 10 domains).")
    parser.add_argument("--output", default="benchmarks/results/sdxl_victim.json")
    args = parser.parse_args()

    report = {"hardware": f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}",
              "targets": TARGETS}
    work_dir = Path(tempfile.mkdtemp(prefix="bench_sdxl_victim_"))
    victim_dir = Path(args.victim_dir or work_dir / "victim")
    snapshots = {}
    if args.victim_dir is None:
        argv = ["--output_dir", str(victim_dir), "--architecture", "sdxl", "--seed", str(args.seed), "--skip_report"]
        if args.snapshot_steps:
            argv += ["--unet_steps", str(max(args.snapshot_steps))]

        def keep_snapshot(step, unet, text_encoders):
            if args.snapshot_steps and step in args.snapshot_steps:
                snapshots[step] = (copy.deepcopy(unet).eval(), [copy.deepcopy(e).eval() for e in text_encoders])

        build_args = make_tiny_victim.parse_args(argv)
        report["build_flags"] = {key: value for key, value in vars(build_args).items() if key != "output_dir"}  # a temp path
        make_tiny_victim.build_tiny_victim(build_args, after_step=keep_snapshot)
    info = json.loads((victim_dir / "victim_info.json").read_text())
    report["victim_info"] = info
    scorer = independent_digit_scorer(info["image_size"])
    if snapshots:
        report["snapshots"] = {}
        for step, (unet, text_encoders) in sorted(snapshots.items()):
            report["snapshots"][step] = measure(victim_dir, args.num_samples_per_prompt, scorer, unet, text_encoders)
            print(json.dumps({step: report["snapshots"][step]}), flush=True)
    else:
        report["default_build"] = measure(victim_dir, args.num_samples_per_prompt, scorer)
        print(json.dumps(report["default_build"], indent=1), flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
