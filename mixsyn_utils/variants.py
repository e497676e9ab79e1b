"""The model a script attacks or samples: the pretrained pipeline plus its fine-tuned parts (a UNet folder, LoRA
weights, textual-inversion tokens), loaded as one `StableDiffusionPipeline` or `StableDiffusionXLPipeline` (by the
kind its model_index.json names), every weights file as safetensors.

A LoRA file whose matrices do not fit the model is refused (diffusers only logs the keys it cannot place, and
would silently attack the un-adapted model).
"""

import re
from pathlib import Path
from types import SimpleNamespace

from .cli import InputError, first_line
from .dataset_io import check_path_or_hub_id
from .models import SD, SDXL, check_pretrained_model
from .placeholders import load_token_map, token_map_files
from .resumable import input_fingerprint


def pipeline_class(kind):
    """`StableDiffusionXLPipeline` for `models.SDXL`, else `StableDiffusionPipeline`."""
    import diffusers

    return diffusers.StableDiffusionXLPipeline if kind == SDXL else diffusers.StableDiffusionPipeline


def load_pipeline(pretrained_model_name_or_path, revision=None, variant=None, dtype=None, **components):
    """The pretrained pipeline of its kind (`models.check_pretrained_model`), safetensors only, `components`
    (unet=, text_encoder=, vae=, …) replacing its own. SD-1.x/2.x without the safety checker; SDXL without the
    invisible watermark (it would be written into synthetic training images and validation images)."""
    kind = check_pretrained_model(pretrained_model_name_or_path, revision)
    extra = {"add_watermarker": False} if kind == SDXL else {"safety_checker": None, "requires_safety_checker": False}
    try:
        return pipeline_class(kind).from_pretrained(pretrained_model_name_or_path, revision=revision, variant=variant,
                                                    dtype=dtype, use_safetensors=True, **extra, **components)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot load --pretrained_model_name_or_path {pretrained_model_name_or_path}: "
                         f"{first_line(error)}") from error


def load_model_variant(pretrained_model_name_or_path, revision=None, variant=None, unet_path=None,
                       lora_weights=None, textual_inversion=None, dtype=None):
    """The pipeline (`load_pipeline`) of the pretrained model or one of its fine-tuned variants.

    `unet_path`: a UNet folder (`checkpoint-N/unet`) or a full pipeline folder (its `unet/` is used).
    `lora_weights`: a folder or file accepted by `pipe.load_lora_weights` (fused, so attacks see one UNet).
    `textual_inversion`: a folder with `token_map.json` written by `train_textual_inversion_mixsyn.py` (for SDXL
    each domain has one file per text encoder).
    """
    from diffusers import UNet2DConditionModel

    # Every part is checked before the pipeline loads: a typo'd path fails in milliseconds, not after the weights.
    check_path_or_hub_id(pretrained_model_name_or_path, "--pretrained_model_name_or_path")
    for flag, path in (("--unet_path", unet_path), ("--lora_weights", lora_weights),
                       ("--textual_inversion", textual_inversion)):
        check_path_or_hub_id(path, flag)
    token_map = None
    if textual_inversion is not None:
        token_map = load_token_map(textual_inversion)
        token_map_files(textual_inversion, token_map)
    pipeline = load_pipeline(pretrained_model_name_or_path, revision, variant, dtype)
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
            if any(key.startswith("text_encoder") for key in state_dict):
                pipeline.load_lora_weights(str(lora_weights), use_safetensors=True)
            else:  # load_lora_weights would log, on every load, that the text encoder has no LoRA keys
                pipeline.load_lora_into_unet(state_dict, network_alphas, pipeline.unet, metadata=metadata)
        except (RuntimeError, ValueError) as error:
            raise InputError(f"--lora_weights {lora_weights} does not match the model: {first_line(error)}") from error
        pipeline.fuse_lora()
        pipeline.unload_lora_weights()
    if textual_inversion is not None:
        for entry in token_map.values():
            load_embeddings(pipeline, textual_inversion, entry)
    return pipeline


def load_embeddings(pipeline, folder, entry):
    """One domain's learned placeholder (a `token_map.json` entry) into the pipeline's tokenizer(s) and encoder(s).

    SD-1.x/2.x: `entry["file"]`. SDXL: `entry["file"]` into `text_encoder`/`tokenizer` and `entry["file_2"]` into
    `text_encoder_2`/`tokenizer_2` (upstream `textual_inversion_sdxl.py`'s two files), each loaded the stock way.
    """
    pipeline.load_textual_inversion(str(Path(folder) / entry["file"]), token=entry["placeholder"],
                                    text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer,
                                    use_safetensors=True)
    if getattr(pipeline, "text_encoder_2", None) is not None:
        if "file_2" not in entry:
            raise InputError(f"--textual_inversion {folder}: {entry['placeholder']} has no embedding for the second "
                             "text encoder (trained on an SD-1.x/2.x model?)")
        pipeline.load_textual_inversion(str(Path(folder) / entry["file_2"]), token=entry["placeholder"],
                                        text_encoder=pipeline.text_encoder_2, tokenizer=pipeline.tokenizer_2,
                                        use_safetensors=True)


