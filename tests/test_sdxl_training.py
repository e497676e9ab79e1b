"""Fine-tuning an SDXL base (the fast tiny SDXL victim) with train_lora_mixsyn.py and
train_textual_inversion_mixsyn.py: the outputs load with the stock SDXL calls, the upstream SDXL flags do what
upstream's SDXL scripts do, each image's size and crop are its time ids, and the card follows diffusers' SDXL card."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from train_fixtures import common_argv, run_in_process

import train_lora_mixsyn as lora_script
import train_textual_inversion_mixsyn as ti_script
from mixsyn_utils.cli import InputError
from mixsyn_utils.models import load_components
from mixsyn_utils.training import batch_conditioning
from mixsyn_utils.training_data import TrainingImages, collate_examples

LORA_FILE = "pytorch_lora_weights.safetensors"


def sdxl_argv(victim, synthetic, perturbed, output_dir, **overrides):
    return common_argv(victim, synthetic, perturbed, output_dir, **overrides)


@pytest.fixture(scope="module")
def sdxl_lora(tiny_sdxl_victim, sdxl_synthetic_dataset, sdxl_perturbed_dataset, tmp_path_factory):
    """LoRA on the UNet and both text encoders, a Kohya copy, validation images and a custom VAE (the victim's own
    VAE folder standing in for madebyollin/sdxl-vae-fp16-fix). Plain LoRA: with the installed transformers, the
    text encoders' DoRA magnitudes do not load through the stock `load_lora_weights`."""
    output_dir = tmp_path_factory.mktemp("sdxl_lora") / "lora"
    run_in_process(lora_script, sdxl_argv(
        tiny_sdxl_victim, sdxl_synthetic_dataset, sdxl_perturbed_dataset, output_dir, train_text_encoder=True,
        output_kohya_format=True, validation_prompt="The face of three", num_validation_images=2,
        pretrained_vae_model_name_or_path=tiny_sdxl_victim / "pipeline" / "vae", learning_rate=1e-2))
    return output_dir


def sdxl_pipeline(victim):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(str(victim / "pipeline"), add_watermarker=False)


def prompt_embeddings(pipeline, prompt="The face of three"):
    with torch.no_grad():
        embeds, _, pooled, _ = pipeline.encode_prompt(prompt, do_classifier_free_guidance=False)
    return embeds, pooled


def test_sdxl_lora_loads_with_load_lora_weights_and_changes_unet_and_both_text_encoders(sdxl_lora, tiny_sdxl_victim):
    keys = load_file(str(sdxl_lora / LORA_FILE)).keys()
    assert {key.split(".")[0] for key in keys} == {"unet", "text_encoder", "text_encoder_2"}
    pipeline = sdxl_pipeline(tiny_sdxl_victim)
    embeds, pooled = prompt_embeddings(pipeline)
    pipeline.load_lora_weights(str(sdxl_lora))
    lora_embeds, lora_pooled = prompt_embeddings(pipeline)
    width = pipeline.text_encoder.config.hidden_size
    assert (lora_embeds[..., :width] - embeds[..., :width]).abs().max() > 1e-5  # text_encoder
    assert (lora_embeds[..., width:] - embeds[..., width:]).abs().max() > 1e-5  # text_encoder_2
    assert (lora_pooled - pooled).abs().max() > 1e-5
    assert (unet_output_sdxl(pipeline.unet) - unet_output_sdxl(sdxl_pipeline(tiny_sdxl_victim).unet)).abs().max() > 1e-5


