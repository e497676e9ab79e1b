"""Stable Diffusion components: loading (pretrained or a fine-tuned variant), and encoding prompts and images.

The calls are those of the diffusers examples, so a Hub id (CompVis/stable-diffusion-v1-4) and the embedded
victim's pipeline folder load the same way. Every weights file is read as safetensors (`use_safetensors=True`):
a pickled `.bin`/`.pt` is refused, never unpickled. z₀ = s · E(x) is computed here and nowhere else.
"""

import logging
from pathlib import Path
from types import SimpleNamespace

import torch

from .cli import InputError, first_line
from .dataset_io import check_path_or_hub_id


def check_pretrained_model(name_or_path, revision=None, flag="--pretrained_model_name_or_path"):
    """Fail in milliseconds, before any data is read, when the pretrained model cannot load.

    A local path must be a diffusers pipeline folder (with model_index.json); a Hub id must be in the local
    cache when HF_HUB_OFFLINE is set.
    """
    from huggingface_hub import constants, snapshot_download

    path = Path(name_or_path)
    check_path_or_hub_id(name_or_path, flag)
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise InputError(f"{flag} {name_or_path} is not a diffusers pipeline folder (no model_index.json)")
    elif constants.HF_HUB_OFFLINE:
        try:
            snapshot_download(str(name_or_path), revision=revision, local_files_only=True)
        except Exception:  # noqa: BLE001 - any lookup failure means it cannot load offline
            raise InputError(f"{flag} {name_or_path} is not in the local Hub cache and HF_HUB_OFFLINE is set") from None


def load_components(pretrained_model_name_or_path, revision=None, variant=None, tokenizer_name=None):
    """Tokenizer, text encoder, VAE, UNet and the training noise scheduler of an SD-1.x pipeline folder or Hub id.

    Same calls as diffusers' `train_dreambooth.py` (the tokenizer from `tokenizer_name` when given); the noise
    scheduler is `DDPMScheduler` built from the pipeline's `scheduler/` config, so ᾱ_t comes from the model's
    own schedule.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = pretrained_model_name_or_path
    if tokenizer_name is not None:  # its own flag: an error blames --tokenizer_name, not the pipeline
        check_path_or_hub_id(tokenizer_name, "--tokenizer_name")
        try:
            tokenizer = CLIPTokenizer.from_pretrained(tokenizer_name, revision=revision)
        except (OSError, ValueError) as error:
            raise InputError(f"cannot load --tokenizer_name {tokenizer_name}: {first_line(error)}") from error
    try:
        if tokenizer_name is None:
            tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", revision=revision)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", revision=revision,
                                                     variant=variant, use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", revision=revision, variant=variant,
                                            use_safetensors=True)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", revision=revision, variant=variant,
                                                    use_safetensors=True)
        noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", revision=revision)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot load --pretrained_model_name_or_path {source}: {first_line(error)} (a Stable "
                         "Diffusion pipeline with tokenizer/, text_encoder/, vae/, unet/ and scheduler/ is needed; "
                         "pixel-space models such as DeepFloyd IF are not supported)") from error
    return SimpleNamespace(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet, noise_scheduler=noise_scheduler
    )


def vae_scale_factor(vae):
    """Pixels per latent cell: 2^(number of VAE down blocks - 1) (8 for SD-1.x)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def native_resolution(unet, vae):
    """The resolution a pipeline was trained at: `unet.config.sample_size × vae_scale_factor` (512 for SD-1.4)."""
    return int(unet.config.sample_size) * vae_scale_factor(vae)


