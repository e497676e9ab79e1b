#!/usr/bin/env python
"""Training throughput of `train_lora_mixsyn.py` on an SDXL base against diffusers' own SDXL LoRA scripts.

The upstream scripts are run as they are published, from a diffusers checkout given with `--upstream_dir` (its
`examples/` folder or any folder holding `train_text_to_image_lora_sdxl.py` and `train_dreambooth_lora_sdxl.py`),
side by side with this repo's script on the same tiny SDXL-architecture victim, the same images and captions
(written once as an imagefolder and an instance folder), the same flags and the same number of steps:

- text-to-image LoRA: `--train_data_dir <imagefolder> --caption_column text` for both;
- DreamBooth LoRA: `--instance_data_dir <folder> --instance_prompt "a photo of sks digit"` for both.

Throughput = extra steps / extra CPU seconds between a run of `--steps` and one of `--short_steps` steps (the child
processes' user + system time): start-up, upstream's one-off precomputation of the dataset's latents and text
embeddings, saving and the final reload cancel out, and CPU time, unlike wall time, does not grow when other jobs
share the cores. One thread per process (`OMP_NUM_THREADS=1`). Ratio = ours / upstream; target ≥ 1.0.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/bench_sdxl_upstream_speed.py \\
        --upstream_dir path/to/diffusers/examples --output benchmarks/results/sdxl_upstream_speed.json
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
UPSTREAM_SCRIPTS = {"text_to_image": "train_text_to_image_lora_sdxl.py", "dreambooth": "train_dreambooth_lora_sdxl.py"}
INSTANCE_PROMPT = "a photo of sks digit"
# The tests' fast SDXL victim (tests/conftest.py FAST_SDXL_VICTIM_ARGS): the speed of a training step does not
# depend on how well the victim was pretrained.
FAST_SDXL_VICTIM_ARGS = ["--architecture", "sdxl", "--image_size", "16", "--vae_block_out_channels", "32", "64",
                         "--members_per_domain", "4", "--nonmembers_per_domain", "4", "--vae_steps", "30",
                         "--unet_steps", "40", "--train_batch_size", "40", "--rprecision_steps", "30", "--skip_report"]


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream_dir", type=str, required=True,
                        help="A folder with diffusers' train_text_to_image_lora_sdxl.py and "
                             "train_dreambooth_lora_sdxl.py (found there or in text_to_image/ and dreambooth/).")
    parser.add_argument("--victim_dir", type=str, default=None,
                        help="A `make_tiny_victim.py --architecture sdxl` folder (default: build the tests' fast one).")
    parser.add_argument("--steps", type=int, default=205,
                        help="Steps of the long run (a tiny model's step costs milliseconds: the difference needs many).")
    parser.add_argument("--short_steps", type=int, default=5, help="Steps of the short run (subtracted).")
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="Interleaved repeats; the fastest of each is kept.")
    parser.add_argument("--output", type=str, default="benchmarks/results/sdxl_upstream_speed.json")
    return parser.parse_args(input_args)


def upstream_script(upstream_dir, name):
    """Path of an upstream script in `upstream_dir` or its `text_to_image/` / `dreambooth/` subfolder."""
    for candidate in (Path(upstream_dir) / name, *Path(upstream_dir).glob(f"*/{name}")):
        if candidate.is_file():
            return candidate
    sys.exit(f"error: --upstream_dir {upstream_dir} has no {name}")


def write_image_folders(victim_dir, work_dir):
    """The victim's member images as an imagefolder with a `text` caption column, and as a bare instance folder."""
    from datasets import load_from_disk

    imagefolder, instances = work_dir / "imagefolder", work_dir / "instances"
    imagefolder.mkdir()
    instances.mkdir()
    rows = load_from_disk(str(Path(victim_dir) / "members"))
    with open(imagefolder / "metadata.jsonl", "w") as metadata:
        for index, row in enumerate(rows):
            row["image"].save(imagefolder / f"{index:04d}.png")
            row["image"].save(instances / f"{index:04d}.png")
            metadata.write(json.dumps({"file_name": f"{index:04d}.png", "text": row["prompt"]}) + "\n")
    return imagefolder, instances


