#!/usr/bin/env python
r"""MixSyn step 1: self-synthesize N images per private domain from the pretrained model itself (SD-1.x/2.x or SDXL,
read from its model_index.json: an SDXL base samples with both text encoders and its default size conditioning).

For each domain, image i gets a prompt template drawn with the template probabilities (the paper's
"The face of {}" p=0.7 / "A photo of {}" p=0.3 by default) and a seed derived from `--seed` and i, so the
dataset is identical on 1 or many processes. Batches are sharded across `accelerate` processes; every
finished batch is saved at once and a killed run resumes without regenerating it.

    accelerate launch generate_synthetic.py \
      --pretrained_model_name_or_path outputs/victim/pipeline \
      --domains_file outputs/victim/domains.json --num_images_per_domain 20 \
      --output_dir outputs/synthetic
"""

import logging

import mixsyn_utils.quiet  # noqa: F401  (first: silences library messages that are emitted at import time)
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers.utils import check_min_version

# Shared with the other scripts (mixsyn_utils/):
from mixsyn_utils.cli import ArgumentParser, InputError, run_cli  # one-line errors for bad input (argparse's included)
from mixsyn_utils.dataset_io import dataset_provenance, save_dataset, with_provenance  # saved whole, with provenance
from mixsyn_utils.domains import domain_id, draw_prompt, load_domains  # domains, ids and the paper's prompt templates
from mixsyn_utils.flags import (  # flag groups shared with the other scripts, written out by flag_values
    add_dataset_output_args,
    add_mixed_precision_arg,
    add_pretrained_model_args,
    add_resolution_arg,
    check_outputs_apart,
    flag_values,
    require_non_negative,
    require_positive,
)
from mixsyn_utils.images import check_resolution
from mixsyn_utils.models import (  # the model checked before loading; default size; --mixed_precision -> dtype
    check_pretrained_model,
    native_resolution,
    weight_dtype_of,
)
from mixsyn_utils.outputs import OutputLock, check_output_dir  # one run per output folder; occupied ones refused
from mixsyn_utils.resumable import (  # batches saved as they finish; a killed run with the same inputs resumes
    ResumableWork,
    input_fingerprint,
    run_signature,
)
from mixsyn_utils.seeds import derive_seed  # image i's seed, independent of batch and process
from mixsyn_utils.variants import load_pipeline  # StableDiffusion(XL)Pipeline by the model's kind

# Fails with a clear message when the installed diffusers is older than the one these scripts are written for.
check_min_version("0.42.0")

logger = get_logger(__name__)


def parse_args(input_args=None):
    parser = ArgumentParser(description="Self-synthesize images per private domain (MixSyn step 1).",
                            allow_abbrev=False)
    add_pretrained_model_args(parser)
    parser.add_argument("--domains_file", type=str, default=None,
                        help="A .json ({'domains': [...], 'templates': [...]}) or .txt (one name per line) file.")
    parser.add_argument("--domain", action="append", default=None, help="A domain name; repeat for several.")
    parser.add_argument("--num_images_per_domain", type=int, default=100,
                        help="Images generated per domain (the paper uses 100).")
    parser.add_argument("--num_inference_steps", type=int, default=50, help="Sampler steps.")
    parser.add_argument("--guidance_scale", type=float, default=7.5, help="Classifier-free guidance scale.")
    parser.add_argument("--negative_prompt", type=str, default=None, help="Negative prompt for every image.")
    add_resolution_arg(parser)
    parser.add_argument("--sample_batch_size", type=int, default=4, help="Images per pipeline call.")
    add_mixed_precision_arg(parser)
    parser.add_argument("--seed", type=int, default=0, help="Base seed; image i uses a seed derived from it and i.")
    add_dataset_output_args(parser)
    args = parser.parse_args(input_args)
    require_positive(args, "num_images_per_domain", "sample_batch_size", "num_inference_steps")
    require_non_negative(args, "guidance_scale", "seed")
    check_resolution(args.resolution)
    if args.domains_file is None and not args.domain:
        raise InputError("no domains given: pass --domains_file or --domain NAME")
    check_outputs_apart(args, ("output_dir",), ("pretrained_model_name_or_path", "domains_file"))
    return args


