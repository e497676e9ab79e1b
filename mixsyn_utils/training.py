"""What the three MixSyn fine-tuning scripts share: flags, accelerator and optimizer, checkpoints, the resumable loop.

The training set is built in `training_data.py`, the model card and Hub upload in `model_card.py`.

The flags keep the names and defaults of diffusers' `train_dreambooth.py`, `train_dreambooth_lora.py` and
`textual_inversion.py`. Where those scripts are known to go wrong, this module does it differently:
- resume skips the batches already seen in the current epoch (the data order is a function of
  (seed, epoch) only, and crops/flips of image i in epoch e use a generator seeded by (seed, e, i));
- `--resume_from_checkpoint` takes a path anywhere, and a path that does not exist is an error;
- `--mixed_precision` defaults to None, so the accelerate config decides;
- checkpoints are written to a hidden folder, renamed when whole, and rotated by the main process only
  after every process has finished writing;
- the Hub token never reaches a tracker, a model card or a log.
"""

import contextlib
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from .data import InputError, check_resolution
from .model_card import read_privacy_report
from .models import add_pretrained_model_args

TRAINING_STATE_FILE = "training_state.json"


# ----------------------------------------------------------------------------------------------
# Flags shared by the three scripts (upstream names and defaults; scripts override a few defaults)
# ----------------------------------------------------------------------------------------------

def add_common_args(parser):
    """Add every flag the three scripts share to `parser` (an `argparse.ArgumentParser`)."""
    model = parser.add_argument_group("model")
    add_pretrained_model_args(model)

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
    data.add_argument("--resolution", type=int, default=None,
                      help="Training resolution in pixels (multiple of 8); default: the model's native resolution "
                           "(512 for SD-1.4, as upstream).")
    data.add_argument("--center_crop", action="store_true",
                      help="Center-crop after resizing; the default is a random crop (seeded by seed, epoch, image).")
    data.add_argument("--random_flip", action="store_true", help="Flip each image horizontally with p = 0.5.")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="Data loading subprocesses (0 = main).")

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
    optim.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                       help="Default: the accelerate config (upstream textual_inversion.py forced 'no').")
    optim.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere GPUs (faster).")
    optim.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for activation memory.")
    optim.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                       help="xformers attention (needs the xformers package).")
    optim.add_argument("--seed", type=int, default=None, help="Seed of noise, timesteps, data order and crops.")

    ckpt = parser.add_argument_group("checkpoints and validation")
    ckpt.add_argument("--checkpointing_steps", type=int, default=500, help="Save a resumable state every N updates.")
    ckpt.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    ckpt.add_argument("--resume_from_checkpoint", type=str, default=None,
                      help="A checkpoint folder (anywhere) or 'latest' (newest checkpoint-N in --output_dir).")
    ckpt.add_argument("--validation_prompt", type=str, default=None, help="Prompt of the validation images.")
    ckpt.add_argument("--num_validation_images", type=int, default=4, help="Validation images per validation.")
    ckpt.add_argument("--validation_steps", type=int, default=100, help="Validate every N updates.")

    out = parser.add_argument_group("outputs")
    out.add_argument("--output_dir", type=str, default="mixsyn-model", help="Where weights and checkpoints go.")
    out.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, relative to --output_dir.")
    out.add_argument("--report_to", type=str, default="tensorboard", help="'tensorboard', 'wandb', 'comet_ml' or 'all'.")
    out.add_argument("--privacy_report", type=str, default=None,
                     help="results.json of evaluate.py: its AUC/TPR (with CIs) go into the model card.")
    out.add_argument("--push_to_hub", action="store_true", help="Upload the output folder to the Hub.")
    out.add_argument("--hub_model_id", type=str, default=None, help="Hub repo id; default: the output folder name.")
    out.add_argument("--hub_token", type=str, default=None, help="Hub token (prefer `huggingface-cli login`).")
    return parser


def check_common_args(args):
    """Reject bad flag combinations before any model is loaded (raises `InputError` naming the flag)."""
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
    for flag in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "validation_steps"):
        if getattr(args, flag) <= 0:
            raise InputError(f"--{flag} must be positive, got {getattr(args, flag)}")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit <= 0:
        raise InputError(f"--checkpoints_total_limit must be positive, got {args.checkpoints_total_limit}")
    if args.hub_token is not None and "wandb" in args.report_to:
        raise InputError("--hub_token with --report_to wandb would expose the token; use `huggingface-cli login`")
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
    args.resume_path = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    return args


