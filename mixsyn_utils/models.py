"""Stable Diffusion components: loading (pretrained or a fine-tuned variant), and encoding prompts and images.

The calls are those of the diffusers examples, so a Hub id (CompVis/stable-diffusion-v1-4) and the embedded
victim's pipeline folder load the same way. Every weights file is read as safetensors (`use_safetensors=True`):
a pickled `.bin`/`.pt` is refused, never unpickled. z₀ = s · E(x) is computed here and nowhere else.
"""

import logging
import re
from pathlib import Path
from types import SimpleNamespace

import torch

from .cli import InputError, first_line
from .placeholders import load_token_map


def check_pretrained_model(name_or_path, revision=None, flag="--pretrained_model_name_or_path"):
    """Fail in milliseconds, before any data is read, when the pretrained model cannot load.

    A local path must be a diffusers pipeline folder (with model_index.json); a Hub id must be in the local
    cache when HF_HUB_OFFLINE is set.
    """
    from huggingface_hub import constants, snapshot_download

    from .dataset_io import is_hub_id

    path = Path(name_or_path)
    if path.exists() or not is_hub_id(name_or_path):
        if not (path / "model_index.json").is_file():
            reason = "is not a diffusers pipeline folder (no model_index.json)" if path.exists() else "does not exist"
            raise InputError(f"{flag} {name_or_path} {reason}")
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
    try:
        if tokenizer_name is not None:
            tokenizer = CLIPTokenizer.from_pretrained(tokenizer_name, revision=revision)
        else:
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


def weight_dtype_of(mixed_precision):
    """dtype of frozen weights under `--mixed_precision` ("fp16", "bf16", else float32); trained weights stay fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


# ----------------------------------------------------------------------------------------------
# Fine-tuned variants: the same pretrained pipeline plus a UNet, LoRA weights or learned tokens
# ----------------------------------------------------------------------------------------------

def load_model_variant(pretrained_model_name_or_path, revision=None, variant=None, unet_path=None,
                       lora_weights=None, textual_inversion=None, dtype=None):
    """A `StableDiffusionPipeline` for the pretrained model or one of its fine-tuned variants.

    `unet_path`: a UNet folder (`checkpoint-N/unet`) or a full pipeline folder (its `unet/` is used).
    `lora_weights`: a folder or file accepted by `pipe.load_lora_weights` (fused, so attacks see one UNet).
    `textual_inversion`: a folder with `token_map.json` written by `train_textual_inversion_mixsyn.py`.
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    try:
        pipeline = StableDiffusionPipeline.from_pretrained(
            pretrained_model_name_or_path, revision=revision, variant=variant, dtype=dtype,
            safety_checker=None, requires_safety_checker=False, use_safetensors=True,
        )
    except (OSError, ValueError) as error:
        raise InputError(f"cannot load --pretrained_model_name_or_path {pretrained_model_name_or_path}: "
                         f"{first_line(error)}") from error
    if unet_path is not None:
        folder = Path(unet_path)
        if not folder.is_dir():
            raise InputError(f"--unet_path {unet_path} is not a folder")
        subfolder = "unet" if (folder / "unet" / "config.json").is_file() else None
        try:
            pipeline.unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder=subfolder, dtype=dtype,
                                                                 use_safetensors=True)
        except (OSError, ValueError) as error:
            raise InputError(f"cannot load --unet_path {unet_path}: {first_line(error)}") from error
    if lora_weights is not None:
        if not Path(lora_weights).exists():
            raise InputError(f"--lora_weights {lora_weights} does not exist")
        check_lora_matches(pipeline, lora_weights)
        try:
            state_dict, network_alphas, metadata = type(pipeline).lora_state_dict(
                str(lora_weights), return_lora_metadata=True, use_safetensors=True)
            if any(key.startswith("text_encoder.") for key in state_dict):
                pipeline.load_lora_weights(str(lora_weights), use_safetensors=True)
            else:  # load_lora_weights would log, on every load, that the text encoder has no LoRA keys
                pipeline.load_lora_into_unet(state_dict, network_alphas, pipeline.unet, metadata=metadata)
        except (RuntimeError, ValueError) as error:
            raise InputError(f"--lora_weights {lora_weights} does not match the model: {first_line(error)}") from error
        pipeline.fuse_lora()
        pipeline.unload_lora_weights()
    if textual_inversion is not None:
        for domain, entry in load_token_map(textual_inversion).items():
            pipeline.load_textual_inversion(str(Path(textual_inversion) / entry["file"]), token=entry["placeholder"],
                                            use_safetensors=True)
    return pipeline


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def weights_digest(path):
    """sha256 identifying the weights a folder (or one weights file) holds: the same bytes give the same digest.

    digest = sha256 of the JSON list [[name, sha256(file bytes)], …] over the weight files (`WEIGHT_SUFFIXES`)
    sorted by their path relative to `path` (a single file: its name); checkpoint-N/, hidden and log folders
    are not published weights and are left out. Unlike `resumable.input_fingerprint` (every file, for resume),
    a changed README or config leaves it unchanged: it names the weights a model card's numbers were measured on.
    """
    import hashlib
    import json

    from .resumable import file_digest

    root = Path(path)
    if root.is_file():
        files = [(root.name, root)]
    else:
        files = sorted((file.relative_to(root).as_posix(), file) for file in root.rglob("*")
                       if file.is_file() and file.suffix in WEIGHT_SUFFIXES
                       and not any(part.startswith((".", "checkpoint-")) or part == "logs"
                                   for part in file.relative_to(root).parts[:-1]))
    entries = [[name, file_digest(file)] for name, file in files]
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def model_fingerprints(args):
    """Content fingerprints (`resumable.input_fingerprint`) of the model `load_model_variant` builds from the flags:
    the pretrained pipeline and each fine-tuned part, for the run signature of a resumable job."""
    from .resumable import input_fingerprint

    parts = ("unet_path", "lora_weights", "textual_inversion")
    return {"pretrained_model": input_fingerprint(args.pretrained_model_name_or_path, args.revision),
            **{flag: input_fingerprint(getattr(args, flag)) for flag in parts}}


