#!/usr/bin/env python
r"""MixSyn fine-tuning with LoRA (and DreamBooth+LoRA with `--with_prior_preservation`).

A drop-in for two diffusers examples: `examples/dreambooth/train_dreambooth_lora.py` (with `--instance_data_dir`
or `--with_prior_preservation`, whose defaults it then takes) and `examples/text_to_image/train_text_to_image_lora.py`
(with `--dataset_name` / `--train_data_dir`, whose defaults it then takes), plus the MixSyn data flags: the
training set is the self-synthesized set with a fraction `--mixup_ratio` of its images (or pixels) replaced by
their adversarially perturbed copies. Output: `pytorch_lora_weights.safetensors`, loadable with
`pipe.load_lora_weights(output_dir)`, and a model card.

    accelerate launch train_lora_mixsyn.py \
      --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 \
      --dataset_name outputs/synthetic --perturbed_dataset_name outputs/perturbed \
      --mixup_mode image --mixup_ratio 0.5 --rank 4 --max_train_steps 1000 --output_dir outputs/lora
"""

import logging
import math
import os
from pathlib import Path

import mixsyn_utils.quiet  # noqa: F401  (first: silences library messages that are emitted at import time)

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.utils import check_min_version
from tqdm.auto import tqdm

# Shared with the other training scripts (mixsyn_utils/):
from mixsyn_utils.checkpoints import (  # where to resume, what it must match, checkpoints saved whole
    check_resume,
    load_resume_state,
    removed_if_nothing_finished,
    resolve_resume_checkpoint,
    save_checkpoint,
    training_signature,
)
from mixsyn_utils.class_images import class_data_dir_of  # the class-image cache folder
from mixsyn_utils.cli import ArgumentParser, run_cli  # one-line errors for bad input (argparse's included)
from mixsyn_utils.dataset_io import save_dataset  # --save_mixed_dataset, saved whole
from mixsyn_utils.flags import (  # flag groups shared with the other scripts, written out by flag_values
    add_prior_preservation_args,
    check_paths_or_hub_ids,
    check_prior_preservation_args,
    flag_values,
    require_positive,
    require_range,
)
from mixsyn_utils.model_card import finish_outputs, training_info  # model card (with measured privacy) and Hub upload
from mixsyn_utils.models import (  # SD components, checked before the data is read
    LatentEncoder,
    check_pretrained_model,
    native_resolution,
    warn_truncated_captions,
    weight_dtype_of,
)
from mixsyn_utils.outputs import (  # one run per output folder; weights staged, moved in whole; a full disk in one line
    OutputLock,
    output_write_errors,
    staging_folder,
)
from mixsyn_utils.resumable import input_fingerprint  # what the class images were
from mixsyn_utils.training import (  # the batch loss, the output folder, validation
    denoising_batch_loss,
    load_training_components,
    log_validation,
    start_output_dir,
    tracker_config,
    validation_due,
    validation_pipeline,
)
from mixsyn_utils.training_data import (  # the (mixed) training set, seeded data order, class images
    TrainingImages,
    caption_of_row,
    load_class_images,
    load_training_images,
    make_dataloader,
)
from mixsyn_utils.training_flags import (  # the training flag groups and their checks
    TRAINING_PATHS_OR_HUB_IDS,
    add_training_args,
    check_training_args,
    check_training_outputs,
    noise_offset_of,
)

# Fails with a clear message when the installed diffusers is older than the one these scripts are written for.
check_min_version("0.42.0")

logger = get_logger(__name__)

UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
# Each upstream script's defaults, where they differ from the shared ones: this script takes those of the one
# whose input it is given (DreamBooth validates by epochs too, every 50; text-to-image after every epoch).
DREAMBOOTH_LORA_DEFAULTS = dict(learning_rate=5e-4, output_dir="lora-dreambooth-model", validation_epochs=50,
                                validation_steps=None)
TEXT_TO_IMAGE_LORA_DEFAULTS = dict(learning_rate=1e-4, output_dir="sd-model-finetuned-lora", train_batch_size=16,
                                   num_train_epochs=100, validation_epochs=1, validation_steps=None)


