"""The embedded tiny victim (make_tiny_victim.py): offline tokenizer, pipeline round trip, splits, determinism."""

import json

import numpy as np
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
    for module in ("unet", "vae"):
        weights = [load_file(str(tmp_path / name / "pipeline" / module / "diffusion_pytorch_model.safetensors"))
                   for name in ("a", "b", "c")]
        assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
        assert not all(torch.equal(weights[0][key], weights[2][key]) for key in weights[0])
