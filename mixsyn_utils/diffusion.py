"""The diffusion maths the attacks and trainers share: ᾱ_t, forward noising, ε̂ from the UNet, the DDIM step, and
the attacks' documented noise draws. The attack scores built from them are in `attack_scores.py`.

Each quantity is one function with its equation in the docstring. Shapes: latents (B, C, h, w); context c a
`conditioning.TextConditioning` (SDXL: text, pooled text and time ids) or, for SD-1.x/2.x, its (B, L, D) text
embeddings alone; `alpha_bar` the float64 ᾱ table of length T from the model's own scheduler.
Every attack reaches the UNet through `predicted_noise`, which turns the UNet output into ε̂ whatever the
scheduler's `prediction_type`.
"""

import math
from dataclasses import dataclass

import torch

from .cli import InputError
from .conditioning import TextConditioning, as_conditioning
from .seeds import SALT_ATTACK_NOISE, derive_seed

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def alphas_cumprod(noise_scheduler):
    """ᾱ_t = Π_{s≤t}(1 − β_s) from the model's own scheduler (float64 tensor of length T)."""
    return noise_scheduler.alphas_cumprod.to(torch.float64)


@dataclass(frozen=True)
class NoisePredictor:
    """What ε̂(z, t, c) needs: the UNet, the float64 ᾱ table and the scheduler's `prediction_type`."""

    unet: torch.nn.Module
    alpha_bar: torch.Tensor
    prediction_type: str

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise InputError(f"the model's scheduler has prediction_type {self.prediction_type!r}; the attacks "
                             f"handle {', '.join(PREDICTION_TYPES)}")

    @classmethod
    def of(cls, unet, noise_scheduler):
        return cls(unet, alphas_cumprod(noise_scheduler), noise_scheduler.config.prediction_type)


def _per_sample(values, like):
    """A (B,) or scalar float64 table entry broadcast over a latent batch, in the latents' dtype/device."""
    values = torch.as_tensor(values, dtype=torch.float64)
    return values.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


def q_sample(latents, noise, timesteps, alpha_bar):
    """Forward noising z_t = √ᾱ_t · z₀ + √(1 − ᾱ_t) · ε, per sample t."""
    a = alpha_bar.to(latents.device)[timesteps].to(latents.dtype).view(-1, *([1] * (latents.dim() - 1)))
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def epsilon_from_model_output(model_output, latents, alpha_bar_t, prediction_type):
    """ε̂ from the UNet output u at input z (the tensor fed to the UNet at label t), by `prediction_type`:

    epsilon:       ε̂ = u;
    v_prediction:  ε̂ = √ᾱ_t · u + √(1 − ᾱ_t) · z      (u = v = √ᾱ_t ε − √(1 − ᾱ_t) z₀, Salimans & Ho 2022);
    sample:        ε̂ = (z − √ᾱ_t · u) / √(1 − ᾱ_t)    (u = x̂₀).
    These are the conversions diffusers' DDIM scheduler applies before each step.
    """
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return math.sqrt(alpha_bar_t) * model_output + math.sqrt(1.0 - alpha_bar_t) * latents
    if prediction_type == "sample":
        return (latents - math.sqrt(alpha_bar_t) * model_output) / math.sqrt(1.0 - alpha_bar_t)
    raise InputError(f"the model's scheduler has prediction_type {prediction_type!r}; the attacks handle "
                     f"{', '.join(PREDICTION_TYPES)}")


def predicted_noise(predictor, latents, timestep, context, guidance_scale=1.0, null_context=None):
    """ε̂(z, t, c): the UNet's noise prediction at one integer timestep t for the whole batch, as ε.

    `context`: c (module doc); for SDXL the UNet also gets c's pooled text and time ids (`added_cond_kwargs`).
    With `guidance_scale` w ≠ 1, classifier-free guidance (Ho & Salimans 2022):
    ε̃ = ε̂(z, t, c_∅) + w · (ε̂(z, t, c) − ε̂(z, t, c_∅)), c_∅ = `null_context` (the model's unconditional
    embedding, with the rows' own time ids), from ONE UNet call on the 2B rows [z; z] with [c_∅; c]. UNet rows per
    image: 1, or 2 with guidance.
    """
    context = as_conditioning(context)
    guided = guidance_scale != 1.0
    if guided:
        latents, context = torch.cat([latents, latents]), TextConditioning.cat([as_conditioning(null_context), context])
    timesteps = torch.full((len(latents),), int(timestep), dtype=torch.long, device=latents.device)
    model_output = predictor.unet(latents, timesteps, **context.unet_kwargs()).sample
    noise = epsilon_from_model_output(model_output, latents, float(predictor.alpha_bar[int(timestep)]),
                                      predictor.prediction_type)
    if not guided:
        return noise
    noise_null, noise_text = noise.chunk(2)
    return noise_null + guidance_scale * (noise_text - noise_null)


def ddim_step(latents, noise_pred, alpha_bar_t, alpha_bar_s):
    """Deterministic DDIM step D(z; t→s) = √ᾱ_s · (z − √(1−ᾱ_t)·ε̂(z,t)) / √ᾱ_t + √(1−ᾱ_s) · ε̂(z,t).

    The same formula goes up (s > t, inversion) and down (s < t, denoising). `alpha_bar_t/_s` are floats.
    """
    predicted_z0 = (latents - math.sqrt(1.0 - alpha_bar_t) * noise_pred) / math.sqrt(alpha_bar_t)
    return math.sqrt(alpha_bar_s) * predicted_z0 + math.sqrt(1.0 - alpha_bar_s) * noise_pred


def ddim_inversion(predictor, latents, context, t_target, k):
    """z̃ = z_{t_target}: DDIM steps of size k upward from z₀ at t = 0, z_{t+k} = D(z_t; t→t+k).

    t_target/k UNet calls (none when t_target = 0). SecMI's reference inverts further and denoises back
    steps it never uses; this stops at the one latent the t-error needs.
    """
    alpha_bar = predictor.alpha_bar
    for t in range(0, t_target, k):
        noise_pred = predicted_noise(predictor, latents, t, context)
        latents = ddim_step(latents, noise_pred, float(alpha_bar[t]), float(alpha_bar[t + k]))
    return latents


# The formula of `fixed_noise`, as the attacks record it in their scores' info.
FIXED_NOISE_FORMULA = (f"torch.randn((1, C, h, w), generator=torch.Generator().manual_seed("
                       f"derive_seed(seed, {SALT_ATTACK_NOISE}, t, draw)))")


def fixed_noise(shape, seed, timestep, draw):
    """Gaussian noise ε (1, *shape), the same for every image: a `torch.Generator` seeded by
    `derive_seed(seed, SALT_ATTACK_NOISE, t, draw)` draws `torch.randn((1, *shape))` (float32, CPU).

    Shared by members and non-members, so both sets see identical noise, on any process and in any batch.
    """
    generator = torch.Generator().manual_seed(derive_seed(seed, SALT_ATTACK_NOISE, int(timestep), int(draw)))
    return torch.randn((1, *shape), generator=generator)
