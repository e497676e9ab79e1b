#!/usr/bin/env python
r"""PFAMI membership-inference attack on a diffusion model (Fu et al. 2023, "Probabilistic Fluctuation based
Membership Inference Attack for Diffusion Models", https://arxiv.org/abs/2308.12143, github wjfu99/MIA-Gen).

A member sits at a local maximum of the model's likelihood: the loss rises more around it than around a
non-member. For each image x and each neighbour x_n (a centre crop of strength λ_n zoomed back to full size,
`images.center_crop_zoom`, encoded by the same VAE rule as x), per timestep t:

    L_t(u) = (1/J) Σ_j ‖ε_j − ε̂(√ᾱ_t z₀(u) + √(1−ᾱ_t) ε_j, t, c)‖² / d        (`diffusion.loss_attack_scores`)
    R_{t,n} = (L_t(x_n) − L_t(x)) / L_t(x)                                       (`diffusion.pfami_fluctuations`)

The natural score, the mean fluctuation R̄ = mean_{t,n} R_{t,n}, is HIGHER for members, so the saved `score` is
−R̄ (members LOWER). `score_t{t}` = −mean_n R_{t,n}; `score_crop{n}` = −mean_t R_{t,n} (`score_crop5` with the
default strengths is the authors' PFAMI_Met statistic, which reads λ index 5 only).

Noise: ε_j = `diffusion.fixed_noise(seed, t, j)`, a `torch.Generator` seeded with
`derive_seed(--seed, SALT_ATTACK_NOISE=13, t, j)` drawing `torch.randn((1, C, h, w))`, the same for every image
and for x and all its neighbours. With `--vae_sample`, every neighbour of image i uses image i's posterior draw
(`derive_seed(--seed, i)`, i the global image index).

Defaults are the authors' (MIA-Gen `attack_model_PFAMI.py`, config.yaml): 10 neighbours of crop strength
λ = linspace(0.95, 0.70, 10) in pixel space, t = 0, 50, …, 450, one draw: (1 + 10) · 10 = 110 UNet calls per image.
Deviations from the authors:
- x and its neighbours share ε (common random numbers, a lower-variance fluctuation); the authors draw fresh
  noise on every call;
- `score` averages all neighbours (the paper's mean fluctuation); the authors' code reads λ index 5 only;
- no reference model is subtracted (PFAMI_Met calibrates against a model trained on other data; CLiD's
  Stable Diffusion re-run of PFAMI has none either);
- the UNet is conditioned on each image's caption (the authors' DDPMs are unconditional; CLiD's SD re-run
  conditions on the caption); `--null_prompt` is the unconditional variant;
- on a small image the crop size ⌊λ·R⌋ is coarse (16 px: 15, 14, 14, 13, 13, 12, 12, 12, 11, 11); the dataset
  info records the effective strengths.

    accelerate launch attack_pfami.py \
      --pretrained_model_name_or_path outputs/victim/pipeline \
      --member_dataset outputs/victim/members --nonmember_dataset outputs/victim/nonmembers \
      --output_dir outputs/scores/pfami
"""

import argparse
import logging

import mixsyn_utils.quiet  # noqa: F401  (first: silences library messages that are emitted at import time)
import numpy as np
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers.utils import check_min_version

# Shared with the other attack scripts (mixsyn_utils/):
from mixsyn_utils.attack_flags import (  # flags of every attack
    add_attack_args,
    check_attack_paths,
    add_noise_draws_arg,
    check_attack_args,
    check_attack_timesteps,
)
from mixsyn_utils.attack_scores import pfami_fluctuations  # R, the relative loss fluctuation
from mixsyn_utils.attacks import (  # members/non-members, the attacked model, pixels and z₀, scoring, output
    AttackedModel,
    assumed_time_ids,
    attack_inputs,
    batch_pixel_values,
    check_timestep,
    encode_pixel_latents,
    load_attack_data,
    load_attack_model,
    model_record,
    num_train_timesteps,
    score_all,
)
from mixsyn_utils.cli import ArgumentParser, InputError, run_cli  # one-line errors for bad input (argparse's included)
from mixsyn_utils.diffusion import FIXED_NOISE_FORMULA, NoisePredictor  # ε̂ of the model, the noise formula
from mixsyn_utils.flags import flag_values, require_positive  # flags written out; range checks
from mixsyn_utils.images import center_crop_zoom  # the neighbour x_λ
from mixsyn_utils.models import (  # the model's kind (SD3/Flux refused); native size; --mixed_precision -> dtype
    check_pretrained_model,
    configured_resolution,
    weight_dtype_of,
)
from mixsyn_utils.outputs import OutputLock  # one run at a time per output folder
from mixsyn_utils.resumable import run_signature  # what a resumed run must share with the killed one
from mixsyn_utils.scores import write_scores  # the scores dataset evaluate.py reads

# Fails with a clear message when the installed diffusers is older than the one these scripts are written for.
check_min_version("0.42.0")

logger = get_logger(__name__)


