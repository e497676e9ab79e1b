#!/usr/bin/env python
r"""MixSyn fine-tuning with LoRA (and DreamBooth+LoRA with `--with_prior_preservation`), SD-1.x/2.x and SDXL.

A drop-in for four diffusers examples: `examples/dreambooth/train_dreambooth_lora.py` and, on an SDXL base,
`train_dreambooth_lora_sdxl.py` (with `--instance_data_dir` or `--with_prior_preservation`, whose defaults it then
takes), and `examples/text_to_image/train_text_to_image_lora.py` / `train_text_to_image_lora_sdxl.py` (with
`--dataset_name` / `--train_data_dir`, whose defaults it then takes), plus the MixSyn data flags: the training set
is the self-synthesized set with a fraction `--mixup_ratio` of its images (or pixels) replaced by their
adversarially perturbed copies. The base's kind is read from its model_index.json: on SDXL both text encoders
condition the UNet (and carry LoRA with `--train_text_encoder`), each image's size and crop are its time ids, and
the native size is 1024 px. Output: `pytorch_lora_weights.safetensors`, loadable with
`pipe.load_lora_weights(output_dir)` (`--output_kohya_format`: also a Kohya copy), and a model card.

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
from mixsyn_utils.cli import ArgumentParser, InputError, run_cli  # one-line errors for bad input (argparse's included)
from mixsyn_utils.dataset_io import save_dataset  # --save_mixed_dataset, saved whole
from mixsyn_utils.flags import (  # flag groups shared with the other scripts, written out by flag_values
    add_prior_preservation_args,
    check_paths_or_hub_ids,
    check_prior_preservation_args,
    flag_values,
    require_non_negative,
    require_positive,
    require_range,
)
from mixsyn_utils.lora import add_lora_adapters  # LoRA / DoRA on the UNet and text encoders, trained in fp32
from mixsyn_utils.model_card import finish_outputs, training_info  # model card (with measured privacy) and Hub upload
from mixsyn_utils.models import (  # SD / SDXL components, the kind checked before the data is read
    SDXL,
    LatentEncoder,
    check_pretrained_model,
    native_resolution,
    read_model_index,
    pipeline_kind,
    text_encoders_of,
    tokenizers_of,
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
from mixsyn_utils.variants import pipeline_class  # StableDiffusion(XL)Pipeline: the LoRA file's format

# Fails with a clear message when the installed diffusers is older than the one these scripts are written for.
check_min_version("0.42.0")

logger = get_logger(__name__)

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS_FILE = "pytorch_lora_weights_kohya.safetensors"
# Each upstream script's defaults, where they differ from the shared ones: this script takes those of the one
# whose input it is given (DreamBooth validates by epochs too, every 50; text-to-image after every epoch) and, for
# DreamBooth, whose base it is given (train_dreambooth_lora_sdxl.py: its own learning rates and weight decays).
DREAMBOOTH_LORA_DEFAULTS = dict(learning_rate=5e-4, output_dir="lora-dreambooth-model", validation_epochs=50,
                                validation_steps=None)
DREAMBOOTH_LORA_SDXL_DEFAULTS = dict(learning_rate=1e-4, adam_weight_decay=1e-4, text_encoder_lr=5e-6,
                                     adam_weight_decay_text_encoder=1e-3)
TEXT_TO_IMAGE_LORA_DEFAULTS = dict(learning_rate=1e-4, output_dir="sd-model-finetuned-lora", train_batch_size=16,
                                   num_train_epochs=100, validation_epochs=1, validation_steps=None)


def is_dreambooth(args):
    """DreamBooth-LoRA (an instance folder or prior preservation), else text-to-image LoRA on a captioned dataset."""
    return args.instance_data_dir is not None or args.with_prior_preservation


def kind_if_readable(pretrained_model_name_or_path, revision=None):
    """The base's kind when its model_index.json can be read now, else None (`main` then fails with the reason)."""
    try:
        return pipeline_kind(read_model_index(pretrained_model_name_or_path, revision))
    except InputError:
        return None


