"""The flags of the three training scripts, defined once, and their checks.

The groups keep the names and defaults of diffusers' `train_dreambooth.py`, `train_dreambooth_lora.py`,
`train_text_to_image_lora.py` and `textual_inversion.py`; `add_training_args` adds every group a training script
shares, `check_training_args` rejects bad values and combinations before any model is loaded.
"""

import argparse
from pathlib import Path

from .checkpoints import resolve_resume_checkpoint
from .cli import InputError
from .flags import (
    add_hub_token_arg,
    add_mixed_precision_arg,
    add_pretrained_model_args,
    add_resolution_arg,
    check_outputs_apart,
    require_non_negative,
    require_positive,
    require_range,
)
from .images import INTERPOLATION_MODES, check_resolution
from .model_card import read_privacy_report
from .outputs import check_output_dir

# diffusers' `SchedulerType` names.
LR_SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "piecewise_constant"]


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
    add_hub_token_arg(parser)
    return parser


def add_training_args(parser):
    """The groups every training script shares: data, MixSyn mix, optimisation, checkpoints, outputs."""
    model = parser.add_argument_group("model")
    add_pretrained_model_args(model)
    model.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                       help="A VAE folder or Hub id replacing the pipeline's own (upstream's SDXL scripts; e.g. "
                            "madebyollin/sdxl-vae-fp16-fix, since SDXL's own VAE overflows in fp16 and is kept "
                            "in fp32 otherwise). The model card names it.")
    add_training_data_args(parser)
    add_mixsyn_args(parser)
    add_text_encoding_args(parser)
    add_optimization_args(parser)
    add_checkpoint_args(parser)
    add_model_output_args(parser.add_argument_group("outputs"))
    return parser


# The flags naming what a training run reads: its outputs must stay clear of them. --resume_from_checkpoint is
# not among them: its usual place is inside --output_dir.
TRAINING_INPUTS = ("dataset_name", "train_data_dir", "instance_data_dir", "perturbed_dataset_name",
                   "pretrained_model_name_or_path", "tokenizer_name", "class_data_dir", "privacy_report")
# Those that may name a Hub id, checked at the start of `main` (`check_paths_or_hub_ids`).
TRAINING_PATHS_OR_HUB_IDS = ("pretrained_model_name_or_path", "tokenizer_name", "dataset_name", "train_data_dir",
                             "instance_data_dir", "perturbed_dataset_name")


def check_training_outputs(args):
    """--output_dir and --save_mixed_dataset lie outside every input and each other, and can be written; an
    occupied one is replaced only with --overwrite, continued only with --resume_from_checkpoint: a second run can
    never mix its weights with another run's checkpoints. Called in `parse_args` and again at the start of `main`,
    under the run's `OutputLock`, so the check and the lock are one step."""
    if args.overwrite and args.resume_from_checkpoint:
        raise InputError("pass --overwrite (start over) or --resume_from_checkpoint (continue), not both")
    check_outputs_apart(args, ("output_dir", "save_mixed_dataset"), TRAINING_INPUTS)
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
                         "dataloader_num_workers", "mixup_seed", "noise_offset")
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
        read_privacy_report(args.privacy_report)
    resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)  # a missing checkpoint fails here
    check_training_outputs(args)


def noise_offset_of(args):
    """The offset-noise scale: --noise_offset, or 0.1 for upstream DreamBooth's --offset_noise."""
    return args.noise_offset or (0.1 if args.offset_noise else 0.0)


def check_hub_token_not_logged(args):
    if args.hub_token is not None and "wandb" in (getattr(args, "report_to", "") or ""):
        raise InputError("--hub_token with --report_to wandb would expose the token; use `huggingface-cli login`")