def parse_args(input_args=None):
    parser = ArgumentParser(
        description="PFAMI (probabilistic fluctuation) membership inference.", epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add_attack_args(parser)
    attack = parser.add_argument_group("attack")
    attack.add_argument("--attack_timesteps", type=int, nargs="+", default=list(range(0, 500, 50)),
                        help="Timesteps t in [0, T): the authors' 0, 50, …, 450 (CLiD's SD re-run uses 1, 51, …, 451).")
    add_noise_draws_arg(attack)
    attack.add_argument("--crop_strengths", type=float, nargs="+",
                        default=[float(value) for value in np.linspace(0.95, 0.70, 10)],
                        help="Neighbour strengths λ in (0, 1): the central ⌊λ·R⌋ pixels zoomed back to R. Default: "
                             "the authors' linspace(0.95, 0.70, 10); CLiD's SD re-run uses one neighbour, 0.825. Each "
                             "costs |T| × draws UNet calls and one VAE encode per image.")
    args = parser.parse_args(input_args)
    check_attack_args(args)
    require_positive(args, "num_noise_draws")
    check_attack_timesteps(args.attack_timesteps, allow_zero=True)
    for strength in args.crop_strengths:
        if not 0 < strength < 1:
            raise InputError(f"--crop_strengths must be in (0, 1), got {strength}")
    return args


def pfami_columns(batch, components, predictor, args, resolution):
    """One batch's score columns: neighbours cropped from the batch's pixels and encoded, then the fluctuations."""
    pixel_values = batch_pixel_values(batch.rows, resolution)
    neighbour_latents = [encode_pixel_latents(components.vae, center_crop_zoom(pixel_values, strength),
                                              args.vae_sample, args.seed, batch.first_index)
                         for strength in args.crop_strengths]
    fluctuations = pfami_fluctuations(predictor, batch.latents, neighbour_latents, batch.context,
                                      args.attack_timesteps, args.seed, args.num_noise_draws)
    by_timestep = np.stack([fluctuations[t].cpu().numpy() for t in args.attack_timesteps])  # (|T|, B, N)
    columns = {"score": -by_timestep.mean(axis=(0, 2))}
    if len(args.attack_timesteps) > 1:
        columns.update({f"score_t{t}": -by_timestep[i].mean(axis=1) for i, t in enumerate(args.attack_timesteps)})
    if len(args.crop_strengths) > 1:
        columns.update({f"score_crop{n}": -by_timestep[:, :, n].mean(axis=0) for n in range(len(args.crop_strengths))})
    return columns


def main(args):
    with OutputLock(args.output_dir):  # a second run into this folder is refused
        check_attack_paths(args)  # under the lock: the occupancy check and the lock are one step
        check_pretrained_model(args.pretrained_model_name_or_path, args.revision)  # its kind: SD3/Flux fail here
        accelerator = Accelerator(mixed_precision=args.mixed_precision)
        logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
        num_timesteps = num_train_timesteps(args.pretrained_model_name_or_path, args.revision)
        for t in args.attack_timesteps:
            check_timestep(t, num_timesteps, "--attack_timesteps", allow_zero=True)
        model = AttackedModel(args.pretrained_model_name_or_path, args.revision, args.variant, args.unet_path,
                              args.lora_weights, args.textual_inversion)
        resolution = args.resolution or configured_resolution(args.pretrained_model_name_or_path, args.revision,
                                                            args.unet_path)
        rows = load_attack_data(args.member_dataset, args.nonmember_dataset, args.caption_column, args.null_prompt,
                                args.textual_inversion, resolution)
        components = load_attack_model(model, accelerator.device, weight_dtype_of(accelerator.mixed_precision))
        predictor = NoisePredictor.of(components.unet, components.noise_scheduler)
        timesteps = args.attack_timesteps

        def score_batch(batch):
            return pfami_columns(batch, components, predictor, args, resolution)

        calls_per_image = (1 + len(args.crop_strengths)) * len(timesteps) * args.num_noise_draws
        effective_strengths = [int(resolution * strength) / resolution for strength in args.crop_strengths]
        logger.info("***** Running PFAMI *****")
        logger.info(f"  Images = {len(rows)} ({sum(row['is_member'] for row in rows)} members), "
                    f"timesteps = {timesteps}, "
                    f"crop strengths = {args.crop_strengths} (effective {effective_strengths}), "
                    f"UNet calls per image = {calls_per_image}")
        logger.info(f"  Resolution = {resolution}, batch size = {args.batch_size}, "
                    f"processes = {accelerator.num_processes}")
        signature = run_signature(flag_values(args), attack_inputs(model, args.member_dataset, args.nonmember_dataset))
        scores, work = score_all(rows, components, score_batch, accelerator=accelerator, output_dir=args.output_dir,
                                 signature=signature, resolution=resolution, batch_size=args.batch_size,
                                 vae_sample=args.vae_sample, seed=args.seed, latents_cache_dir=args.latents_cache_dir,
                                 overwrite=args.overwrite, desc="pfami")

        if accelerator.is_main_process:
            extra = {"attack_timesteps": timesteps, "num_noise_draws": args.num_noise_draws,
                     "crop_strengths": args.crop_strengths, "effective_crop_strengths": effective_strengths,
                     "unet_calls_per_image": calls_per_image, "vae_encodes_per_image": 1 + len(args.crop_strengths),
                     "resolution": resolution,
                     "time_ids": assumed_time_ids(components, resolution),
                     "noise": f"{FIXED_NOISE_FORMULA}, shared by all images and neighbours"}
            dataset = write_scores(scores, args.output_dir, script="attack_pfami.py", attack="pfami",
                                   flags=flag_values(args), model=model_record(model), extra=extra,
                                   push_to_hub=args.push_to_hub, hub_dataset_id=args.hub_dataset_id,
                                   hub_token=args.hub_token)
            work.cleanup()
            logger.info(f"Saved {len(dataset)} scores to {args.output_dir}")
        accelerator.wait_for_everyone()
        accelerator.end_training()


if __name__ == "__main__":
    run_cli(main, parse_args)
