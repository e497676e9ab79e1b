"""Every flag two or more scripts share, defined once: `add_*_args(parser)` adds a group, `check_*` validates it.

A script lists the groups it uses at the top of its `parse_args`, then adds its own flags, so a reader sees
every flag from the script. The checks only read `args` (they raise `InputError` naming the flag); values
derived from flags are returned by small functions (`class_data_dir_of`), never written back into `args`.
"""

import argparse
from pathlib import Path

from .cli import InputError
from .images import INTERPOLATION_MODES, check_resolution
from .outputs import check_output_dir

RESOLUTION_HELP = ("Image size in pixels (a multiple of 8) fed to the VAE; default: the model's native size "
                   "(unet sample_size × 8, i.e. 512 for SD-1.4).")


# diffusers' `SchedulerType` names.
LR_SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "piecewise_constant"]


# Flags whose names contain "token" but hold no secret; every other such flag (--hub_token) is never written out.
PUBLIC_TOKEN_FLAGS = frozenset({"placeholder_token_template", "placeholder_token", "initializer_token",
                                "tokenizer_name", "tokenizer_max_length"})


def is_secret_flag(name):
    """Whether a flag may hold a credential, so it never reaches a file, a tracker or a log."""
    return "token" in name and name not in PUBLIC_TOKEN_FLAGS
def require_range(args, flag, low=None, high=None, include_low=True, include_high=True):
    """`--flag` must lie in the interval from `low` to `high` (None: unbounded); NaN never does."""
    value = getattr(args, flag)
    if value is None:
        return
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

def _add_hub_token_arg(parser):
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
    _add_hub_token_arg(parser)
    return parser


def add_model_output_args(parser):
    """Where a fine-tuned model goes, its trackers, its model card and the optional Hub upload."""
    parser.add_argument("--output_dir", type=str, default="mixsyn-model", help="Where weights and checkpoints go.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace an existing non-empty --output_dir (its weights and checkpoints are removed "
                             "when training starts) and an existing --save_mixed_dataset.")
    parser.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, relative to --output_dir.")
    parser.add_argument("--report_to", type=str, default="tensorboard",
                        help="'tensorboard', 'wandb', 'comet_ml' or 'all'.")
    parser.add_argument("--privacy_report", type=str, default=None,
                        help="results.json of evaluate.py: its AUC/TPR (with CIs) go into the model card.")
    parser.add_argument("--push_to_hub", action="store_true", help="Upload the output folder to the Hub.")
    parser.add_argument("--hub_model_id", type=str, default=None, help="Hub repo id; default: the output folder name.")
    _add_hub_token_arg(parser)
    return parser


def add_card_publish_args(parser):
    """evaluate.py's publish path: attach the measured privacy to a fine-tuned folder's card, optionally push it."""
    group = parser.add_argument_group("publish (attach the privacy numbers to a trained model's card)")
    group.add_argument("--write_card", type=str, default=None,
                       help="Output folder of a MixSyn training script: rewrite its README.md with these privacy "
                            "numbers; refused unless every --scores dataset attacked exactly the weights in it "
                            "(the attacks record their sha256).")
    group.add_argument("--push_to_hub", action="store_true", help="Then upload that folder to the Hub.")
    group.add_argument("--hub_model_id", type=str, default=None, help="Hub repo id; default: the folder name.")
    _add_hub_token_arg(group)
    return parser


def check_hub_token_not_logged(args):
    if args.hub_token is not None and "wandb" in (getattr(args, "report_to", "") or ""):
        raise InputError("--hub_token with --report_to wandb would expose the token; use `huggingface-cli login`")


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


def noise_offset_of(args):
    """The offset-noise scale: --noise_offset, or 0.1 for upstream DreamBooth's --offset_noise."""
    return args.noise_offset or (0.1 if args.offset_noise else 0.0)


def class_data_dir_of(args):
    """The class-image cache folder: --class_data_dir, or `<output_dir>.class_images` beside the output."""
    return args.class_data_dir or f"{str(args.output_dir).rstrip('/')}.class_images"


# ----------------------------------------------------------------------------------------------
# The three training scripts
# ----------------------------------------------------------------------------------------------