# ----------------------------------------------------------------------------------------------
# Accelerator, optimizer, schedule
# ----------------------------------------------------------------------------------------------

def make_accelerator(args):
    """An `Accelerator` with the trackers of `--report_to`; seeds everything when `--seed` is set."""
    import logging

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    project_config = ProjectConfiguration(project_dir=args.output_dir,
                                          logging_dir=str(Path(args.output_dir, args.logging_dir)))
    accelerator = Accelerator(mixed_precision=args.mixed_precision, log_with=args.report_to,
                              project_config=project_config)
    if args.seed is not None:
        set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    return accelerator


def weight_dtype_of(accelerator):
    """dtype of the frozen models: fp16/bf16 under mixed precision; trainable weights stay float32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def make_optimizer(params, args, accelerator):
    """AdamW (or bitsandbytes AdamW8bit) over `params`; `--scale_lr` scales by GA × batch × processes."""
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                           weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


def plan_steps(args, batches_per_epoch):
    """Fill in `max_train_steps` or `num_train_epochs` (upstream rule): updates/epoch = ⌈batches / GA⌉."""
    args.updates_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * args.updates_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / args.updates_per_epoch)


def make_lr_scheduler(optimizer, args, accelerator):
    """diffusers' `get_scheduler`; steps × processes because the prepared scheduler steps once per process."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(args.lr_scheduler, optimizer=optimizer,
                         num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                         num_training_steps=args.max_train_steps * accelerator.num_processes,
                         num_cycles=args.lr_num_cycles, power=args.lr_power)


def tracker_config(args):
    """The flags as tracker hyper-parameters: scalars only, and never a token."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in vars(args).items() if "token" not in key or key == "placeholder_token_template"}


def init_trackers(accelerator, args, project_name):
    if accelerator.is_main_process:
        accelerator.init_trackers(project_name, config=tracker_config(args))


# ----------------------------------------------------------------------------------------------
# Checkpoints: resumable state, written whole, rotated by the main process
# ----------------------------------------------------------------------------------------------

def checkpoint_step(path):
    """The update count stored in a checkpoint (its training_state.json, else its `checkpoint-N` name)."""
    state_file = Path(path) / TRAINING_STATE_FILE
    if state_file.is_file():
        return int(json.loads(state_file.read_text())["global_step"])
    match = re.fullmatch(r"checkpoint-(\d+)", Path(path).name)
    if match is None:
        raise InputError(f"--resume_from_checkpoint {path} is not a checkpoint (no {TRAINING_STATE_FILE})")
    return int(match.group(1))


def list_checkpoints(output_dir):
    """Finished `checkpoint-N` folders of `output_dir`, oldest first."""
    if not Path(output_dir).is_dir():
        return []
    found = [p for p in Path(output_dir).iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resolve_resume_checkpoint(resume_from_checkpoint, output_dir):
    """The folder to resume from: None for a fresh start (no flag, or `latest` with no checkpoint yet)."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return str(found[-1]) if found else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise InputError(f"--resume_from_checkpoint {resume_from_checkpoint} does not exist "
                         "(pass 'latest' to resume from --output_dir or start fresh)")
    checkpoint_step(path)
    return str(path)