_LORA_KEY = re.compile(
    r"^(unet|text_encoder)\.(.+?)\.(lora_A|lora_B|lora\.down|lora\.up|lora_down|lora_up|"
    r"lora_linear_layer\.down|lora_linear_layer\.up)(?:\.[A-Za-z_0-9]+)?\.weight$"
)


def check_lora_matches(pipeline, lora_weights):
    """Raise `InputError` unless every LoRA matrix in `lora_weights` targets an existing layer of the right size.

    diffusers only logs LoRA keys it cannot place, so an adapter trained on another UNet would silently
    attack the un-adapted model. Checked: a known prefix (`unet.` / `text_encoder.`), the target module
    exists, and the down (A) matrix's input width / the up (B) matrix's output width equal the layer's.
    """
    try:
        state_dict, _ = type(pipeline).lora_state_dict(str(lora_weights), use_safetensors=True)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot load --lora_weights {lora_weights} as safetensors: {first_line(error)}") from error
    models = {"unet": pipeline.unet, "text_encoder": pipeline.text_encoder}
    matched = 0
    for key, tensor in state_dict.items():
        if key.endswith(".alpha"):
            continue
        found = _LORA_KEY.match(key)
        if found is None:
            raise InputError(f"--lora_weights {lora_weights}: key {key} is not a UNet or text-encoder LoRA matrix")
        model_name, module_name = found.group(1), found.group(2)
        try:
            module = models[model_name].get_submodule(module_name)
        except AttributeError:
            raise InputError(f"--lora_weights {lora_weights} does not match the model: no layer {model_name}.{module_name}")
        is_down = found.group(3).endswith(("lora_A", "down"))
        layer_width = getattr(module, "in_features" if is_down else "out_features", None)
        if layer_width is None:
            layer_width = getattr(module, "in_channels" if is_down else "out_channels", None)
        lora_width = tensor.shape[1] if is_down else tensor.shape[0]
        if layer_width is not None and lora_width != layer_width:
            raise InputError(
                f"--lora_weights {lora_weights} does not match the model: {key} has width {lora_width}, "
                f"layer {model_name}.{module_name} has {layer_width}"
            )
        matched += 1
    if matched == 0:
        raise InputError(f"--lora_weights {lora_weights} holds no LoRA matrices")


def components_from_pipeline(pipeline):
    """The pieces attacks and trainers use, with a `DDPMScheduler` built from the pipeline's schedule."""
    from diffusers import DDPMScheduler

    return SimpleNamespace(
        tokenizer=pipeline.tokenizer, text_encoder=pipeline.text_encoder, vae=pipeline.vae, unet=pipeline.unet,
        noise_scheduler=DDPMScheduler.from_config(pipeline.scheduler.config),
    )
