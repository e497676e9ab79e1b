#!/usr/bin/env python
r"""MixSyn fine-tuning with DreamBooth (full fine-tuning, optional prior preservation).

The flags are those of diffusers' `examples/dreambooth/train_dreambooth.py` plus the MixSyn data flags. SD-1.x/2.x
only: an SDXL base is refused in one line (DreamBooth+LoRA: `train_lora_mixsyn.py --with_prior_preservation`).
`--trainable_modules` picks what is fine-tuned (the MixSyn paper's Table 5 ablation): the denoising
network (`unet`), the image encoder (`vae_encoder`), the token embeddings (`text_embeddings`) or the
whole text encoder (`text_encoder`). Output: a pipeline loadable by `DiffusionPipeline.from_pretrained`,
and checkpoints whose `checkpoint-N/unet` loads with `UNet2DConditionModel.from_pretrained`.

    accelerate launch train_dreambooth_mixsyn.py \
      --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 \
      --dataset_name outputs/synthetic --perturbed_dataset_name outputs/perturbed \
      --mixup_mode pixel --mixup_ratio 0.5 --max_train_steps 400 --output_dir outputs/dreambooth
"""

import logging
import math
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
    register_pretrained_checkpoint_hooks,
    removed_if_nothing_finished,
    resolve_resume_checkpoint,
    save_checkpoint,
    training_signature,
)
from mixsyn_utils.class_images import class_data_dir_of  # the class-image cache folder
from mixsyn_utils.cli import ArgumentParser, InputError, run_cli  # one-line errors for bad input (argparse's included)
from mixsyn_utils.dataset_io import save_dataset  # --save_mixed_dataset, saved whole
from mixsyn_utils.flags import (  # flag groups shared with the other scripts, written out by flag_values
    add_prior_preservation_args,
    check_paths_or_hub_ids,
    check_prior_preservation_args,
    flag_values,
)
from mixsyn_utils.model_card import finish_outputs, training_info  # model card (with measured privacy) and Hub upload
from mixsyn_utils.models import (  # SD components, checked before the data is read (SDXL refused)
    SDXL,
    LatentEncoder,
    check_pretrained_model,
    native_resolution,
    warn_truncated_captions,
    weight_dtype_of,
)
from mixsyn_utils.outputs import (  # one run per output folder; the pipeline staged, moved in whole; a full disk
    OutputLock,
    move_entries_into,
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

TRAINABLE_MODULES = ("unet", "vae_encoder", "text_embeddings", "text_encoder")


def parse_args(input_args=None):
    parser = ArgumentParser(description="MixSyn DreamBooth fine-tuning of Stable Diffusion.",
                            allow_abbrev=False)
    add_training_args(parser)
    add_prior_preservation_args(parser)
    group = parser.add_argument_group("what to fine-tune")
    group.add_argument("--train_text_encoder", action="store_true",
                       help="Also fine-tune the text encoder (same as adding text_encoder to --trainable_modules).")
    group.add_argument("--trainable_modules", type=str, nargs="+", default=["unet"],
                       help=f"Any of {', '.join(TRAINABLE_MODULES)} (MixSyn Table 5: denoising network, image "
                            "encoder, embedding).")
    group.add_argument("--skip_save_text_encoder", action="store_true",
                       help="Save the pipeline without its text encoder (load it from the base model).")
    parser.set_defaults(learning_rate=5e-6, output_dir="dreambooth-model", image_interpolation_mode="bilinear")
    args = parser.parse_args(input_args)
    unknown = [name for name in args.trainable_modules if name not in TRAINABLE_MODULES]
    if unknown:
        raise InputError(f"--trainable_modules: unknown {unknown[0]!r} (choose from {', '.join(TRAINABLE_MODULES)})")
    check_training_args(args)
    check_prior_preservation_args(args)
    return args


def trainable_modules_of(trainable_modules, train_text_encoder=False):
    """--trainable_modules, plus text_encoder with upstream's --train_text_encoder."""
    return list(dict.fromkeys(trainable_modules + (["text_encoder"] if train_text_encoder else [])))


def select_trainable(trainable_modules, unet, vae, text_encoder):
    """Set requires_grad for the chosen parts; returns the modules to prepare (DDP-wrapped when distributed)."""
    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)
    trained = {}
    if "unet" in trainable_modules:
        unet.requires_grad_(True)
        trained["unet"] = unet
    if "vae_encoder" in trainable_modules:
        # The image encoder E: encoder + quant_conv; the decoder is not in the training graph.
        vae.encoder.requires_grad_(True)
        vae.quant_conv.requires_grad_(True)
        trained["vae"] = LatentEncoder(vae)
    if "text_encoder" in trainable_modules:
        text_encoder.requires_grad_(True)
        trained["text_encoder"] = text_encoder
    elif "text_embeddings" in trainable_modules:
        text_encoder.get_input_embeddings().requires_grad_(True)
        trained["text_encoder"] = text_encoder
    return trained


