"""The flags every attack script shares, defined once, and their checks (`flags.py` has the model and output groups
they use)."""

from .cli import InputError
from .flags import (
    add_dataset_output_args,
    check_outputs_apart,
    check_paths_or_hub_ids,
    add_mixed_precision_arg,
    add_model_variant_args,
    add_pretrained_model_args,
    add_resolution_arg,
    require_non_negative,
    require_positive,
    require_range,
)
from .images import check_resolution
from .outputs import check_output_dir, check_output_writable
from .placeholders import load_token_map, token_map_files


def add_attack_args(parser):
    """Model, data and output flags of every attack script."""
    model = parser.add_argument_group("model (the pretrained pipeline plus an optional fine-tuned variant)")
    add_pretrained_model_args(model)
    add_model_variant_args(model)
    add_mixed_precision_arg(model)
    data = parser.add_argument_group("data")
    data.add_argument("--member_dataset", type=str, required=True,
                      help="Images the model was trained on (save_to_disk folder, imagefolder or Hub id).")
    data.add_argument("--nonmember_dataset", type=str, required=True,
                      help="Held-out images from the same distribution; must share no id and no image with members.")
    data.add_argument("--caption_column", type=str, default="prompt",
                      help="Column with each image's own caption, the text condition c of ε_θ(z, t, c).")
    data.add_argument("--null_prompt", action="store_true",
                      help="Condition on the empty prompt instead of the captions (a standard control).")
    add_resolution_arg(data)
    data.add_argument("--batch_size", type=int, default=64,
                      help="Images per UNet call (members and non-members together); lower it if memory runs out.")
    data.add_argument("--vae_sample", action="store_true",
                      help="z₀ = a VAE posterior sample (seeded per image) instead of the posterior mode.")
    data.add_argument("--seed", type=int, default=0, help="Seed of every random draw of the attack (see its doc).")
    data.add_argument("--latents_cache_dir", type=str, default=None,
                      help="Keep each batch's z₀ here and reuse it in later runs whose VAE encoder, images, resolution "
                           "and batch size match (attacking many fine-tunes of one model skips the VAE and decoding).")
    add_dataset_output_args(parser.add_argument_group("output"))
    return parser


# The flags naming what an attack reads: its outputs must stay clear of them.
ATTACK_INPUTS = ("member_dataset", "nonmember_dataset", "pretrained_model_name_or_path", "unet_path", "lora_weights",
                 "textual_inversion")


def check_attack_args(args):
    """Flag checks of `add_attack_args` that need no model or data; the outputs lie outside every input."""
    require_positive(args, "batch_size")
    require_non_negative(args, "seed")
    check_resolution(args.resolution)
    if args.null_prompt and args.textual_inversion:
        raise InputError("--null_prompt ignores captions, so --textual_inversion placeholders would never be used")
    check_outputs_apart(args, ("output_dir", "latents_cache_dir"), ATTACK_INPUTS)


def check_attack_paths(args):
    """At the start of `main`, under the run's `OutputLock`: --output_dir writable and free (or --overwrite),
    --latents_cache_dir writable, every input an existing path or a Hub id, and --textual_inversion's token map
    naming embedding files that are there (before any image is decoded)."""
    check_output_dir(args.output_dir, args.overwrite)
    check_output_writable(args.latents_cache_dir, "--latents_cache_dir")
    check_paths_or_hub_ids(args, *ATTACK_INPUTS)
    if args.textual_inversion is not None:
        token_map_files(args.textual_inversion, load_token_map(args.textual_inversion))


def check_attack_timesteps(timesteps, allow_zero=False, flag="--attack_timesteps"):
    """Distinct timesteps, each > 0 (≥ 0 with `allow_zero`); the upper bound T is checked against the model."""
    if len(set(timesteps)) != len(timesteps):
        raise InputError(f"{flag} lists a timestep twice: {timesteps}")
    for t in timesteps:
        if t < 0 or (t == 0 and not allow_zero):
            raise InputError(f"{flag} must be in {'[0' if allow_zero else '(0'}, T), got {t}")


def add_noise_draws_arg(group):
    group.add_argument("--num_noise_draws", type=int, default=1,
                       help="Noise draws ε_j per timestep, each `diffusion.fixed_noise(seed, t, j)` shared by every "
                            "image; the authors use one. More draws average out the noise at that many UNet calls.")
    return group


def add_calibration_arg(group, attack):
    group.add_argument("--calibration_fraction", type=float, default=0.2,
                       help=f"Fraction of each (member/non-member, domain) stratum used to fit {attack} (a seeded "
                            "split); those images are left out of the saved scores, so nothing is fitted on the images "
                            "it scores. 0.2 keeps 80%% for the audit.")
    return group


def check_calibration_fraction(args):
    require_range(args, "calibration_fraction", 0, 1, include_low=False, include_high=False)