def parse_args(input_args=None):
    parser = ArgumentParser(
        description="MixSyn LoRA / DreamBooth+LoRA fine-tuning of Stable Diffusion (SD-1.x/2.x, SDXL).",
        allow_abbrev=False,
        epilog="Defaults shown are train_dreambooth_lora.py's. With --dataset_name or --train_data_dir and no prior "
               "preservation they are train_text_to_image_lora.py's (and train_text_to_image_lora_sdxl.py's): " +
               ", ".join(f"--{flag} {value}" for flag, value in TEXT_TO_IMAGE_LORA_DEFAULTS.items()) +
               ". DreamBooth on an SDXL base takes train_dreambooth_lora_sdxl.py's: " +
               ", ".join(f"--{flag} {value}" for flag, value in DREAMBOOTH_LORA_SDXL_DEFAULTS.items()) + ".")
    add_training_args(parser)
    add_prior_preservation_args(parser)
    lora = parser.add_argument_group("LoRA (arXiv:2106.09685)")
    lora.add_argument("--rank", type=int, default=4, help="LoRA rank r of the update ΔW = B·A.")
    lora.add_argument("--lora_alpha", type=int, default=None, help="LoRA α (scale α/r); default: r, as upstream.")
    lora.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout on the LoRA input.")
    lora.add_argument("--train_text_encoder", action="store_true",
                      help="Also train LoRA on the text encoder (on SDXL: on both).")
    lora.add_argument("--text_encoder_lr", type=float, default=None,
                      help="Learning rate of the text encoders' LoRA (default: --learning_rate; 5e-6 for DreamBooth on "
                           "SDXL, as train_dreambooth_lora_sdxl.py).")
    lora.add_argument("--adam_weight_decay_text_encoder", type=float, default=None,
                      help="AdamW weight decay of the text encoders' LoRA (default: --adam_weight_decay; 1e-3 for "
                           "DreamBooth on SDXL).")
    lora.add_argument("--use_dora", action="store_true",
                      help="Weight-decomposed LoRA (DoRA, arXiv:2402.09353; peft ≥ 0.9): a magnitude vector per "
                           "adapted layer besides B·A. Loads with the same load_lora_weights. UNet only here: with "
                           "--train_text_encoder it is refused (the text encoders' magnitude vectors do not load back "
                           "through diffusers' load_lora_weights, so the weights could be neither used nor audited).")
    lora.add_argument("--output_kohya_format", action="store_true",
                      help=f"Also write {KOHYA_WEIGHTS_FILE} in Kohya's key format (A1111, ComfyUI), converted per "
                           "model part so a run with text-encoder LoRA converts its UNet keys too.")
    lora.add_argument("--do_edm_style_training", action="store_true",
                      help="Train in the Euler/EDM parameterisation z = x₀ + σ_t ε (Karras et al. 2022): the target is "
                           "x₀ and the loss is σ_t⁻²-weighted (train_dreambooth_lora_sdxl.py's Euler branch, for a "
                           "base with a DDPM-family schedule). Not with --snr_gamma. EDM-formulation bases "
                           "(Playground v2.5) are refused when the model loads.")
    parser.set_defaults(**DREAMBOOTH_LORA_DEFAULTS)
    # Defaults follow the upstream script whose input this run gets (an --instance_data_dir or a dataset) and whose
    # base it gets (SD-1.x/2.x or SDXL, read from the model's model_index.json when it can be read here).
    known = parser.parse_known_args(input_args)[0]
    if not is_dreambooth(known):
        parser.set_defaults(**TEXT_TO_IMAGE_LORA_DEFAULTS)
    elif known.pretrained_model_name_or_path and kind_if_readable(known.pretrained_model_name_or_path,
                                                                  known.revision) == SDXL:
        parser.set_defaults(**DREAMBOOTH_LORA_SDXL_DEFAULTS)
    args = parser.parse_args(input_args)
    require_positive(args, "rank", "lora_alpha", "text_encoder_lr")
    require_non_negative(args, "adam_weight_decay_text_encoder")
    require_range(args, "lora_dropout", 0, 1, include_high=False)
    if args.do_edm_style_training and args.snr_gamma is not None:
        raise InputError("--snr_gamma (Min-SNR) is not defined for --do_edm_style_training (as upstream)")
    if args.use_dora and args.train_text_encoder:
        raise InputError("--use_dora with --train_text_encoder: the text encoders' DoRA magnitude vectors do not load "
                         "back through diffusers' load_lora_weights (the attacks could not audit the result); drop "
                         "one of the two flags")
    check_training_args(args)
    check_prior_preservation_args(args)
    return args


