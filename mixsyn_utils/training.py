"""Pieces the three MixSyn fine-tuning scripts build their training loop from: the batch loss (SD-1.x/2.x and SDXL
conditioning), the output folder, tracker settings, when and how to validate, and the components with the training
flags applied.

The loop itself is in each script (as in the diffusers examples); checkpoints are in `checkpoints.py`, the
training set in `training_data.py`, the model card in `model_card.py`, the flags in `training_flags.py`.
"""

import shutil
from pathlib import Path

import numpy as np
import torch

from .cli import InputError
from .conditioning import encode_prompts, size_time_ids
from .diffusion import alphas_cumprod, q_sample
from .dreambooth import dreambooth_loss, euler_sigmas, euler_x0_prediction, offset_noise, prediction_target
from .models import attention_mask_until_eos, load_components, weight_dtype_of
from .variants import load_pipeline


def start_output_dir(accelerator, output_dir, overwrite=False):
    """Create `output_dir` once every input is checked; with `overwrite`, first remove what it held.

    So the old run's checkpoints never survive into the new one (`--resume_from_checkpoint latest` would pick
    them up), and a run refused for bad input leaves no folder behind.
    """
    output_dir = Path(output_dir)
    if accelerator.is_main_process:
        if overwrite and output_dir.is_dir():
            shutil.rmtree(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()


def tracker_config(flags):
    """Flag values (`flags.flag_values`) as tracker hyper-parameters: trackers take scalars only."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in flags.items()}


def validation_due(global_step, validation_steps=None, validation_epochs=None, epoch_end=None):
    """Whether to validate now: every `validation_steps` updates, or after every `validation_epochs`-th epoch.

    `epoch_end`: the index of the epoch that just ended (upstream validates after epochs 0, N, 2N, …), else None.
    The scripts validate once more after training, so the model card shows the final weights.
    """
    if epoch_end is not None:
        return validation_epochs is not None and epoch_end % validation_epochs == 0
    return validation_steps is not None and global_step % validation_steps == 0


def log_validation(pipeline, accelerator, prompt, num_images, seed, global_step, resolution):
    """Generate `num_images` for `prompt`, send them to the trackers, return them (PIL images).

    The pipeline runs under the accelerator's autocast (trained parts are float32, frozen ones half precision,
    as upstream). A CPU generator seeded by `seed` draws the latents, so validation leaves the training RNG untouched.
    """
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(seed or 0)
    with accelerator.autocast():
        images = [decode_latents(pipeline, pipeline(prompt, num_inference_steps=25, generator=generator,
                                                    height=resolution, width=resolution, output_type="latent").images)[0]
                  for _ in range(num_images)]
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack([np.asarray(image) for image in images]),
                                      global_step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(image, caption=f"{i}: {prompt}") for i, image in enumerate(images)]})
    return images


def decode_latents(pipeline, latents):
    """PIL images of a sampler's final latents z: x = D(z / s), decoded by the pipeline's VAE in its own dtype.

    The pipelines decode z in the sampler's dtype; SDXL's VAE stays float32 in training (`force_upcast`) while the
    UNet samples in half precision, which only CUDA's autocast reconciles, so z is cast to the VAE's dtype here.
    """
    vae = pipeline.vae
    with torch.no_grad():
        pixels = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return pipeline.image_processor.postprocess(pixels.float(), output_type="pil")


def validation_pipeline(pretrained_model_name_or_path, accelerator, scheduler_name, revision=None, variant=None,
                        **components):
    """The base model's pipeline (`variants.load_pipeline`: SD-1.x/2.x or SDXL) with the in-training `components`
    (unet=, text_encoder=, text_encoder_2=, vae=...).

    Sampled with `scheduler_name` (--validation_scheduler: upstream's DPM-Solver++ by default), built from the
    model's schedule.
    """
    import diffusers

    pipeline = load_pipeline(
        pretrained_model_name_or_path, revision, variant, weight_dtype_of(accelerator.mixed_precision),
        **{name: accelerator.unwrap_model(part) if isinstance(part, torch.nn.Module) else part
           for name, part in components.items()})
    pipeline.scheduler = getattr(diffusers, scheduler_name).from_config(pipeline.scheduler.config)
    return pipeline.to(accelerator.device)


def batch_conditioning(batch, text_encoders, resolution, attention_mask_eos_id=None):
    """The UNet's conditioning of a training batch (`conditioning.encode_prompts` of its `input_ids[_2]`); for SDXL
    with each image's own size and crop as time ids (`size_time_ids`, target `resolution`), as upstream's SDXL
    scripts. With `attention_mask_eos_id` the text encoder masks the padding after that token."""
    input_ids = [batch["input_ids"]] + ([batch["input_ids_2"]] if len(text_encoders) > 1 else [])
    masks = None
    if attention_mask_eos_id is not None:
        masks = [attention_mask_until_eos(ids, attention_mask_eos_id) for ids in input_ids]
    conditioning = encode_prompts(text_encoders, input_ids, masks)
    return conditioning.with_time_ids(size_time_ids(batch["original_size"], batch["crop_top_left"],
                                                    (resolution, resolution)))


def denoising_batch_loss(batch, unet, latent_encoder, text_encoders, noise_scheduler, weight_dtype, resolution,
                         prior_loss_weight=1.0, snr_gamma=None, noise_offset=0.0, attention_mask_eos_id=None,
                         class_labels_from_timesteps=False, edm_style=False):
    """The DreamBooth/LoRA/TI training loss of one batch; returns (loss, logs).

    z₀ = `latent_encoder(x)`, ε ~ N(0, I) (plus `offset_noise` when `noise_offset` > 0), t ~ U{0, …, T−1},
    z_t = `q_sample(z₀, ε, t)`, c = `batch_conditioning` (`text_encoders`: one, or SDXL's two; `resolution` the
    time ids' target size), L = `dreambooth_loss(ε_θ(z_t, t, c), target)` with instance rows first; without class
    rows it is the plain (optionally Min-SNR-weighted) denoising loss. With `edm_style` (upstream SDXL DreamBooth's
    `--do_edm_style_training` on an Euler-scheduler base) the same z_t and t are read as z = x₀ + σ_t ε
    (`euler_sigmas`; the UNet sees z / √(σ_t² + 1) = z_t), the target is x₀ and the loss is the σ_t⁻²-weighted MSE
    of `euler_x0_prediction`.
    """
    latents = latent_encoder(batch["pixel_values"])
    noise = offset_noise(torch.randn_like(latents), noise_offset)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              device=latents.device).long()
    noisy_latents = q_sample(latents, noise, timesteps, alphas_cumprod(noise_scheduler))
    conditioning = batch_conditioning(batch, text_encoders, resolution, attention_mask_eos_id)
    # Inputs in the frozen models' dtype: a frozen half-precision UNet is not autocast-wrapped (upstream TI).
    model_pred = unet(noisy_latents.to(weight_dtype), timesteps,
                      class_labels=timesteps if class_labels_from_timesteps else None,
                      **conditioning.to(dtype=weight_dtype).unet_kwargs()).sample
    sample_weights = None
    if edm_style:
        sigmas = euler_sigmas(noise_scheduler, timesteps)
        unscaled = latents + sigmas.view(-1, *([1] * (latents.dim() - 1))) * noise
        model_pred = euler_x0_prediction(model_pred.float(), unscaled.float(), sigmas,
                                         noise_scheduler.config.prediction_type)
        target, sample_weights = latents, sigmas ** -2
    else:
        target = prediction_target(noise_scheduler, latents, noise, timesteps)
    loss, instance_loss, prior_loss = dreambooth_loss(
        model_pred, target, timesteps, noise_scheduler, batch["num_instance"],
        prior_loss_weight=prior_loss_weight, snr_gamma=snr_gamma, sample_weights=sample_weights)
    logs = {"prior_loss": prior_loss.detach().item()} if model_pred.shape[0] > batch["num_instance"] else {}
    return loss, logs


def load_training_components(pretrained_model_name_or_path, revision=None, variant=None, tokenizer_name=None,
                             prediction_type=None, validation_images=None, class_labels_conditioning=None,
                             vae_name_or_path=None):
    """`models.load_components` with the training flags applied: --tokenizer_name, --pretrained_vae_model_name_or_path,
    --prediction_type (changes the target the loss regresses: `prediction_target` reads the scheduler's config).
    DeepFloyd IF's --validation_images and --class_labels_conditioning parse (upstream's commands do) but are
    refused here."""
    components = load_components(pretrained_model_name_or_path, revision, variant, tokenizer_name=tokenizer_name,
                                 vae_name_or_path=vae_name_or_path)
    if prediction_type is not None:
        components.noise_scheduler.register_to_config(prediction_type=prediction_type)
    if validation_images:
        raise InputError("--validation_images needs an image-conditioned pipeline (DeepFloyd IF stage II); "
                         "Stable Diffusion validates from --validation_prompt alone")
    if class_labels_conditioning is not None and components.unet.config.class_embed_type is None:
        raise InputError(f"--class_labels_conditioning {class_labels_conditioning}: the UNet of "
                         f"{pretrained_model_name_or_path} has no class embedding (DeepFloyd IF stage II has one)")
    return components