def plan_images(domain_names, templates, num_images_per_domain, seed):
    """Every image to make: id, domain, prompt and seed, in a fixed global order."""
    plan = []
    for domain_index, domain in enumerate(domain_names):
        for k in range(num_images_per_domain):
            index = domain_index * num_images_per_domain + k
            plan.append({
                "id": f"syn-{domain_id(domain)}-{k:05d}",
                "domain": domain,
                "prompt": draw_prompt(domain, templates, seed, index),
                "seed": derive_seed(seed, index),
            })
    return plan


def generate_batch(pipeline, rows, resolution, num_inference_steps, guidance_scale, negative_prompt=None):
    """One pipeline call; each image has its own generator, so its pixels do not depend on its batch-mates."""
    generators = [torch.Generator(device="cpu").manual_seed(row["seed"]) for row in rows]
    return pipeline(
        [row["prompt"] for row in rows],
        negative_prompt=[negative_prompt] * len(rows) if negative_prompt else None,
        height=resolution, width=resolution, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
        generator=generators, output_type="pil",
    ).images


def main(args):
    from datasets import Dataset, Features, Image as ImageFeature, Value

    with OutputLock(args.output_dir):  # a second run into this folder is refused
        check_output_dir(args.output_dir, args.overwrite)  # under the lock: the check and the lock are one step
        # A bad domains file or model path fails here, before any model loads.
        domain_names, templates = load_domains(args.domains_file, args.domain)
        check_pretrained_model(args.pretrained_model_name_or_path, args.revision)
        accelerator = Accelerator(mixed_precision=args.mixed_precision)
        logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
        plan = plan_images(domain_names, templates, args.num_images_per_domain, args.seed)
        batches = [plan[start : start + args.sample_batch_size]
                   for start in range(0, len(plan), args.sample_batch_size)]
        # The domains file's content, not only its path, fixes the images; so does the model's.
        signature = run_signature(flag_values(args), inputs={
            "domains": [domain_names, [list(pair) for pair in templates]],
            "pretrained_model": input_fingerprint(args.pretrained_model_name_or_path, args.revision)})
        work = ResumableWork(args.output_dir, signature, accelerator, discard_other_settings=args.overwrite)

        pipeline = load_pipeline(args.pretrained_model_name_or_path, args.revision, args.variant,
                                 weight_dtype_of(accelerator.mixed_precision)).to(accelerator.device)
        pipeline.set_progress_bar_config(disable=True)
        resolution = args.resolution or native_resolution(pipeline.unet, pipeline.vae)
        features = Features({"id": Value("string"), "image": ImageFeature(), "prompt": Value("string"),
                             "domain": Value("string"), "seed": Value("int64")})

        def generate_unit(unit):
            rows = batches[unit]
            images = generate_batch(pipeline, rows, resolution, args.num_inference_steps, args.guidance_scale,
                                    args.negative_prompt)
            return Dataset.from_list([dict(row, image=image) for row, image in zip(rows, images)], features=features)

        logger.info("***** Generating synthetic images *****")
        logger.info(f"  Domains = {len(domain_names)}, images per domain = {args.num_images_per_domain}, "
                    f"batches = {len(batches)}, processes = {accelerator.num_processes}")
        dataset = work.run(len(batches), generate_unit, desc="Generating")

        if accelerator.is_main_process:
            provenance = dataset_provenance("generate_synthetic.py", flag_values(args),
                                            extra={"domains": domain_names, "resolution": resolution})
            save_dataset(with_provenance(dataset, provenance), args.output_dir, args.push_to_hub, args.hub_dataset_id,
                         hub_token=args.hub_token)
            work.cleanup()
            logger.info(f"Saved {len(dataset)} images to {args.output_dir}")
        accelerator.wait_for_everyone()
        accelerator.end_training()


if __name__ == "__main__":
    run_cli(main, parse_args)