def model_fingerprints(pretrained_model_name_or_path, revision=None, unet_path=None, lora_weights=None,
                       textual_inversion=None):
    """Content fingerprints (`resumable.input_fingerprint`) of the model `load_model_variant` builds: the
    pretrained pipeline and each fine-tuned part, for the run signature of a resumable job."""
    return {"pretrained_model": input_fingerprint(pretrained_model_name_or_path, revision),
            "unet_path": input_fingerprint(unet_path), "lora_weights": input_fingerprint(lora_weights),
            "textual_inversion": input_fingerprint(textual_inversion)}


_LORA_KEY = re.compile(
    r"^(unet|text_encoder_2|text_encoder)\.(.+?)\.(lora_A|lora_B|lora\.down|lora\.up|lora_down|lora_up|"
    r"lora_linear_layer\.down|lora_linear_layer\.up)(?:\.[A-Za-z_0-9]+)?\.weight$"
)
# DoRA (train_lora_mixsyn.py --use_dora): one magnitude per output feature of the adapted layer.
_DORA_MAGNITUDE_KEY = re.compile(r"^(unet|text_encoder_2|text_encoder)\.(.+?)\.lora_magnitude_vector(?:\.[A-Za-z_0-9]+)?$")


def check_lora_matches(pipeline, lora_weights):
    """Raise `InputError` unless every LoRA matrix in `lora_weights` targets an existing layer of the right size.

    diffusers only logs LoRA keys it cannot place, so an adapter trained on another UNet would silently
    attack the un-adapted model. Checked: a known prefix (`unet.`, `text_encoder.`, `text_encoder_2.`), the target module
    exists, and the down (A) matrix's input width / the up (B) matrix's output width / a DoRA magnitude vector's
    length equal the layer's.
    """
    try:
        state_dict, _ = type(pipeline).lora_state_dict(str(lora_weights), use_safetensors=True)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot load --lora_weights {lora_weights} as safetensors: {first_line(error)}") from error
    models = {"unet": pipeline.unet, "text_encoder": pipeline.text_encoder,
              "text_encoder_2": getattr(pipeline, "text_encoder_2", None)}
    matched = 0
    for key, tensor in state_dict.items():
        if key.endswith(".alpha"):
            continue
        found = _LORA_KEY.match(key) or _DORA_MAGNITUDE_KEY.match(key)
        if found is None:
            raise InputError(f"--lora_weights {lora_weights}: key {key} is not a UNet or text-encoder LoRA matrix")
        model_name, module_name = found.group(1), found.group(2)
        try:
            module = models[model_name].get_submodule(module_name)
        except AttributeError:  # also a text_encoder_2 key for a model without one (None)
            raise InputError(f"--lora_weights {lora_weights} does not match the model: no layer {model_name}.{module_name}")
        is_down = found.re is _LORA_KEY and found.group(3).endswith(("lora_A", "down"))
        layer_width = getattr(module, "in_features" if is_down else "out_features", None)
        if layer_width is None:
            layer_width = getattr(module, "in_channels" if is_down else "out_channels", None)
        lora_width = tensor.shape[1] if is_down else tensor.shape[-1] if found.re is _DORA_MAGNITUDE_KEY else tensor.shape[0]
        if layer_width is not None and lora_width != layer_width:
            raise InputError(
                f"--lora_weights {lora_weights} does not match the model: {key} has width {lora_width}, "
                f"layer {model_name}.{module_name} has {layer_width}"
            )
        matched += 1
    if matched == 0:
        raise InputError(f"--lora_weights {lora_weights} holds no LoRA matrices")


def components_from_pipeline(pipeline):
    """The pieces attacks and trainers use (as `models.load_components` returns them), with a `DDPMScheduler` built
    from the pipeline's schedule."""
    from diffusers import DDPMScheduler

    text_encoder_2 = getattr(pipeline, "text_encoder_2", None)
    return SimpleNamespace(
        tokenizer=pipeline.tokenizer, text_encoder=pipeline.text_encoder,
        tokenizer_2=getattr(pipeline, "tokenizer_2", None), text_encoder_2=text_encoder_2, vae=pipeline.vae,
        unet=pipeline.unet, noise_scheduler=DDPMScheduler.from_config(pipeline.scheduler.config),
        kind=SDXL if text_encoder_2 is not None else SD,
        force_zeros_for_empty_prompt=bool(pipeline.config.get("force_zeros_for_empty_prompt", False)),
    )
