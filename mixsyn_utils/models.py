"""Loading Stable Diffusion components and encoding prompts and images, exactly as the diffusers examples do."""

import re
from types import SimpleNamespace

from .data import InputError


def add_pretrained_model_args(parser, required=True,
                              help="Pipeline folder or Hub id, e.g. CompVis/stable-diffusion-v1-4 or outputs/victim/pipeline."):
    """Add the diffusers examples' model flags to `parser` (or a group): what `load_components` reads.

    --pretrained_model_name_or_path, --revision (a Hub revision) and --variant (a weights variant, e.g. fp16).
    """
    parser.add_argument("--pretrained_model_name_or_path", type=str, required=required, default=None, help=help)
    parser.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model on the Hub.")
    parser.add_argument("--variant", type=str, default=None, help="Weights variant of the pretrained model, e.g. fp16.")
    return parser


def load_components(pretrained_model_name_or_path, revision=None, variant=None):
    """Tokenizer, text encoder, VAE, UNet and the training noise scheduler of an SD-1.x pipeline folder or Hub id.

    Same calls as diffusers' `train_dreambooth.py`; the noise scheduler is `DDPMScheduler` built from
    the pipeline's `scheduler/` config, so ᾱ_t comes from the model's own schedule.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = pretrained_model_name_or_path
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", revision=revision)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", revision=revision, variant=variant)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", revision=revision, variant=variant)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", revision=revision, variant=variant)
        noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", revision=revision)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"cannot load --pretrained_model_name_or_path {source}: {first_line}") from error
    return SimpleNamespace(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet, noise_scheduler=noise_scheduler
    )


def vae_scale_factor(vae):
    """Pixels per latent cell: 2^(number of VAE down blocks - 1) (8 for SD-1.x)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def native_resolution(unet, vae):
    """The resolution a pipeline was trained at: `unet.config.sample_size × vae_scale_factor` (512 for SD-1.4)."""
    return int(unet.config.sample_size) * vae_scale_factor(vae)


def tokenize_prompts(tokenizer, prompts):
    """Token ids (B, model_max_length), padded and truncated as `StableDiffusionPipeline.encode_prompt` does."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_prompts(text_encoder, input_ids):
    """Text-encoder hidden states c (B, L, D) used as cross-attention context; no classifier-free guidance."""
    attention_mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        attention_mask = (input_ids != text_encoder.config.pad_token_id).long().to(input_ids.device)
    return text_encoder(input_ids.to(text_encoder.device), attention_mask=attention_mask)[0]


def encode_images_to_latents(vae, pixel_values, sample=False, generator=None):
    """z₀ = scaling_factor · E(x): the posterior mode by default, a sample with `sample=True`.

    `pixel_values` are in [-1, 1], shape (B, 3, H, W). Gradients flow when the caller enables them
    (Anti-DreamBooth's PGD differentiates through this call).
    """
    posterior = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
    latents = posterior.sample(generator=generator) if sample else posterior.mode()
    return latents * vae.config.scaling_factor


# ----------------------------------------------------------------------------------------------
# Fine-tuned variants: the same pretrained pipeline plus a UNet, LoRA weights or learned tokens
# ----------------------------------------------------------------------------------------------

TOKEN_MAP_FILE = "token_map.json"


def load_token_map(textual_inversion_dir):
    """{domain: {"placeholder": "<zero>", "file": "learned_embeds-zero.safetensors", "num_vectors": 1}}."""
    import json
    from pathlib import Path

    path = Path(textual_inversion_dir) / TOKEN_MAP_FILE
    if not path.is_file():
        raise InputError(f"--textual_inversion {textual_inversion_dir} has no {TOKEN_MAP_FILE}")
    return json.loads(path.read_text())


def placeholder_text(placeholder, num_vectors):
    """The prompt text of a multi-vector token, as diffusers' `maybe_convert_prompt` expands it."""
    return " ".join([placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)])


def domain_name_pattern(domain):
    """The regex of a domain name as a whole word (not inside a longer word) in a caption."""
    return re.compile(rf"(?<!\w){re.escape(domain)}(?!\w)")


def rewrite_caption(caption, domain, token_map, for_pipeline=False):
    """Replace the domain name (whole words only) in a caption by its learned placeholder.

    For direct tokenization (training, attacks) a multi-vector placeholder is spelled out as
    `<p> <p>_1 …`; a diffusers pipeline expands `<p>` itself (`maybe_convert_prompt`), so with
    `for_pipeline=True` only the bare placeholder is written.
    """
    entry = token_map.get(domain)
    if entry is None:
        return caption
    placeholder = entry["placeholder"] if for_pipeline else placeholder_text(entry["placeholder"], entry.get("num_vectors", 1))
    return domain_name_pattern(domain).sub(lambda _: placeholder, caption)


def load_model_variant(pretrained_model_name_or_path, revision=None, variant=None, unet_path=None,
                       lora_weights=None, textual_inversion=None, torch_dtype=None):
    """A `StableDiffusionPipeline` for the pretrained model or one of its fine-tuned variants.

    `unet_path`: a UNet folder (`checkpoint-N/unet`) or a full pipeline folder (its `unet/` is used).
    `lora_weights`: a folder or file accepted by `pipe.load_lora_weights` (fused, so attacks see one UNet).
    `textual_inversion`: a folder with `token_map.json` written by `train_textual_inversion_mixsyn.py`.
    """
    from pathlib import Path

    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    try:
        pipeline = StableDiffusionPipeline.from_pretrained(
            pretrained_model_name_or_path, revision=revision, variant=variant, torch_dtype=torch_dtype,
            safety_checker=None, requires_safety_checker=False,
        )
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"cannot load --pretrained_model_name_or_path {pretrained_model_name_or_path}: {first_line}")
    if unet_path is not None:
        folder = Path(unet_path)
        if not folder.is_dir():
            raise InputError(f"--unet_path {unet_path} is not a folder")
        subfolder = "unet" if (folder / "unet" / "config.json").is_file() else None
        pipeline.unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder=subfolder, torch_dtype=torch_dtype)
    if lora_weights is not None:
        if not Path(lora_weights).exists():
            raise InputError(f"--lora_weights {lora_weights} does not exist")
        check_lora_matches(pipeline, lora_weights)
        try:
            pipeline.load_lora_weights(str(lora_weights))
        except (RuntimeError, ValueError) as error:
            raise InputError(f"--lora_weights {lora_weights} does not match the model: {str(error).splitlines()[0]}")
        pipeline.fuse_lora()
        pipeline.unload_lora_weights()
    if textual_inversion is not None:
        for domain, entry in load_token_map(textual_inversion).items():
            pipeline.load_textual_inversion(str(Path(textual_inversion) / entry["file"]), token=entry["placeholder"])
    return pipeline


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
    state_dict, _ = type(pipeline).lora_state_dict(str(lora_weights))
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
