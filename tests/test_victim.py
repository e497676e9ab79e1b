"""The embedded tiny victim (make_tiny_victim.py): offline tokenizer, pipeline round trip, splits, determinism."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import make_tiny_victim
from mixsyn_utils.dataset_io import load_image_dataset
from mixsyn_utils.models import load_components, tokenize_prompts


def test_offline_tokenizer_matches_clip_bpe(tmp_path):
    tokenizer = make_tiny_victim.write_clip_tokenizer(tmp_path)
    ids = tokenizer("The face of seven").input_ids
    # CLIP ViT-L/14 ids: <|startoftext|>=49406, "the</w>"=518, "face</w>"=1710, "of</w>"=539, "seven</w>"=5757, eos=49407
    assert ids == [49406, 518, 1710, 539, 5757, 49407]
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77


def test_victim_pipeline_round_trip(tiny_victim):
    from diffusers import StableDiffusionPipeline

    components = load_components(str(tiny_victim / "pipeline"))
    assert components.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert components.noise_scheduler.config.num_train_timesteps == 1000
    assert np.isclose(float(components.noise_scheduler.betas[0]), 0.00085) and np.isclose(float(components.noise_scheduler.betas[-1]), 0.012)
    assert components.unet.config.cross_attention_dim == components.text_encoder.config.hidden_size
    ids = tokenize_prompts(components.tokenizer, ["The face of three"])
    assert ids.shape == (1, 77)
    pipeline = StableDiffusionPipeline.from_pretrained(str(tiny_victim / "pipeline"), safety_checker=None)
    image = pipeline("The face of three", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                     height=16, width=16).images[0]
    assert image.size == (16, 16)


def test_victim_splits_are_disjoint_and_stratified(tiny_victim):
    members = load_image_dataset(str(tiny_victim / "members"), required_columns=("id", "image", "prompt", "domain"))
    nonmembers = load_image_dataset(str(tiny_victim / "nonmembers"), required_columns=("id", "image", "prompt", "domain"))
    assert not set(members["id"]) & set(nonmembers["id"])
    domains = json.loads((tiny_victim / "domains.json").read_text())["domains"]
    assert len(domains) == 10
    for split in (members, nonmembers):
        counts = {d: split["domain"].count(d) for d in domains}
        assert set(counts.values()) == {4}
        assert split[0]["image"].size == (16, 16)
        assert all(domain in prompt for domain, prompt in zip(split["domain"], split["prompt"]))


def test_victim_build_is_deterministic(tmp_path):
    argv = ["--members_per_domain", "2", "--nonmembers_per_domain", "2", "--vae_steps", "3", "--unet_steps", "3",
            "--train_batch_size", "8", "--rprecision_steps", "2", "--skip_report"]
    for name in ("a", "b"):
        make_tiny_victim.main(make_tiny_victim.parse_args(["--output_dir", str(tmp_path / name), "--seed", "5", *argv]))
    make_tiny_victim.main(make_tiny_victim.parse_args(["--output_dir", str(tmp_path / "c"), "--seed", "6", *argv]))
    for module, file in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                         ("text_encoder", "model")):
        weights = [load_file(str(tmp_path / name / "pipeline" / module / f"{file}.safetensors"))
                   for name in ("a", "b", "c")]
        assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
        assert not all(torch.equal(weights[0][key], weights[2][key]) for key in weights[0])


def test_victim_posterior_is_narrow_so_samples_and_modes_agree(tiny_victim):
    """The one latent rule: training on posterior samples, attacks on the mode, a posterior σ ≪ the latent spread
    (the fast victim too), recomputed here from the saved VAE."""
    info = json.loads((tiny_victim / "victim_info.json").read_text())
    components = load_components(str(tiny_victim / "pipeline"))
    members = load_image_dataset(str(tiny_victim / "members"), required_columns=("image",))
    pixels = make_tiny_victim.rows_to_tensor(list(members))
    with torch.no_grad():
        posterior = components.vae.encode(pixels).latent_dist
    scale = components.vae.config.scaling_factor
    ratio = float((posterior.std * scale).double().mean() / (posterior.mean * scale).double().std())
    assert ratio == pytest.approx(info["posterior_std_over_latent_std"], rel=1e-4)
    assert ratio <= 0.1


def test_victim_text_encoder_is_trained_with_the_unet(tmp_path):
    argv = ["--members_per_domain", "2", "--nonmembers_per_domain", "2", "--vae_steps", "2", "--unet_steps", "3",
            "--train_batch_size", "8", "--rprecision_steps", "2", "--skip_report", "--seed", "1"]
    make_tiny_victim.main(make_tiny_victim.parse_args(["--output_dir", str(tmp_path / "trained"), *argv]))
    make_tiny_victim.main(make_tiny_victim.parse_args(["--output_dir", str(tmp_path / "frozen"), *argv,
                                                       "--text_encoder_lr", "0"]))
    trained, frozen = (load_file(str(tmp_path / name / "pipeline" / "text_encoder" / "model.safetensors"))
                       for name in ("trained", "frozen"))
    _, _, (initial,) = make_tiny_victim.build_models(1)
    initial = initial.state_dict()
    suffix = "encoder.layers.0.mlp.fc1.weight"  # saved and in-memory key prefixes differ across versions
    saved_key = next(key for key in trained if key.endswith(suffix))
    assert torch.equal(frozen[saved_key], initial[suffix])  # frozen: the random initial encoder
    assert not torch.equal(trained[saved_key], initial[suffix])  # trained jointly (EMA of the trained weights)


def test_victim_v_prediction_is_written_into_the_scheduler(tmp_path):
    argv = ["--members_per_domain", "2", "--nonmembers_per_domain", "2", "--vae_steps", "2", "--unet_steps", "2",
            "--train_batch_size", "8", "--rprecision_steps", "2", "--skip_report", "--prediction_type", "v_prediction"]
    make_tiny_victim.main(make_tiny_victim.parse_args(["--output_dir", str(tmp_path / "v"), *argv]))
    components = load_components(str(tmp_path / "v" / "pipeline"))
    assert components.noise_scheduler.config.prediction_type == "v_prediction"
    assert json.loads((tmp_path / "v" / "victim_info.json").read_text())["prediction_type"] == "v_prediction"


def test_the_vae_trains_on_public_digits_outside_both_splits():
    members, nonmembers, public = make_tiny_victim.digits_splits(0, 25, 25, resolution=32, with_public=True)
    ids = [{row["id"] for row in rows} for rows in (members, nonmembers, public)]
    assert not ids[0] & ids[2] and not ids[1] & ids[2] and not ids[0] & ids[1]
    assert len(ids[0]) + len(ids[1]) + len(ids[2]) == 1797  # every sklearn digit, each in one split
    assert public[0]["image"].size == (32, 32)


def test_the_default_victim_has_sds_vae_factor_at_32_px(tmp_path):
    argv = ["--members_per_domain", "2", "--nonmembers_per_domain", "2", "--vae_steps", "2", "--unet_steps", "2",
            "--train_batch_size", "8", "--rprecision_steps", "2", "--skip_report"]
    make_tiny_victim.main(make_tiny_victim.parse_args(["--output_dir", str(tmp_path / "v"), *argv]))
    components = load_components(str(tmp_path / "v" / "pipeline"))
    assert 2 ** (len(components.vae.config.block_out_channels) - 1) == 8
    assert components.unet.config.sample_size * 8 == 32
    info = json.loads((tmp_path / "v" / "victim_info.json").read_text())
    assert info["vae_data"] == "public" and info["vae_training_images"] == 1797 - 40