def lora_layers(model):
    """The LoRA weights of a peft-wrapped model, named as diffusers' LoRA loader expects."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    # No embedding layer carries LoRA here; peft's "auto" would look for the base model's config to decide.
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model, save_embedding_layers=False))


def save_lora(output_dir, kind, unet, text_encoders=()):
    """`pytorch_lora_weights.safetensors` of the UNet (and text encoders) in the base pipeline's format (keys
    `unet.`, `text_encoder.`, SDXL's `text_encoder_2.`), with the adapters' configs so α ≠ r loads right."""
    parts = {"unet_lora_layers": lora_layers(unet), "unet_lora_adapter_metadata": unet.peft_config["default"].to_dict()}
    for name, encoder in zip(("text_encoder", "text_encoder_2"), text_encoders):
        parts[f"{name}_lora_layers"] = lora_layers(encoder)
        parts[f"{name}_lora_adapter_metadata"] = encoder.peft_config["default"].to_dict()
    pipeline_class(kind).save_lora_weights(output_dir, **parts)


def load_lora(input_dir, kind, unet, text_encoders=()):
    """Load `save_lora`'s file back into the peft-wrapped models (resume)."""
    from diffusers.training_utils import _set_state_dict_into_text_encoder
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state_dict = pipeline_class(kind).lora_state_dict(input_dir)[0]
    unet_state = {k[len("unet."):]: v for k, v in state_dict.items() if k.startswith("unet.")}
    set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state), adapter_name="default")
    for name, encoder in zip(("text_encoder", "text_encoder_2"), text_encoders):
        _set_state_dict_into_text_encoder(state_dict, prefix=f"{name}.", text_encoder=encoder)


def save_kohya_copy(output_dir):
    """--output_kohya_format: `pytorch_lora_weights_kohya.safetensors` beside the diffusers file.

    Each model part (`unet.`, `text_encoder.`, `text_encoder_2.`) is converted to peft keys on its own, then the
    union to Kohya's (`lora_unet_…`, `lora_te1_…`, `lora_te2_…` with `.alpha`): diffusers' one-shot conversion types
    the whole file by its text-encoder keys and leaves the UNet's unconverted when both are present.
    """
    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    state_dict = load_file(str(Path(output_dir) / LORA_WEIGHTS_FILE))
    peft_state = {}
    for prefix in ("unet.", "text_encoder.", "text_encoder_2."):
        part = {key: value for key, value in state_dict.items() if key.startswith(prefix)
                and not (prefix == "text_encoder." and key.startswith("text_encoder_2."))}
        if part:
            peft_state.update(convert_all_state_dict_to_peft(part))
    save_file(kohya_dora_keys(convert_state_dict_to_kohya(peft_state)), str(Path(output_dir) / KOHYA_WEIGHTS_FILE))


