"""Every flag two or more scripts share, defined once: `add_*_args(parser)` adds a group, `check_*` validates it.

A script lists the groups it uses at the top of its `parse_args`, then adds its own flags, so a reader sees
every flag from the script. The checks only read `args` (they raise `InputError` naming the flag); values
derived from flags are returned by small functions (`class_data_dir_of`), never written back into `args`.
"""

from pathlib import Path

from .cli import InputError
from .images import check_resolution

RESOLUTION_HELP = ("Image size in pixels (a multiple of 8) fed to the VAE; default: the model's native size "
                   "(unet sample_size × 8, i.e. 512 for SD-1.4).")


def require_positive(args, *flags):
    """Every named flag must be > 0."""
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise InputError(f"--{flag} must be positive, got {value}")


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
    parser.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, relative to --output_dir.")
    parser.add_argument("--report_to", type=str, default="tensorboard",
                        help="'tensorboard', 'wandb', 'comet_ml' or 'all'.")
    parser.add_argument("--privacy_report", type=str, default=None,
                        help="results.json of evaluate.py: its AUC/TPR (with CIs) go into the model card.")
    parser.add_argument("--push_to_hub", action="store_true", help="Upload the output folder to the Hub.")
    parser.add_argument("--hub_model_id", type=str, default=None, help="Hub repo id; default: the output folder name.")
    _add_hub_token_arg(parser)
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
                       help="Cache of the class images (a saved dataset); default <output_dir>.class_images.")
    group.add_argument("--class_prompt", type=str, default=None,
                       help="Prompt of the class images, e.g. 'a photo of person'.")
    group.add_argument("--num_class_images", type=int, default=100,
                       help="Class images generated once and cached (upstream's default; Anti-DreamBooth's scripts "
                            "use 200).")
    group.add_argument("--class_num_inference_steps", type=int, default=50, help="Sampler steps for class images.")
    group.add_argument("--sample_batch_size", type=int, default=4, help="Class images per pipeline call.")
    return parser


def check_prior_preservation_args(args):
    if args.with_prior_preservation and not args.class_prompt:
        raise InputError("--class_prompt is required with --with_prior_preservation")
    require_positive(args, "num_class_images", "class_num_inference_steps", "sample_batch_size")


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
    data.add_argument("--image_column", type=str, default="image", help="Column of --dataset_name holding images.")
    data.add_argument("--caption_column", type=str, default="prompt", help="Column of --dataset_name holding captions.")
    data.add_argument("--instance_data_dir", type=str, default=None,
                      help="Upstream DreamBooth input: a folder of images that all train with --instance_prompt.")
    data.add_argument("--instance_prompt", type=str, default=None, help="Caption of every --instance_data_dir image.")
    data.add_argument("--instance_domain", type=str, default=None,
                      help="Domain name of the --instance_data_dir images, as it appears in --instance_prompt "
                           "(textual inversion learns its token and needs it; the others record it).")
    add_resolution_arg(data)
    data.add_argument("--center_crop", action="store_true",
                      help="Center-crop after resizing; the default is a random crop (seeded by seed, epoch, image).")
    data.add_argument("--random_flip", action="store_true", help="Flip each image horizontally with p = 0.5.")
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
    mix.add_argument("--save_mixed_dataset", type=str, default=None, help="Also save the mixed training set here.")
    return parser


def add_optimization_args(parser):
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train_batch_size", type=int, default=4, help="Images per device per micro-batch.")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per update.")
    optim.add_argument("--num_train_epochs", type=int, default=1, help="Epochs (overridden by --max_train_steps).")
    optim.add_argument("--max_train_steps", type=int, default=None, help="Total optimizer updates.")
    optim.add_argument("--learning_rate", type=float, default=5e-6, help="Initial learning rate (after warmup).")
    optim.add_argument("--scale_lr", action="store_true",
                       help="Multiply the learning rate by accumulation steps × batch size × processes.")
    optim.add_argument("--lr_scheduler", type=str, default="constant",
                       choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                "constant_with_warmup"], help="Learning-rate schedule.")
    optim.add_argument("--lr_warmup_steps", type=int, default=500, help="Warmup updates of the schedule.")
    optim.add_argument("--lr_num_cycles", type=int, default=1, help="Hard restarts of cosine_with_restarts.")
    optim.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule.")
    optim.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit: less optimizer memory.")
    optim.add_argument("--adam_beta1", type=float, default=0.9, help="Adam β1.")
    optim.add_argument("--adam_beta2", type=float, default=0.999, help="Adam β2.")
    optim.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay.")
    optim.add_argument("--adam_epsilon", type=float, default=1e-08, help="Adam ε.")
    optim.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (0 disables).")
    optim.add_argument("--snr_gamma", type=float, default=None,
                       help="Min-SNR-γ loss weighting (arXiv:2303.09556); 5.0 is the recommended value.")
    add_mixed_precision_arg(optim)
    optim.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere GPUs (faster).")
    optim.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for activation memory.")
    optim.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                       help="xformers attention (needs the xformers package).")
    optim.add_argument("--seed", type=int, default=None, help="Seed of noise, timesteps, data order and crops.")
    return parser


def add_checkpoint_args(parser):
    ckpt = parser.add_argument_group("checkpoints and validation")
    ckpt.add_argument("--checkpointing_steps", type=int, default=500, help="Save a resumable state every N updates.")
    ckpt.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    ckpt.add_argument("--resume_from_checkpoint", type=str, default=None,
                      help="A checkpoint folder (anywhere) or 'latest' (newest checkpoint-N in --output_dir). The "
                           "resumed run must use the checkpoint's flags and inputs.")
    ckpt.add_argument("--validation_prompt", type=str, default=None, help="Prompt of the validation images.")
    ckpt.add_argument("--num_validation_images", type=int, default=4, help="Validation images per validation.")
    ckpt.add_argument("--validation_steps", type=int, default=100, help="Validate every N updates.")
    return parser


def add_training_args(parser):
    """The groups every training script shares: data, MixSyn mix, optimisation, checkpoints, outputs."""
    model = parser.add_argument_group("model")
    add_pretrained_model_args(model)
    add_training_data_args(parser)
    add_mixsyn_args(parser)
    add_optimization_args(parser)
    add_checkpoint_args(parser)
    add_model_output_args(parser.add_argument_group("outputs"))
    return parser


def check_training_args(args):
    """Reject bad flag combinations of the training groups before any model is loaded."""
    if (args.dataset_name is None) == (args.instance_data_dir is None):
        raise InputError("pass exactly one of --dataset_name and --instance_data_dir")
    if args.instance_data_dir is not None:
        if not Path(args.instance_data_dir).is_dir():
            raise InputError(f"--instance_data_dir {args.instance_data_dir} is not a folder")
        if not args.instance_prompt:
            raise InputError("--instance_prompt is required with --instance_data_dir")
    if not 0.0 <= args.mixup_ratio <= 1.0:
        raise InputError(f"--mixup_ratio must be in [0, 1], got {args.mixup_ratio}")
    if args.mixup_ratio > 0 and args.perturbed_dataset_name is None:
        raise InputError(f"--mixup_ratio {args.mixup_ratio} needs --perturbed_dataset_name")
    check_resolution(args.resolution)
    require_positive(args, "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps",
                     "validation_steps", "checkpoints_total_limit")
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