def configured_resolution(pretrained_model_name_or_path, revision=None, unet_path=None):
    """`native_resolution` from the UNet's and the VAE's config.json alone, before any weight loads (the attacks
    check their images at this size first). `unet_path`: a fine-tuned UNet folder, or a pipeline folder whose
    `unet/` replaces the pretrained UNet (as `variants.load_model_variant` reads it)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    try:
        if unet_path is not None and Path(unet_path).is_dir():
            subfolder = "unet" if (Path(unet_path) / "unet" / "config.json").is_file() else None
            unet_config = UNet2DConditionModel.load_config(str(unet_path), subfolder=subfolder)
        else:
            unet_config = UNet2DConditionModel.load_config(pretrained_model_name_or_path, subfolder="unet",
                                                           revision=revision)
        vae_config = AutoencoderKL.load_config(pretrained_model_name_or_path, subfolder="vae", revision=revision)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot load --pretrained_model_name_or_path {pretrained_model_name_or_path}: "
                         f"{first_line(error)}") from error
    return int(unet_config["sample_size"]) * 2 ** (len(vae_config["block_out_channels"]) - 1)


def tokenize_prompts(tokenizer, prompts, max_length=None):
    """Token ids (B, L), padded and truncated as `StableDiffusionPipeline.encode_prompt` does.

    L = `max_length`, default the tokenizer's `model_max_length` (77 for CLIP).
    """
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=max_length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def attention_mask_until_eos(input_ids, eos_token_id):
    """1 for every token up to and including the first end-of-text token, 0 for the padding after it (B, L)."""
    is_eos = (input_ids == eos_token_id).long()
    return ((torch.cumsum(is_eos, dim=1) - is_eos) == 0).long()


def warn_truncated_captions(tokenizer, captions, what="captions"):
    """Warn once, with the count, when captions exceed the tokenizer's limit (`tokenize_prompts` cuts them there).

    Returns the number of distinct captions cut. Length counts the begin and end tokens, as the text encoder sees.
    """
    distinct = sorted(set(captions))
    if not distinct:
        return 0
    lengths = [len(ids) for ids in tokenizer(distinct, truncation=False, verbose=False).input_ids]
    cut = [caption for caption, length in zip(distinct, lengths) if length > tokenizer.model_max_length]
    if cut:
        logging.getLogger(__name__).warning(
            f"{len(cut)} of {len(distinct)} distinct {what} exceed the tokenizer's {tokenizer.model_max_length} "
            f"tokens and are cut there, e.g. {cut[0][:60]!r}...")
    return len(cut)


def encode_prompts(text_encoder, input_ids):
    """Text-encoder hidden states c (B, L, D) used as cross-attention context; no classifier-free guidance."""
    attention_mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        attention_mask = (input_ids != text_encoder.config.pad_token_id).long().to(input_ids.device)
    return text_encoder(input_ids.to(text_encoder.device), attention_mask=attention_mask)[0]


def encode_images_to_latents(vae, pixel_values, sample=False, generator=None):
    """z₀ = s · E(x): the scaled VAE posterior mode μ, or with `sample=True` a posterior sample μ + σ · n.

    `pixel_values` in [-1, 1], shape (B, 3, H, W); s = `vae.config.scaling_factor`. n ~ N(0, I) is drawn in
    float32 whatever the VAE's dtype (diffusers' `randn_tensor`), from `generator`: None (the global RNG), one
    `torch.Generator`, or one per image (then image i's draw depends on its own generator only, not on its
    batch). Gradients flow when the caller enables them (Anti-DreamBooth's PGD differentiates here).
    """
    from diffusers.utils.torch_utils import randn_tensor

    posterior = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
    if not sample:
        return posterior.mode() * vae.config.scaling_factor
    noise = randn_tensor(posterior.mean.shape, generator=generator, device=posterior.mean.device, dtype=torch.float32)
    return (posterior.mean + posterior.std * noise.to(posterior.mean.dtype)) * vae.config.scaling_factor


class LatentEncoder(torch.nn.Module):
    """The VAE encoder as a module (`encode_images_to_latents`, posterior sample), so DDP can wrap it when it trains."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, pixel_values):
        return encode_images_to_latents(self.vae, pixel_values, sample=True)


def weight_dtype_of(mixed_precision):
    """dtype of frozen weights under `--mixed_precision` ("fp16", "bf16", else float32); trained weights stay fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
