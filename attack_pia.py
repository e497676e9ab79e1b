#!/usr/bin/env python
r"""PIA membership-inference attack on a Stable Diffusion model (Kong et al. 2023, https://arxiv.org/abs/2308.06405).

For each image, ε₀ = ε̂(z₀, 0) is the model's own noise prediction at t = 0; the image is noised with it,
z_t = √ᾱ_t z₀ + √(1−ᾱ_t) ε₀, and the score is Σ|ε̂(z_t, t) − ε₀|^p: a member's noise is recovered more
accurately, so members score LOWER. `--method pian` normalises ε₀ to the scale of N(0, I) first. No noise is
drawn: the score is deterministic given z₀.

Defaults are the authors' Stable Diffusion script (kong13661/PIA `stable_diffusion/stable_attack.py`): every
t in 10, 20, …, 500, p = 4, and classifier-free guidance 7.5 with the caption and "" on both UNet evaluations
(1 + 50 calls per image, each of 2 rows). `--guidance_scale 1` is the unguided variant CLiD's and SimA's
re-runs use. Deviations from the authors' script: ᾱ_t is the model's own schedule (theirs is a linear β
schedule, not SD's scaled-linear), the latents are not mapped by 2z − 1, and `score` (the mean over t) is ours;
the authors print a figure per t, which `score_t{t}` holds.

    accelerate launch attack_pia.py \
      --pretrained_model_name_or_path outputs/victim/pipeline \
      --member_dataset outputs/victim/members --nonmember_dataset outputs/victim/nonmembers \
      --attack_timesteps 200 --output_dir outputs/scores/pia

The scores dataset (id, domain, is_member, score[, score_t{t}]) is what `evaluate.py` reads.
"""

import argparse
import logging

import mixsyn_utils.quiet  # noqa: F401  (first: silences library messages that are emitted at import time)
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers.utils import check_min_version

# Shared with the other attack scripts (mixsyn_utils/):
from mixsyn_utils.attack_flags import (  # flags of every attack
    add_attack_args,
    check_attack_args,
    check_attack_paths,
    check_attack_timesteps,
)
from mixsyn_utils.attack_scores import pia_scores  # the PIA score (equations there)
from mixsyn_utils.attacks import (  # members/non-members, the attacked model, sharded resumable scoring, columns
    AttackedModel,
    assumed_time_ids,
    attack_inputs,
    check_timestep,
    load_attack_data,
    load_attack_model,
    model_record,
    num_train_timesteps,
    score_all,
    timestep_columns,
)
from mixsyn_utils.cli import ArgumentParser, run_cli  # one-line errors for bad input (argparse's included)
from mixsyn_utils.diffusion import NoisePredictor  # ε̂ of the model
from mixsyn_utils.flags import flag_values, require_non_negative, require_positive  # flags written out; ranges
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
        description="PIA / PIAN membership inference on a diffusion model.", epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add_attack_args(parser)
    attack = parser.add_argument_group("attack")
    attack.add_argument("--method", type=str, default="pia", choices=["pia", "pian"],
                        help="pia: ε₀ = ε̂(z₀, 0); pian: ε₀ normalised to E|N(0,1)| (paper's PIAN).")
    attack.add_argument("--attack_timesteps", type=int, nargs="+", default=list(range(10, 501, 10)),
                        help="Timesteps t in (0, T) to score, all from one ε₀ (columns score_t{t}; `score` is their "
                             "mean). Default: the authors' SD sweep 10, 20, …, 500 (1 + 50 UNet calls per image); "
                             "one t (e.g. 200, their DDPM setting) is a cheap run.")
    attack.add_argument("--lp", type=float, default=4.0,
                        help="Exponent p of Σ|ε̂ − ε₀|^p; 4 is the authors' default (their PIA class).")
    attack.add_argument("--guidance_scale", type=float, default=7.5,
                        help="Classifier-free guidance w on both UNet evaluations, ε̃ = ε̂(c_∅) + w(ε̂(c) − ε̂(c_∅)) "
                             "with c_∅ the empty prompt: 7.5 as in the authors' SD script (each UNet call then has "
                             "2 rows per image); 1 = no guidance, as in CLiD's and SimA's re-runs.")
    args = parser.parse_args(input_args)
    check_attack_args(args)
    require_positive(args, "lp")
    require_non_negative(args, "guidance_scale")
    check_attack_timesteps(args.attack_timesteps)
    return args


