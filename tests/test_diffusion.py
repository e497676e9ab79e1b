"""The diffusion maths (mixsyn_utils/diffusion.py) against an independent float64 re-implementation.

The reference (attack_fixtures.py) runs plain per-image loops in float64 straight from the papers' equations;
the attack scripts' scores and the functions called directly must agree with it to 1e-3 relative.
"""

import numpy as np
import pytest
import torch
from attack_fixtures import (
    GUIDANCE,
    K,
    PIA_TIMESTEPS,
    T_SEC,
    reference_loss,
    reference_pia,
    reference_secmi,
    worst_relative_error,
)

from mixsyn_utils.cli import InputError
from mixsyn_utils.diffusion import (
    NoisePredictor,
    alphas_cumprod,
    epsilon_from_model_output,
    fixed_noise,
    loss_attack_scores,
    q_sample,
)
from mixsyn_utils.models import load_components


@pytest.mark.parametrize("method,guidance", [("pia", GUIDANCE), ("pian", 1.0)])
def test_pia_scores_match_float64_reference(attack_runs, reference_model, method, guidance):
    dataset, _ = attack_runs[method]
    for t in PIA_TIMESTEPS:
        fn = lambda row: reference_pia(reference_model, row, t, method, guidance)  # noqa: E731
        assert worst_relative_error(dataset, fn, reference_model, f"{method} t={t}", f"score_t{t}") <= 1e-3


def test_secmi_t_error_matches_float64_reference(attack_runs, reference_model):
    dataset, _ = attack_runs["secmi"]
    fn = lambda row: reference_secmi(reference_model, row, T_SEC, K)  # noqa: E731
    assert worst_relative_error(dataset, fn, reference_model, "secmi") <= 1e-3


def test_pia_score_is_mean_over_timesteps(attack_runs):
    dataset, _ = attack_runs["pia"]
    per_t = np.mean([dataset[f"score_t{t}"] for t in PIA_TIMESTEPS], axis=0)
    np.testing.assert_allclose(dataset["score"], per_t, rtol=1e-12)


def test_loss_attack_matches_float64_reference(tiny_victim, reference_model):
    components = load_components(str(tiny_victim / "pipeline"))
    predictor = NoisePredictor.of(components.unet, components.noise_scheduler)
    for row in reference_model["rows"]:
        z0, context = row["z0"].float(), row["context"].float()
        with torch.no_grad():
            by_t = loss_attack_scores(predictor, z0, context, PIA_TIMESTEPS, seed=4, num_noise_draws=2)
        for t in PIA_TIMESTEPS:
            expected = reference_loss(reference_model, row, t, draws=2, seed=4)
            assert abs(float(by_t[t][0]) - expected) / expected <= 1e-3


@pytest.mark.parametrize("t", [0, 450, 999])
def test_epsilon_is_recovered_from_v_and_from_sample_predictions(t):
    """v from diffusers' get_velocity and x̂₀ = z₀ both convert back to the ε that made z_t (float64)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    generator = torch.Generator().manual_seed(t)
    latents, noise = (torch.randn(3, 4, 8, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    timesteps = torch.full((3,), t)
    alpha_bar = alphas_cumprod(scheduler)
    noisy = q_sample(latents, noise, timesteps, alpha_bar)
    velocity = scheduler.get_velocity(latents, noise, timesteps)
    a = float(alpha_bar[t])
    torch.testing.assert_close(epsilon_from_model_output(velocity, noisy, a, "v_prediction"), noise)
    torch.testing.assert_close(epsilon_from_model_output(latents, noisy, a, "sample"), noise)
    assert epsilon_from_model_output(noise, noisy, a, "epsilon") is noise


def test_unknown_prediction_type_is_a_one_line_error():
    scheduler = type("Scheduler", (), {"alphas_cumprod": torch.ones(10),
                                       "config": type("Config", (), {"prediction_type": "flow"})})()
    with pytest.raises(InputError, match="prediction_type 'flow'; the attacks handle epsilon, v_prediction, sample$"):
        NoisePredictor.of(torch.nn.Identity(), scheduler)


def test_attack_noise_is_the_documented_generator():
    from mixsyn_utils.seeds import derive_seed

    expected = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(derive_seed(7, 13, 250, 3)))
    assert torch.equal(fixed_noise((4, 8, 8), seed=7, timestep=250, draw=3), expected)
    assert not torch.equal(fixed_noise((4, 8, 8), seed=7, timestep=250, draw=4), expected)


def test_q_sample_is_the_schedulers_add_noise_bit_for_bit():
    """One forward-noising formula: training (q_sample) and diffusers' DDPMScheduler.add_noise agree exactly."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(64, 4, 8, 8, generator=generator), torch.randn(64, 4, 8, 8, generator=generator)
    timesteps = torch.randint(0, 1000, (64,), generator=generator)
    assert torch.equal(q_sample(latents, noise, timesteps, alphas_cumprod(scheduler)),
                       scheduler.add_noise(latents, noise, timesteps))


def test_q_sample_matches_float64_formula():
    generator = torch.Generator().manual_seed(1)
    alpha_bar = torch.rand(1000, dtype=torch.float64, generator=generator)
    latents, noise = torch.randn(8, 4, 4, 4, generator=generator), torch.randn(8, 4, 4, 4, generator=generator)
    timesteps = torch.randint(0, 1000, (8,), generator=generator)
    expected = np.stack([np.sqrt(alpha_bar[t].item()) * latents[i].double().numpy()
                         + np.sqrt(1 - alpha_bar[t].item()) * noise[i].double().numpy() for i, t in enumerate(timesteps)])
    np.testing.assert_allclose(q_sample(latents, noise, timesteps, alpha_bar).double().numpy(), expected, rtol=1e-6,
                               atol=1e-6)