def save_checkpoint(accelerator, output_dir, global_step, checkpoints_total_limit=None):
    """Save the full training state to `output_dir/checkpoint-N` and keep the newest `checkpoints_total_limit`.

    Every process writes into one hidden folder (its RNG state is per process); after a barrier the main
    process renames it into place and only then deletes old checkpoints, so a crash never leaves fewer
    than the limit of whole checkpoints and no process races another's deletion.
    """
    final_dir = Path(output_dir) / f"checkpoint-{global_step}"
    partial_dir = Path(output_dir) / f".checkpoint-{global_step}.incomplete"
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial_dir))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial_dir / TRAINING_STATE_FILE).write_text(json.dumps({"global_step": global_step}))
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(partial_dir, final_dir)
        if checkpoints_total_limit is not None:
            for old in list_checkpoints(output_dir)[:-checkpoints_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final_dir


def register_pretrained_checkpoint_hooks(accelerator):
    """Keep diffusers/transformers models in checkpoints as `unet/`, `text_encoder/`, `vae/` folders.

    So `checkpoint-N/unet` loads with `UNet2DConditionModel.from_pretrained` (as upstream DreamBooth).
    """
    def pretrained_model(model):
        model = accelerator.unwrap_model(model)
        return model.vae if isinstance(model, LatentEncoder) else model

    def subfolder(model):
        return {"UNet2DConditionModel": "unet", "CLIPTextModel": "text_encoder", "AutoencoderKL": "vae"}.get(
            type(model).__name__)

    def save_hook(models, weights, output_dir):
        if not accelerator.is_main_process:
            return
        for index in reversed(range(len(models))):
            model = pretrained_model(models[index])
            if subfolder(model) is not None:
                model.save_pretrained(str(Path(output_dir) / subfolder(model)))
                weights.pop(index)

    def load_hook(models, input_dir):
        for index in reversed(range(len(models))):
            model = pretrained_model(models[index])
            if subfolder(model) is not None:
                loaded = type(model).from_pretrained(str(Path(input_dir) / subfolder(model)))
                model.load_state_dict(loaded.state_dict())
                models.pop(index)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def resume_training_state(accelerator, resume_path):
    """Load a checkpoint (models, optimizer, schedule, RNG states); returns the update count reached."""
    if resume_path is None:
        return 0
    accelerator.print(f"Resuming from checkpoint {resume_path}")
    accelerator.load_state(str(resume_path))
    return checkpoint_step(resume_path)


# ----------------------------------------------------------------------------------------------
# The loop: identical in the three scripts, only the loss and the after-update hook differ
# ----------------------------------------------------------------------------------------------

def train_loop(accelerator, args, *, models, dataloader, batch_sampler, optimizer, lr_scheduler, params_to_clip,
               loss_fn, global_step=0, after_update=None, validate=None, logger=None):
    """Run updates `global_step+1 .. max_train_steps`; returns the final update count.

    `loss_fn(batch) -> (loss, logs)`. Gradients of `gradient_accumulation_steps` micro-batches (or of
    the rest of the epoch) are summed with DDP sync only on the last one. On resume, epoch
    ⌊step / updates_per_epoch⌋ restarts after its first (step mod updates_per_epoch) × GA batches.
    """
    from tqdm.auto import tqdm

    accumulation = args.gradient_accumulation_steps
    first_epoch = global_step // args.updates_per_epoch
    skip_batches = (global_step % args.updates_per_epoch) * accumulation
    if logger is not None:
        logger.info("***** Running training *****")
        logger.info(f"  Num examples = {len(dataloader.dataset)}, batches per epoch = {batch_sampler.batches_per_epoch()}")
        logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
        logger.info(f"  Gradient accumulation steps = {accumulation}, total optimization steps = {args.max_train_steps}")
        logger.info(f"  Resuming at step {global_step} (epoch {first_epoch}, skipping {skip_batches} batches)")
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)
    for epoch in range(first_epoch, args.num_train_epochs):
        for model in models:
            model.train()
        batch_sampler.set_epoch(epoch, skip_batches if epoch == first_epoch else 0)
        dataloader.dataset.set_epoch(epoch)
        num_batches = batch_sampler.batches_per_epoch()
        start = batch_sampler.skip_batches
        for batch_index, batch in enumerate(dataloader, start=start):
            sync = (batch_index + 1) % accumulation == 0 or batch_index + 1 == num_batches
            with contextlib.ExitStack() as stack:
                if not sync:
                    for model in models:
                        stack.enter_context(accelerator.no_sync(model))
                batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                loss, logs = loss_fn(batch)
                accelerator.backward(loss / accumulation)
            if not sync:
                continue
            if args.max_grad_norm and args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params_to_clip, args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if after_update is not None:
                after_update()
            global_step += 1
            progress.update(1)
            logs = {"loss": loss.detach().item(), **logs, "lr": lr_scheduler.get_last_lr()[0]}
            progress.set_postfix(**logs)
            accelerator.log(logs, step=global_step)
            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
            if validate is not None and args.validation_prompt and global_step % args.validation_steps == 0:
                validate(global_step)
            if global_step >= args.max_train_steps:
                break
        if global_step >= args.max_train_steps:
            break
    progress.close()
    accelerator.wait_for_everyone()
    return global_step


