"""The membership scores of the attacks, one function per quantity with its equation in the docstring: SecMI's
t-error, PIA and PIAN, the loss attack, CLiD, PFAMI and SimA.

Every score reaches the UNet through `diffusion.predicted_noise` (ε̂ whatever the scheduler's `prediction_type`)
and draws its noise with `diffusion.fixed_noise`. Scores are errors: members are expected to score LOWER.
Shapes: latents (B, C, h, w); context (B, L, D) text embeddings.
"""

import math

import torch

from .diffusion import _per_sample, ddim_inversion, ddim_step, fixed_noise, predicted_noise, q_sample


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
