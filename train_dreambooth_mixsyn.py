#!/usr/bin/env python
"""MixSyn fine-tuning with DreamBooth (full fine-tuning, optional prior preservation).

The flags are those of diffusers' `examples/dreambooth/train_dreambooth.py` plus the MixSyn data flags.
`--trainable_modules` picks what is fine-tuned (the MixSyn paper's Table 5 ablation): the denoising
network (`unet`), the image encoder (`vae_encoder`), the token embeddings (`text_embeddings`) or the
whole text encoder (`text_encoder`). Output: a pipeline loadable by `DiffusionPipeline.from_pretrained`,
and checkpoints whose `checkpoint-N/unet` loads with `UNet2DConditionModel.from_pretrained`.

    accelerate launch train_dreambooth_mixsyn.py \
      --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 \
      --dataset_name outputs/synthetic --perturbed_dataset_name outputs/perturbed \
      --mixup_mode pixel --mixup_ratio 0.5 --max_train_steps 400 --output_dir outputs/dreambooth
"""

import argparse
from pathlib import Path

import mixsyn_utils.quiet  # noqa: F401  (first: silences library messages that are emitted at import time)
import torch
from accelerate.logging import get_logger

# Shared with the other training scripts (mixsyn_utils/):
from mixsyn_utils.cli import InputError, run_cli  # one-line errors for bad input
from mixsyn_utils.flags import (  # flag groups shared with the other scripts, and their checks
    add_prior_preservation_args,
    add_training_args,
    check_prior_preservation_args,
    check_training_args,
)
from mixsyn_utils.model_card import finish_outputs, training_info  # model card (with measured privacy) and Hub upload
from mixsyn_utils.models import (  # SD components, checked before the data is read
    check_pretrained_model,
    native_resolution,
    warn_truncated_captions,
    weight_dtype_of,
)
from mixsyn_utils.outputs import move_entries_into, temp_sibling  # the pipeline staged, then moved in whole
from mixsyn_utils.training import (  # accelerator, optimizer, checkpoints, the loop, validation, the batch loss
    LatentEncoder,
    batch_loss_fn,
    init_trackers,
    load_training_components,
    log_validation,
    make_accelerator,
    make_lr_scheduler,
    make_optimizer,
    plan_steps,
    register_pretrained_checkpoint_hooks,
    resolve_resume_checkpoint,
    resume_training_state,
    scaled_learning_rate,
    start_output_dir,
    train_loop,
    training_inputs,
    training_signature,
    validation_pipeline,
)
from mixsyn_utils.training_data import (  # the (mixed) training set, seeded data order, class images
    TrainingImages,
    caption_of_row,
    load_class_images,
    load_training_images,
    make_dataloader,
)

logger = get_logger(__name__)

TRAINABLE_MODULES = ("unet", "vae_encoder", "text_embeddings", "text_encoder")


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="MixSyn DreamBooth fine-tuning of Stable Diffusion.",
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


def trainable_modules_of(args):
    """--trainable_modules, plus text_encoder with upstream's --train_text_encoder."""
    return list(dict.fromkeys(args.trainable_modules + (["text_encoder"] if args.train_text_encoder else [])))


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


def save_pipeline(args, trained):
    """The fine-tuned pipeline into `--output_dir`: trained parts from memory, the rest (safety checker included)
    from the base model; without the text encoder with --skip_save_text_encoder.

    Staged in a hidden folder; each part is moved in whole.
    """
    from diffusers import StableDiffusionPipeline

    if args.skip_save_text_encoder:
        trained = dict(trained, text_encoder=None)
    pipeline = StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant, use_safetensors=True,
        **trained)
    staging_dir = temp_sibling(Path(args.output_dir) / "pipeline")
    pipeline.save_pretrained(str(staging_dir), safe_serialization=True)
    move_entries_into(staging_dir, args.output_dir)


def main(args):
    check_pretrained_model(args.pretrained_model_name_or_path, args.revision)  # before the data: fails in ms
    accelerator = make_accelerator(args)
    weight_dtype = weight_dtype_of(accelerator.mixed_precision)
    resume_path = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    training_set = load_training_images(args, accelerator.is_main_process)
    components = load_training_components(args)
    unet, text_encoder, vae, tokenizer = components.unet, components.text_encoder, components.vae, components.tokenizer
    resolution = args.resolution or native_resolution(unet, vae)
    trainable_modules = trainable_modules_of(args)
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
    dataset = TrainingImages(training_set.rows, tokenizer, resolution,
                             lambda row, rng: caption_of_row(row, training_set.caption_column, rng), args,
                             load_class_images(args, resolution, accelerator))
    dataloader, batch_sampler = make_dataloader(dataset, args, accelerator)
    plan = plan_steps(args, batch_sampler.batches_per_epoch())
    params = [p for model in trained.values() for p in model.parameters() if p.requires_grad]
    learning_rate = scaled_learning_rate(args, accelerator.num_processes)
    optimizer = make_optimizer(params, learning_rate, args)
    lr_scheduler = make_lr_scheduler(optimizer, args, plan, accelerator.num_processes)
    prepared = accelerator.prepare(*trained.values(), optimizer, lr_scheduler)
    trained, optimizer, lr_scheduler = dict(zip(trained, prepared[:-2])), prepared[-2], prepared[-1]
    register_pretrained_checkpoint_hooks(accelerator)
    start_output_dir(accelerator, args)  # --overwrite empties it here, once every input was checked
    init_trackers(accelerator, args, "mixsyn-dreambooth")
    signature = training_signature(args, training_inputs(args, training_set))
    global_step = resume_training_state(accelerator, resume_path, signature)

    unet_in_use = trained.get("unet", unet)
    text_encoder_in_use = trained.get("text_encoder", text_encoder)
    latent_encoder = trained.get("vae", LatentEncoder(vae))

    def validate(step):
        pipeline = validation_pipeline(args, accelerator, unet=unet_in_use, text_encoder=text_encoder_in_use, vae=vae)
        return log_validation(accelerator, args, pipeline, step, resolution)

    loss_fn = batch_loss_fn(args, components, unet_in_use, latent_encoder, text_encoder_in_use, weight_dtype)
    result = train_loop(accelerator, args, plan, models=list(trained.values()), dataloader=dataloader,
                        batch_sampler=batch_sampler, optimizer=optimizer, lr_scheduler=lr_scheduler,
                        params_to_clip=params, loss_fn=loss_fn, signature=signature, global_step=global_step,
                        validate=validate, logger=logger)

    if accelerator.is_main_process:
        unwrapped = {name: accelerator.unwrap_model(model) for name, model in trained.items()}
        save_pipeline(args, {name: getattr(model, "vae", model) for name, model in unwrapped.items()})
    prior = " with prior preservation" if args.with_prior_preservation else ""
    trigger_words = set(training_set.rows["domain"]) - {""} if "domain" in training_set.rows.column_names else ()
    info = training_info(args, "dreambooth", f"DreamBooth{prior} ({', '.join(trainable_modules)})",
                         training_set.mix_info,
                         {"steps": plan.max_train_steps, "learning_rate": learning_rate, "resolution": resolution},
                         len(training_set.rows), trigger_words)
    finish_outputs(accelerator, args, info, result.validation_images)


if __name__ == "__main__":
    run_cli(main, parse_args)