def add_training_data_args(parser):
    data = parser.add_argument_group("data (a dataset with one caption per image, or upstream's instance folder)")
    data.add_argument("--dataset_name", type=str, default=None,
                      help="Training images: a save_to_disk folder (e.g. from generate_synthetic.py), an imagefolder "
                           "or a Hub dataset id. Each image trains with its own caption.")
    data.add_argument("--dataset_config_name", type=str, default=None,
                      help="Config of a Hub --dataset_name with several configs.")
    data.add_argument("--train_data_dir", type=str, default=None,
                      help="A folder of training images: an imagefolder with captions in metadata.jsonl/csv "
                           "(train_text_to_image_lora.py); textual inversion also takes a folder of bare images and "
                           "captions them with its templates (textual_inversion.py). With --dataset_name: its data_dir.")
    data.add_argument("--cache_dir", type=str, default=None, help="Where downloaded Hub datasets are cached.")
    data.add_argument("--max_train_samples", type=int, default=None,
                      help="Train on this many images only (a random subset seeded by --seed; for quick runs).")
    data.add_argument("--image_column", type=str, default="image", help="Column of --dataset_name holding images.")
    data.add_argument("--caption_column", type=str, default=None,
                      help="Column holding each image's caption (a string, or a list drawn from per epoch). "
                           "Default: 'text' (upstream's default) when the dataset has it, else 'prompt' (the column "
                           "generate_synthetic.py writes).")
    data.add_argument("--instance_data_dir", type=str, default=None,
                      help="Upstream DreamBooth input: a folder of images that all train with --instance_prompt.")
    data.add_argument("--instance_prompt", type=str, default=None, help="Caption of every --instance_data_dir image.")
    data.add_argument("--instance_domain", type=str, default=None,
                      help="Domain name of the --instance_data_dir images, as it appears in --instance_prompt "
                           "(textual inversion learns its token and needs it; the others record it).")
    add_resolution_arg(data)
    data.add_argument("--center_crop", action="store_true",
                      help="Center-crop after resizing; the default is a random crop (seeded by seed, epoch, image).")
    data.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=False,
                      help="Flip each image horizontally with p = 0.5 (default: %(default)s).")
    data.add_argument("--image_interpolation_mode", type=str, default="lanczos", choices=sorted(INTERPOLATION_MODES),
                      help="Filter of the resize to --resolution (default: %(default)s; upstream's DreamBooth resizes "
                           "bilinear, textual inversion bicubic, the LoRA scripts lanczos).")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="Data loading subprocesses (0 = main).")
    return parser


def add_mixsyn_args(parser):
    mix = parser.add_argument_group("MixSyn: mix clean and adversarially perturbed self-synthesized images")
    mix.add_argument("--perturbed_dataset_name", type=str, default=None,
                     help="The perturbed copy of --dataset_name (same ids), e.g. from the Anti-DreamBooth PGD script.")
    mix.add_argument("--mixup_mode", type=str, default="image", choices=["image", "pixel"],
                     help="'image': a fraction of whole images is perturbed; 'pixel': a fraction of each image's pixels.")
    mix.add_argument("--mixup_ratio", type=float, default=0.0,
                     help="Fraction of perturbed images (or pixels) in [0, 1]; 0 trains on the clean set.")
    mix.add_argument("--mixup_seed", type=int, default=0, help="Seed of the mix masks.")
    mix.add_argument("--mixup_pattern", type=str, default="random", choices=["random", "block"],
                     help="Pixel-mask layout in pixel mode: random positions or one block (see mixing.py).")
    mix.add_argument("--save_mixed_dataset", type=str, default=None,
                     help="Also save the training set here (mixed when a perturbed set is given, else the clean set).")
    return parser


def add_text_encoding_args(parser):
    text = parser.add_argument_group("text encoding")
    text.add_argument("--tokenizer_name", type=str, default=None,
                      help="Tokenizer folder or Hub id, if not the pretrained model's own.")
    text.add_argument("--tokenizer_max_length", type=int, default=None,
                      help="Token length of the captions (default: the tokenizer's model_max_length, 77 for CLIP).")
    text.add_argument("--text_encoder_use_attention_mask", action="store_true",
                      help="Mask the padding after the end-of-text token inside the text encoder.")
    text.add_argument("--pre_compute_text_embeddings", action="store_true",
                      help="Accepted for upstream's DeepFloyd IF commands: here the frozen text encoder runs on each "
                           "batch without gradients (the CLIP encoder of SD is small); not with --train_text_encoder.")
    return parser


