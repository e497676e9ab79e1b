#!/usr/bin/env python
"""Training-loop overhead of the three MixSyn fine-tuning scripts, and their peak memory vs dataset size.

1. Steps/s of each script (its `train_loop`, data loading included) against a bare loop on the same
   model, batch and precision: VAE encode + text encode + UNet forward/backward + optimizer step on one
   preloaded batch. Target: script / bare ≥ 0.9.
2. Peak resident memory of a LoRA run on 1k vs 10k synthetic rows (each in its own process), mixed
   with a perturbed copy; it should not grow with the number of rows.

    HF_HUB_OFFLINE=1 python benchmarks/bench_training.py            # builds a fast tiny victim
    HF_HUB_OFFLINE=1 python benchmarks/bench_training.py --victim_dir outputs/demo/victim --steps 50
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
FAST_VICTIM_ARGS = ["--members_per_domain", "4", "--nonmembers_per_domain", "4", "--vae_steps", "60",
                    "--unet_steps", "150", "--train_batch_size", "40", "--skip_report"]


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victim_dir", type=str, default=None, help="A make_tiny_victim.py folder (default: build).")
    parser.add_argument("--steps", type=int, default=30, help="Timed updates per loop.")
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="Interleaved repeats; the best of each is kept.")
    parser.add_argument("--memory_rows", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--memory_image_size", type=int, default=64,
                        help="Side of the memory-test images: large enough that 10k rows in RAM would show.")
    parser.add_argument("--memory_only", action="store_true", help="Skip the loop-overhead part.")
    parser.add_argument("--memory_child", type=str, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(input_args)


def make_dataset(output_dir, num_rows, seed=0, eps=0.0, image_size=16):
    """`num_rows` random `image_size`-px images with captions "The face of <digit name>" (+ uniform ±eps noise).

    A noisy copy records its budget `pgd_eps` = eps in its provenance, as `perturb_antidreambooth.py` does: the
    training scripts check every perturbed image against its clean one within that budget before mixing.
    """
    import datasets
    from PIL import Image

    from mixsyn_utils.dataset_io import dataset_provenance, with_provenance

    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    rng = np.random.default_rng(seed)
    noise_rng = np.random.default_rng(seed + 1)
    images = []
    for _ in range(num_rows):
        array = rng.integers(0, 256, size=(image_size, image_size, 3)).astype(np.float32)
        array = np.clip(array + noise_rng.uniform(-eps, eps, array.shape) * 127.5, 0, 255)
        images.append(Image.fromarray(array.round().astype(np.uint8)))
    domains = [names[i % 10] for i in range(num_rows)]
    dataset = datasets.Dataset.from_dict(
        {"id": [f"row-{i}" for i in range(num_rows)], "image": images,
         "prompt": [f"The face of {d}" for d in domains], "domain": domains},
        features=datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                    "prompt": datasets.Value("string"), "domain": datasets.Value("string")}))
    if eps > 0:
        dataset = with_provenance(dataset, dataset_provenance("bench_training.py", {"pgd_eps": eps, "seed": seed}))
    dataset.save_to_disk(str(output_dir))
    return output_dir


def script_argv(victim_dir, dataset_dir, perturbed_dir, output_dir, steps, batch_size):
    argv = ["--pretrained_model_name_or_path", str(Path(victim_dir) / "pipeline"), "--dataset_name", str(dataset_dir),
            "--output_dir", str(output_dir), "--max_train_steps", str(steps), "--train_batch_size", str(batch_size),
            "--checkpointing_steps", "1000000", "--seed", "0", "--lr_warmup_steps", "0", "--report_to", "tensorboard"]
    if perturbed_dir is not None:
        argv += ["--perturbed_dataset_name", str(perturbed_dir), "--mixup_ratio", "0.5"]
    return argv


def time_script(module, argv):
    """Seconds per update of the script's training loop, data loading included; loading and saving are not counted.

    The loop is inline in each script's `main`, between the creation of its "Steps" progress bar and that bar's
    `close()`: the script's `tqdm` is wrapped to time exactly that span, divided by the bar's total (the updates).
    """
    from study.runner import run_script_in_process

    timing = {}
    real_tqdm = module.tqdm

    def timed_tqdm(*args, **kwargs):
        bar = real_tqdm(*args, **kwargs)
        if kwargs.get("desc") != "Steps":
            return bar
        start, close = time.perf_counter(), bar.close

        def timed_close():
            if "seconds_per_step" not in timing:
                timing["seconds_per_step"] = (time.perf_counter() - start) / bar.total
            return close()

        bar.close = timed_close
        return bar

    module.tqdm = timed_tqdm
    try:
        run_script_in_process(module, argv)
    finally:
        module.tqdm = real_tqdm
    return timing["seconds_per_step"]


def time_bare_loop(victim_dir, method, steps, batch_size):
    """Seconds per update of the bare loop: one preloaded batch, the same trainable parameters as the script."""
    from mixsyn_utils.conditioning import encode_prompts, square_time_ids
    from mixsyn_utils.lora import add_lora_adapters
    from mixsyn_utils.models import (load_components, native_resolution, text_encoders_of, tokenize_prompts,
                                     tokenizers_of)

    torch.manual_seed(0)
    components = load_components(str(Path(victim_dir) / "pipeline"))
    unet, vae = components.unet, components.vae
    text_encoders, tokenizers = text_encoders_of(components), tokenizers_of(components)  # SDXL: two of each
    for model in (unet, vae, *text_encoders):
        model.requires_grad_(False)
    if method == "lora":
        import train_lora_mixsyn

        # The script's own LoRA defaults (rank, α, dropout, DoRA; the text encoders only with --train_text_encoder).
        args = train_lora_mixsyn.parse_args(["--pretrained_model_name_or_path", "x", "--dataset_name", "x"])
        add_lora_adapters(unet, text_encoders if args.train_text_encoder else (), rank=args.rank,
                          lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, use_dora=args.use_dora)
        params = [p for p in unet.parameters() if p.requires_grad]
    elif method == "dreambooth":
        unet.requires_grad_(True)
        params = list(unet.parameters())
    else:
        text_encoder = text_encoders[0]
        text_encoder.get_input_embeddings().requires_grad_(True)
        params = list(text_encoder.get_input_embeddings().parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    resolution = native_resolution(unet, vae)  # the scripts' default --resolution
    pixel_values = torch.rand(batch_size, 3, resolution, resolution) * 2 - 1
    input_ids = [tokenize_prompts(tokenizer, ["The face of three"] * batch_size) for tokenizer in tokenizers]
    time_ids = square_time_ids(resolution, batch_size)  # SDXL only (ignored for SD-1.x/2.x)
    scheduler = components.noise_scheduler

    def step():
        latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,))
        context = encode_prompts(text_encoders, input_ids).with_time_ids(time_ids)
        prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, **context.unet_kwargs()).sample
        torch.nn.functional.mse_loss(prediction, noise).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def memory_child(spec):
    """Run the LoRA script on the given dataset in this process; print the peak RSS in MiB."""
    import train_lora_mixsyn
    from study.runner import run_script_in_process

    config = json.loads(spec)
    run_script_in_process(train_lora_mixsyn, script_argv(config["victim_dir"], config["dataset"], config["perturbed"],
                                                  config["output_dir"], 20, 4))
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    end_kib = {key: int(status[key].split()[0]) for key in ("RssAnon", "RssFile") if key in status}
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork + exec, so a child would report
    # the parent's size at fork time (the parent holds the freshly built datasets) whenever that is larger.
    print(json.dumps({"peak_rss_mib": int(status["VmHWM"].split()[0]) / 1024,
                      **{f"end_{key}_mib": value / 1024 for key, value in end_kib.items()}}))


def main(args):
    if args.memory_child:
        return memory_child(args.memory_child)
    work_dir = Path(tempfile.mkdtemp(prefix="bench_training_"))
    victim_dir = args.victim_dir
    if victim_dir is None:
        import make_tiny_victim

        victim_dir = work_dir / "victim"
        make_tiny_victim.main(make_tiny_victim.parse_args(["--output_dir", str(victim_dir), *FAST_VICTIM_ARGS]))
    if not args.memory_only:
        loop_overhead(args, victim_dir, work_dir)
    peak_memory(args, victim_dir, work_dir)
    shutil.rmtree(work_dir, ignore_errors=True)


def loop_overhead(args, victim_dir, work_dir):
    import train_dreambooth_mixsyn
    import train_lora_mixsyn
    import train_textual_inversion_mixsyn

    dataset = make_dataset(work_dir / "data-200", 200)
    perturbed = make_dataset(work_dir / "data-200-perturbed", 200, eps=0.05)
    print(f"\n=== Loop overhead: {args.steps} updates, batch {args.train_batch_size}, fp32, CPU threads "
          f"{torch.get_num_threads()} ===")
    scripts = {"lora": train_lora_mixsyn, "dreambooth": train_dreambooth_mixsyn,
               "textual_inversion": train_textual_inversion_mixsyn}
    for method, module in scripts.items():
        # Interleaved repeats, best of each: the machine is shared, so the minimum is the least-disturbed run.
        script_s, bare_s = float("inf"), float("inf")
        for repeat in range(args.repeats):
            script_s = min(script_s, time_script(module, script_argv(
                victim_dir, dataset, perturbed, work_dir / f"out-{method}-{repeat}", args.steps, args.train_batch_size)))
            bare_s = min(bare_s, time_bare_loop(victim_dir, method, args.steps, args.train_batch_size))
        print(f"{method:>18}: script {1 / script_s:7.2f} steps/s, bare loop {1 / bare_s:7.2f} steps/s, "
              f"ratio {bare_s / script_s:.2f} (target >= 0.9)")


def peak_memory(args, victim_dir, work_dir):
    print(f"\n=== Peak memory of a LoRA run vs dataset rows ({args.memory_image_size}-px images; clean, and mixed "
          "with a perturbed copy at ratio 0.5) ===")
    for setting in ("clean", "mixed"):
        peaks = {}
        for rows in args.memory_rows:
            dataset = work_dir / f"mem-data-{rows}"
            perturbed = work_dir / f"mem-pert-{rows}"
            if not dataset.exists():
                make_dataset(dataset, rows, image_size=args.memory_image_size)
                make_dataset(perturbed, rows, eps=0.05, image_size=args.memory_image_size)
            spec = json.dumps({"victim_dir": str(victim_dir), "output_dir": str(work_dir / f"mem-{setting}-{rows}"),
                               "dataset": str(dataset), "perturbed": str(perturbed) if setting == "mixed" else None})
            child = subprocess.run([sys.executable, __file__, "--memory_child", spec], capture_output=True, text=True)
            if child.returncode != 0:
                sys.exit(f"memory run on {rows} rows failed:\n{child.stderr[-3000:]}")
            measured = json.loads(child.stdout.strip().splitlines()[-1])
            peaks[rows] = measured["peak_rss_mib"]
            print(f"{setting:>6} {rows:>7} rows: peak RSS {peaks[rows]:8.1f} MiB; at the end anonymous "
                  f"{measured.get('end_RssAnon_mib', float('nan')):.1f} MiB, file-backed "
                  f"{measured.get('end_RssFile_mib', float('nan')):.1f} MiB")
        rows = sorted(peaks)
        print(f"{setting:>6}: peak({rows[-1]}) / peak({rows[0]}) = {peaks[rows[-1]] / peaks[rows[0]]:.3f} (target ~1.0)")


if __name__ == "__main__":
    main(parse_args())
