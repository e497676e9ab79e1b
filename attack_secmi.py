#!/usr/bin/env python
r"""SecMI membership-inference attack on a Stable Diffusion model (Duan et al. 2023, https://arxiv.org/abs/2302.01316).

Each image's latent z₀ is inverted with deterministic DDIM steps of size k to z̃ = z_{t_sec−k}; one more DDIM
step goes up to t_sec and one comes back down. The t-error ℓ = ‖D(D(z̃; t_sec−k → t_sec); t_sec → t_sec−k) − z̃‖²₂
is smaller for members (the model's posterior estimates are more consistent on its training data), so
members score LOWER. UNet calls per image: t_sec/k + 1 (the reference inverts further and denoises steps it
never uses). `--secmi_nn` trains the paper's NN variant on the per-element error maps.

The default `--t_sec 150 --k 10` is the comparison point of the authors' Stable Diffusion code (SecMI-LDM
`secmi.py`: invert 0 → 140 in steps of 10, step 140 → 150 → 140, compare at 140), caption-conditioned without
guidance; `--t_sec 100` is the DDPM paper's setting. The error is the sum over latent elements, as theirs.
No noise is drawn. Deviation: the authors' threshold is the best one on the evaluated images (an oracle);
here the scores go to `evaluate.py`, which fixes direction and threshold on a calibration half.

    accelerate launch attack_secmi.py \
      --pretrained_model_name_or_path outputs/victim/pipeline \
      --member_dataset outputs/victim/members --nonmember_dataset outputs/victim/nonmembers \
      --output_dir outputs/scores/secmi

The scores dataset (id, domain, is_member, score) is what `evaluate.py` reads.
"""

import argparse
import logging

import mixsyn_utils.quiet  # noqa: F401  (first: silences library messages that are emitted at import time)
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers.utils import check_min_version

