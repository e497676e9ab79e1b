"""What the three MixSyn fine-tuning scripts share: accelerator, optimizer and schedule, checkpoints, the loop.

Their flags are in `flags.py`, their training set in `training_data.py`, the model card in `model_card.py`.
The flags keep the names and defaults of diffusers' `train_dreambooth.py`, `train_dreambooth_lora.py` and
`textual_inversion.py`. Where those scripts are known to go wrong, this module does it differently:
- resume skips the batches already seen in the current epoch (the data order is a function of
  (seed, epoch) only, and crops/flips of image i in epoch e use a generator seeded by (seed, e, i));
- `--resume_from_checkpoint` takes a path anywhere (or a checkpoint name inside --output_dir), a path that does
  not exist is an error, a checkpoint made with other flags or inputs is refused (`training_signature`), and so
  is one whose RNG states do not load;
- an occupied `--output_dir` is refused unless `--overwrite` (emptied when training starts) or
  `--resume_from_checkpoint`; a run that fails before its first checkpoint leaves no folder behind;
- `--mixed_precision` defaults to None, so the accelerate config decides;
- validation runs on the main process under the accelerator's autocast, by steps and/or epochs, and once after
  training; its last images go into the model card;
- checkpoints are written to a hidden folder, renamed when whole, and rotated by the main process only
  after every process has finished writing;
- the Hub token never reaches a tracker, a model card or a log.
"""

import contextlib
import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from .cli import InputError, first_line
from .diffusion import alphas_cumprod, q_sample
from .dreambooth import dreambooth_loss, offset_noise, prediction_target
from .flags import class_data_dir_of, is_secret_flag, noise_offset_of
from .models import attention_mask_until_eos, encode_images_to_latents, load_components, weight_dtype_of
from .resumable import input_fingerprint, run_signature, signature_differences

TRAINING_STATE_FILE = "training_state.json"
# Schedules whose learning rate at update n does not depend on the total number of updates: with these a resumed
# run may train for longer than the original (the first updates are the same whatever the total).
LENGTH_FREE_SCHEDULES = ("constant", "constant_with_warmup")


# ----------------------------------------------------------------------------------------------
# Accelerator, optimizer, schedule
# ----------------------------------------------------------------------------------------------

def make_accelerator(args):
    """An `Accelerator` with the trackers of `--report_to`; seeds everything when `--seed` is set."""
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
    return accelerator


