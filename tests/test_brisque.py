"""Offline BRISQUE: piq's features with our SVR from the pinned LIVE libsvm text; nothing is ever unpickled."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mixsyn_utils import brisque as offline_brisque
from mixsyn_utils.cli import InputError
from mixsyn_utils.utility import (
    BRISQUE_MIN_SIDE,
    brisque_features,
    brisque_scores,
    brisque_svr_score,
    upsample_to_min_side,
)


@pytest.fixture(scope="module")
def allmodel_bytes():
    """The LIVE libsvm text kept by the install step (`python -m mixsyn_utils.brisque --install`)."""
    path = offline_brisque.checkpoint_dir() / offline_brisque.ALLMODEL_FILE
    if not path.is_file():
        pytest.skip(f"BRISQUE not installed ({path} missing): run `python -m mixsyn_utils.brisque --install`")
    return path.read_bytes()


@pytest.fixture
def offline_torch_home(tmp_path, monkeypatch, allmodel_bytes):
    """A fresh TORCH_HOME holding only the checked model text, with every download made to fail."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    offline_brisque.keep_allmodel(allmodel_bytes)

    def no_network(*args, **kwargs):
        raise AssertionError("BRISQUE tried to download weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch_home"


def libsvm_epsilon_svr_predict(model_text, scaled_features):
    """libsvm's svm_predict for an epsilon-SVR with RBF kernel, written from its text format, in float64:
    f(x) = Σ_i α_i exp(−γ ‖x − SV_i‖²) − ρ, sparse `index:value` rows (absent indices are 0)."""
    lines = model_text.splitlines()
    header = dict(line.split(" ", 1) for line in lines[: lines.index("SV")])
    gamma, rho = float(header["gamma"]), float(header["rho"])
    prediction = np.full(len(scaled_features), -rho)
    for line in lines[lines.index("SV") + 1:]:
        fields = line.split()
        if not fields:
            continue
        support_vector = np.zeros(scaled_features.shape[1])
        for field in fields[1:]:
            position, value = field.split(":")
            support_vector[int(position) - 1] = float(value)
        prediction += float(fields[0]) * np.exp(-gamma * ((scaled_features - support_vector) ** 2).sum(axis=1))
    return prediction


def test_offline_brisque_matches_libsvm_prediction(offline_torch_home, allmodel_bytes):
    generator = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(2, 3, 24, 24, generator=generator, dtype=torch.float64),
                                             size=96, mode="bilinear")
    images = torch.cat([torch.rand(2, 3, 96, 96, generator=generator, dtype=torch.float64), smooth])
    features = brisque_features(images).numpy()
    scores = brisque_svr_score(features, offline_brisque.load_svr())
    reference = libsvm_epsilon_svr_predict(allmodel_bytes.decode(), features)
    np.testing.assert_allclose(scores, reference, rtol=0, atol=1e-4)


class WritesMarker:
    """A pickle payload: unpickling it writes `marker` (proof that code from the file ran)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (Path(self.marker), "code from a pickle ran")


def test_a_pickle_in_the_brisque_cache_is_never_unpickled(offline_torch_home, tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    planted = offline_torch_home / "hub" / "checkpoints" / "brisque_svm_weights.pt"
    torch.save(WritesMarker(marker), planted)
    torch.load(planted, weights_only=False)  # what piq.brisque does with this file: the payload runs
    assert marker.exists()
    marker.unlink()

    def refuse(*args, **kwargs):
        raise AssertionError("something unpickled a file")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    rng = np.random.default_rng(0)
    scores = brisque_scores([Image.fromarray(rng.integers(0, 256, (96, 96, 3)).astype(np.uint8))])
    assert np.isfinite(scores).all() and not marker.exists()


def test_a_model_text_that_differs_from_the_pinned_one_is_refused_before_parsing(offline_torch_home, allmodel_bytes):
    path = offline_torch_home / "hub" / "checkpoints" / offline_brisque.ALLMODEL_FILE
    path.write_bytes(allmodel_bytes.replace(b"rho -153.591", b"rho -53.591"))
    with pytest.raises(InputError, match="SHA-256 differs"):
        brisque_scores([Image.new("RGB", (96, 96))])


def test_brisque_scores_is_nan_for_a_flat_image(offline_torch_home):
    rng = np.random.default_rng(0)
    textured = Image.fromarray(rng.integers(0, 256, (128, 128, 3)).astype(np.uint8))
    textured_score, flat_score = brisque_scores([textured, Image.new("RGB", (16, 16), (90, 90, 90))])
    assert np.isfinite(textured_score) and np.isnan(flat_score)


def test_brisque_scores_without_weights_raise_input_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(InputError, match="--install"):
        brisque_scores([Image.new("RGB", (16, 16))])


def test_small_images_upsampled_by_integer_factor():
    assert upsample_to_min_side(Image.new("RGB", (16, 16)), BRISQUE_MIN_SIDE).size == (96, 96)
    assert upsample_to_min_side(Image.new("RGB", (20, 40)), BRISQUE_MIN_SIDE).size == (100, 200)
    assert upsample_to_min_side(Image.new("RGB", (128, 100)), BRISQUE_MIN_SIDE).size == (128, 100)