def main(args):
    with OutputLock(args.output_dir):  # a second run into this folder is refused
        check_attack_paths(args)  # under the lock: the occupancy check and the lock are one step
        check_pretrained_model(args.pretrained_model_name_or_path, args.revision)  # its kind: SD3/Flux fail here
        accelerator = Accelerator(mixed_precision=args.mixed_precision)
        logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
        num_timesteps = num_train_timesteps(args.pretrained_model_name_or_path, args.revision)
        for t in args.attack_timesteps:
            check_timestep(t, num_timesteps, "--attack_timesteps")
        model = AttackedModel(args.pretrained_model_name_or_path, args.revision, args.variant, args.unet_path,
                              args.lora_weights, args.textual_inversion)
        resolution = args.resolution or configured_resolution(args.pretrained_model_name_or_path, args.revision,
                                                            args.unet_path)
        rows = load_attack_data(args.member_dataset, args.nonmember_dataset, args.caption_column, args.null_prompt,
                                args.textual_inversion, resolution)
        components = load_attack_model(model, accelerator.device, weight_dtype_of(accelerator.mixed_precision))
        predictor = NoisePredictor.of(components.unet, components.noise_scheduler)

        def score_batch(batch):
            null_context = batch.null_context() if args.guidance_scale != 1.0 else None
            by_timestep = pia_scores(predictor, batch.latents, batch.context, args.attack_timesteps, lp=args.lp,
                                     normalised=args.method == "pian", guidance_scale=args.guidance_scale,
                                     null_context=null_context)
            return timestep_columns(by_timestep)

        calls_per_image = 1 + len(args.attack_timesteps)
        rows_per_call = 2 if args.guidance_scale != 1.0 else 1
        logger.info(f"***** Running {args.method.upper()} *****")
        logger.info(f"  Images = {len(rows)} ({sum(row['is_member'] for row in rows)} members), "
                    f"timesteps = {args.attack_timesteps}, p = {args.lp}, guidance = {args.guidance_scale}, "
                    f"UNet calls per image = {calls_per_image} × {rows_per_call} row(s)")
        logger.info(f"  Resolution = {resolution}, batch size = {args.batch_size}, "
                    f"processes = {accelerator.num_processes}")
        signature = run_signature(flag_values(args), attack_inputs(model, args.member_dataset, args.nonmember_dataset))
        scores, work = score_all(rows, components, score_batch, accelerator=accelerator, output_dir=args.output_dir,
                                 signature=signature, resolution=resolution, batch_size=args.batch_size,
                                 vae_sample=args.vae_sample, seed=args.seed, latents_cache_dir=args.latents_cache_dir,
                                 overwrite=args.overwrite, desc=args.method)

        if accelerator.is_main_process:
            extra = {"attack_timesteps": args.attack_timesteps, "lp": args.lp, "guidance_scale": args.guidance_scale,
                     "unet_calls_per_image": calls_per_image, "unet_rows_per_image": calls_per_image * rows_per_call,
                     "resolution": resolution,
                     "time_ids": assumed_time_ids(components, resolution)}
            dataset = write_scores(scores, args.output_dir, script="attack_pia.py", attack=args.method,
                                   flags=flag_values(args), model=model_record(model), extra=extra,
                                   push_to_hub=args.push_to_hub, hub_dataset_id=args.hub_dataset_id,
                                   hub_token=args.hub_token)
            work.cleanup()
            logger.info(f"Saved {len(dataset)} scores to {args.output_dir}")
        accelerator.wait_for_everyone()
        accelerator.end_training()


if __name__ == "__main__":
    run_cli(main, parse_args)