def save_pipeline(output_dir, pretrained_model_name_or_path, trained, revision=None, variant=None,
                  skip_save_text_encoder=False):
    """The fine-tuned pipeline into `output_dir`: trained parts from memory, the rest (safety checker included)
    from the base model; without the text encoder with --skip_save_text_encoder.

    Staged in a hidden folder; each part is moved in whole.
    """
    from diffusers import StableDiffusionPipeline

    if skip_save_text_encoder:
        trained = dict(trained, text_encoder=None)
    pipeline = StableDiffusionPipeline.from_pretrained(
        pretrained_model_name_or_path, revision=revision, variant=variant, use_safetensors=True, **trained)
    with staging_folder(Path(output_dir) / "pipeline") as staging_dir:
        pipeline.save_pretrained(str(staging_dir), safe_serialization=True)
        move_entries_into(staging_dir, output_dir)


def main(args):
    with OutputLock(args.output_dir), OutputLock(args.save_mixed_dataset, "--save_mixed_dataset"):
        check_training_outputs(args)  # again, under the lock: the check and the lock are one step
        check_paths_or_hub_ids(args, *TRAINING_PATHS_OR_HUB_IDS)
        if check_pretrained_model(args.pretrained_model_name_or_path, args.revision) == SDXL:  # before the data: in ms
            raise InputError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path} is an SDXL model: "
                             "full DreamBooth of SDXL is not supported (diffusers has no such example; its UNet, AdamW "
                             "states and copies need far more than one GPU); use train_lora_mixsyn.py "
                             "--with_prior_preservation (DreamBooth+LoRA)")
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
        trainable_modules = trainable_modules_of(args.trainable_modules, args.train_text_encoder)
        trained = select_trainable(trainable_modules, unet, vae, text_encoder)
        # Trained weights stay float32 (mixed precision autocasts them); frozen ones take the half dtype.
        for name, model in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
            model.to(accelerator.device)
            if name not in trained and weight_dtype != torch.float32:
                model.to(dtype=weight_dtype)
        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            if "text_encoder" in trained:
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
        params_to_optimize = [p for model in trained.values() for p in model.parameters() if p.requires_grad]
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
        prepared = accelerator.prepare(*trained.values(), optimizer, lr_scheduler)
        trained, optimizer, lr_scheduler = dict(zip(trained, prepared[:-2])), prepared[-2], prepared[-1]
        register_pretrained_checkpoint_hooks(accelerator)
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
                accelerator.init_trackers("mixsyn-dreambooth", config=tracker_config(flag_values(args)))
            global_step = load_resume_state(accelerator, resume_path)
            first_epoch = global_step // updates_per_epoch
            batch_sampler.resume_at(first_epoch, (global_step % updates_per_epoch) * args.gradient_accumulation_steps)

            unet_in_use = trained.get("unet", unet)
            text_encoder_in_use = trained.get("text_encoder", text_encoder)
            latent_encoder = trained.get("vae", LatentEncoder(vae))

            def validate(step):
                images = []
                if accelerator.is_main_process:
                    pipeline = validation_pipeline(args.pretrained_model_name_or_path, accelerator,
                                                   args.validation_scheduler, args.revision, args.variant,
                                                   unet=unet_in_use,
                                                   text_encoder=text_encoder_in_use, vae=vae)
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
            eos_token_id = tokenizer.eos_token_id if args.text_encoder_use_attention_mask else None
            validation_images, validated_step = [], None
            for epoch in range(first_epoch, num_train_epochs):
                for model in trained.values():
                    model.train()
                train_dataloader.set_epoch(epoch)  # the order, crops and captions are functions of (seed, epoch)
                for batch in train_dataloader:
                    with accelerator.accumulate(*trained.values()):
                        loss, logs = denoising_batch_loss(
                            batch, unet_in_use, latent_encoder, [text_encoder_in_use], noise_scheduler, weight_dtype,
                            resolution, prior_loss_weight=args.prior_loss_weight, snr_gamma=args.snr_gamma,
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
                unwrapped = {name: accelerator.unwrap_model(model) for name, model in trained.items()}
                save_pipeline(args.output_dir, args.pretrained_model_name_or_path,
                              {name: getattr(model, "vae", model) for name, model in unwrapped.items()},
                              revision=args.revision, variant=args.variant,
                              skip_save_text_encoder=args.skip_save_text_encoder)
            prior = " with prior preservation" if args.with_prior_preservation else ""
            has_domains = "domain" in training_set.rows.column_names
            trigger_words = set(training_set.rows["domain"]) - {""} if has_domains else ()
            info = training_info(
                "dreambooth", f"DreamBooth{prior} ({', '.join(trainable_modules)})",
                pretrained_model_name_or_path=args.pretrained_model_name_or_path, revision=args.revision,
                dataset_name=args.dataset_name, source=training_set.source, mix_info=training_set.mix_info,
                trained={"steps": max_train_steps, "learning_rate": learning_rate, "resolution": resolution},
                num_images=len(training_set.rows), instance_prompt=args.instance_prompt,
                validation_prompt=args.validation_prompt, train_text_encoder="text_encoder" in trainable_modules,
                trigger_words=trigger_words)
            finish_outputs(accelerator, args.output_dir, info, validation_images, privacy_report=args.privacy_report,
                           push=args.push_to_hub, hub_model_id=args.hub_model_id, hub_token=args.hub_token)


if __name__ == "__main__":
    run_cli(main, parse_args)