def start_output_dir(accelerator, args):
    """Create --output_dir once every input is checked; with --overwrite, first remove what it held.

    So the old run's checkpoints never survive into the new one (`--resume_from_checkpoint latest` would pick
    them up), and a run refused for bad input leaves no folder behind.
    """
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        if args.overwrite and output_dir.is_dir():
            shutil.rmtree(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()


def scaled_learning_rate(args, num_processes):
    """η = --learning_rate, times GA steps × batch size × processes with --scale_lr (upstream's rule)."""
    if not args.scale_lr:
        return args.learning_rate
    return args.learning_rate * args.gradient_accumulation_steps * args.train_batch_size * num_processes


def make_optimizer(params, learning_rate, args):
    """AdamW (or bitsandbytes AdamW8bit) over `params` at `learning_rate` with the --adam_* settings."""
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(params, lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                           weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


@dataclass(frozen=True)
class TrainingPlan:
    updates_per_epoch: int
    max_train_steps: int
    num_train_epochs: int


def plan_steps(args, batches_per_epoch):
    """The upstream rule: updates/epoch = ⌈batches / GA⌉; --max_train_steps, else epochs × updates/epoch."""
    updates_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps
    if max_train_steps is None:
        max_train_steps = args.num_train_epochs * updates_per_epoch
    return TrainingPlan(updates_per_epoch, max_train_steps, math.ceil(max_train_steps / updates_per_epoch))


def make_lr_scheduler(optimizer, args, plan, num_processes):
    """diffusers' `get_scheduler`; steps × processes because the prepared scheduler steps once per process."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(args.lr_scheduler, optimizer=optimizer, step_rules=args.lr_step_rules,
                         num_warmup_steps=args.lr_warmup_steps * num_processes,
                         num_training_steps=plan.max_train_steps * num_processes,
                         num_cycles=args.lr_num_cycles, power=args.lr_power)


def tracker_config(args):
    """The flags as tracker hyper-parameters: scalars only, and never a token."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in vars(args).items() if not is_secret_flag(key)}


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
    """The folder to resume from: None for a fresh start (no flag, or `latest` with no checkpoint yet).

    A path that is not a folder is looked up by its name inside `output_dir`, as upstream does for
    `--resume_from_checkpoint checkpoint-1500`.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return str(found[-1]) if found else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir() and (Path(output_dir) / path.name).is_dir():
        path = Path(output_dir) / path.name
    if not path.is_dir():
        raise InputError(f"--resume_from_checkpoint {resume_from_checkpoint} does not exist "
                         "(pass 'latest' to resume from --output_dir or start fresh)")
    checkpoint_step(path)
    return str(path)


def training_inputs(args, training_set):
    """Fingerprints of everything a training run reads (`resumable.input_fingerprint`): its training images,
    the pretrained model and, with prior preservation, the class images."""
    inputs = dict(training_set.fingerprints,
                  pretrained_model=input_fingerprint(args.pretrained_model_name_or_path, args.revision))
    if getattr(args, "with_prior_preservation", False):  # textual inversion has no prior-preservation flags
        inputs["class_images"] = input_fingerprint(class_data_dir_of(args))
    return inputs


def training_signature(args, inputs=None):
    """The run signature a checkpoint records and a resumed run must match (`resumable.run_signature`).

    With a schedule that does not depend on the total (`LENGTH_FREE_SCHEDULES`) the training length may grow
    on resume, so --max_train_steps and --num_train_epochs are left out of it.
    """
    signature = run_signature(args, inputs)
    if args.lr_scheduler in LENGTH_FREE_SCHEDULES:
        for flag in ("max_train_steps", "num_train_epochs"):
            signature["flags"].pop(flag, None)
    return signature


def save_checkpoint(accelerator, output_dir, global_step, signature, checkpoints_total_limit=None):
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
        (partial_dir / TRAINING_STATE_FILE).write_text(json.dumps({"global_step": global_step,
                                                                   "signature": signature}, indent=2))
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(partial_dir, final_dir)
        logging.getLogger(__name__).info(f"Saved the training state to {final_dir}")
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


def resume_training_state(accelerator, resume_path, signature):
    """Load a checkpoint (models, optimizer, schedule, RNG states); returns the update count reached.

    A checkpoint whose recorded `training_signature` differs from this run's is refused, naming the flags.
    """
    if resume_path is None:
        return 0
    state_file = Path(resume_path) / TRAINING_STATE_FILE
    recorded = json.loads(state_file.read_text()).get("signature") if state_file.is_file() else None
    if recorded is not None and recorded != signature:
        raise InputError(f"--resume_from_checkpoint {resume_path} was made with other "
                         f"{', '.join(signature_differences(recorded, signature))}; resume with the same flags "
                         "and inputs")
    check_random_states(resume_path, accelerator.process_index)
    accelerator.print(f"Resuming from checkpoint {resume_path}")
    accelerator.load_state(str(resume_path))
    return checkpoint_step(resume_path)


def check_random_states(resume_path, process_index):
    """This process's RNG states must load: `load_state` only logs an unreadable file at INFO level and goes on
    with fresh RNG streams, and the resumed weights then differ from an uninterrupted run's."""
    from accelerate.utils import load as accelerate_load

    states_file = Path(resume_path) / f"random_states_{process_index}.pkl"
    try:
        accelerate_load(states_file)  # accelerate's own weights-only loader, as `load_state` calls it
    except Exception as error:  # noqa: BLE001 - missing, truncated or foreign: all end the same way
        raise InputError(f"--resume_from_checkpoint {resume_path}: {states_file.name} cannot be read "
                         f"({first_line(error)})") from None


# ----------------------------------------------------------------------------------------------
# The loop: identical in the three scripts, only the loss and the after-update hook differ
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainingResult:
    global_step: int
    validation_images: list  # the last validation's PIL images (of the final weights), [] without --validation_prompt


def validation_due(args, global_step, epoch_end=None, final=False):
    """Whether to validate now: every --validation_steps updates, after every --validation_epochs-th epoch, and
    once after training (`final`), so the model card shows the final weights.

    `epoch_end`: the index of the epoch that just ended (upstream validates after epochs 0, N, 2N, …), else None.
    """
    if not args.validation_prompt or args.num_validation_images <= 0:
        return False
    if final:
        return True
    if epoch_end is not None:
        return args.validation_epochs is not None and epoch_end % args.validation_epochs == 0
    return args.validation_steps is not None and global_step % args.validation_steps == 0


def train_loop(accelerator, args, plan, *, models, dataloader, batch_sampler, optimizer, lr_scheduler,
               params_to_clip, loss_fn, signature, global_step=0, after_update=None, validate=None, logger=None):
    """Run updates `global_step+1 .. plan.max_train_steps`; returns a `TrainingResult`.

    `loss_fn(batch) -> (loss, logs)`; `after_update(global_step)` runs after each update. Gradients of
    `gradient_accumulation_steps` micro-batches (or of the rest of the epoch) are summed with DDP sync only on
    the last one. On resume, epoch ⌊step / updates_per_epoch⌋ restarts after its first
    (step mod updates_per_epoch) × GA batches.
    Checkpoints record `signature` (see `training_signature`). `validate(step) -> images` runs on the main
    process when `validation_due`, and once more after the last update so the final weights have images.
    """
    from tqdm.auto import tqdm

    accumulation = args.gradient_accumulation_steps
    first_epoch = global_step // plan.updates_per_epoch
    skip_batches = (global_step % plan.updates_per_epoch) * accumulation
    validated = {"step": None, "images": []}

    def run_validation():
        validated["step"] = global_step  # on every process, so all of them reach the same barriers
        if validate is not None and accelerator.is_main_process:
            validated["images"] = validate(global_step)
        accelerator.wait_for_everyone()

    if logger is not None:
        logger.info("***** Running training *****")
        logger.info(f"  Num examples = {len(dataloader.dataset)}, batches per epoch = {batch_sampler.batches_per_epoch()}")
        logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
        logger.info(f"  Gradient accumulation steps = {accumulation}, total optimization steps = {plan.max_train_steps}")
        logger.info(f"  Resuming at step {global_step} (epoch {first_epoch}, skipping {skip_batches} batches)")
    progress = tqdm(range(plan.max_train_steps), initial=global_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)
    with removed_if_nothing_finished(accelerator, args.output_dir, args.logging_dir):
        for epoch in range(first_epoch, plan.num_train_epochs):
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
                global_step += 1
                if after_update is not None:
                    after_update(global_step)
                progress.update(1)
                logs = {"loss": loss.detach().item(), **logs, "lr": lr_scheduler.get_last_lr()[0]}
                progress.set_postfix(**logs)
                accelerator.log(logs, step=global_step)
                if global_step % args.checkpointing_steps == 0:
                    save_checkpoint(accelerator, args.output_dir, global_step, signature, args.checkpoints_total_limit)
                if validation_due(args, global_step):
                    run_validation()
                if global_step >= plan.max_train_steps:
                    break
            if validation_due(args, global_step, epoch_end=epoch) and validated["step"] != global_step:
                run_validation()
            if global_step >= plan.max_train_steps:
                break
    progress.close()
    if validation_due(args, global_step, final=True) and validated["step"] != global_step:
        run_validation()
    accelerator.wait_for_everyone()
    return TrainingResult(global_step, validated["images"])


@contextlib.contextmanager
def removed_if_nothing_finished(accelerator, output_dir, logging_dir):
    """On failure, remove `output_dir` when no checkpoint was finished and it holds only what a run writes
    before its first checkpoint (tracker logs, a half-written checkpoint): a corrected rerun is not refused
    as an occupied folder. A folder holding anything else is left alone."""
    try:
        yield
    except BaseException:
        output_dir = Path(output_dir)
        transient = re.compile(rf"^({re.escape(Path(logging_dir).parts[0])}|\.checkpoint-\d+\.incomplete)$")
        if accelerator.is_main_process and output_dir.is_dir() and not list_checkpoints(output_dir) \
                and all(transient.match(entry.name) for entry in output_dir.iterdir()):
            shutil.rmtree(output_dir, ignore_errors=True)
        raise


def log_validation(accelerator, args, pipeline, global_step, resolution):
    """Generate `--num_validation_images` for `--validation_prompt`, send them to the trackers, return them.

    The pipeline runs under the accelerator's autocast (trained parts are float32, frozen ones half precision,
    as upstream). A generator seeded by `--seed` draws the latents, so validation leaves the training RNG untouched.
    """
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(args.seed or 0)
    with accelerator.autocast():
        images = [pipeline(args.validation_prompt, num_inference_steps=25, generator=generator,
                           height=resolution, width=resolution).images[0]
                  for _ in range(args.num_validation_images)]
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack([np.asarray(image) for image in images]),
                                      global_step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(image, caption=f"{i}: {args.validation_prompt}")
                                        for i, image in enumerate(images)]})
    return images


