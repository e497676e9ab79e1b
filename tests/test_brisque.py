"""Offline BRISQUE: piq with our converted LIVE model equals libsvm's RBF-SVR prediction, and never downloads."""

import numpy as np
import pytest
import torch
from PIL import Image

from mixsyn_utils import brisque as offline_brisque
from mixsyn_utils.cli import InputError
from mixsyn_utils.utility import BRISQUE_MIN_SIDE, brisque_scores, upsample_to_min_side


@pytest.fixture(scope="module")
def allmodel_text():
    """The LIVE libsvm text kept by the install step (`python -m mixsyn_utils.brisque --install`)."""
    path = offline_brisque.checkpoint_dir() / offline_brisque.ALLMODEL_FILE
    if not path.is_file():
        pytest.skip(f"BRISQUE not installed ({path} missing): run `python -m mixsyn_utils.brisque --install`")
    return path.read_text()


@pytest.fixture
def offline_torch_home(tmp_path, monkeypatch, allmodel_text):
    """A fresh TORCH_HOME holding only our converted weights, with every download made to fail."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    offline_brisque.convert_allmodel(allmodel_text)

    def no_network(*args, **kwargs):
        raise AssertionError("piq tried to download BRISQUE weights")

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


def piq_scaled_features(images):
    """piq's own BRISQUE feature pipeline up to (not including) the SVR: luma, 2 scales, MATLAB range scaling."""
    import importlib

    from piq.functional import imresize, rgb2yiq

    piq_brisque = importlib.import_module("piq.brisque")
    luma = torch.round(rgb2yiq(images * 255)[:, :1])
    features = []
    for _ in range(2):
        features.append(piq_brisque._natural_scene_statistics(luma))
        luma = imresize(luma, sizes=(luma.size(2) // 2, luma.size(3) // 2))
    return piq_brisque._scale_features(torch.cat(features, dim=-1)).numpy()


def test_offline_brisque_matches_libsvm_prediction(offline_torch_home, allmodel_text):
    import piq

    generator = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(2, 3, 24, 24, generator=generator, dtype=torch.float64),
                                             size=96, mode="bilinear")
    images = torch.cat([torch.rand(2, 3, 96, 96, generator=generator, dtype=torch.float64), smooth])
    piq_scores = piq.brisque(images, data_range=1.0, reduction="none").numpy()
    reference = libsvm_epsilon_svr_predict(allmodel_text, piq_scaled_features(images))
    np.testing.assert_allclose(piq_scores, reference, rtol=0, atol=1e-4)


def test_converted_weights_load_without_pickle(offline_torch_home):
    sv_coef, support_vectors = torch.load(offline_torch_home / "hub" / "checkpoints" / offline_brisque.WEIGHTS_FILE,
                                          weights_only=True)
    assert sv_coef.shape == (774,) and support_vectors.shape == (774, 36)


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
