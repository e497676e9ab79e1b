"""Stable Diffusion components (SD-1.x/2.x and SDXL): the pipeline's kind, loading, tokenizing, encoding images.

The kind is read from `model_index.json` before anything heavy, and models the scripts cannot handle (SD3, Flux)
are refused there in one line. The calls are those of the diffusers examples, so a Hub id
(CompVis/stable-diffusion-v1-4, stabilityai/stable-diffusion-xl-base-1.0) and the embedded victim's pipeline folder
load the same way. Every weights file is read as safetensors (`use_safetensors=True`): a pickled `.bin`/`.pt` is
refused, never unpickled. z₀ = s · E(x) is computed here and nowhere else; the text conditioning is in
`conditioning.py`.
"""

import logging
from pathlib import Path
from types import SimpleNamespace

import torch

from .cli import InputError, first_line
from .dataset_io import check_path_or_hub_id


# Pipeline kinds the scripts train and attack: a UNet ε/v-prediction model with a DDPM-family schedule.
SD, SDXL = "sd", "sdxl"
FLOW_MATCHING_REASON = ("the attacks' ε/v statistics and the DDPM training loss do not apply to flow matching as "
                        "written; Stable Diffusion 1.x/2.x and SDXL are supported")
EDM_REASON = ("the attacks' ᾱ_t table and the DDPM training loss do not apply to EDM preconditioning as written; "
              "Stable Diffusion 1.x/2.x and SDXL with a DDPM-family schedule are supported")


def read_model_index(name_or_path, revision=None, flag="--pretrained_model_name_or_path"):
    """The pipeline's `model_index.json` as a dict: from a local folder, or from the Hub (the cached snapshot when
    HF_HUB_OFFLINE is set; else one small download). Fails in milliseconds, before any data or weights are read."""
    import json

    from huggingface_hub import constants, hf_hub_download

    path = Path(name_or_path)
    check_path_or_hub_id(name_or_path, flag)
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise InputError(f"{flag} {name_or_path} is not a diffusers pipeline folder (no model_index.json)")
        index_file = path / "model_index.json"
    else:
        try:
            index_file = hf_hub_download(str(name_or_path), "model_index.json", revision=revision,
                                         local_files_only=constants.HF_HUB_OFFLINE)
        except Exception as error:  # noqa: BLE001 - any lookup failure means it cannot load
            reason = ("is not in the local Hub cache and HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE
                      else f"has no model_index.json on the Hub ({first_line(error)})")
            raise InputError(f"{flag} {name_or_path} {reason}") from None
    try:
        return json.loads(Path(index_file).read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"{flag} {name_or_path}: model_index.json does not read ({first_line(error)})") from None


def _component_class(model_index, name):
    """The class name a model_index.json entry names (["library", "Class"]), or None for an absent component."""
    entry = model_index.get(name)
    return entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None


def pipeline_kind(model_index, name_or_path="", flag="--pretrained_model_name_or_path"):
    """`SD` or `SDXL` from a pipeline's model_index.json; any other kind is a one-line `InputError` saying why.

    SDXL: `text_encoder`, `text_encoder_2`, `tokenizer_2` and a `unet` (`StableDiffusionXLPipeline`, also SDXL-
    Turbo). Refused: flow-matching transformer models (a `transformer` component or a `FlowMatch…` scheduler: SD3,
    Flux), EDM-formulation models (an `EDM…` scheduler: Playground v2.5), the SDXL refiner (no first text encoder),
    pixel-space models (no VAE: DeepFloyd IF).
    """
    class_name = model_index.get("_class_name", "a pipeline")
    scheduler = _component_class(model_index, "scheduler") or ""
    if _component_class(model_index, "transformer") or scheduler.startswith("FlowMatch"):
        raise InputError(f"{flag} {name_or_path} is a flow-matching transformer model ({class_name}, "
                         f"{scheduler or 'no scheduler'}): {FLOW_MATCHING_REASON}")
    if scheduler.startswith("EDM"):
        raise InputError(f"{flag} {name_or_path} is an EDM-formulation model ({class_name}, {scheduler}): {EDM_REASON}")
    missing = [name for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
               if _component_class(model_index, name) is None]
    if missing:
        why = {"vae": "pixel-space models such as DeepFloyd IF are not supported",
               "text_encoder": "an SDXL refiner has no first text encoder and conditions on an aesthetic score"}
        reason = next((why[name] for name in missing if name in why), "a latent UNet pipeline is needed")
        raise InputError(f"{flag} {name_or_path} ({class_name}) has no {', '.join(missing)}: {reason}")
    if _component_class(model_index, "text_encoder_2") and _component_class(model_index, "tokenizer_2"):
        return SDXL
    return SD


