#!/usr/bin/env python
"""MixSyn fine-tuning with LoRA (and DreamBooth+LoRA with `--with_prior_preservation`).

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

import argparse
import os
import shutil
from pathlib import Path

import mixsyn_utils.quiet  # noqa: F401  (first: silences library messages that are emitted at import time)

import torch
from accelerate.logging import get_logger

# Shared with the other training scripts (mixsyn_utils/):
from mixsyn_utils.cli import run_cli  # one-line errors for bad input
from mixsyn_utils.flags import (  # flag groups shared with the other scripts, and their checks
    add_prior_preservation_args,
    add_training_args,
    check_prior_preservation_args,
    check_training_args,
    require_positive,
    require_range,
)
from mixsyn_utils.model_card import finish_outputs, training_info  # model card (with measured privacy) and Hub upload
from mixsyn_utils.models import (  # SD components, checked before the data is read
    check_pretrained_model,
    native_resolution,
    warn_truncated_captions,
    weight_dtype_of,
)
from mixsyn_utils.outputs import temp_sibling  # weights staged in a hidden folder, moved in when whole
from mixsyn_utils.training import (  # accelerator, optimizer, checkpoints, the loop, validation, the batch loss
    LatentEncoder,
    batch_loss_fn,
    init_trackers,
    log_validation,
    make_accelerator,
    load_training_components,
    make_lr_scheduler,
    make_optimizer,
    plan_steps,
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
    parser = argparse.ArgumentParser(
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


def add_lora_adapters(args, unet, text_encoder):
    """Freeze the base model and add trainable LoRA adapters (fp32, so fp16 grads can be unscaled)."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    alpha = args.lora_alpha or args.rank
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=alpha, lora_dropout=args.lora_dropout,
                                init_lora_weights="gaussian", target_modules=UNET_LORA_TARGETS))
    trained = [unet]
    if args.train_text_encoder:
        text_encoder.add_adapter(LoraConfig(r=args.rank, lora_alpha=alpha, lora_dropout=args.lora_dropout,
                                            init_lora_weights="gaussian", target_modules=TEXT_ENCODER_LORA_TARGETS))
        trained.append(text_encoder)
    # Upstream fault: LoRA weights left in fp16 make GradScaler fail with "Attempting to unscale FP16 gradients".
    cast_training_params(trained, dtype=torch.float32)
    return trained


def main(args):
    check_pretrained_model(args.pretrained_model_name_or_path, args.revision)  # before the data: fails in ms
    accelerator = make_accelerator(args)
    weight_dtype = weight_dtype_of(accelerator.mixed_precision)
    resume_path = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    training_set = load_training_images(args, accelerator.is_main_process)
    components = load_training_components(args)
    unet, text_encoder, vae, tokenizer = components.unet, components.text_encoder, components.vae, components.tokenizer
    resolution = args.resolution or native_resolution(unet, vae)
    for model in (unet, text_encoder, vae):
        model.requires_grad_(False)
        model.to(accelerator.device)
        if weight_dtype != torch.float32:
            model.to(dtype=weight_dtype)
    trained_models = add_lora_adapters(args, unet, text_encoder)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
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
    params = [p for model in trained_models for p in model.parameters() if p.requires_grad]
    learning_rate = scaled_learning_rate(args, accelerator.num_processes)
    optimizer = make_optimizer(params, learning_rate, args)
    lr_scheduler = make_lr_scheduler(optimizer, args, plan, accelerator.num_processes)
    if args.train_text_encoder:
        unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(unet, text_encoder, optimizer, lr_scheduler)
    else:
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    register_lora_checkpoint_hooks(accelerator, unet, text_encoder if args.train_text_encoder else None)
    start_output_dir(accelerator, args)  # --overwrite empties it here, once every input was checked
    init_trackers(accelerator, args, "mixsyn-lora")
    signature = training_signature(args, training_inputs(args, training_set))
    global_step = resume_training_state(accelerator, resume_path, signature)

    def validate(step):
        pipeline = validation_pipeline(args, accelerator, unet=unet, text_encoder=text_encoder)
        return log_validation(accelerator, args, pipeline, step, resolution)

    loss_fn = batch_loss_fn(args, components, unet, LatentEncoder(vae), text_encoder, weight_dtype)
    result = train_loop(accelerator, args, plan, models=[unet, text_encoder] if args.train_text_encoder else [unet],
                        dataloader=dataloader, batch_sampler=batch_sampler, optimizer=optimizer,
                        lr_scheduler=lr_scheduler, params_to_clip=params, loss_fn=loss_fn, signature=signature,
                        global_step=global_step, validate=validate, logger=logger)

    if accelerator.is_main_process:
        staging_dir = temp_sibling(Path(args.output_dir) / LORA_WEIGHTS_FILE)
        save_lora(str(staging_dir), accelerator.unwrap_model(unet),
                  accelerator.unwrap_model(text_encoder) if args.train_text_encoder else None)
        os.replace(staging_dir / LORA_WEIGHTS_FILE, Path(args.output_dir) / LORA_WEIGHTS_FILE)
        shutil.rmtree(staging_dir)
    kind = "dreambooth_lora" if is_dreambooth(args) else "text_to_image_lora"
    method = "DreamBooth+LoRA" if args.with_prior_preservation else "LoRA"
    trigger_words = set(training_set.rows["domain"]) - {""} if "domain" in training_set.rows.column_names else ()
    info = training_info(args, kind, f"{method} (rank {args.rank})", training_set.mix_info,
                         {"steps": plan.max_train_steps, "learning_rate": learning_rate, "resolution": resolution},
                         len(training_set.rows), trigger_words)
    finish_outputs(accelerator, args, info, result.validation_images)


if __name__ == "__main__":
    run_cli(main, parse_args)