def common_flags(args, resolution, steps, output_dir):
    return ["--resolution", str(resolution), "--train_batch_size", str(args.train_batch_size), "--max_train_steps",
            str(steps), "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
            "--seed", "0", "--rank", "4", "--dataloader_num_workers", "0", "--checkpointing_steps", "100000",
            "--output_dir", str(output_dir)]


def run_cpu_seconds(script, argv, work_dir):
    """CPU seconds (user + system) of `accelerate launch script argv` and everything it starts."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--num_processes", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(script), *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, cwd=work_dir, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: {Path(script).name} failed:\n{result.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(args):
    import make_tiny_victim

    work_dir = Path(tempfile.mkdtemp(prefix="sdxl_upstream_speed_"))
    victim_dir = args.victim_dir
    if victim_dir is None:
        victim_dir = work_dir / "victim"
        make_tiny_victim.main(make_tiny_victim.parse_args(["--output_dir", str(victim_dir), "--seed", "0",
                                                           *FAST_SDXL_VICTIM_ARGS]))
    resolution = json.loads((Path(victim_dir) / "victim_info.json").read_text())["image_size"]
    imagefolder, instances = write_image_folders(victim_dir, work_dir)
    model = ["--pretrained_model_name_or_path", str(Path(victim_dir).resolve() / "pipeline")]
    data = {"text_to_image": ["--train_data_dir", str(imagefolder), "--caption_column", "text"],
            "dreambooth": ["--instance_data_dir", str(instances), "--instance_prompt", INSTANCE_PROMPT]}
    scripts = {"upstream": {task: upstream_script(args.upstream_dir, name) for task, name in UPSTREAM_SCRIPTS.items()},
               "mixsyn": {task: REPO_ROOT / "train_lora_mixsyn.py" for task in UPSTREAM_SCRIPTS}}
    best = {}  # (task, side, steps) -> fewest CPU seconds over the repeats
    for repeat in range(args.repeats):
        for task in UPSTREAM_SCRIPTS:
            for side in ("upstream", "mixsyn"):
                for steps in (args.short_steps, args.steps):
                    output_dir = work_dir / f"out_{task}_{side}_{steps}_{repeat}"
                    seconds = run_cpu_seconds(scripts[side][task], model + data[task]
                                              + common_flags(args, resolution, steps, output_dir), work_dir)
                    key = (task, side, steps)
                    best[key] = min(seconds, best.get(key, float("inf")))
                    print(f"{task:14s} {side:8s} {steps:3d} steps: {seconds:7.1f} CPU s", flush=True)
    results = {"victim_resolution": resolution, "train_batch_size": args.train_batch_size,
               "steps": [args.short_steps, args.steps], "repeats": args.repeats, "tasks": {}}
    for task in UPSTREAM_SCRIPTS:
        rate = {side: (args.steps - args.short_steps) / (best[(task, side, args.steps)]
                                                         - best[(task, side, args.short_steps)])
                for side in ("upstream", "mixsyn")}
        results["tasks"][task] = {"upstream_script": UPSTREAM_SCRIPTS[task], "steps_per_cpu_second": rate,
                                  "ratio": rate["mixsyn"] / rate["upstream"],
                                  "cpu_seconds": {f"{side}_{steps}": best[(task, side, steps)]
                                                  for side in ("upstream", "mixsyn")
                                                  for steps in (args.short_steps, args.steps)}}
        print(f"{task}: mixsyn {rate['mixsyn']:.3f} vs upstream {rate['upstream']:.3f} steps per CPU s "
              f"= {rate['mixsyn'] / rate['upstream']:.2f}x (target >= 1.0)")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main(parse_args())