def kohya_dora_keys(kohya_state):
    """DoRA magnitudes under Kohya's name, `<lora name>.dora_scale`, the key diffusers' Kohya loader reads.

    diffusers' conversion renames a magnitude only when its key has no model prefix, so a prefixed one comes out as
    `lora_unet_…attn1.to_k.lora_magnitude_vector`, which `load_lora_weights` refuses as an unrenamed key.
    """
    suffix = ".lora_magnitude_vector"
    return {(key[:-len(suffix)].replace(".", "_") + ".dora_scale" if key.endswith(suffix) else key): value
            for key, value in kohya_state.items()}


def register_lora_checkpoint_hooks(accelerator, kind, unet, text_encoders):
    """Checkpoints hold only the LoRA weights (upstream format), not the frozen base model."""
    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            save_lora(output_dir, kind, accelerator.unwrap_model(unet),
                      [accelerator.unwrap_model(encoder) for encoder in text_encoders])
            weights.clear()

    def load_hook(models, input_dir):
        load_lora(input_dir, kind, accelerator.unwrap_model(unet),
                  [accelerator.unwrap_model(encoder) for encoder in text_encoders])
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def main(args):
    with OutputLock(args.output_dir), OutputLock(args.save_mixed_dataset, "--save_mixed_dataset"):
        check_training_outputs(args)  # again, under the lock: the check and the lock are one step
        check_paths_or_hub_ids(args, *TRAINING_PATHS_OR_HUB_IDS)
        kind = check_pretrained_model(args.pretrained_model_name_or_path, args.revision)  # before the data: fails in ms
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
            class_labels_conditioning=args.class_labels_conditioning,
            vae_name_or_path=args.pretrained_vae_model_name_or_path)
        unet, vae, noise_scheduler = components.unet, components.vae, components.noise_scheduler
        text_encoders, tokenizers = text_encoders_of(components), tokenizers_of(components)  # SDXL: two of each
        resolution = args.resolution or native_resolution(unet, vae)
        for model in (unet, vae, *text_encoders):
            model.requires_grad_(False)
            model.to(accelerator.device)
            # SDXL's own VAE overflows in half precision (its config says force_upcast): it encodes in fp32, as upstream.
            keep_fp32 = model is vae and kind == SDXL and vae.config.force_upcast
            if weight_dtype != torch.float32 and not keep_fp32:
                model.to(dtype=weight_dtype)
        trained_models = add_lora_adapters(unet, text_encoders if args.train_text_encoder else (), rank=args.rank,
                                           lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                           use_dora=args.use_dora)
        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            if args.train_text_encoder:
                for encoder in text_encoders:
                    encoder.gradient_checkpointing_enable()
        if args.enable_xformers_memory_efficient_attention:
            unet.enable_xformers_memory_efficient_attention()

        if training_set.caption_column is not None:
            warn_truncated_captions(tokenizers[0], training_set.rows[training_set.caption_column], "training captions")
        class_data_dir = class_data_dir_of(args.class_data_dir, args.output_dir)
        class_images = None
        if args.with_prior_preservation:
            class_images = load_class_images(
                args.pretrained_model_name_or_path, args.class_prompt, args.num_class_images, class_data_dir,
                resolution, accelerator, revision=args.revision, variant=args.variant,
                sample_batch_size=args.sample_batch_size, num_inference_steps=args.class_num_inference_steps,
                prior_generation_precision=args.prior_generation_precision, seed=args.seed)
        train_dataset = TrainingImages(
            training_set.rows, tokenizers, resolution,
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
        # One group per model: the text encoders' LoRA may have its own rate and weight decay (upstream SDXL DreamBooth).
        param_groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": learning_rate,
                         "weight_decay": args.adam_weight_decay} for model in trained_models]
        for group in param_groups[1:]:
            group["lr"] = args.text_encoder_lr or learning_rate
            group["weight_decay"] = (args.adam_weight_decay if args.adam_weight_decay_text_encoder is None
                                     else args.adam_weight_decay_text_encoder)
        params_to_optimize = [p for group in param_groups for p in group["params"]]
        if args.use_8bit_adam:
            import bitsandbytes as bnb

            optimizer_class = bnb.optim.AdamW8bit
        else:
            optimizer_class = torch.optim.AdamW
        optimizer = optimizer_class(param_groups, lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                    weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
        # × processes: the prepared scheduler steps once per process at every update.
        lr_scheduler = get_scheduler(
            args.lr_scheduler, optimizer=optimizer, step_rules=args.lr_step_rules,
            num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=max_train_steps * accelerator.num_processes, num_cycles=args.lr_num_cycles,
            power=args.lr_power)
        if args.train_text_encoder:
            unet, *text_encoders, optimizer, lr_scheduler = accelerator.prepare(unet, *text_encoders, optimizer,
                                                                                 lr_scheduler)
        else:
            unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
        trained_models = [unet, *text_encoders] if args.train_text_encoder else [unet]
        register_lora_checkpoint_hooks(accelerator, kind, unet, trained_models[1:])
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
                    encoders = dict(zip(("text_encoder", "text_encoder_2"), text_encoders))
                    pipeline = validation_pipeline(args.pretrained_model_name_or_path, accelerator,
                                                   args.validation_scheduler, args.revision, args.variant, unet=unet,
                                                   vae=vae, **encoders)
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
            eos_token_id = tokenizers[0].eos_token_id if args.text_encoder_use_attention_mask else None
            validation_images, validated_step = [], None
            for epoch in range(first_epoch, num_train_epochs):
                for model in trained_models:
                    model.train()
                train_dataloader.set_epoch(epoch)  # the order, crops and captions are functions of (seed, epoch)
                for batch in train_dataloader:
                    with accelerator.accumulate(*trained_models):
                        loss, logs = denoising_batch_loss(
                            batch, unet, latent_encoder, text_encoders, noise_scheduler, weight_dtype, resolution,
                            prior_loss_weight=args.prior_loss_weight, snr_gamma=args.snr_gamma,
                            noise_offset=noise_offset_of(args), attention_mask_eos_id=eos_token_id,
                            class_labels_from_timesteps=args.class_labels_conditioning == "timesteps",
                            edm_style=args.do_edm_style_training)
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
                    save_lora(str(staging_dir), kind, accelerator.unwrap_model(unet),
                              [accelerator.unwrap_model(encoder) for encoder in trained_models[1:]])
                    if args.output_kohya_format:
                        save_kohya_copy(staging_dir)
                        os.replace(staging_dir / KOHYA_WEIGHTS_FILE, Path(args.output_dir) / KOHYA_WEIGHTS_FILE)
                    os.replace(staging_dir / LORA_WEIGHTS_FILE, Path(args.output_dir) / LORA_WEIGHTS_FILE)
            card_kind = "dreambooth_lora" if is_dreambooth(args) else "text_to_image_lora"
            method = "DreamBooth+LoRA" if args.with_prior_preservation else "LoRA"
            has_domains = "domain" in training_set.rows.column_names
            trigger_words = set(training_set.rows["domain"]) - {""} if has_domains else ()
            info = training_info(
                card_kind, f"{method} (rank {args.rank})",
                pretrained_model_name_or_path=args.pretrained_model_name_or_path, revision=args.revision, dataset_name=args.dataset_name, source=training_set.source,
                mix_info=training_set.mix_info,
                trained={"steps": max_train_steps, "learning_rate": learning_rate, "resolution": resolution},
                num_images=len(training_set.rows), instance_prompt=args.instance_prompt,
                validation_prompt=args.validation_prompt, train_text_encoder=args.train_text_encoder,
                trigger_words=trigger_words, base_kind=kind, vae_name_or_path=args.pretrained_vae_model_name_or_path,
                use_dora=args.use_dora)
            finish_outputs(accelerator, args.output_dir, info, validation_images, privacy_report=args.privacy_report,
                           push=args.push_to_hub, hub_model_id=args.hub_model_id, hub_token=args.hub_token)


if __name__ == "__main__":
    run_cli(main, parse_args)
