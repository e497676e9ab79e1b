"""LoRA adapters (Hu et al. 2021, arXiv:2106.09685) on the UNet and text encoders, as the diffusers LoRA examples add
them: the fine-tuning script trains them, and Anti-DreamBooth's `--surrogate lora` makes its surrogate of them.

A LoRA layer adds ΔW = (α / r) · B · A to a frozen weight W (A: r × d_in Gaussian, B: d_out × r zeros at the start).
"""

import torch

# The diffusers examples' targets: every attention projection of the UNet, and of each CLIP text encoder.
UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def add_lora_adapters(unet, text_encoders=(), rank=4, lora_alpha=None, lora_dropout=0.0, use_dora=False,
                      unet_targets=UNET_LORA_TARGETS, text_encoder_targets=TEXT_ENCODER_LORA_TARGETS):
    """Add trainable LoRA (or DoRA: `use_dora`) adapters of rank r = `rank`, α = `lora_alpha` (default r) to the
    frozen UNet and each of `text_encoders`; they stay fp32, so fp16 gradients can be unscaled. Returns the models
    that train."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    alpha = lora_alpha or rank
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=lora_dropout, init_lora_weights="gaussian",
                                use_dora=use_dora, target_modules=list(unet_targets)))
    for encoder in text_encoders:
        encoder.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=lora_dropout, init_lora_weights="gaussian",
                                       use_dora=use_dora, target_modules=list(text_encoder_targets)))
    trained = [unet, *text_encoders]
    # Upstream fault: LoRA weights left in fp16 make GradScaler fail with "Attempting to unscale FP16 gradients".
    cast_training_params(trained, dtype=torch.float32)
    return trained


def lora_parameters(models):
    """The adapters' parameters of `models`, in a fixed order ({"<model index>.<name>": parameter})."""
    return {f"{index}.{name}": parameter for index, model in enumerate(models)
            for name, parameter in model.named_parameters() if "lora_" in name}


def lora_state(models):
    """A copy of the adapters' current values (`lora_parameters`), detached."""
    return {name: parameter.detach().clone() for name, parameter in lora_parameters(models).items()}


def load_lora_state(models, state):
    """Put `lora_state`'s values back into the adapters of `models`."""
    with torch.no_grad():
        for name, parameter in lora_parameters(models).items():
            parameter.copy_(state[name])