def add_optimization_args(parser):
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train_batch_size", type=int, default=4, help="Images per device per micro-batch.")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per update.")
    optim.add_argument("--num_train_epochs", type=int, default=1,
                       help="Epochs (overridden by --max_train_steps; default: %(default)s).")
    optim.add_argument("--max_train_steps", type=int, default=None, help="Total optimizer updates.")
    optim.add_argument("--learning_rate", type=float, default=5e-6,
                       help="Initial learning rate after warmup (default: %(default)s).")
    optim.add_argument("--scale_lr", action="store_true",
                       help="Multiply the learning rate by accumulation steps × batch size × processes.")
    optim.add_argument("--lr_scheduler", type=str, default="constant", choices=LR_SCHEDULERS,
                       help="Learning-rate schedule.")
    optim.add_argument("--lr_step_rules", type=str, default=None,
                       help="piecewise_constant's rules, e.g. '1:10,0.1:20,0.01' (lr multiplier 1 until update 10, "
                            "0.1 until 20, then 0.01).")
    optim.add_argument("--lr_warmup_steps", type=int, default=500, help="Warmup updates of the schedule.")
    optim.add_argument("--lr_num_cycles", type=int, default=1, help="Hard restarts of cosine_with_restarts.")
    optim.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule.")
    optim.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit: less optimizer memory.")
    optim.add_argument("--adam_beta1", type=float, default=0.9, help="Adam β1.")
    optim.add_argument("--adam_beta2", type=float, default=0.999, help="Adam β2.")
    optim.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay.")
    optim.add_argument("--adam_epsilon", type=float, default=1e-08, help="Adam ε.")
    optim.add_argument("--max_grad_norm", type=float, default=1.0,
                       help="Gradient clipping norm, 0 disables it (default: %(default)s).")
    optim.add_argument("--set_grads_to_none", action="store_true",
                       help="Accepted for upstream commands: gradients are always set to None after each update.")
    optim.add_argument("--snr_gamma", type=float, default=None,
                       help="Min-SNR-γ loss weighting (arXiv:2303.09556); 5.0 is the recommended value.")
    optim.add_argument("--noise_offset", type=float, default=0.0,
                       help="Offset noise scale s: ε + s · n with one n ~ N(0, 1) per image and channel (0 = off).")
    optim.add_argument("--offset_noise", action="store_true",
                       help="Upstream DreamBooth's offset noise: --noise_offset 0.1 (when --noise_offset is 0).")
    optim.add_argument("--prediction_type", type=str, default=None, choices=["epsilon", "v_prediction"],
                       help="Train for this target instead of the model scheduler's prediction_type.")
    add_mixed_precision_arg(optim)
    optim.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere GPUs (faster).")
    optim.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for activation memory.")
    optim.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                       help="xformers attention (needs the xformers package).")
    optim.add_argument("--seed", type=int, default=None, help="Seed of noise, timesteps, data order and crops.")
    optim.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                       help="Accepted for torch.distributed launchers; accelerate assigns the ranks.")
    return parser


def add_checkpoint_args(parser):
    ckpt = parser.add_argument_group("checkpoints and validation")
    ckpt.add_argument("--checkpointing_steps", type=int, default=500, help="Save a resumable state every N updates.")
    ckpt.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    ckpt.add_argument("--resume_from_checkpoint", type=str, default=None,
                      help="A checkpoint folder (anywhere, or a checkpoint-N name inside --output_dir) or 'latest' "
                           "(the newest checkpoint-N in --output_dir). The resumed run must use the checkpoint's flags "
                           "and inputs.")
    ckpt.add_argument("--validation_prompt", type=str, default=None,
                      help="Prompt of the validation images; the last ones go into the model card.")
    ckpt.add_argument("--num_validation_images", type=int, default=4, help="Validation images per validation.")
    ckpt.add_argument("--validation_steps", type=int, default=100,
                      help="Validate every N updates (default: %(default)s); and after training.")
    ckpt.add_argument("--validation_epochs", type=int, default=None,
                      help="Validate after every N-th epoch (from the first; default: %(default)s).")
    ckpt.add_argument("--validation_scheduler", type=str, default="DPMSolverMultistepScheduler",
                      choices=["DPMSolverMultistepScheduler", "DDPMScheduler"], help="Sampler of the validation images.")
    ckpt.add_argument("--validation_images", type=str, nargs="+", default=None,
                      help="DeepFloyd IF stage II only (images to upscale); accepted so its commands parse, refused "
                           "with Stable Diffusion.")
    ckpt.add_argument("--class_labels_conditioning", type=str, default=None,
                      help="DeepFloyd IF stage II only ('timesteps'); refused for a UNet without class embeddings.")
    return parser