def unet_output_sdxl(unet, seed=0):
    """ε_θ on a fixed random input with SDXL's added conditioning (float64), to tell two UNets apart."""
    generator = torch.Generator().manual_seed(seed)
    config = unet.config
    latents = torch.randn(1, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    context = torch.randn(1, 77, config.cross_attention_dim, generator=generator)
    pooled = torch.randn(1, config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim,
                         generator=generator)
    time_ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])
    with torch.no_grad():
        return unet(latents, torch.tensor([500]), context,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample.double()


def test_the_kohya_copy_loads_and_equals_the_diffusers_file(sdxl_lora, tiny_sdxl_victim):
    kohya = load_file(str(sdxl_lora / "pytorch_lora_weights_kohya.safetensors"))
    prefixes = {key.split("_", 2)[1] for key in kohya}
    assert {"unet", "te1", "te2"} <= prefixes and not any(".lora.down" in key for key in kohya)
    diffusers_pipeline, kohya_pipeline = sdxl_pipeline(tiny_sdxl_victim), sdxl_pipeline(tiny_sdxl_victim)
    diffusers_pipeline.load_lora_weights(str(sdxl_lora))
    kohya_pipeline.load_lora_weights(str(sdxl_lora), weight_name="pytorch_lora_weights_kohya.safetensors")
    for left, right in zip(prompt_embeddings(diffusers_pipeline), prompt_embeddings(kohya_pipeline)):
        torch.testing.assert_close(left, right, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unet_output_sdxl(diffusers_pipeline.unet), unet_output_sdxl(kohya_pipeline.unet),
                               rtol=1e-5, atol=1e-5)


def test_the_sdxl_card_follows_diffusers_sdxl_card(sdxl_lora, tiny_sdxl_victim):
    card = (sdxl_lora / "README.md").read_text()
    assert "license: openrail++" in card and "- stable-diffusion-xl" in card
    assert "from diffusers import StableDiffusionXLPipeline" in card
    assert "Special VAE used for training: a local VAE." in card
    assert "LoRA for the text encoder was enabled: True." in card
    assert card.count("output:") == 2 and "image_1.png" in card  # one widget entry per validation image
    assert "## Trigger words" in card and "three" in card
    info = json.loads((sdxl_lora / "training_info.json").read_text())
    assert info["base_kind"] == "sdxl" and info["trained"]["resolution"] == 16  # the model's native size


def test_dreambooth_lora_on_sdxl_takes_train_dreambooth_lora_sdxl_defaults(tiny_sdxl_victim, tiny_victim, tmp_path):
    (tmp_path / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "dog" / "0.png")
    common = ["--instance_data_dir", str(tmp_path / "dog"), "--instance_prompt", "a photo of sks dog"]
    sdxl = lora_script.parse_args(["--pretrained_model_name_or_path", str(tiny_sdxl_victim / "pipeline"), *common])
    sd = lora_script.parse_args(["--pretrained_model_name_or_path", str(tiny_victim / "pipeline"), *common])
    assert (sdxl.learning_rate, sdxl.adam_weight_decay, sdxl.text_encoder_lr, sdxl.adam_weight_decay_text_encoder) == \
        (1e-4, 1e-4, 5e-6, 1e-3)
    assert (sd.learning_rate, sd.adam_weight_decay, sd.text_encoder_lr) == (5e-4, 1e-2, None)


def test_edm_style_training_runs_and_refuses_min_snr(tiny_sdxl_victim, sdxl_synthetic_dataset, sdxl_perturbed_dataset,
                                                     tmp_path):
    argv = sdxl_argv(tiny_sdxl_victim, sdxl_synthetic_dataset, sdxl_perturbed_dataset, tmp_path / "edm",
                     do_edm_style_training=True, max_train_steps=1)
    with pytest.raises(InputError, match="--snr_gamma .* is not defined for --do_edm_style_training"):
        lora_script.parse_args(argv + ["--snr_gamma", "5"])
    run_in_process(lora_script, argv)
    assert (tmp_path / "edm" / LORA_FILE).is_file()


def test_edm_style_loss_of_an_epsilon_model_is_its_epsilon_loss():
    """x̂₀ = z − σ·ε̂ and target x₀ with weight σ⁻²: σ⁻²·‖x̂₀ − x₀‖² = ‖ε̂ − ε‖² for every sample (upstream's Euler branch
    trains an ε model on the same objective, weighted per timestep as it is)."""
    from mixsyn_utils.dreambooth import euler_x0_prediction

    generator = torch.Generator().manual_seed(0)
    latents, noise, prediction = (torch.randn(3, 4, 2, 2, generator=generator, dtype=torch.float64) for _ in range(3))
    sigmas = torch.tensor([0.1, 1.0, 14.6], dtype=torch.float64)
    unscaled = latents + sigmas.view(-1, 1, 1, 1) * noise
    x0 = euler_x0_prediction(prediction, unscaled, sigmas, "epsilon")
    weighted = ((x0 - latents) ** 2).flatten(1).mean(1) / sigmas ** 2
    torch.testing.assert_close(weighted, ((prediction - noise) ** 2).flatten(1).mean(1))


def test_each_image_trains_with_its_own_size_and_crop_as_time_ids(tiny_sdxl_victim):
    """A 24 × 40 image resized to 16 px high and cropped at a random left offset: time ids (24, 40, 0, left, 16, 16)."""
    components = load_components(str(tiny_sdxl_victim / "pipeline"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8))
    rows = [{"image": image, "prompt": "The face of three"}]
    dataset = TrainingImages(rows, [components.tokenizer, components.tokenizer_2], 16, lambda row, rng: row["prompt"],
                             seed=3)
    batch = collate_examples([dataset[0]])
    left = int(batch["crop_top_left"][0, 1])
    assert batch["original_size"].tolist() == [[24, 40]] and batch["crop_top_left"][0, 0] == 0 and 0 <= left <= 11
    with torch.no_grad():
        conditioning = batch_conditioning(batch, [components.text_encoder, components.text_encoder_2], 16)
    assert conditioning.time_ids.tolist() == [[24, 40, 0, left, 16, 16]]
    assert batch["input_ids"].shape == batch["input_ids_2"].shape == (1, 77)  # one row of ids per tokenizer


@pytest.fixture(scope="module")
def sdxl_textual_inversion(tiny_sdxl_victim, sdxl_synthetic_dataset, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("sdxl_ti") / "ti"
    run_in_process(ti_script, [
        "--pretrained_model_name_or_path", str(tiny_sdxl_victim / "pipeline"), "--dataset_name",
        str(sdxl_synthetic_dataset), "--output_dir", str(output_dir), "--max_train_steps", "2", "--train_batch_size",
        "2", "--learning_rate", "0.05", "--lr_warmup_steps", "0", "--repeats", "1", "--seed", "0",
        "--max_train_samples", "4", "--save_as_full_pipeline"])
    return output_dir


def test_sdxl_textual_inversion_writes_both_encoders_files_that_load_the_stock_way(sdxl_textual_inversion,
                                                                                  tiny_sdxl_victim):
    token_map = json.loads((sdxl_textual_inversion / "token_map.json").read_text())
    pipeline = sdxl_pipeline(tiny_sdxl_victim)
    for entry in token_map.values():
        assert entry["file_2"].startswith("learned_embeds_2")
        pipeline.load_textual_inversion(str(sdxl_textual_inversion), weight_name=entry["file"],
                                        token=entry["placeholder"], text_encoder=pipeline.text_encoder,
                                        tokenizer=pipeline.tokenizer)
        pipeline.load_textual_inversion(str(sdxl_textual_inversion), weight_name=entry["file_2"],
                                        token=entry["placeholder"], text_encoder=pipeline.text_encoder_2,
                                        tokenizer=pipeline.tokenizer_2)
    full = sdxl_pipeline_at(sdxl_textual_inversion)
    prompt = f"The face of {next(iter(token_map.values()))['placeholder']}"
    for loaded, saved in zip(prompt_embeddings(pipeline, prompt), prompt_embeddings(full, prompt)):
        assert torch.equal(loaded, saved)
    domain, entry = next(iter(token_map.items()))
    learned = load_file(str(sdxl_textual_inversion / entry["file_2"]))[entry["placeholder"]]
    base = load_components(str(tiny_sdxl_victim / "pipeline"))
    table = base.text_encoder_2.get_input_embeddings().weight.detach()
    start = table[base.tokenizer_2.encode(domain, add_special_tokens=False)].mean(0)  # its initial value
    assert learned.shape == (1, table.shape[1]) and (learned[0] - start).abs().max() > 1e-4  # it trained


def sdxl_pipeline_at(folder):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(str(folder), add_watermarker=False)