def check_pretrained_model(name_or_path, revision=None, flag="--pretrained_model_name_or_path"):
    """The pipeline's kind (`SD` or `SDXL`), read from its model_index.json before any data or weights are read.

    A local path must be a diffusers pipeline folder; a Hub id must be in the local cache when HF_HUB_OFFLINE is
    set; SD3, Flux and other models the scripts cannot train or attack fail here in one line (`pipeline_kind`).
    """
    return pipeline_kind(read_model_index(name_or_path, revision, flag), name_or_path, flag)


def load_components(pretrained_model_name_or_path, revision=None, variant=None, tokenizer_name=None,
                    vae_name_or_path=None):
    """Tokenizer(s), text encoder(s), VAE, UNet and the training noise scheduler of an SD-1.x/2.x or SDXL pipeline.

    Same calls as diffusers' `train_dreambooth.py` / `train_dreambooth_lora_sdxl.py`: the tokenizer from
    `tokenizer_name` when given, the VAE from `vae_name_or_path` (a VAE folder or Hub id, e.g.
    madebyollin/sdxl-vae-fp16-fix) when given; the noise scheduler is `DDPMScheduler` built from the pipeline's
    `scheduler/` config, so ᾱ_t comes from the model's own schedule. SDXL adds `tokenizer_2` and `text_encoder_2`
    (`CLIPTextModelWithProjection`); for SD-1.x/2.x they are None. `kind` is `SD` or `SDXL`;
    `force_zeros_for_empty_prompt` is the pipeline's rule for the unconditional embedding (`conditioning`).
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    source = pretrained_model_name_or_path
    model_index = read_model_index(source, revision)
    kind = pipeline_kind(model_index, source)
    tokenizer_2 = text_encoder_2 = None
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
        if kind == SDXL:
            tokenizer_2 = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", revision=revision)
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                source, subfolder="text_encoder_2", revision=revision, variant=variant, use_safetensors=True)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", revision=revision, variant=variant,
                                                    use_safetensors=True)
        noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", revision=revision)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot load --pretrained_model_name_or_path {source}: {first_line(error)} (a Stable "
                         "Diffusion pipeline with tokenizer/, text_encoder/, vae/, unet/ and scheduler/ is needed, "
                         "and tokenizer_2/, text_encoder_2/ for SDXL)") from error
    vae = load_vae(source, revision, variant, vae_name_or_path)
    return SimpleNamespace(
        tokenizer=tokenizer, text_encoder=text_encoder, tokenizer_2=tokenizer_2, text_encoder_2=text_encoder_2,
        vae=vae, unet=unet, noise_scheduler=noise_scheduler, kind=kind,
        force_zeros_for_empty_prompt=kind == SDXL and bool(model_index.get("force_zeros_for_empty_prompt", True)))


def load_vae(pretrained_model_name_or_path, revision=None, variant=None, vae_name_or_path=None):
    """The pipeline's `vae/`, or a separate VAE (`--pretrained_vae_model_name_or_path`: a VAE folder or Hub id)."""
    from diffusers import AutoencoderKL

    flag = "--pretrained_vae_model_name_or_path" if vae_name_or_path else "--pretrained_model_name_or_path"
    try:
        if vae_name_or_path:
            return AutoencoderKL.from_pretrained(vae_name_or_path, use_safetensors=True)
        return AutoencoderKL.from_pretrained(pretrained_model_name_or_path, subfolder="vae", revision=revision,
                                             variant=variant, use_safetensors=True)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot load {flag} {vae_name_or_path or pretrained_model_name_or_path}: "
                         f"{first_line(error)}") from error


def text_encoders_of(components):
    """(text_encoder,) for SD-1.x/2.x, (text_encoder, text_encoder_2) for SDXL: what `encode_prompts` takes."""
    return tuple(encoder for encoder in (components.text_encoder, getattr(components, "text_encoder_2", None))
                 if encoder is not None)


def tokenizers_of(components):
    """The tokenizer of each text encoder, in `text_encoders_of`'s order."""
    return tuple(tokenizer for tokenizer in (components.tokenizer, getattr(components, "tokenizer_2", None))
                 if tokenizer is not None)


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
