"""The diffusion maths every attack and trainer shares: ᾱ_t, forward noising, loss scores.

Each quantity is one function with its equation in the docstring.
"""

import numpy as np
import torch

from .data import image_to_tensor
from .models import encode_images_to_latents, encode_prompts, native_resolution, tokenize_prompts


def alphas_cumprod(noise_scheduler):
    """ᾱ_t = Π_{s≤t}(1 − β_s) from the model's own scheduler (float64 tensor of length T)."""
    return noise_scheduler.alphas_cumprod.to(torch.float64)


def q_sample(latents, noise, timesteps, alpha_bar):
    """Forward noising z_t = √ᾱ_t · z₀ + √(1 − ᾱ_t) · ε, per sample t."""
    a = alpha_bar.to(latents.device)[timesteps].to(latents.dtype).view(-1, *([1] * (latents.dim() - 1)))
    return a.sqrt() * latents + (1 - a).sqrt() * noise


@torch.no_grad()
def naive_loss_scores(components, dataset, timesteps, seed=0, num_noise_samples=1, batch_size=64,
                      caption_column="prompt", resolution=None):
    """Loss-threshold attack: mean over t and noise draws of ‖ε_θ(z_t, t, c) − ε‖² / d (float64, per image).

    The noise for image i is drawn from a generator seeded by (`seed`, t, draw), the same for every image
    position, so member and non-member sets see identical noise. Lower loss suggests "member".
    """
    unet, vae, text_encoder, tokenizer = components.unet, components.vae, components.text_encoder, components.tokenizer
    resolution = resolution or native_resolution(unet, vae)
    alpha_bar = alphas_cumprod(components.noise_scheduler)
    scores = []
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        pixel_values = torch.stack([image_to_tensor(image, resolution) for image in rows["image"]])
        latents = encode_images_to_latents(vae, pixel_values)
        context = encode_prompts(text_encoder, tokenize_prompts(tokenizer, rows[caption_column]))
        losses = torch.zeros(len(latents), dtype=torch.float64)
        for t in timesteps:
            for draw in range(num_noise_samples):
                generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(t) * 101 + draw)
                noise = torch.randn((1, *latents.shape[1:]), generator=generator).expand_as(latents)
                t_batch = torch.full((len(latents),), int(t), dtype=torch.long)
                prediction = unet(q_sample(latents, noise, t_batch, alpha_bar), t_batch, context).sample
                losses += ((prediction - noise) ** 2).flatten(1).mean(1).double()
        scores.append(losses / (len(timesteps) * num_noise_samples))
    return torch.cat(scores).numpy().astype(np.float64)