def is_dreambooth(args):
    """DreamBooth-LoRA (an instance folder or prior preservation), else text-to-image LoRA on a captioned dataset."""
    return args.instance_data_dir is not None or args.with_prior_preservation


def parse_args(input_args=None):
    parser = ArgumentParser(
        description="MixSyn LoRA / DreamBooth+LoRA fine-tuning of Stable Diffusion.", allow_abbrev=False,
        epilog="Defaults shown are train_dreambooth_lora.py's. With --dataset_name or --train_data_dir and no prior "
               "preservation they are train_text_to_image_lora.py's: " +
               ", ".join(f"--{flag} {value}" for flag, value in TEXT_TO_IMAGE_LORA_DEFAULTS.items()) + ".")
    add_training_args(parser)
    add_prior_preservation_args(parser)
    lora = parser.add_argument_group("LoRA (arXiv:2106.09685)")
    lora.add_argument("--rank", type=int, default=4, help="LoRA rank r of the update ΔW = B·A.")
    lora.add_argument("--lora_alpha", type=int, default=None, help="LoRA α (scale α/r); default: r, as upstream.")
    lora.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout on the LoRA input.")
    lora.add_argument("--train_text_encoder", action="store_true", help="Also train LoRA on the text encoder.")
    parser.set_defaults(**DREAMBOOTH_LORA_DEFAULTS)
    # Defaults follow the upstream script whose input this run gets (an --instance_data_dir or a dataset).
    if not is_dreambooth(parser.parse_known_args(input_args)[0]):
        parser.set_defaults(**TEXT_TO_IMAGE_LORA_DEFAULTS)
    args = parser.parse_args(input_args)
    require_positive(args, "rank", "lora_alpha")
    require_range(args, "lora_dropout", 0, 1, include_high=False)
    check_training_args(args)
    check_prior_preservation_args(args)
    return args


def lora_layers(model):
    """The LoRA weights of a peft-wrapped model, named as diffusers' LoRA loader expects."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    # No embedding layer carries LoRA here; peft's "auto" would look for the base model's config to decide.
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model, save_embedding_layers=False))


def save_lora(output_dir, unet, text_encoder=None):
    """`pytorch_lora_weights.safetensors` (+ the adapters' configs, so α ≠ r loads right)."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(
        output_dir, unet_lora_layers=lora_layers(unet),
        text_encoder_lora_layers=lora_layers(text_encoder) if text_encoder is not None else None,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=(text_encoder.peft_config["default"].to_dict()
                                            if text_encoder is not None else None))


def load_lora(input_dir, unet, text_encoder=None):
    """Load `save_lora`'s file back into the peft-wrapped models (resume)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.training_utils import _set_state_dict_into_text_encoder
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state_dict = StableDiffusionPipeline.lora_state_dict(input_dir)[0]
    unet_state = {k[len("unet."):]: v for k, v in state_dict.items() if k.startswith("unet.")}
    set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state), adapter_name="default")
    if text_encoder is not None:
        _set_state_dict_into_text_encoder(state_dict, prefix="text_encoder.", text_encoder=text_encoder)


def register_lora_checkpoint_hooks(accelerator, unet, text_encoder):
    """Checkpoints hold only the LoRA weights (upstream format), not the frozen base model."""
    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            save_lora(output_dir, accelerator.unwrap_model(unet),
                      accelerator.unwrap_model(text_encoder) if text_encoder is not None else None)
            weights.clear()

    def load_hook(models, input_dir):
        load_lora(input_dir, accelerator.unwrap_model(unet),
                  accelerator.unwrap_model(text_encoder) if text_encoder is not None else None)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def add_lora_adapters(unet, text_encoder=None, rank=4, lora_alpha=None, lora_dropout=0.0):
    """Add trainable LoRA adapters to the frozen UNet (and text encoder); they stay fp32, so fp16 grads can be
    unscaled. Returns the models that train."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    alpha = lora_alpha or rank
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=lora_dropout, init_lora_weights="gaussian",
                                target_modules=UNET_LORA_TARGETS))
    trained = [unet]
    if text_encoder is not None:
        text_encoder.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=lora_dropout,
                                            init_lora_weights="gaussian", target_modules=TEXT_ENCODER_LORA_TARGETS))
        trained.append(text_encoder)
    # Upstream fault: LoRA weights left in fp16 make GradScaler fail with "Attempting to unscale FP16 gradients".
    cast_training_params(trained, dtype=torch.float32)
    return trained