def log_validation(accelerator, args, pipeline, global_step):
    """Generate `--num_validation_images` for `--validation_prompt` and send them to the trackers.

    A generator seeded by `--seed` draws the latents, so validation leaves the training RNG untouched.
    """
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(args.seed or 0)
    images = [pipeline(args.validation_prompt, num_inference_steps=25, generator=generator,
                       height=args.resolution, width=args.resolution).images[0]
              for _ in range(args.num_validation_images)]
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack([np.asarray(image) for image in images]),
                                      global_step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(image, caption=args.validation_prompt) for image in images]})
    return images


def validation_pipeline(args, accelerator, **components):
    """A `StableDiffusionPipeline` of the base model with the in-training `components` (unet=, text_encoder=...)."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant, safety_checker=None,
        requires_safety_checker=False, torch_dtype=weight_dtype_of(accelerator),
        **{name: accelerator.unwrap_model(part) if isinstance(part, torch.nn.Module) else part
           for name, part in components.items()})
    return pipeline.to(accelerator.device)


# ----------------------------------------------------------------------------------------------
# Prior-preservation flags (DreamBooth and DreamBooth+LoRA) and the denoising loss of one batch
# ----------------------------------------------------------------------------------------------

def add_prior_preservation_args(parser):
    group = parser.add_argument_group("prior preservation (DreamBooth, arXiv:2208.12242)")
    group.add_argument("--with_prior_preservation", action="store_true",
                       help="Add the prior-preservation loss on class images generated by the base model.")
    group.add_argument("--prior_loss_weight", type=float, default=1.0, help="λ of the prior-preservation loss.")
    group.add_argument("--class_data_dir", type=str, default=None, help="Cache folder of the class images.")
    group.add_argument("--class_prompt", type=str, default=None, help="Prompt of the class images, e.g. 'a face'.")
    group.add_argument("--num_class_images", type=int, default=100, help="Class images to generate and use.")
    group.add_argument("--sample_batch_size", type=int, default=4, help="Batch size of class-image generation.")
    return parser


class LatentEncoder(torch.nn.Module):
    """z₀ = scaling_factor · sample of E(x): the VAE encoder as a module, so DDP can wrap it when it trains."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, pixel_values):
        posterior = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist
        return posterior.sample() * self.vae.config.scaling_factor


def denoising_batch_loss(batch, unet, latent_encoder, text_encoder, noise_scheduler, args, weight_dtype):
    """The DreamBooth/LoRA/TI training loss of one batch; returns (loss, logs).

    z₀ = scaling · E(x), ε ~ N(0, I), t ~ U{0, …, T−1}, z_t = √ᾱ_t z₀ + √(1 − ᾱ_t) ε (the scheduler's
    `add_noise`), L = `dreambooth_loss(ε_θ(z_t, t, c), target)` with instance rows first; without class
    rows it is the plain (optionally Min-SNR-weighted) denoising loss.
    """
    from .dreambooth import dreambooth_loss, prediction_target

    latents = latent_encoder(batch["pixel_values"])
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              device=latents.device).long()
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    encoder_hidden_states = text_encoder(batch["input_ids"])[0]
    # Inputs in the frozen models' dtype: a frozen half-precision UNet is not autocast-wrapped (upstream TI).
    model_pred = unet(noisy_latents.to(weight_dtype), timesteps, encoder_hidden_states.to(weight_dtype)).sample
    target = prediction_target(noise_scheduler, latents, noise, timesteps)
    loss, instance_loss, prior_loss = dreambooth_loss(
        model_pred, target, timesteps, noise_scheduler, batch["num_instance"],
        prior_loss_weight=getattr(args, "prior_loss_weight", 1.0), snr_gamma=args.snr_gamma)
    logs = {"prior_loss": prior_loss.detach().item()} if model_pred.shape[0] > batch["num_instance"] else {}
    return loss, logs
