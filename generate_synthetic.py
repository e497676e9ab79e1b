#!/usr/bin/env python
"""MixSyn step 1: self-synthesize N images per private domain from the pretrained model itself.

For each domain, image i gets a prompt template drawn with the template probabilities (the paper's
"The face of {}" p=0.7 / "A photo of {}" p=0.3 by default) and a seed derived from `--seed` and i, so the
dataset is identical on 1 or many processes. Batches are sharded across `accelerate` processes; every
finished batch is saved at once and a killed run resumes without regenerating it.

    accelerate launch generate_synthetic.py \
      --pretrained_model_name_or_path outputs/victim/pipeline \
      --domains_file outputs/victim/domains.json --num_images_per_domain 20 \
      --output_dir outputs/synthetic
"""

import argparse
import logging

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from mixsyn_utils import (
    InputError,
    PartialResults,
    check_output_dir,
    check_resolution,
    dataset_provenance,
    derive_seed,
    draw_prompt,
    load_domains,
    run_cli,
    save_dataset,
    shard_units,
    with_provenance,
)
from mixsyn_utils.models import add_pretrained_model_args

logger = get_logger(__name__)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="Self-synthesize images per private domain (MixSyn step 1).")
    add_pretrained_model_args(parser)
    parser.add_argument("--domains_file", type=str, default=None,
                        help="A .json ({'domains': [...], 'templates': [...]}) or .txt (one name per line) file.")
    parser.add_argument("--domain", action="append", default=None, help="A domain name; repeat for several.")
    parser.add_argument("--num_images_per_domain", type=int, default=100,
                        help="Images generated per domain (the paper uses 100).")
    parser.add_argument("--num_inference_steps", type=int, default=50, help="Sampler steps.")
    parser.add_argument("--guidance_scale", type=float, default=7.5, help="Classifier-free guidance scale.")
    parser.add_argument("--negative_prompt", type=str, default=None, help="Negative prompt for every image.")
    parser.add_argument("--resolution", type=int, default=None,
                        help="Output size in pixels (multiple of 8); default: the model's native resolution.")
    parser.add_argument("--sample_batch_size", type=int, default=4, help="Images per pipeline call.")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                        help="Weights dtype; default: the accelerate config.")
    parser.add_argument("--seed", type=int, default=0, help="Base seed; image i uses a seed derived from it and i.")
    parser.add_argument("--output_dir", type=str, required=True, help="Where the dataset is saved (save_to_disk).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing non-empty --output_dir.")
    parser.add_argument("--push_to_hub", action="store_true", help="Also push the dataset to the Hub (private).")
    parser.add_argument("--hub_dataset_id", type=str, default=None, help="Hub dataset repo id for --push_to_hub.")
    parser.add_argument("--hub_token", type=str, default=None, help="Hub token (prefer `huggingface-cli login`).")
    args = parser.parse_args(input_args)

    if args.num_images_per_domain <= 0:
        raise InputError(f"--num_images_per_domain must be positive, got {args.num_images_per_domain}")
    if args.sample_batch_size <= 0:
        raise InputError(f"--sample_batch_size must be positive, got {args.sample_batch_size}")
    if args.num_inference_steps <= 0:
        raise InputError(f"--num_inference_steps must be positive, got {args.num_inference_steps}")
    check_resolution(args.resolution)
    args.domain_names, args.prompt_templates = load_domains(args.domains_file, args.domain)
    return args


def plan_images(domain_names, templates, num_images_per_domain, seed):
    """Every image to make: id, domain, prompt and seed, in a fixed global order."""
    plan = []
    for domain_index, domain in enumerate(domain_names):
        for k in range(num_images_per_domain):
            index = domain_index * num_images_per_domain + k
            plan.append({
                "id": f"syn-{domain}-{k:05d}".replace(" ", "_"),
                "domain": domain,
                "prompt": draw_prompt(domain, templates, seed, index),
                "seed": derive_seed(seed, index),
            })
    return plan


def generate_batch(pipeline, rows, args, device):
    """One pipeline call; each image has its own generator, so its pixels do not depend on its batch-mates."""
    generators = [torch.Generator(device="cpu").manual_seed(row["seed"]) for row in rows]
    return pipeline(
        [row["prompt"] for row in rows],
        negative_prompt=[args.negative_prompt] * len(rows) if args.negative_prompt else None,
        height=args.resolution, width=args.resolution,
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
        generator=generators, output_type="pil",
    ).images


def main(args):
    from datasets import Dataset, Features, Image as ImageFeature, Value
    from diffusers import StableDiffusionPipeline

    check_output_dir(args.output_dir, args.overwrite)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    plan = plan_images(args.domain_names, args.prompt_templates, args.num_images_per_domain, args.seed)
    batches = [plan[start : start + args.sample_batch_size] for start in range(0, len(plan), args.sample_batch_size)]
    partial = PartialResults(args.output_dir)
    meta = {key: getattr(args, key) for key in (
        "pretrained_model_name_or_path", "revision", "variant", "domain_names", "prompt_templates",
        "num_images_per_domain", "num_inference_steps", "guidance_scale", "negative_prompt", "resolution",
        "sample_batch_size", "seed")}
    meta["prompt_templates"] = [list(pair) for pair in meta["prompt_templates"]]
    if accelerator.is_main_process:
        partial.write_meta(meta)
    accelerator.wait_for_everyone()

    pipeline = StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant,
        torch_dtype=weight_dtype, safety_checker=None, requires_safety_checker=False,
    ).to(accelerator.device)
    pipeline.set_progress_bar_config(disable=True)
    if args.resolution is None:
        args.resolution = pipeline.unet.config.sample_size * pipeline.vae_scale_factor

    my_batches = shard_units(range(len(batches)), accelerator.process_index, accelerator.num_processes)
    todo = [b for b in my_batches if not partial.is_done(b)]
    logger.info("***** Generating synthetic images *****")
    logger.info(f"  Domains = {len(args.domain_names)}, images per domain = {args.num_images_per_domain}")
    logger.info(f"  Batches on this process = {len(my_batches)} ({len(my_batches) - len(todo)} already done)")
    features = Features({"id": Value("string"), "image": ImageFeature(), "prompt": Value("string"),
                         "domain": Value("string"), "seed": Value("int64")})
    progress = tqdm(total=len(my_batches), initial=len(my_batches) - len(todo), desc="Generating",
                    disable=not accelerator.is_local_main_process)
    for batch_index in todo:
        rows = batches[batch_index]
        images = generate_batch(pipeline, rows, args, accelerator.device)
        partial.save(batch_index, Dataset.from_list([dict(row, image=image) for row, image in zip(rows, images)],
                                                    features=features))
        progress.update(1)
    progress.close()
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        dataset = partial.load(range(len(batches)))
        with_provenance(dataset, dataset_provenance("generate_synthetic.py", args))
        save_dataset(dataset, args.output_dir, args.push_to_hub, args.hub_dataset_id, hub_token=args.hub_token)
        partial.cleanup()
        logger.info(f"Saved {len(dataset)} images to {args.output_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    run_cli(main, parse_args)
