#!/usr/bin/env python
"""PIA membership-inference attack on a Stable Diffusion model (Kong et al. 2023, https://arxiv.org/abs/2308.06405).

For each image, ε₀ = ε̂(z₀, 0) is the model's own noise prediction at t = 0; the image is noised with it,
z_t = √ᾱ_t z₀ + √(1−ᾱ_t) ε₀, and the score is Σ|ε̂(z_t, t) − ε₀|^p: a member's noise is recovered more
accurately, so members score LOWER. `--method pian` normalises ε₀ to the scale of N(0, I) first.

    accelerate launch attack_pia.py \
      --pretrained_model_name_or_path outputs/victim/pipeline \
      --member_dataset outputs/victim/members --nonmember_dataset outputs/victim/nonmembers \
      --attack_timesteps 200 --output_dir outputs/scores/pia

The scores dataset (id, domain, is_member, score[, score_t{t}]) is what `evaluate.py` reads.
"""

import argparse
import logging

import mixsyn_utils.quiet  # noqa: F401  (first: silences library messages that are emitted at import time)
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

# Shared with the other attack scripts (mixsyn_utils/):
from mixsyn_utils.attacks import (  # members/non-members, the attacked model, sharded resumable scoring, output
    attack_resolution,
    check_timestep,
    load_attack_data,
    load_attack_model,
    num_train_timesteps,
    score_all,
    write_scores,
)
from mixsyn_utils.cli import InputError, run_cli  # one-line errors for bad input
from mixsyn_utils.diffusion import alphas_cumprod, pia_scores  # the PIA score (equations in its docstring)
from mixsyn_utils.flags import add_attack_args, check_attack_args  # model, data and output flags of every attack
from mixsyn_utils.models import weight_dtype_of  # --mixed_precision -> dtype of the weights
from mixsyn_utils.outputs import check_output_dir  # an occupied --output_dir is refused before any work

logger = get_logger(__name__)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="PIA / PIAN membership inference on a diffusion model.",
                                     allow_abbrev=False)
    add_attack_args(parser)
    attack = parser.add_argument_group("attack")
    attack.add_argument("--method", type=str, default="pia", choices=["pia", "pian"],
                        help="pia: ε₀ = ε̂(z₀, 0); pian: ε₀ normalised to E|N(0,1)| (paper's PIAN).")
    attack.add_argument("--attack_timesteps", type=int, nargs="+", default=[200],
                        help="Timesteps t in (0, T) to score; several are scored from one ε₀ (columns score_t{t}), "
                             "`score` is their mean. The paper's best t is around 200 for latent models.")
    attack.add_argument("--lp", type=float, default=4.0,
                        help="Exponent p of Σ|ε̂ − ε₀|^p; the paper finds p = 4 best.")
    args = parser.parse_args(input_args)
    check_attack_args(args)
    if args.lp <= 0:
        raise InputError(f"--lp must be positive, got {args.lp}")
    if len(set(args.attack_timesteps)) != len(args.attack_timesteps):
        raise InputError(f"--attack_timesteps lists a timestep twice: {args.attack_timesteps}")
    for t in args.attack_timesteps:
        if t <= 0:
            raise InputError(f"--attack_timesteps must be in (0, T), got {t}")
    return args


def main(args):
    check_output_dir(args.output_dir, args.overwrite)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    for t in args.attack_timesteps:
        check_timestep(t, num_train_timesteps(args), "--attack_timesteps")
    rows = load_attack_data(args)
    components = load_attack_model(args, accelerator.device, weight_dtype_of(accelerator.mixed_precision))
    resolution = attack_resolution(args, components)
    alpha_bar = alphas_cumprod(components.noise_scheduler).to(accelerator.device)

    def score_batch(latents, context):
        by_timestep = pia_scores(components.unet, latents, context, alpha_bar, args.attack_timesteps, lp=args.lp,
                                 normalised=args.method == "pian")
        columns = {"score": torch.stack([by_timestep[t] for t in args.attack_timesteps]).mean(0)}
        if len(args.attack_timesteps) > 1:
            columns.update({f"score_t{t}": by_timestep[t] for t in args.attack_timesteps})
        return columns

    calls_per_image = 1 + len(args.attack_timesteps)
    logger.info(f"***** Running {args.method.upper()} *****")
    logger.info(f"  Images = {len(rows)} ({sum(row['is_member'] for row in rows)} members), "
                f"timesteps = {args.attack_timesteps}, p = {args.lp}, UNet calls per image = {calls_per_image}")
    logger.info(f"  Resolution = {resolution}, batch size = {args.batch_size}, processes = {accelerator.num_processes}")
    scores, work = score_all(rows, components, args, resolution, accelerator, score_batch, desc=args.method)

    if accelerator.is_main_process:
        extra = {"attack_timesteps": args.attack_timesteps, "lp": args.lp, "unet_calls_per_image": calls_per_image,
                 "resolution": resolution}
        dataset = write_scores(scores, "attack_pia.py", args.method, args, extra=extra)
        work.cleanup()
        logger.info(f"Saved {len(dataset)} scores to {args.output_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    run_cli(main, parse_args)
