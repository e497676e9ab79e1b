"""Flags two or more scripts share, defined once: `add_*_args(parser)` adds a group, `check_*` validates it.

A script lists the groups it uses at the top of its `parse_args`, then adds its own flags, so a reader sees
every flag from the script. The checks only read `args` (they raise `InputError` naming the flag); values
derived from flags are returned by small functions (`class_data_dir_of`), never written back into `args`.
This module, `attack_flags` and `training_flags` are the only shared code that takes the parsed `args`: the scripts pass every
other shared function the values it uses. `flag_values(args)` is the one way flags are written out (run
signatures, dataset provenance, trackers).
"""

import json
import math

from .cli import InputError
from .dataset_io import check_path_or_hub_id
from .outputs import check_output_outside_inputs

RESOLUTION_HELP = ("Image size in pixels (a multiple of 8) fed to the VAE; default: the model's native size "
                   "(unet sample_size × 8, i.e. 512 for SD-1.4).")


# Flags whose names contain "token" but hold no secret; every other such flag (--hub_token) is never written out.
PUBLIC_TOKEN_FLAGS = frozenset({"placeholder_token_template", "placeholder_token", "initializer_token",
                                "tokenizer_name", "tokenizer_max_length"})


def is_secret_flag(name):
    """Whether a flag may hold a credential, so it never reaches a file, a tracker or a log."""
    return "token" in name and name not in PUBLIC_TOKEN_FLAGS


def flag_values(args):
    """Every flag of `args` as plain JSON values, sorted by name, never a credential (`is_secret_flag`).

    The one serialiser of flags: run signatures (`resumable.run_signature`), dataset provenance
    (`dataset_io.dataset_provenance`) and tracker hyper-parameters all start from it. A value JSON cannot hold
    (a Path) becomes its string.
    """
    return json.loads(json.dumps({key: value for key, value in sorted(vars(args).items()) if not is_secret_flag(key)},
                                 default=str))


def require_range(args, flag, low=None, high=None, include_low=True, include_high=True):
    """`--flag` must lie in the interval from `low` to `high` (None: unbounded) and be finite.

    NaN never passes; +inf only when `high` is `math.inf` (and -inf only when `low` is `-math.inf`): a bound left
    open is "any finite number", not infinity.
    """
    value = getattr(args, flag)
    if value is None:
        return
    if not math.isfinite(value) and not (value == math.inf and high == math.inf and include_high) \
            and not (value == -math.inf and low == -math.inf and include_low):
        raise InputError(f"--{flag} must be a finite number, got {value}")
    above = low is None or (value >= low if include_low else value > low)
    below = high is None or (value <= high if include_high else value < high)
    if not (above and below):  # written so that NaN fails both comparisons
        if high is None and low == 0 and not include_low:
            bound = "positive"
        elif high is None:
            bound = f"{'>=' if include_low else '>'} {low}"
        else:
            bound = f"in {'[' if include_low else '('}{low}, {high}{']' if include_high else ')'}"
        raise InputError(f"--{flag} must be {bound}, got {value}")


def check_outputs_apart(args, outputs, inputs):
    """Every output flag in `outputs` (names, e.g. "output_dir") must lie outside the path of every flag in `inputs`
    (an input written over, deleted by --overwrite, or changed under a run reading it) and outside the other
    outputs; one line naming both flags otherwise (`outputs.check_output_outside_inputs`)."""
    input_paths = {f"--{name}": getattr(args, name, None) for name in inputs}
    for name in outputs:
        check_output_outside_inputs(getattr(args, name), input_paths, f"--{name}")
        others = {f"--{other}": getattr(args, other) for other in outputs if other != name}
        check_output_outside_inputs(getattr(args, name), others, f"--{name}", existing_only=False)


def check_paths_or_hub_ids(args, *names):
    """Each named flag (a local path or a Hub id, or a list of them) must name an existing path or a Hub id
    (`dataset_io.check_path_or_hub_id`). Called at the start of `main`, not in `parse_args`: a study's earlier
    stages write these paths after its plan's flags are parsed."""
    for name in names:
        check_path_or_hub_id(getattr(args, name), f"--{name}")


def require_positive(args, *flags):
    """Every named flag must be > 0."""
    for flag in flags:
        require_range(args, flag, 0, include_low=False)


def require_non_negative(args, *flags):
    """Every named flag must be >= 0 (seeds, counts that may be zero, weights)."""
    for flag in flags:
        require_range(args, flag, 0)