def add_training_args(parser):
    """The groups every training script shares: data, MixSyn mix, optimisation, checkpoints, outputs."""
    model = parser.add_argument_group("model")
    add_pretrained_model_args(model)
    add_training_data_args(parser)
    add_mixsyn_args(parser)
    add_text_encoding_args(parser)
    add_optimization_args(parser)
    add_checkpoint_args(parser)
    add_model_output_args(parser.add_argument_group("outputs"))
    return parser


def check_training_outputs(args):
    """An occupied --output_dir or --save_mixed_dataset is replaced only with --overwrite, continued only with
    --resume_from_checkpoint: a second run can never mix its weights with another run's checkpoints."""
    if args.overwrite and args.resume_from_checkpoint:
        raise InputError("pass --overwrite (start over) or --resume_from_checkpoint (continue), not both")
    continuing = args.resume_from_checkpoint is not None
    hint = "pass --overwrite to replace it or --resume_from_checkpoint latest to continue it"
    check_output_dir(args.output_dir, args.overwrite or continuing, hint=hint)
    if args.save_mixed_dataset:
        check_output_dir(args.save_mixed_dataset, args.overwrite or continuing, flag="--save_mixed_dataset",
                         hint="pass --overwrite to replace it")


def check_optimization_args(args):
    """Ranges of the optimisation and checkpoint flags (upstream accepts any number; a bad one fails hours in)."""
    require_positive(args, "train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_train_steps",
                     "learning_rate", "lr_num_cycles", "lr_power", "adam_epsilon", "snr_gamma", "checkpointing_steps",
                     "checkpoints_total_limit", "num_validation_images", "validation_steps")
    require_non_negative(args, "lr_warmup_steps", "adam_weight_decay", "max_grad_norm", "seed",
                         "dataloader_num_workers", "mixup_seed")
    for flag in ("adam_beta1", "adam_beta2"):
        require_range(args, flag, 0, 1, include_high=False)


def check_training_args(args):
    """Reject bad flag combinations of the training groups before any model is loaded."""
    if (args.dataset_name is None and args.train_data_dir is None) == (args.instance_data_dir is None):
        raise InputError("pass one of --dataset_name, --train_data_dir and --instance_data_dir")
    if args.train_data_dir is not None and not Path(args.train_data_dir).is_dir():
        raise InputError(f"--train_data_dir {args.train_data_dir} is not a folder")
    if args.lr_scheduler == "piecewise_constant" and not args.lr_step_rules:
        raise InputError("--lr_scheduler piecewise_constant needs --lr_step_rules, e.g. '1:10,0.1:20,0.01'")
    if args.pre_compute_text_embeddings and getattr(args, "train_text_encoder", False):
        raise InputError("--pre_compute_text_embeddings cannot be used with --train_text_encoder")
    if args.instance_data_dir is not None:
        if not Path(args.instance_data_dir).is_dir():
            raise InputError(f"--instance_data_dir {args.instance_data_dir} is not a folder")
        if not args.instance_prompt:
            raise InputError("--instance_prompt is required with --instance_data_dir")
    require_range(args, "mixup_ratio", 0, 1)
    if args.mixup_ratio > 0 and args.perturbed_dataset_name is None:
        raise InputError(f"--mixup_ratio {args.mixup_ratio} needs --perturbed_dataset_name")
    check_resolution(args.resolution)
    check_optimization_args(args)
    require_positive(args, "validation_epochs", "max_train_samples", "tokenizer_max_length")
    check_hub_token_not_logged(args)
    if args.enable_xformers_memory_efficient_attention:
        from diffusers.utils.import_utils import is_xformers_available

        if not is_xformers_available():
            raise InputError("--enable_xformers_memory_efficient_attention needs xformers (pip install xformers)")
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as error:
            raise InputError("--use_8bit_adam needs bitsandbytes (pip install bitsandbytes)") from error
    if args.privacy_report is not None:
        from .model_card import read_privacy_report

        read_privacy_report(args.privacy_report)
    from .training import resolve_resume_checkpoint

    resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)  # a missing checkpoint fails here
    check_training_outputs(args)


# ----------------------------------------------------------------------------------------------
# The attack scripts
# ----------------------------------------------------------------------------------------------

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


def check_attack_args(args):
    """Flag checks of `add_attack_args` that need no model or data."""
    require_positive(args, "batch_size")
    require_non_negative(args, "seed")
    check_resolution(args.resolution)
    if args.null_prompt and args.textual_inversion:
        raise InputError("--null_prompt ignores captions, so --textual_inversion placeholders would never be used")


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
    if not 0 < args.calibration_fraction < 1:
        raise InputError(f"--calibration_fraction must be in (0, 1), got {args.calibration_fraction}")