def main(args):
    with OutputLock(args.output_dir), OutputLock(args.save_mixed_dataset, "--save_mixed_dataset"):
        check_training_outputs(args)  # again, under the lock: the check and the lock are one step
        check_paths_or_hub_ids(args, *TRAINING_PATHS_OR_HUB_IDS)
        check_pretrained_model(args.pretrained_model_name_or_path, args.revision)  # before the data: fails in ms
        accelerator = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
            log_with=args.report_to, project_config=ProjectConfiguration(
                project_dir=args.output_dir, logging_dir=str(Path(args.output_dir, args.logging_dir))))
        logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
        if args.seed is not None:
            set_seed(args.seed)
        if args.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        weight_dtype = weight_dtype_of(accelerator.mixed_precision)
        resume_path = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)

        # The training set: the self-synthesized images, a --mixup_ratio of them (or of their pixels) perturbed.
        training_set = load_training_images(
            args.dataset_name, args.train_data_dir, args.instance_data_dir,
            dataset_config_name=args.dataset_config_name, cache_dir=args.cache_dir, image_column=args.image_column,
            caption_column=args.caption_column, instance_prompt=args.instance_prompt,
            instance_domain=args.instance_domain, max_train_samples=args.max_train_samples, seed=args.seed,
            perturbed_dataset_name=args.perturbed_dataset_name, mixup_mode=args.mixup_mode,
            mixup_ratio=args.mixup_ratio, mixup_seed=args.mixup_seed, mixup_pattern=args.mixup_pattern,
            resolution=args.resolution)
        components = load_training_components(
            args.pretrained_model_name_or_path, args.revision, args.variant, tokenizer_name=args.tokenizer_name,
            prediction_type=args.prediction_type, validation_images=args.validation_images,
            class_labels_conditioning=args.class_labels_conditioning)
        unet, text_encoder = components.unet, components.text_encoder
        vae, tokenizer = components.vae, components.tokenizer
        noise_scheduler = components.noise_scheduler
        resolution = args.resolution or native_resolution(unet, vae)
        for model in (unet, text_encoder, vae):
            model.requires_grad_(False)
            model.to(accelerator.device)
            if weight_dtype != torch.float32:
                model.to(dtype=weight_dtype)
        trained_models = add_lora_adapters(unet, text_encoder if args.train_text_encoder else None, rank=args.rank,
                                           lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout)
        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            if args.train_text_encoder:
                text_encoder.gradient_checkpointing_enable()
        if args.enable_xformers_memory_efficient_attention:
            unet.enable_xformers_memory_efficient_attention()

        if training_set.caption_column is not None:
            warn_truncated_captions(tokenizer, training_set.rows[training_set.caption_column], "training captions")
        class_data_dir = class_data_dir_of(args.class_data_dir, args.output_dir)
        class_images = None
        if args.with_prior_preservation:
            class_images = load_class_images(
                args.pretrained_model_name_or_path, args.class_prompt, args.num_class_images, class_data_dir,
                resolution, accelerator, revision=args.revision, variant=args.variant,
                sample_batch_size=args.sample_batch_size, num_inference_steps=args.class_num_inference_steps,
                prior_generation_precision=args.prior_generation_precision, seed=args.seed)
        train_dataset = TrainingImages(
            training_set.rows, tokenizer, resolution,
            lambda row, rng: caption_of_row(row, training_set.caption_column, rng), center_crop=args.center_crop,
            random_flip=args.random_flip, seed=args.seed, interpolation=args.image_interpolation_mode,
            max_length=args.tokenizer_max_length, class_images=class_images)
        train_dataloader, batch_sampler = make_dataloader(train_dataset, args.train_batch_size, args.seed, accelerator,
                                                          args.dataloader_num_workers)

        # Updates per epoch and in total (upstream's rule: --max_train_steps wins over --num_train_epochs).
        updates_per_epoch = math.ceil(batch_sampler.batches_per_epoch() / args.gradient_accumulation_steps)
        max_train_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
        num_train_epochs = math.ceil(max_train_steps / updates_per_epoch)
        learning_rate = args.learning_rate
        if args.scale_lr:
            learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
        params_to_optimize = [p for model in trained_models for p in model.parameters() if p.requires_grad]
        if args.use_8bit_adam:
            import bitsandbytes as bnb

            optimizer_class = bnb.optim.AdamW8bit
        else:
            optimizer_class = torch.optim.AdamW
        optimizer = optimizer_class(params_to_optimize, lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                    weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
        # × processes: the prepared scheduler steps once per process at every update.
        lr_scheduler = get_scheduler(
            args.lr_scheduler, optimizer=optimizer, step_rules=args.lr_step_rules,
            num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=max_train_steps * accelerator.num_processes, num_cycles=args.lr_num_cycles,
            power=args.lr_power)
        if args.train_text_encoder:
            unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(unet, text_encoder, optimizer,
                                                                              lr_scheduler)
        else:
            unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
        trained_models = [unet, text_encoder] if args.train_text_encoder else [unet]
        register_lora_checkpoint_hooks(accelerator, unet, text_encoder if args.train_text_encoder else None)
        # A resumed run must have the checkpoint's flags, inputs and process count; it then skips the batches already
        # trained on. Checked before the output folder is touched, loaded once the models are prepared.
        inputs = dict(training_set.fingerprints,
                      pretrained_model=input_fingerprint(args.pretrained_model_name_or_path, args.revision))
        if args.with_prior_preservation:
            inputs["class_images"] = input_fingerprint(class_data_dir)
        signature = training_signature(flag_values(args), inputs)
        check_resume(resume_path, signature, accelerator.num_processes, accelerator.process_index)
        start_output_dir(accelerator, args.output_dir, args.overwrite)  # --overwrite empties it once inputs are checked
        # From here on the run writes: a failed write (a full disk) is one line naming --output_dir, and a
        # folder holding only what the run wrote before its first checkpoint (logs, staging) is removed.
        with removed_if_nothing_finished(accelerator, args.output_dir, args.logging_dir), \
                output_write_errors(args.output_dir):
            if args.save_mixed_dataset and accelerator.is_main_process:  # once every input and the model have loaded
                save_dataset(training_set.rows, args.save_mixed_dataset, flag="--save_mixed_dataset")
            if accelerator.is_main_process:
                accelerator.init_trackers("mixsyn-lora", config=tracker_config(flag_values(args)))
            global_step = load_resume_state(accelerator, resume_path)
            first_epoch = global_step // updates_per_epoch
            batch_sampler.resume_at(first_epoch, (global_step % updates_per_epoch) * args.gradient_accumulation_steps)

            def validate(step):
                images = []
                if accelerator.is_main_process:
                    pipeline = validation_pipeline(args.pretrained_model_name_or_path, accelerator,
                                                   args.validation_scheduler, args.revision, args.variant, unet=unet,
                                                   text_encoder=text_encoder)
                    images = log_validation(pipeline, accelerator, args.validation_prompt, args.num_validation_images,
                                            args.seed, step, resolution)
                accelerator.wait_for_everyone()
                return images

            logger.info("***** Running training *****")
            logger.info(f"  Num examples = {len(train_dataset)}, "
                        f"batches per epoch = {batch_sampler.batches_per_epoch()}")
            logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
            logger.info(f"  Gradient accumulation steps = {args.gradient_accumulation_steps}")
            logger.info(f"  Total optimization steps = {max_train_steps}")
            if global_step > 0:
                logger.info(f"  Resuming at step {global_step} (epoch {first_epoch})")
            progress_bar = tqdm(range(max_train_steps), initial=global_step, desc="Steps",
                                disable=not accelerator.is_local_main_process)
            latent_encoder = LatentEncoder(vae)
            eos_token_id = tokenizer.eos_token_id if args.text_encoder_use_attention_mask else None
            validation_images, validated_step = [], None
            for epoch in range(first_epoch, num_train_epochs):
                for model in trained_models:
                    model.train()
                train_dataloader.set_epoch(epoch)  # the order, crops and captions are functions of (seed, epoch)
                for batch in train_dataloader:
                    with accelerator.accumulate(*trained_models):
                        loss, logs = denoising_batch_loss(
                            batch, unet, latent_encoder, text_encoder, noise_scheduler, weight_dtype,
                            prior_loss_weight=args.prior_loss_weight, snr_gamma=args.snr_gamma,
                            noise_offset=noise_offset_of(args), attention_mask_eos_id=eos_token_id,
                            class_labels_from_timesteps=args.class_labels_conditioning == "timesteps")
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and args.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(params_to_optimize, args.max_grad_norm)
                        optimizer.step()
                        lr_scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                    if not accelerator.sync_gradients:  # an update happens every accumulation steps
                        continue
                    global_step += 1
                    progress_bar.update(1)
                    logs = {"loss": loss.detach().item(), **logs, "lr": lr_scheduler.get_last_lr()[0]}
                    progress_bar.set_postfix(**logs)
                    accelerator.log(logs, step=global_step)
                    if global_step % args.checkpointing_steps == 0:
                        save_checkpoint(accelerator, args.output_dir, global_step, signature,
                                        args.checkpoints_total_limit)
                    if args.validation_prompt and validation_due(global_step, validation_steps=args.validation_steps):
                        validation_images, validated_step = validate(global_step), global_step
                    if global_step >= max_train_steps:
                        break
                if args.validation_prompt and validated_step != global_step and validation_due(
                        global_step, validation_epochs=args.validation_epochs, epoch_end=epoch):
                    validation_images, validated_step = validate(global_step), global_step
                if global_step >= max_train_steps:
                    break
            progress_bar.close()
            if args.validation_prompt and validated_step != global_step:  # the model card shows the final weights
                validation_images = validate(global_step)
            accelerator.wait_for_everyone()

            if accelerator.is_main_process:
                with staging_folder(Path(args.output_dir) / LORA_WEIGHTS_FILE) as staging_dir:
                    save_lora(str(staging_dir), accelerator.unwrap_model(unet),
                              accelerator.unwrap_model(text_encoder) if args.train_text_encoder else None)
                    os.replace(staging_dir / LORA_WEIGHTS_FILE, Path(args.output_dir) / LORA_WEIGHTS_FILE)
            kind = "dreambooth_lora" if is_dreambooth(args) else "text_to_image_lora"
            method = "DreamBooth+LoRA" if args.with_prior_preservation else "LoRA"
            has_domains = "domain" in training_set.rows.column_names
            trigger_words = set(training_set.rows["domain"]) - {""} if has_domains else ()
            info = training_info(
                kind, f"{method} (rank {args.rank})", pretrained_model_name_or_path=args.pretrained_model_name_or_path,
                revision=args.revision, dataset_name=args.dataset_name, source=training_set.source,
                mix_info=training_set.mix_info,
                trained={"steps": max_train_steps, "learning_rate": learning_rate, "resolution": resolution},
                num_images=len(training_set.rows), instance_prompt=args.instance_prompt,
                validation_prompt=args.validation_prompt, train_text_encoder=args.train_text_encoder,
                trigger_words=trigger_words)
            finish_outputs(accelerator, args.output_dir, info, validation_images, privacy_report=args.privacy_report,
                           push=args.push_to_hub, hub_model_id=args.hub_model_id, hub_token=args.hub_token)


if __name__ == "__main__":
    run_cli(main, parse_args)
