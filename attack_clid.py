#!/usr/bin/env python
r"""CLiD membership-inference attack on a text-to-image diffusion model (Zhai et al., NeurIPS 2024,
https://arxiv.org/abs/2405.14800): a member's own caption helps the model much more than a weakened one.

For each image (latent z₀, caption c) and each weakened caption c*_i (i = 1..K), with the same noise for every
caption, per timestep t:

    L_t(x, c) = (1/J) Σ_j ‖ε_j − ε̂(√ᾱ_t z₀ + √(1−ᾱ_t) ε_j, t, c)‖² / d          (`diffusion.loss_attack_scores`)
    D_t(x)    = (1/K) Σ_i [L_t(x, c*_i) − L_t(x, c)]                             (`diffusion.clid_scores`)

L and D are their means over t. CLiD_th (paper Eq. 16, the authors' `cal_clid_th.py`) combines them:

    s = (1 − α) · RS(L) + α · RS(−D),  RS(u) = (u − median u) / IQR u,

members LOWER. The medians, IQRs and α ∈ {0, 0.1, …, 1} (best AUC, first of a tie) are fitted on a seeded
calibration split only (`--calibration_fraction` of each member/non-member and domain stratum, seeded by
`derive_seed(--seed, SALT_ATTACK_CALIBRATION=17)`); those images are left out of the saved scores and their ids,
the fitted values and the split are recorded in the dataset info. `score_t{t}` is CLiD_th refitted on t alone.
`score_loss` (L) and `score_discrepancy` (−D) are the two parts, members lower in both.

Noise: ε_j = `diffusion.fixed_noise(seed, t, j)`, a `torch.Generator` seeded with
`derive_seed(--seed, SALT_ATTACK_NOISE=13, t, j)` drawing `torch.randn((1, C, h, w))`, the same for every image
and every caption. Defaults are the authors' (`mia_CLiD_impt.py`, paper App. D.1): t = 440, 450, 460 with one
draw each, K = 4 weakened captions (30%, 50% and 70% of the words replaced by "<|endoftext|>", and the empty
caption), no guidance: (1 + 4) · 3 = 15 UNet calls per image.

Deviations from the authors:
- Which words are cut: the authors rank words by a precomputed importance file (PromptCharm's cross-attention
  attribution), unavailable for other captions. Here a word's importance is its rarity in the text encoder's
  vocabulary, the largest BPE token id among its tokens (CLIP's merges, hence ids, are in order of frequency,
  so content words rank above "a", "of", "the"). The cut rule is theirs: with n words and fraction r, every word
  whose importance is ≥ the ⌊r·n − 0.01⌋-th largest is replaced (`weakened_caption`).
- The calibration split is labelled data on the attacked model itself; the authors fit on a shadow model.
- The noise is one documented draw shared by all images (theirs: one unseeded pool, 3 draws per image).
- CLiD_vec (the XGBoost variant) is not implemented.

On SDXL the weakened captions go through both text encoders (`conditioning.encode_prompts`), the "null" caption is
the pipeline's unconditional embedding (zeros with `force_zeros_for_empty_prompt`, as SDXL base's pipeline guides),
and every UNet call gets the time ids of an uncropped R × R image, (R, R, 0, 0, R, R) with R = --resolution or the
model's native size: the size and crop a training image was given are not in the image, so the attacker assumes
the pipeline's default.

    accelerate launch attack_clid.py \
      --pretrained_model_name_or_path outputs/victim/pipeline \
      --member_dataset outputs/victim/members --nonmember_dataset outputs/victim/nonmembers \
      --output_dir outputs/scores/clid
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
    add_calibration_arg,
    add_noise_draws_arg,
    check_attack_args,
    check_attack_timesteps,
    check_calibration_fraction,
)
from mixsyn_utils.attack_scores import clid_scores  # CLiD's L and D
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
)
from mixsyn_utils.cli import ArgumentParser, InputError, run_cli  # one-line errors for bad input (argparse's included)
from mixsyn_utils.diffusion import FIXED_NOISE_FORMULA, NoisePredictor  # ε̂ of the model, the noise formula
from mixsyn_utils.flags import flag_values, require_positive  # flags written out; range checks
from mixsyn_utils.metrics import clid_threshold_fit, clid_threshold_score  # CLiD_th's α and robust scalers
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

PAD_WORD = "<|endoftext|>"  # what the authors put in place of a cut word: SD-1.x's pad token


def weak_caption_type(value):
    """A --weak_caption entry: "null" (the empty caption) or a fraction of words to cut, in (0, 1)."""
    if value == "null":
        return value
    try:
        fraction = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'null' or a fraction in (0, 1), got {value!r}") from None
    if not 0 < fraction < 1:
        raise argparse.ArgumentTypeError(f"a fraction of words must be in (0, 1), got {value}")
    return fraction


def parse_args(input_args=None):
    parser = ArgumentParser(
        description="CLiD (conditional likelihood discrepancy) membership inference.", epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add_attack_args(parser)
    attack = parser.add_argument_group("attack")
    attack.add_argument("--attack_timesteps", type=int, nargs="+", default=[440, 450, 460],
                        help="Timesteps t in [0, T): the authors' 440 450 460 (paper App. D.1: t in [400, 500] was "
                             "best on SD at 512 px; a smaller model may prefer other t).")
    add_noise_draws_arg(attack)
    attack.add_argument("--weak_caption", type=weak_caption_type, nargs="+", default=[0.3, 0.5, 0.7, "null"],
                        help="The weakened captions c*: 'null' (the empty caption) or a fraction of the caption's "
                             "words to replace by <|endoftext|>, rarest words first. Default: the authors' 0.3 0.5 0.7 "
                             "null; D is the mean over them. Each costs |T| × draws UNet calls per image.")
    add_calibration_arg(attack, "CLiD's α and robust scalers")
    args = parser.parse_args(input_args)
    check_attack_args(args)
    require_positive(args, "num_noise_draws")
    check_attack_timesteps(args.attack_timesteps, allow_zero=True)
    check_calibration_fraction(args)
    if args.null_prompt:
        raise InputError("--null_prompt leaves CLiD no caption to compare with the weakened ones")
    return args


def weakened_caption(caption, weak, tokenizer):
    """c*: "" for weak = "null"; else the caption with its most important fraction `weak` of words replaced by
    <|endoftext|>. Importance of a word = the largest token id of `tokenizer(word)` (rarer words have larger ids);
    words are split on whitespace and every word with importance ≥ sorted_desc[⌊weak·n − 0.01⌋] is replaced
    (the authors' `replace_words_topRate`, ties included).
    """
    if weak == "null":
        return ""
    words = caption.split()
    importance = [max(tokenizer(word, add_special_tokens=False).input_ids or [0]) for word in words]
    threshold = sorted(importance, reverse=True)[int(weak * len(words) - 0.01)]
    return " ".join(PAD_WORD if weight >= threshold else word for word, weight in zip(words, importance))


def clid_raw_columns(batch, components, predictor, args):
    """One batch's L_t and D_t columns (`loss_t{t}`, `discrepancy_t{t}`); `score` waits for the calibration fit.

    The "null" caption is the model's unconditional embedding (`AttackBatch.null_context`: the encoded empty caption
    for SD-1.x/2.x, zeros for an SDXL pipeline with `force_zeros_for_empty_prompt`)."""
    weak_contexts = [batch.null_context() if weak == "null" else batch.captions(
        [weakened_caption(row["caption"], weak, components.tokenizer) for row in batch.rows])
        for weak in args.weak_caption]
    losses, discrepancies = clid_scores(predictor, batch.latents, batch.context, weak_contexts, args.attack_timesteps,
                                        args.seed, args.num_noise_draws)
    columns = {"score": np.zeros(len(batch.rows))}  # CLiD_th needs the calibration rows: computed at the end
    for t in args.attack_timesteps:
        columns[f"loss_t{t}"], columns[f"discrepancy_t{t}"] = losses[t], discrepancies[t]
    return columns


def clid_threshold_columns(scores, timesteps, mask):
    """CLiD_th on the non-calibration rows, fitted on the calibration rows: `score` from L and D (means over t),
    `score_t{t}` from L_t and D_t alone. Returns (scores dataset of the other rows, {"all": fit, t: fit})."""
    is_member = np.asarray(scores["is_member"], dtype=bool)
    losses = {t: np.asarray(scores[f"loss_t{t}"]) for t in timesteps}
    discrepancies = {t: np.asarray(scores[f"discrepancy_t{t}"]) for t in timesteps}
    parts = {"all": (np.mean(list(losses.values()), axis=0), np.mean(list(discrepancies.values()), axis=0))}
    if len(timesteps) > 1:
        parts.update({t: (losses[t], discrepancies[t]) for t in timesteps})
    fits, columns = {}, {}
    for key, (loss, discrepancy) in parts.items():
        fits[key] = clid_threshold_fit(loss[mask], discrepancy[mask], is_member[mask])
        name = "score" if key == "all" else f"score_t{key}"
        columns[name] = clid_threshold_score(fits[key], loss[~mask], discrepancy[~mask])
    loss, discrepancy = parts["all"]
    columns["score_loss"], columns["score_discrepancy"] = loss[~mask], -discrepancy[~mask]
    scored = scores.select(np.flatnonzero(~mask)).remove_columns("score")
    for name, values in columns.items():
        scored = scored.add_column(name, values.tolist())
    raw = [f"{part}_t{t}" for t in timesteps for part in ("loss", "discrepancy")]
    return scored.select_columns(["id", "domain", "is_member", *columns, *raw]), fits


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
        mask = calibration_rows(rows, args.calibration_fraction, args.seed, "CLiD")
        components = load_attack_model(model, accelerator.device, weight_dtype_of(accelerator.mixed_precision))
        predictor = NoisePredictor.of(components.unet, components.noise_scheduler)

        def score_batch(batch):
            return clid_raw_columns(batch, components, predictor, args)

        calls_per_image = (1 + len(args.weak_caption)) * len(args.attack_timesteps) * args.num_noise_draws
        logger.info("***** Running CLiD *****")
        logger.info(f"  Images = {len(rows)} ({sum(row['is_member'] for row in rows)} members, {int(mask.sum())} for "
                    f"calibration), timesteps = {args.attack_timesteps}, weakened captions = {args.weak_caption}, "
                    f"UNet calls per image = {calls_per_image}")
        logger.info(f"  Resolution = {resolution}, batch size = {args.batch_size}, "
                    f"processes = {accelerator.num_processes}")
        signature = run_signature(flag_values(args), attack_inputs(model, args.member_dataset, args.nonmember_dataset))
        scores, work = score_all(rows, components, score_batch, accelerator=accelerator, output_dir=args.output_dir,
                                 signature=signature, resolution=resolution, batch_size=args.batch_size,
                                 vae_sample=args.vae_sample, seed=args.seed, latents_cache_dir=args.latents_cache_dir,
                                 overwrite=args.overwrite, desc="clid")

        if accelerator.is_main_process:
            scores, fits = clid_threshold_columns(scores, args.attack_timesteps, mask)
            fit = dict(fits.pop("all"), per_timestep={str(t): fit for t, fit in fits.items()})
            extra = {"attack_timesteps": args.attack_timesteps, "num_noise_draws": args.num_noise_draws,
                     "weak_captions": args.weak_caption, "unet_calls_per_image": calls_per_image,
                     "resolution": resolution, "time_ids": assumed_time_ids(components, resolution),
                     "calibration": calibration_record(rows, mask, args.calibration_fraction, args.seed, fit),
                     "noise": f"{FIXED_NOISE_FORMULA}, shared by all images and captions"}
            dataset = write_scores(scores, args.output_dir, script="attack_clid.py", attack="clid",
                                   flags=flag_values(args), model=model_record(model), extra=extra,
                                   push_to_hub=args.push_to_hub, hub_dataset_id=args.hub_dataset_id,
                                   hub_token=args.hub_token)
            work.cleanup()
            logger.info(f"Saved {len(dataset)} scores to {args.output_dir}")
        accelerator.wait_for_everyone()
        accelerator.end_training()


if __name__ == "__main__":
    run_cli(main, parse_args)
