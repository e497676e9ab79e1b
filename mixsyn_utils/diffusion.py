"""The diffusion maths every attack and trainer shares: ε̂ from the UNet, forward noising, the DDIM step, attack scores.

Each quantity is one function with its equation in the docstring. Shapes: latents (B, C, h, w); context
(B, L, D) text embeddings; `alpha_bar` the float64 ᾱ table of length T from the model's own scheduler.
Every attack reaches the UNet through `predicted_noise`, which turns the UNet output into ε̂ whatever the
scheduler's `prediction_type`. Attack scores are errors: members are expected to score LOWER.
"""

import math
from dataclasses import dataclass

import torch

from .cli import InputError
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

    With `guidance_scale` w ≠ 1, classifier-free guidance (Ho & Salimans 2022):
    ε̃ = ε̂(z, t, c_∅) + w · (ε̂(z, t, c) − ε̂(z, t, c_∅)), c_∅ = `null_context` (the empty prompt's embedding),
    from ONE UNet call on the 2B rows [z; z] with [c_∅; c]. UNet rows per image: 1, or 2 with guidance.
    """
    guided = guidance_scale != 1.0
    if guided:
        latents, context = torch.cat([latents, latents]), torch.cat([null_context, context])
    timesteps = torch.full((len(latents),), int(timestep), dtype=torch.long, device=latents.device)
    model_output = predictor.unet(latents, timesteps, context).sample
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


def secmi_t_error(predictor, latents, context, t_sec, k):
    """SecMI t-error (Duan et al. 2023, Eq. 7): ℓ = ‖D(D(z̃; t_sec−k → t_sec); t_sec → t_sec−k) − z̃‖²₂.

    z̃ = `ddim_inversion(z₀, t_sec − k)`. Returns (score (B,) float64, per-element error map (B, C, h, w)).
    UNet calls per image: (t_sec/k − 1) + 1 + 1 = t_sec/k + 1.
    """
    t_start = t_sec - k
    inverted = ddim_inversion(predictor, latents, context, t_start, k)
    a_start, a_sec = float(predictor.alpha_bar[t_start]), float(predictor.alpha_bar[t_sec])
    noised = ddim_step(inverted, predicted_noise(predictor, inverted, t_start, context), a_start, a_sec)
    recovered = ddim_step(noised, predicted_noise(predictor, noised, t_sec, context), a_sec, a_start)
    error_map = recovered - inverted
    return (error_map.double() ** 2).flatten(1).sum(1), error_map


def pian_normalised_noise(epsilon_0):
    """PIAN: ε₀ rescaled per sample to the mean absolute value of N(0, I): ε₀ / mean|ε₀| · √(2/π)."""
    mean_abs = epsilon_0.abs().flatten(1).mean(1)
    return epsilon_0 / _per_sample(mean_abs, epsilon_0) * math.sqrt(2.0 / math.pi)


def pia_score(noise_pred, epsilon_0, lp):
    """PIA score s = Σ_elements |ε̂(z_t, t) − ε₀|^p, z_t = √ᾱ_t z₀ + √(1−ᾱ_t) ε₀ (float64, (B,))."""
    return ((noise_pred - epsilon_0).double().abs() ** lp).flatten(1).sum(1)


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


def noise_prediction_error(noise_pred, noise):
    """Denoising loss ‖ε_θ(z_t, t, c) − ε‖² / d per sample (float64, (B,)), d = elements per latent."""
    return ((noise_pred - noise).double() ** 2).flatten(1).mean(1)


def loss_attack_scores(predictor, latents, context, timesteps, seed=0, num_noise_draws=1):
    """Loss attack (Matsumoto et al. 2023): {t: (B,) float64} with L_t = mean_j ‖ε_j − ε̂(z_t, t, c)‖² / d.

    z_t = √ᾱ_t z₀ + √(1−ᾱ_t) ε_j, ε_j = `fixed_noise(seed, t, j)` for j < `num_noise_draws`: the same ε_j for
    every image and every caption c. The attack's score is the mean of L_t over t (members lower).
    UNet calls per image: |T| · num_noise_draws.
    """
    scores = {}
    for t in timesteps:
        t_batch = torch.full((len(latents),), int(t), dtype=torch.long, device=latents.device)
        total = torch.zeros(len(latents), dtype=torch.float64, device=latents.device)
        for draw in range(num_noise_draws):
            noise = fixed_noise(latents.shape[1:], seed, t, draw).to(latents).expand_as(latents)
            prediction = predicted_noise(predictor, q_sample(latents, noise, t_batch, predictor.alpha_bar), t, context)
            total += noise_prediction_error(prediction, noise)
        scores[t] = total / num_noise_draws
    return scores


def pia_scores(predictor, latents, context, timesteps, lp=4, normalised=False, guidance_scale=1.0,
               null_context=None):
    """{t: (B,) float64 score} for PIA (or PIAN with `normalised`), all t from one ε₀.

    PIA:  ε₀ = ε̂(z₀, 0) (Kong et al. 2023, Eq. 10), z_t = √ᾱ_t z₀ + √(1−ᾱ_t) ε₀, s_t = `pia_score(ε̂(z_t, t), ε₀, p)`;
    PIAN: the same with ε₀ ← `pian_normalised_noise(ε₀)`. Both ε̂ use `guidance_scale` (see `predicted_noise`).
    UNet calls per image: 1 + |T| (each of 2 rows with guidance).
    """
    epsilon_0 = predicted_noise(predictor, latents, 0, context, guidance_scale, null_context)
    if normalised:
        epsilon_0 = pian_normalised_noise(epsilon_0)
    scores = {}
    for t in timesteps:
        t_batch = torch.full((len(latents),), int(t), dtype=torch.long, device=latents.device)
        noisy_latents = q_sample(latents, epsilon_0, t_batch, predictor.alpha_bar)
        noise_pred = predicted_noise(predictor, noisy_latents, t, context, guidance_scale, null_context)
        scores[t] = pia_score(noise_pred, epsilon_0, lp)
    return scores


def clid_scores(predictor, latents, context, weak_contexts, timesteps, seed=0, num_noise_draws=1):
    """CLiD (Zhai et al. 2024, Eq. 12–14): per t, the caption's loss and the mean conditional likelihood discrepancy.

    L_t(x, c) = `loss_attack_scores` (ε_j = `fixed_noise(seed, t, j)`, the same for every caption of an image),
    D_t(x) = (1/K) Σ_i [L_t(x, c*_i) − L_t(x, c)] over the K weakened captions c*_i (`weak_contexts`).
    Returns ({t: L_t}, {t: D_t}), each (B,) float64. A member has a LOW L and a HIGH D: its own caption
    helps the model far more than a weakened one. UNet calls per image: (1 + K) · |T| · num_noise_draws.
    """
    losses = loss_attack_scores(predictor, latents, context, timesteps, seed, num_noise_draws)
    weak_losses = [loss_attack_scores(predictor, latents, weak_context, timesteps, seed, num_noise_draws)
                   for weak_context in weak_contexts]
    discrepancies = {t: torch.stack([weak[t] - losses[t] for weak in weak_losses]).mean(0) for t in timesteps}
    return losses, discrepancies


def pfami_fluctuations(predictor, latents, neighbour_latents, context, timesteps, seed=0, num_noise_draws=1):
    """PFAMI (Fu et al. 2023): each neighbour's relative loss fluctuation R_{t,n} = (L_t(x_n) − L_t(x)) / L_t(x).

    L_t = `loss_attack_scores` of z₀ and of each neighbour's latent (`neighbour_latents`, N tensors like
    `latents`), with ε_j = `fixed_noise(seed, t, j)` shared by x and every x_n. Returns {t: (B, N) float64}.
    A member sits at a local minimum of the loss: its neighbours' losses rise more, so its R is HIGHER.
    UNet calls per image: (1 + N) · |T| · num_noise_draws.
    """
    losses = loss_attack_scores(predictor, latents, context, timesteps, seed, num_noise_draws)
    neighbour_losses = [loss_attack_scores(predictor, neighbour, context, timesteps, seed, num_noise_draws)
                        for neighbour in neighbour_latents]
    return {t: torch.stack([(neighbour[t] - losses[t]) / losses[t] for neighbour in neighbour_losses], dim=1)
            for t in timesteps}


def sima_scores(predictor, latents, context, timesteps):
    """SimA (Rao et al. 2025): s_t = Σ_elements ε̂(z₀, t, c)⁴, the CLEAN z₀ fed at label t (no noise added).

    {t: (B,) float64}; a member's prediction is closer to zero, so members score LOWER. UNet calls per image: |T|.
    """
    return {t: (predicted_noise(predictor, latents, t, context).double() ** 4).flatten(1).sum(1) for t in timesteps}