# ----------------------------------------------------------------------------------------------
# Model: the pretrained pipeline, its fine-tuned variants, the weights dtype
# ----------------------------------------------------------------------------------------------

def add_pretrained_model_args(parser, required=True,
                              help="Pipeline folder or Hub id, e.g. CompVis/stable-diffusion-v1-4 or outputs/victim/pipeline."):
    """The diffusers examples' model flags: --pretrained_model_name_or_path, --revision, --variant."""
    parser.add_argument("--pretrained_model_name_or_path", type=str, required=required, default=None, help=help)
    parser.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model on the Hub.")
    parser.add_argument("--variant", type=str, default=None, help="Weights variant of the pretrained model, e.g. fp16.")
    return parser


def add_model_variant_args(parser):
    """The fine-tuned parts that turn the pretrained pipeline into the model attacked or sampled."""
    parser.add_argument("--unet_path", type=str, default=None,
                        help="Fine-tuned UNet folder (checkpoint-N/unet or a pipeline folder) replacing the pretrained one.")
    parser.add_argument("--lora_weights", type=str, default=None,
                        help="LoRA folder/file (UNet and/or text encoder), fused into the model before use.")
    parser.add_argument("--textual_inversion", type=str, default=None,
                        help="Folder with token_map.json; captions are rewritten with the learned placeholders.")
    return parser


def add_mixed_precision_arg(parser):
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                        help="Half-precision compute (frozen weights in that dtype); default: the accelerate config. "
                             "Attack scores are small differences: keep fp32 ('no') for them.")
    return parser


def add_resolution_arg(parser):
    parser.add_argument("--resolution", type=int, default=None, help=RESOLUTION_HELP)
    return parser


# ----------------------------------------------------------------------------------------------
# Outputs: a dataset (generation, perturbation, attack scores) or a fine-tuned model
# ----------------------------------------------------------------------------------------------

def add_hub_token_arg(parser):
    parser.add_argument("--hub_token", type=str, default=None,
                        help="Hub token (prefer `huggingface-cli login`); never written to a file or a log.")


def add_dataset_output_args(parser):
    """Where a script's output dataset goes: --output_dir (save_to_disk), --overwrite, an optional Hub push."""
    parser.add_argument("--output_dir", type=str, required=True, help="Where the dataset is saved (save_to_disk).")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace an existing non-empty --output_dir (and discard a killed run's partial results "
                             "made with other flags).")
    parser.add_argument("--push_to_hub", action="store_true", help="Also push the dataset to the Hub (private).")
    parser.add_argument("--hub_dataset_id", type=str, default=None, help="Hub dataset repo id for --push_to_hub.")
    add_hub_token_arg(parser)
    return parser


# ----------------------------------------------------------------------------------------------
# Prior preservation (DreamBooth fine-tuning and the Anti-DreamBooth surrogate)
# ----------------------------------------------------------------------------------------------

def add_prior_preservation_args(parser):
    group = parser.add_argument_group("prior preservation (DreamBooth, arXiv:2208.12242)")
    group.add_argument("--with_prior_preservation", action="store_true",
                       help="Add the prior-preservation loss on class images generated by the base model.")
    group.add_argument("--prior_loss_weight", type=float, default=1.0, help="λ of the prior-preservation loss.")
    group.add_argument("--class_data_dir", type=str, default=None,
                       help="Folder of class images (upstream's: your own images count, missing ones are generated "
                            "into it) or a saved class-image dataset; default <output_dir>.class_images.")
    group.add_argument("--class_prompt", type=str, default=None,
                       help="Prompt of the class images, e.g. 'a photo of person'.")
    group.add_argument("--num_class_images", type=int, default=100,
                       help="Class images generated once and cached (upstream's default; Anti-DreamBooth's scripts "
                            "use 200).")
    group.add_argument("--class_num_inference_steps", type=int, default=50, help="Sampler steps for class images.")
    group.add_argument("--sample_batch_size", type=int, default=4, help="Class images per pipeline call.")
    group.add_argument("--prior_generation_precision", type=str, default=None, choices=["no", "fp32", "fp16", "bf16"],
                       help="dtype of the class-image pipeline; default ('no'): fp16 on a GPU, else fp32.")
    return parser


def check_prior_preservation_args(args):
    if args.with_prior_preservation and not args.class_prompt:
        raise InputError("--class_prompt is required with --with_prior_preservation")
    require_positive(args, "num_class_images", "class_num_inference_steps", "sample_batch_size")
    require_non_negative(args, "prior_loss_weight")
