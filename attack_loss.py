#!/usr/bin/env python
r"""Loss and SimA membership-inference attacks on a Stable Diffusion model: one UNet query per timestep and draw.

`--method loss` (Matsumoto et al. 2023, https://arxiv.org/abs/2301.01024; the Stable Diffusion form of CLiD's
re-runs): the denoising loss

    L(x) = (1/|T|) Σ_t (1/J) Σ_j ‖ε_j − ε̂(√ᾱ_t z₀ + √(1−ᾱ_t) ε_j, t, c)‖² / d,

the one definition of `diffusion.loss_attack_scores`. ε_j = `diffusion.fixed_noise(seed, t, j)`: a
`torch.Generator` seeded with `derive_seed(--seed, SALT_ATTACK_NOISE=13, t, j)` draws `torch.randn((1, C, h, w))`,
the same ε_j for every image. A member's noise is predicted better; its natural score −L is HIGHER, so the
saved `score` is L (members LOWER). Defaults: t = 450, one draw, the caption, no guidance (CLiD's "Loss" row,
`mia_loss_sd.py`). `--attack_timesteps 440 450 460` is CLiD's "M.C." row.

`--method sima` (Rao et al. 2025, https://arxiv.org/abs/2509.25003, github mx-ethan-rao/SimA): the single query

    s_t(x) = Σ_elements ε̂(z₀, t, c)⁴,

the CLEAN latent z₀ fed at label t, no noise at all; members LOWER (the authors' labels agree). Default: the
authors' sweep t = 0, 10, …, 190 (one UNet call each, columns `score_t{t}`). The authors report the best t on
the evaluated images; here `score` is the column of the t with the best AUC on a seeded calibration split
(`--calibration_fraction` of each member/non-member and domain stratum), and those calibration images are left
out of the saved scores. With one timestep nothing is fitted and every image is scored.

Deviations from the authors: the noise is one documented draw shared by all images (CLiD's code shares one
unseeded draw per batch of 16; Matsumoto's and SimA's draw per image); z₀ is the VAE posterior mode unless
`--vae_sample`; SimA's t comes from a calibration split, not from the images reported. Captions must be
present and non-empty (`--null_prompt` is the unconditional variant).

    accelerate launch attack_loss.py --method sima \
      --pretrained_model_name_or_path outputs/victim/pipeline \
      --member_dataset outputs/victim/members --nonmember_dataset outputs/victim/nonmembers \
      --output_dir outputs/scores/sima

The scores dataset (id, domain, is_member, score[, score_t{t}]) is what `evaluate.py` reads.
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
    add_calibration_arg,
    add_noise_draws_arg,
    check_attack_args,
    check_attack_paths,
    check_attack_timesteps,
    check_calibration_fraction,
)
from mixsyn_utils.attack_scores import loss_attack_scores, sima_scores  # the two scores
from mixsyn_utils.attacks import (  # members/non-members, the attacked model, scoring, calibration split, output
    AttackedModel,
    assumed_time_ids,
    attack_inputs,
    calibration_record,
    calibration_rows,
    check_timestep,
    load_attack_data,
    load_attack_model,
    model_record,
    num_train_timesteps,
    score_all,
    timestep_columns,
)
from mixsyn_utils.cli import ArgumentParser, run_cli  # one-line errors for bad input (argparse's included)
from mixsyn_utils.diffusion import FIXED_NOISE_FORMULA, NoisePredictor  # ε̂ of the model, the noise formula
from mixsyn_utils.flags import flag_values, require_positive  # flags written out; range checks
from mixsyn_utils.metrics import most_separating  # SimA's t: best calibration AUC
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

DEFAULT_TIMESTEPS = {"loss": [450], "sima": list(range(0, 200, 10))}


def parse_args(input_args=None):
    parser = ArgumentParser(
        description="Loss / SimA membership inference on a diffusion model.", epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add_attack_args(parser)
    attack = parser.add_argument_group("attack")
    attack.add_argument("--method", type=str, default="loss", choices=["loss", "sima"],
                        help="loss: mean ‖ε − ε̂(z_t, t, c)‖² over timesteps and draws; sima: Σ ε̂(z₀, t, c)⁴ on the "
                             "clean latent.")
    attack.add_argument("--attack_timesteps", type=int, nargs="+", default=None,
                        help="Timesteps t in [0, T), columns score_t{t} when several. Default: 450 for loss (CLiD's "
                             "Loss row; 440 450 460 is their M.C. row); 0, 10, …, 190 for sima (the authors' sweep, "
                             "one t then chosen on the calibration split).")
    add_noise_draws_arg(attack)
    add_calibration_arg(attack, "SimA's timestep (with several --attack_timesteps)")
    args = parser.parse_args(input_args)
    check_attack_args(args)
    require_positive(args, "num_noise_draws")
    check_attack_timesteps(timesteps_of(args), allow_zero=True)
    check_calibration_fraction(args)
    return args


def timesteps_of(args):
    return args.attack_timesteps or DEFAULT_TIMESTEPS[args.method]


def score_columns(batch, predictor, args):
    """One batch's `score_t{t}` columns (when several t) and `score`, their mean; SimA's `score` is replaced by
    the chosen t's column once every image is scored."""
    timesteps = timesteps_of(args)
    if args.method == "loss":
        by_timestep = loss_attack_scores(predictor, batch.latents, batch.context, timesteps, args.seed,
                                         args.num_noise_draws)
    else:
        by_timestep = sima_scores(predictor, batch.latents, batch.context, timesteps)
    return timestep_columns(by_timestep)


