"""The diffusion maths (mixsyn_utils/diffusion.py) against an independent float64 re-implementation.

The reference (attack_fixtures.py) runs plain per-image loops in float64 straight from the papers' equations;
the attack scripts' scores and the functions called directly must agree with it to 1e-3 relative.
"""

import json

import numpy as np
import pytest
import torch
from attack_fixtures import (
    CLID_TIMESTEPS,
    CLID_WEAK,
    GUIDANCE,
    K,
    LOSS_DRAWS,
    LOSS_TIMESTEPS,
    PFAMI_STRENGTHS,
    PFAMI_TIMESTEPS,
    PIA_TIMESTEPS,
    SIMA_TIMESTEPS,
    T_SEC,
    reference_clid,
    reference_loss,
    reference_pfami,
    reference_pia,
    reference_secmi,
    reference_sima,
    worst_relative_error,
)

from mixsyn_utils.cli import InputError
from mixsyn_utils.attack_scores import clid_scores, loss_attack_scores
from mixsyn_utils.diffusion import NoisePredictor, alphas_cumprod, epsilon_from_model_output, fixed_noise, q_sample
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


def test_loss_attack_script_matches_float64_reference(attack_runs, reference_model):
    dataset, _ = attack_runs["loss"]
    for t in LOSS_TIMESTEPS:
        fn = lambda row: reference_loss(reference_model, row, t, LOSS_DRAWS)  # noqa: E731
        assert worst_relative_error(dataset, fn, reference_model, f"loss t={t}", f"score_t{t}") <= 1e-3
    np.testing.assert_allclose(dataset["score"], np.mean([dataset[f"score_t{t}"] for t in LOSS_TIMESTEPS], 0),
                               rtol=1e-12)


def test_sima_matches_float64_reference_and_scores_the_calibrated_timestep(attack_runs, reference_model):
    dataset, _ = attack_runs["sima"]
    for t in SIMA_TIMESTEPS:
        fn = lambda row: reference_sima(reference_model, row, t)  # noqa: E731
        assert worst_relative_error(dataset, fn, reference_model, f"sima t={t}", f"score_t{t}") <= 1e-3
    chosen = json.loads(dataset.info.description)["calibration"]["selected_timestep"]
    assert dataset["score"] == dataset[f"score_t{chosen}"]


def test_clid_matches_float64_reference(attack_runs, reference_model):
    """L and the weakened captions' loss L + D to 1e-3 relative; CLiD_th to 1e-3 in its robust-scaled units
    (IQRs). D itself is a difference of two losses that agree to 4-6 digits on this weakly conditioned victim:
    float32 resolves it to ~1e-7 of the losses, so it is checked to 1e-3 relative plus 1e-6 of L here, and to
    1e-6 relative in float64 by `test_clid_scores_match_float64_reference_in_float64`."""
    dataset, _ = attack_runs["clid"]
    fit = json.loads(dataset.info.description)["calibration"]
    parts = {row["id"]: reference_clid(reference_model, row, CLID_TIMESTEPS, CLID_WEAK)
             for row in reference_model["rows"] if row["id"] in set(dataset["id"])}
    assert worst_relative_error(dataset, lambda row: parts[row["id"]][0], reference_model, "clid L",
                                "score_loss") <= 1e-3
    weak_loss = dataset.add_column("weak_loss", np.subtract(dataset["score_loss"], dataset["score_discrepancy"]))
    assert worst_relative_error(weak_loss, lambda row: sum(parts[row["id"]]), reference_model, "clid L + D",
                                "weak_loss") <= 1e-3
    by_id = {image_id: (s, loss, -minus_d) for image_id, s, loss, minus_d in
             zip(dataset["id"], dataset["score"], dataset["score_loss"], dataset["score_discrepancy"])}
    for image_id, (loss, discrepancy) in parts.items():
        score, _, scored_discrepancy = by_id[image_id]
        assert abs(scored_discrepancy - discrepancy) <= 1e-3 * abs(discrepancy) + 1e-6 * loss
        expected = ((1 - fit["alpha"]) * (loss - fit["loss_median"]) / fit["loss_iqr"]
                    + fit["alpha"] * (-discrepancy - fit["discrepancy_median"]) / fit["discrepancy_iqr"])
        assert abs(score - expected) <= 1e-3 * max(1.0, abs(expected))


def test_clid_scores_match_float64_reference_in_float64(reference_model):
    from attack_fixtures import reference_context, reference_weak_caption

    predictor = NoisePredictor(reference_model["unet"], reference_model["alpha_bar"], "epsilon")
    for row in reference_model["rows"][:4]:
        weak_contexts = [reference_context(reference_model, reference_weak_caption(row["prompt"], weak,
                                                                                   reference_model["tokenizer"]))
                         for weak in CLID_WEAK]
        with torch.no_grad():
            losses, discrepancies = clid_scores(predictor, row["z0"], row["context"], weak_contexts, CLID_TIMESTEPS)
        loss, discrepancy = reference_clid(reference_model, row, CLID_TIMESTEPS, CLID_WEAK)
        np.testing.assert_allclose(np.mean([float(losses[t][0]) for t in CLID_TIMESTEPS]), loss, rtol=1e-9)
        np.testing.assert_allclose(np.mean([float(discrepancies[t][0]) for t in CLID_TIMESTEPS]), discrepancy,
                                   rtol=1e-6)


def test_pfami_matches_float64_reference(attack_runs, reference_model):
    dataset, _ = attack_runs["pfami"]
    fn = lambda row: reference_pfami(reference_model, row, PFAMI_TIMESTEPS, PFAMI_STRENGTHS)  # noqa: E731
    assert worst_relative_error(dataset, fn, reference_model, "pfami") <= 1e-3


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
