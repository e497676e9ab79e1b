#!/usr/bin/env python
"""The main job: one command runs the MixSyn study end to end and answers each of the paper's claims.

It chains the real scripts — victim → generate_synthetic.py → perturb_antidreambooth.py (ASPL and the random-noise
control) → the training scripts at every epoch level, setting and training seed → every attack script on every
model → evaluate.py — exchanging datasets on disk, then measures the premises every claim rests on (P1–P7) and
writes `<output_dir>/report/`: REPORT.md (the premises, Tables 1–5, the claims and their verdicts, extraction),
dose_response.png, figure4.png and summary.json (every number the report prints).

Every stage is cached by its inputs (a changed flag reruns that stage and what depends on it), and a killed run
resumes. `--workers N` runs independent stages in N one-thread worker processes (the models of this study are
small: two one-thread workers use two cores better than one two-thread process); `--num_processes N` (N > 1)
instead sends the sharded stages through `accelerate launch` (GPUs).

    python run_experiment.py --config configs/tiny_digits.toml --output_dir outputs/demo
    python run_experiment.py --config configs/sd14_celeb40.toml --output_dir runs/sd14 --dry_run
"""

import json
import shutil
import time
from pathlib import Path

import mixsyn_utils.quiet  # noqa: F401  (first: silences library messages that are emitted at import time)
from mixsyn_utils.cli import ArgumentParser, InputError, run_cli  # one-line errors for bad input (argparse's included)
from mixsyn_utils.outputs import OutputLock  # one study at a time per output folder
from study.plan import load_config, plan_study  # the config, its models and stages
from study.report import write_report  # premises, tables, figures, one verdict per claim
from study.runner import run_stages  # cached stages, in order, in workers, or through accelerate launch

# Measured per-stage costs on one A100-class GPU for SD-1.x at 512 px, used only by --dry_run's estimate.
# Basis: public diffusers figures (SD-1.5 UNet fwd+bwd ≈ 0.25 s per image at fp16; 50-step sampling ≈ 2.5 s per
# image with CFG). They are estimates, printed as such.
GPU_SECONDS = {"sample_image": 2.5, "train_step_per_image": 0.25, "attack_unet_forward": 0.03}
# [experiment] architecture -> cost of one UNet call relative to SD-1.x at 512 px: the forward pass's FLOPs counted
# with torch.utils.flop_counter on the real UNet configs (meta device): SD-1.4 at 512 px 0.80 TFLOP, SDXL base at
# 1024 px 6.76 TFLOP (benchmarks/bench_aspl_memory.py, unet_forward_tflops). Every cost above scales by it.
UNET_COST_RATIO = {"sd": 1.0, "sdxl": 8.42}


def parse_args(input_args=None):
    parser = ArgumentParser(description="Run the MixSyn study from a config (see configs/).",
                            allow_abbrev=False)
    parser.add_argument("--config", type=str, default="configs/tiny_digits.toml", help="A TOML study config.")
    parser.add_argument("--output_dir", type=str, default="outputs/demo", help="Where every stage writes.")
    parser.add_argument("--quick", action="store_true", help="Apply the config's [quick] profile (CI's e2e test).")
    parser.add_argument("--dry_run", action="store_true",
                        help="Validate the config, print the planned stages and a GPU-hours estimate, run nothing.")
    parser.add_argument("--report_only", action="store_true",
                        help="Run no stage: rewrite the report from the results already under --output_dir.")
    parser.add_argument("--num_processes", type=int, default=1,
                        help="Processes for the sharded stages (accelerate launch --multi_gpu when > 1).")
    parser.add_argument("--workers", type=int, default=None,
                        help="Stages run at once in one-thread worker processes (default: the config's "
                             "[experiment] workers, else 1). Each stage's numbers are the same whatever the value "
                             "as long as it is > 1 (one thread each).")
    parser.add_argument("--results_dir", type=str, default=None,
                        help="Also copy the report (REPORT.md, figure4.png, summary.json) here, e.g. results/.")
    args = parser.parse_args(input_args)
    if args.num_processes < 1:
        raise InputError(f"--num_processes must be >= 1, got {args.num_processes}")
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers must be >= 1, got {args.workers}")
    load_config(args.config, quick=args.quick)  # a bad config fails here, in one line
    return args