# Shared with the other attack scripts (mixsyn_utils/):
from mixsyn_utils.attack_flags import add_attack_args, check_attack_args, check_attack_paths  # flags of every attack
from mixsyn_utils.attack_scores import secmi_t_error  # the t-error (equations there)
from mixsyn_utils.attacks import (  # members/non-members, the attacked model, sharded resumable scoring, output
    AttackedModel,
    assumed_time_ids,
    attack_inputs,
    check_timestep,
    load_attack_data,
    load_attack_model,
    model_record,
    num_train_timesteps,
    score_all,
)
from mixsyn_utils.cli import ArgumentParser, InputError, run_cli  # one-line errors for bad input (argparse's included)
from mixsyn_utils.diffusion import NoisePredictor  # ε̂ of the model
from mixsyn_utils.flags import flag_values, require_positive, require_range  # flags written out; range checks
from mixsyn_utils.models import (  # the model's kind (SD3/Flux refused); sizes; --mixed_precision -> dtype
    check_pretrained_model,
    configured_resolution,
    vae_scale_factor,
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
        description="SecMI (t-error) membership inference on a diffusion model.", epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add_attack_args(parser)
    attack = parser.add_argument_group("attack")
    attack.add_argument("--t_sec", type=int, default=150,
                        help="Timestep of the t-error, in (0, T) and a multiple of --k. 150 (with k = 10) is the "
                             "authors' Stable Diffusion setting (SecMI-LDM: invert to 140, step 140 → 150 → 140); "
                             "their DDPM paper uses 100. UNet calls per image: t_sec/k + 1.")
    attack.add_argument("--k", type=int, default=10, help="DDIM step size for inversion and the t-error steps.")
    attack.add_argument("--secmi_nn", action="store_true",
                        help="Also train SecMI-NN on |error maps| with separate train/validation/test splits; "
                             "the scores dataset then holds the test split only, scored by the network.")
    attack.add_argument("--nn_train_fraction", type=float, default=0.5,
                        help="--secmi_nn: fraction of each set used to train the network.")
    attack.add_argument("--nn_val_fraction", type=float, default=0.1,
                        help="--secmi_nn: fraction used to pick the epoch (never the scored test split).")
    attack.add_argument("--nn_epochs", type=int, default=30, help="--secmi_nn: training epochs.")
    args = parser.parse_args(input_args)
    check_attack_args(args)
    require_positive(args, "k", "nn_epochs")
    if args.t_sec <= 0:
        raise InputError(f"--t_sec must be in (0, T), got {args.t_sec}")
    if args.t_sec % args.k != 0:
        raise InputError(f"--t_sec must be a multiple of --k, got --t_sec {args.t_sec} --k {args.k}")
    for flag in ("nn_train_fraction", "nn_val_fraction"):  # checked without --secmi_nn too: a bad value is a typo
        require_range(args, flag, 0, 1, include_low=False, include_high=False)
    if args.nn_train_fraction + args.nn_val_fraction >= 1:
        raise InputError(f"--nn_train_fraction and --nn_val_fraction must sum below 1 (the rest is the scored test "
                         f"split), got {args.nn_train_fraction} + {args.nn_val_fraction}")
    return args


def nn_splits(is_member, train_fraction, val_fraction, seed):
    """Disjoint train / validation / test row indices, stratified by membership, fixed by `seed`."""
    rng = np.random.default_rng(seed)
    splits = {"train": [], "val": [], "test": []}
    for label in (True, False):
        indices = rng.permutation(np.flatnonzero(is_member == label))
        n_train, n_val = int(round(train_fraction * len(indices))), int(round(val_fraction * len(indices)))
        splits["train"] += list(indices[:n_train])
        splits["val"] += list(indices[n_train : n_train + n_val])
        splits["test"] += list(indices[n_train + n_val :])
    if min(len(rows) for rows in splits.values()) == 0:
        raise InputError(f"--secmi_nn: too few images for train/validation/test splits ({len(is_member)} images)")
    return {name: np.sort(np.asarray(rows, dtype=np.int64)) for name, rows in splits.items()}


def secmi_nn_scores(dataset, latent_shape, args):
    """SecMI-NN: a small CNN classifies |error maps|; the epoch is chosen on validation, scores are for test only.

    Returns the test rows with `score` = −logit (members lower, like every attack here) and `score_t_error`
    (the plain t-error), and a record of the split sizes and the validation AUC.
    """
    from sklearn.metrics import roc_auc_score

    maps = torch.from_numpy(np.stack(dataset.with_format("numpy")["error_map"])).view(len(dataset), *latent_shape)
    labels = torch.tensor(dataset["is_member"], dtype=torch.float32)
    splits = nn_splits(labels.numpy().astype(bool), args.nn_train_fraction, args.nn_val_fraction, args.seed)
    torch.manual_seed(args.seed)
    channels = latent_shape[0]
    network = torch.nn.Sequential(
        torch.nn.Conv2d(channels, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3, stride=2, padding=1),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 1),
    )
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    scale = maps[splits["train"]].mean()  # the maps' magnitude is model-specific; normalise by the train mean
    best_auc, best_state = -1.0, None
    for _ in range(args.nn_epochs):
        network.train()
        for batch in torch.randperm(len(splits["train"])).split(max(1, args.batch_size)):
            rows = torch.as_tensor(splits["train"])[batch]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(network(maps[rows] / scale).squeeze(1), labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        network.eval()
        with torch.no_grad():
            val_logits = network(maps[splits["val"]] / scale).squeeze(1)
        val_labels = labels[splits["val"]].numpy()
        val_auc = roc_auc_score(val_labels, val_logits.numpy()) if 0 < val_labels.sum() < len(val_labels) else 0.5
        if val_auc > best_auc:
            best_auc, best_state = val_auc, {k: v.clone() for k, v in network.state_dict().items()}
    network.load_state_dict(best_state)
    with torch.no_grad():
        test_logits = network(maps[splits["test"]] / scale).squeeze(1).double().numpy()
    test = dataset.select(splits["test"]).remove_columns("error_map").rename_column("score", "score_t_error")
    test = test.add_column("score", (-test_logits).tolist())
    record = {name: int(len(rows)) for name, rows in splits.items()} | {"val_auc": float(best_auc)}
    return test.select_columns(["id", "domain", "is_member", "score", "score_t_error"]), record


def main(args):
    with OutputLock(args.output_dir):  # a second run into this folder is refused
        check_attack_paths(args)  # under the lock: the occupancy check and the lock are one step
        check_pretrained_model(args.pretrained_model_name_or_path, args.revision)  # its kind: SD3/Flux fail here
        accelerator = Accelerator(mixed_precision=args.mixed_precision)
        logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
        check_timestep(args.t_sec, num_train_timesteps(args.pretrained_model_name_or_path, args.revision), "--t_sec")
        model = AttackedModel(args.pretrained_model_name_or_path, args.revision, args.variant, args.unet_path,
                              args.lora_weights, args.textual_inversion)
        resolution = args.resolution or configured_resolution(args.pretrained_model_name_or_path, args.revision,
                                                            args.unet_path)
        rows = load_attack_data(args.member_dataset, args.nonmember_dataset, args.caption_column, args.null_prompt,
                                args.textual_inversion, resolution)
        components = load_attack_model(model, accelerator.device, weight_dtype_of(accelerator.mixed_precision))
        predictor = NoisePredictor.of(components.unet, components.noise_scheduler)

        def score_batch(batch):
            t_error, error_map = secmi_t_error(predictor, batch.latents, batch.context, args.t_sec, args.k)
            columns = {"score": t_error}
            if args.secmi_nn:  # the NN variant trains on each image's |error| map
                columns["error_map"] = error_map.abs()
            return columns

        calls_per_image = args.t_sec // args.k + 1
        logger.info("***** Running SecMI *****")
        logger.info(f"  Images = {len(rows)} ({sum(row['is_member'] for row in rows)} members), t_sec = {args.t_sec}, "
                    f"k = {args.k}, UNet calls per image = {calls_per_image}")
        logger.info(f"  Resolution = {resolution}, batch size = {args.batch_size}, "
                    f"processes = {accelerator.num_processes}")
        signature = run_signature(flag_values(args), attack_inputs(model, args.member_dataset, args.nonmember_dataset))
        dataset, work = score_all(rows, components, score_batch, accelerator=accelerator, output_dir=args.output_dir,
                                 signature=signature, resolution=resolution, batch_size=args.batch_size,
                                 vae_sample=args.vae_sample, seed=args.seed, latents_cache_dir=args.latents_cache_dir,
                                 overwrite=args.overwrite, desc="secmi")

        if accelerator.is_main_process:
            extra = {"t_sec": args.t_sec, "k": args.k, "unet_calls_per_image": calls_per_image,
                     "resolution": resolution,
                     "time_ids": assumed_time_ids(components, resolution)}
            if args.secmi_nn:
                latent_side = resolution // vae_scale_factor(components.vae)
                latent_shape = (components.unet.config.in_channels, latent_side, latent_side)
                dataset, extra["nn"] = secmi_nn_scores(dataset, latent_shape, args)
            attack = "secmi_nn" if args.secmi_nn else "secmi"
            dataset = write_scores(dataset, args.output_dir, script="attack_secmi.py", attack=attack,
                                   flags=flag_values(args), model=model_record(model), extra=extra,
                                   push_to_hub=args.push_to_hub, hub_dataset_id=args.hub_dataset_id,
                                   hub_token=args.hub_token)
            work.cleanup()
            logger.info(f"Saved {len(dataset)} scores to {args.output_dir}")
        accelerator.wait_for_everyone()
        accelerator.end_training()


if __name__ == "__main__":
    run_cli(main, parse_args)