def validation_pipeline(args, accelerator, **components):
    """A `StableDiffusionPipeline` of the base model with the in-training `components` (unet=, text_encoder=...).

    Sampled with `--validation_scheduler` (upstream's DPM-Solver++ by default), built from the model's schedule.
    """
    import diffusers

    pipeline = diffusers.StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant, safety_checker=None,
        requires_safety_checker=False, dtype=weight_dtype_of(accelerator.mixed_precision), use_safetensors=True,
        **{name: accelerator.unwrap_model(part) if isinstance(part, torch.nn.Module) else part
           for name, part in components.items()})
    pipeline.scheduler = getattr(diffusers, args.validation_scheduler).from_config(pipeline.scheduler.config)
    return pipeline.to(accelerator.device)


# ----------------------------------------------------------------------------------------------
# The denoising loss of one batch
# ----------------------------------------------------------------------------------------------

class LatentEncoder(torch.nn.Module):
    """The VAE encoder as a module (`encode_images_to_latents`, posterior sample), so DDP can wrap it when it trains."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, pixel_values):
        return encode_images_to_latents(self.vae, pixel_values, sample=True)


def denoising_batch_loss(batch, unet, latent_encoder, text_encoder, noise_scheduler, weight_dtype,
                         prior_loss_weight=1.0, snr_gamma=None, noise_offset=0.0, attention_mask_eos_id=None,
                         class_labels_from_timesteps=False):
    """The DreamBooth/LoRA/TI training loss of one batch; returns (loss, logs).

    z₀ = `latent_encoder(x)`, ε ~ N(0, I) (plus `offset_noise` when `noise_offset` > 0), t ~ U{0, …, T−1},
    z_t = `q_sample(z₀, ε, t)`, L = `dreambooth_loss(ε_θ(z_t, t, c), target)` with instance rows first; without
    class rows it is the plain (optionally Min-SNR-weighted) denoising loss. With `attention_mask_eos_id` the text
    encoder masks the padding after that token.
    """
    latents = latent_encoder(batch["pixel_values"])
    noise = offset_noise(torch.randn_like(latents), noise_offset)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              device=latents.device).long()
    noisy_latents = q_sample(latents, noise, timesteps, alphas_cumprod(noise_scheduler))
    attention_mask = None
    if attention_mask_eos_id is not None:
        attention_mask = attention_mask_until_eos(batch["input_ids"], attention_mask_eos_id)
    encoder_hidden_states = text_encoder(batch["input_ids"], attention_mask=attention_mask)[0]
    # Inputs in the frozen models' dtype: a frozen half-precision UNet is not autocast-wrapped (upstream TI).
    model_pred = unet(noisy_latents.to(weight_dtype), timesteps, encoder_hidden_states.to(weight_dtype),
                      class_labels=timesteps if class_labels_from_timesteps else None).sample
    target = prediction_target(noise_scheduler, latents, noise, timesteps)
    loss, instance_loss, prior_loss = dreambooth_loss(
        model_pred, target, timesteps, noise_scheduler, batch["num_instance"],
        prior_loss_weight=prior_loss_weight, snr_gamma=snr_gamma)
    logs = {"prior_loss": prior_loss.detach().item()} if model_pred.shape[0] > batch["num_instance"] else {}
    return loss, logs


def batch_loss_fn(args, components, unet, latent_encoder, text_encoder, weight_dtype):
    """`denoising_batch_loss` bound to this run's models and loss flags: the `loss_fn` of `train_loop`."""
    return partial(denoising_batch_loss, unet=unet, latent_encoder=latent_encoder, text_encoder=text_encoder,
                   noise_scheduler=components.noise_scheduler, weight_dtype=weight_dtype,
                   prior_loss_weight=getattr(args, "prior_loss_weight", 1.0), snr_gamma=args.snr_gamma,
                   noise_offset=noise_offset_of(args),
                   attention_mask_eos_id=(components.tokenizer.eos_token_id if args.text_encoder_use_attention_mask
                                          else None),
                   class_labels_from_timesteps=args.class_labels_conditioning == "timesteps")


def load_training_components(args):
    """`load_components` with the training flags: --tokenizer_name, --prediction_type; IF-only flags refused.

    --prediction_type changes the target the loss regresses (`prediction_target` reads the scheduler's config).
    """
    components = load_components(args.pretrained_model_name_or_path, args.revision, args.variant,
                                 tokenizer_name=args.tokenizer_name)
    if args.prediction_type is not None:
        components.noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    if args.validation_images:
        raise InputError("--validation_images needs an image-conditioned pipeline (DeepFloyd IF stage II); "
                         "Stable Diffusion validates from --validation_prompt alone")
    if args.class_labels_conditioning is not None and components.unet.config.class_embed_type is None:
        raise InputError(f"--class_labels_conditioning {args.class_labels_conditioning}: the UNet of "
                         f"{args.pretrained_model_name_or_path} has no class embedding (DeepFloyd IF stage II has one)")
    return components