def gpu_hours_estimate(config, stages):
    """Rough GPU-hours of a plan from the per-operation costs above (counts of images, steps and UNet calls)."""
    flags, experiment = config["stages"], config["experiment"]
    num_domains = experiment.get("num_domains", 10)
    images = flags["synthetic"]["num_images_per_domain"] * num_domains
    seconds = images * GPU_SECONDS["sample_image"] * flags["synthetic"].get("num_inference_steps", 50) / 50
    perturb = flags["perturb"]
    perturb_steps = perturb.get("max_train_steps", 50) * (2 * perturb.get("max_f_train_steps", 3)
                                                          + perturb.get("max_adv_train_steps", 6))
    seconds += perturb_steps * images * GPU_SECONDS["train_step_per_image"]
    train_stages = [s for s in stages if s.name.startswith("train:")]
    seconds += sum(new_training_steps(s) * s.flags.get("train_batch_size", 1) for s in train_stages) \
        * GPU_SECONDS["train_step_per_image"]
    num_scored = experiment.get("num_member_images", 1000) * 2
    calls = sum(ATTACK_UNET_CALLS.get(attack, 20) for attack in experiment["attacks"])
    seconds += (len(train_stages) + 1) * num_scored * calls * GPU_SECONDS["attack_unet_forward"]
    # Sampling: each model's utility generations, and the extraction stages' (2 prompt templates per domain).
    for stage in stages:
        if stage.script == "evaluate.py":
            per_prompt = max(stage.flags.get("num_images_per_prompt", 4), stage.flags.get("num_extraction_samples", 0))
            seconds += per_prompt * num_domains * 2 * GPU_SECONDS["sample_image"] \
                * stage.flags.get("num_inference_steps", 50) / 50
    return seconds * UNET_COST_RATIO[experiment.get("architecture", "sd")] / 3600


def new_training_steps(stage):
    """The updates a training stage runs: its --max_train_steps, less those of the checkpoint it resumes from (a
    dose-response level continues the level below)."""
    steps = stage.flags.get("max_train_steps", 400)
    resumed = stage.flags.get("resume_from_checkpoint")
    return steps - int(Path(resumed).name.removeprefix("checkpoint-")) if resumed else steps


# UNet calls per image of each attack at its default flags (the attack scripts' docstrings), for the estimate.
ATTACK_UNET_CALLS = {"secmi": 16, "pia": 102, "loss": 1, "sima": 20, "clid": 15, "pfami": 110}


def copy_report(report_dir, results_dir):
    results_dir.mkdir(parents=True, exist_ok=True)
    for name in ("REPORT.md", "figure4.png", "dose_response.png", "summary.json", "timings.json"):
        if (report_dir / name).exists():
            shutil.copy2(report_dir / name, results_dir / name)


def main(args):
    with OutputLock(args.output_dir):  # a second study into this folder is refused
        config, output_dir = load_config(args.config, quick=args.quick), Path(args.output_dir)
        workers = args.workers or config["experiment"].get("workers", 1)
        stages, models = plan_study(config, output_dir)
        for stage in stages:
            if args.num_processes > 1 and stage.script != "evaluate.py" and stage.name != "victim":
                stage.num_processes = args.num_processes
        print(f"MixSyn study '{config['experiment']['name']}': {len(stages)} stages ({len(models)} fine-tuned models)")
        if args.dry_run:
            run_stages(stages, output_dir / "logs", dry_run=True)
            architecture = config["experiment"].get("architecture", "sd")
            print(f"Estimated cost: {gpu_hours_estimate(config, stages):.1f} GPU-hours (A100-class, {architecture}; "
                  "see GPU_SECONDS and UNET_COST_RATIO)")
            return None
        start, timings_path = time.time(), output_dir / "report" / "timings.json"
        # Every stage's run time as recorded when it ran (a resumed or re-reported study keeps the earlier ones).
        timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
        if not args.report_only:
            timings.update(run_stages(stages, output_dir / "logs", workers=workers))
            timings_path.parent.mkdir(parents=True, exist_ok=True)
            timings_path.write_text(json.dumps(timings, indent=2) + "\n")
        summary = write_report(config, output_dir, list(models.values()), output_dir / "report",
                               stage_seconds=sum(timings.values()), workers=workers)
        print(f"Report: {output_dir / 'report' / 'REPORT.md'} ({time.time() - start:.0f} s)")
        if args.results_dir:
            copy_report(output_dir / "report", Path(args.results_dir))
        return summary


if __name__ == "__main__":
    run_cli(main, parse_args)
