"""The six attacks on an SDXL model (the fast tiny SDXL victim) against the independent float64 reference of
attack_fixtures.py, to 1e-4 relative per image: both text encoders' penultimate layers, encoder 2's pooled
embedding, the time ids an attacker must assume, (R, R, 0, 0, R, R), and zeros as the unconditional embedding."""

import json

import numpy as np
import pytest
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

TOLERANCE = 1e-4


@pytest.mark.parametrize("method,guidance", [("pia", GUIDANCE), ("pian", 1.0)])
def test_sdxl_pia_scores_match_float64_reference(sdxl_attack_runs, sdxl_reference_model, method, guidance):
    dataset, _ = sdxl_attack_runs[method]
    for t in PIA_TIMESTEPS:
        fn = lambda row: reference_pia(sdxl_reference_model, row, t, method, guidance)  # noqa: E731
        assert worst_relative_error(dataset, fn, sdxl_reference_model, f"sdxl {method} t={t}",
                                    f"score_t{t}") <= TOLERANCE


def test_sdxl_secmi_t_error_matches_float64_reference(sdxl_attack_runs, sdxl_reference_model):
    dataset, _ = sdxl_attack_runs["secmi"]
    fn = lambda row: reference_secmi(sdxl_reference_model, row, T_SEC, K)  # noqa: E731
    assert worst_relative_error(dataset, fn, sdxl_reference_model, "sdxl secmi") <= TOLERANCE


def test_sdxl_loss_attack_matches_float64_reference(sdxl_attack_runs, sdxl_reference_model):
    dataset, _ = sdxl_attack_runs["loss"]
    for t in LOSS_TIMESTEPS:
        fn = lambda row: reference_loss(sdxl_reference_model, row, t, LOSS_DRAWS)  # noqa: E731
        assert worst_relative_error(dataset, fn, sdxl_reference_model, f"sdxl loss t={t}",
                                    f"score_t{t}") <= TOLERANCE


def test_sdxl_sima_matches_float64_reference(sdxl_attack_runs, sdxl_reference_model):
    dataset, _ = sdxl_attack_runs["sima"]
    for t in SIMA_TIMESTEPS:
        fn = lambda row: reference_sima(sdxl_reference_model, row, t)  # noqa: E731
        assert worst_relative_error(dataset, fn, sdxl_reference_model, f"sdxl sima t={t}",
                                    f"score_t{t}") <= TOLERANCE
    chosen = json.loads(dataset.info.description)["calibration"]["selected_timestep"]
    assert dataset["score"] == dataset[f"score_t{chosen}"]


def test_sdxl_clid_matches_float64_reference(sdxl_attack_runs, sdxl_reference_model):
    """L, the weakened captions' mean loss L + D (the null caption: zeros, SDXL's unconditional embedding) and the
    CLiD_th score in its robust-scaled units, each to 1e-4."""
    dataset, _ = sdxl_attack_runs["clid"]
    fit = json.loads(dataset.info.description)["calibration"]
    parts = {row["id"]: reference_clid(sdxl_reference_model, row, CLID_TIMESTEPS, CLID_WEAK)
             for row in sdxl_reference_model["rows"] if row["id"] in set(dataset["id"])}
    assert worst_relative_error(dataset, lambda row: parts[row["id"]][0], sdxl_reference_model, "sdxl clid L",
                                "score_loss") <= TOLERANCE
    weak_loss = dataset.add_column("weak_loss", np.subtract(dataset["score_loss"], dataset["score_discrepancy"]))
    assert worst_relative_error(weak_loss, lambda row: sum(parts[row["id"]]), sdxl_reference_model,
                                "sdxl clid L + D", "weak_loss") <= TOLERANCE
    scores = dict(zip(dataset["id"], dataset["score"]))
    for image_id, (loss, discrepancy) in parts.items():
        expected = ((1 - fit["alpha"]) * (loss - fit["loss_median"]) / fit["loss_iqr"]
                    + fit["alpha"] * (-discrepancy - fit["discrepancy_median"]) / fit["discrepancy_iqr"])
        assert abs(scores[image_id] - expected) <= TOLERANCE * max(1.0, abs(expected))


def test_sdxl_pfami_matches_float64_reference(sdxl_attack_runs, sdxl_reference_model):
    dataset, _ = sdxl_attack_runs["pfami"]
    fn = lambda row: reference_pfami(sdxl_reference_model, row, PFAMI_TIMESTEPS, PFAMI_STRENGTHS)  # noqa: E731
    assert worst_relative_error(dataset, fn, sdxl_reference_model, "sdxl pfami") <= TOLERANCE


def test_sdxl_attacks_record_the_time_ids_they_assumed(sdxl_attack_runs, sdxl_reference_model):
    """Every scores dataset says which size conditioning the attacker assumed."""
    size = sdxl_reference_model["resolution"]
    for name, (dataset, _) in sdxl_attack_runs.items():
        info = json.loads(dataset.info.description)
        assert info["time_ids"] == [size, size, 0, 0, size, size], name