def choose_sima_timestep(scores, timesteps, mask):
    """SimA's t: the `score_t{t}` column with the best AUC on the calibration rows; `score` = that column, for
    the other rows only. Returns (scores of the non-calibration rows, the calibration fit)."""
    is_member = np.asarray(scores["is_member"], dtype=bool)
    columns = {t: np.asarray(scores[f"score_t{t}"]) for t in timesteps}
    best_t, aucs = most_separating({t: values[mask] for t, values in columns.items()}, is_member[mask])
    scored = scores.select(np.flatnonzero(~mask))
    scored = scored.remove_columns("score").add_column("score", columns[best_t][~mask].tolist())
    columns_in_order = ["id", "domain", "is_member", "score", *[f"score_t{t}" for t in timesteps]]
    fit = {"selected_timestep": best_t, "calibration_auc_per_timestep": {str(t): auc for t, auc in aucs.items()}}
    return scored.select_columns(columns_in_order), fit


def main(args):
    with OutputLock(args.output_dir):  # a second run into this folder is refused
        check_attack_paths(args)  # under the lock: the occupancy check and the lock are one step
        check_pretrained_model(args.pretrained_model_name_or_path, args.revision)  # its kind: SD3/Flux fail here
        accelerator = Accelerator(mixed_precision=args.mixed_precision)
        logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
        timesteps = timesteps_of(args)
        num_timesteps = num_train_timesteps(args.pretrained_model_name_or_path, args.revision)
        for t in timesteps:
            check_timestep(t, num_timesteps, "--attack_timesteps", allow_zero=True)
        model = AttackedModel(args.pretrained_model_name_or_path, args.revision, args.variant, args.unet_path,
                              args.lora_weights, args.textual_inversion)
        resolution = args.resolution or configured_resolution(args.pretrained_model_name_or_path, args.revision,
                                                            args.unet_path)
        rows = load_attack_data(args.member_dataset, args.nonmember_dataset, args.caption_column, args.null_prompt,
                                args.textual_inversion, resolution)
        choose_timestep = args.method == "sima" and len(timesteps) > 1
        mask = calibration_rows(rows, args.calibration_fraction, args.seed, "SimA") if choose_timestep else None
        components = load_attack_model(model, accelerator.device, weight_dtype_of(accelerator.mixed_precision))
        predictor = NoisePredictor.of(components.unet, components.noise_scheduler)

        def score_batch(batch):
            return score_columns(batch, predictor, args)

        calls_per_image = len(timesteps) * (args.num_noise_draws if args.method == "loss" else 1)
        logger.info(f"***** Running {args.method} *****")
        logger.info(f"  Images = {len(rows)} ({sum(row['is_member'] for row in rows)} members), "
                    f"timesteps = {timesteps}, "
                    f"noise draws = {args.num_noise_draws if args.method == 'loss' else 0}, "
                    f"UNet calls per image = {calls_per_image}")
        logger.info(f"  Resolution = {resolution}, batch size = {args.batch_size}, "
                    f"processes = {accelerator.num_processes}")
        signature = run_signature(flag_values(args), attack_inputs(model, args.member_dataset, args.nonmember_dataset))
        scores, work = score_all(rows, components, score_batch, accelerator=accelerator, output_dir=args.output_dir,
                                 signature=signature, resolution=resolution, batch_size=args.batch_size,
                                 vae_sample=args.vae_sample, seed=args.seed, latents_cache_dir=args.latents_cache_dir,
                                 overwrite=args.overwrite, desc=args.method)

        if accelerator.is_main_process:
            extra = {"attack_timesteps": timesteps, "unet_calls_per_image": calls_per_image, "resolution": resolution,
                     "time_ids": assumed_time_ids(components, resolution),
                     "noise": f"{FIXED_NOISE_FORMULA}, shared by all images" if args.method == "loss"
                              else "none (clean z0)"}
            if args.method == "loss":
                extra["num_noise_draws"] = args.num_noise_draws
            if choose_timestep:
                scores, fit = choose_sima_timestep(scores, timesteps, mask)
                extra["calibration"] = calibration_record(rows, mask, args.calibration_fraction, args.seed, fit)
            dataset = write_scores(scores, args.output_dir, script="attack_loss.py", attack=args.method,
                                   flags=flag_values(args), model=model_record(model), extra=extra,
                                   push_to_hub=args.push_to_hub, hub_dataset_id=args.hub_dataset_id,
                                   hub_token=args.hub_token)
            work.cleanup()
            logger.info(f"Saved {len(dataset)} scores to {args.output_dir}")
        accelerator.wait_for_everyone()
        accelerator.end_training()


if __name__ == "__main__":
    run_cli(main, parse_args)
