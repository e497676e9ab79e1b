"""SDXL support in the shared pieces: the pipeline's kind read from model_index.json (SD3, Flux, EDM and the refiner
refused in one line before any heavy work), the one conditioning encoder against diffusers' own SDXL pipeline, the
tiny SDXL victim, and the unconditional embedding."""

import json

import pytest
import torch
from conftest import run_python
from safetensors.torch import save_file

import attack_clid
import attack_loss
import attack_pfami
import attack_pia
import attack_secmi
import evaluate
import generate_synthetic
import perturb_antidreambooth
import train_dreambooth_mixsyn
import train_lora_mixsyn
import train_textual_inversion_mixsyn
from mixsyn_utils.cli import InputError
from mixsyn_utils.conditioning import empty_prompt_conditioning, encode_prompts, size_time_ids, square_time_ids
from mixsyn_utils.models import SD, SDXL, check_pretrained_model, load_components, tokenize_prompts

SD3_INDEX = {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer_2": ["transformers", "CLIPTokenizer"], "text_encoder_3": ["transformers", "T5EncoderModel"],
             "tokenizer_3": ["transformers", "T5TokenizerFast"]}
FLUX_INDEX = {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
              "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "vae": ["diffusers", "AutoencoderKL"],
              "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
              "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer_2": ["transformers", "T5TokenizerFast"]}
SDXL_INDEX = {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
              "scheduler": ["diffusers", "EulerDiscreteScheduler"], "vae": ["diffusers", "AutoencoderKL"],
              "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
              "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
              "tokenizer_2": ["transformers", "CLIPTokenizer"], "force_zeros_for_empty_prompt": True}
PLAYGROUND_INDEX = dict(SDXL_INDEX, scheduler=["diffusers", "EDMDPMSolverMultistepScheduler"])
REFINER_INDEX = dict(SDXL_INDEX, _class_name="StableDiffusionXLImg2ImgPipeline", text_encoder=[None, None],
                     tokenizer=[None, None])


def pipeline_folder(tmp_path, name, index):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("name, index, reason", [
    ("sd3", SD3_INDEX, "is a flow-matching transformer model (StableDiffusion3Pipeline, FlowMatchEulerDiscreteScheduler): "
                       "the attacks' ε/v statistics and the DDPM training loss do not apply to flow matching"),
    ("flux", FLUX_INDEX, "is a flow-matching transformer model (FluxPipeline"),
    ("playground", PLAYGROUND_INDEX, "is an EDM-formulation model (StableDiffusionXLPipeline, "
                                     "EDMDPMSolverMultistepScheduler)"),
    ("refiner", REFINER_INDEX, "has no text_encoder, tokenizer: an SDXL refiner has no first text encoder"),
])
def test_unsupported_pipelines_are_refused_in_one_line_naming_why(tmp_path, name, index, reason):
    folder = pipeline_folder(tmp_path, name, index)
    with pytest.raises(InputError) as refused:
        check_pretrained_model(str(folder))
    assert reason in str(refused.value) and "\n" not in str(refused.value)


def test_the_kind_is_read_from_model_index_json(tmp_path, tiny_victim, tiny_sdxl_victim):
    assert check_pretrained_model(str(pipeline_folder(tmp_path, "xl", SDXL_INDEX))) == SDXL
    assert check_pretrained_model(str(tiny_sdxl_victim / "pipeline")) == SDXL
    assert check_pretrained_model(str(tiny_victim / "pipeline")) == SD


def flux_argv(script, folder, tmp_path):
    """Each script's smallest command line naming the Flux folder as its model. The data folders exist (every
    script checks its paths exist first) but hold nothing: a script that read them before the model's kind would
    fail on them, not on the model."""
    for name in ("m", "n", "s"):
        (tmp_path / name).mkdir(exist_ok=True)
    model = ["--pretrained_model_name_or_path", str(folder)]
    data = ["--member_dataset", str(tmp_path / "m"), "--nonmember_dataset", str(tmp_path / "n")]
    out = ["--output_dir", str(tmp_path / "out")]
    return {attack_loss: model + data + out, attack_pia: model + data + out, attack_secmi: model + data + out,
            attack_clid: model + data + out, attack_pfami: model + data + out,
            evaluate: ["--generate", "--domains_file", str(tmp_path / "d.json"), "--no_brisque",
                       "--rprecision_model", str(tmp_path / "r")] + model + out,
            generate_synthetic: model + ["--domain", "zero"] + out,
            perturb_antidreambooth: model + ["--dataset_name", str(tmp_path / "s")] + out,
            train_lora_mixsyn: model + ["--dataset_name", str(tmp_path / "s")] + out,
            train_textual_inversion_mixsyn: model + ["--dataset_name", str(tmp_path / "s")] + out,
            train_dreambooth_mixsyn: model + ["--dataset_name", str(tmp_path / "s")] + out}[script]


@pytest.mark.parametrize("script", [attack_loss, attack_pia, attack_secmi, attack_clid, attack_pfami, evaluate,
                                    generate_synthetic, perturb_antidreambooth, train_lora_mixsyn,
                                    train_textual_inversion_mixsyn, train_dreambooth_mixsyn],
                         ids=lambda module: module.__name__)
def test_every_script_refuses_flux_before_reading_any_data(tmp_path, script):
    folder = pipeline_folder(tmp_path, "flux", FLUX_INDEX)
    if script is perturb_antidreambooth:  # plans its groups from the rows first (no image is decoded before the check)
        from datasets import Dataset
        from PIL import Image

        Dataset.from_dict({"id": ["a"], "image": [Image.new("RGB", (16, 16))], "prompt": ["The face of one"],
                           "domain": ["one"]}).save_to_disk(str(tmp_path / "s"))
    (tmp_path / "d.json").write_text(json.dumps({"domains": ["zero"]}))
    (tmp_path / "r").mkdir()  # evaluate.py checks its scorer knows the sampled domains before reading the model
    (tmp_path / "r" / "config.json").write_text(json.dumps({"domain_names": ["zero"]}))
    save_file({"weight": torch.zeros(1)}, str(tmp_path / "r" / "model.safetensors"))  # and that it is safetensors
    with pytest.raises(InputError, match="flow-matching transformer model"):
        script.main(script.parse_args(flux_argv(script, folder, tmp_path)))
    assert not (tmp_path / "out").exists()


def test_sd3_is_one_line_on_the_command_line_never_a_traceback(tmp_path):
    folder = pipeline_folder(tmp_path, "sd3", SD3_INDEX)
    result = run_python("attack_loss.py", flux_argv(attack_loss, folder, tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --pretrained_model_name_or_path {folder} is a flow-matching transformer model "
        "(StableDiffusion3Pipeline, FlowMatchEulerDiscreteScheduler): the attacks' ε/v statistics and the DDPM "
        "training loss do not apply to flow matching as written; Stable Diffusion 1.x/2.x and SDXL are supported"]


def test_dreambooth_on_sdxl_is_refused_pointing_to_dreambooth_lora(tiny_sdxl_victim, sdxl_synthetic_dataset, tmp_path):
    args = train_dreambooth_mixsyn.parse_args(["--pretrained_model_name_or_path", str(tiny_sdxl_victim / "pipeline"),
                                               "--dataset_name", str(sdxl_synthetic_dataset),
                                               "--output_dir", str(tmp_path / "db")])
    with pytest.raises(InputError, match=r"is an SDXL model: .* use train_lora_mixsyn.py --with_prior_preservation"):
        train_dreambooth_mixsyn.main(args)
    assert not (tmp_path / "db").exists()


def test_encode_prompts_is_the_sdxl_pipelines_own_conditioning(tiny_sdxl_victim):
    """c, p and the time ids equal what StableDiffusionXLPipeline feeds its UNet, bit for bit."""
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_victim / "pipeline"), add_watermarker=False)
    components = load_components(str(tiny_sdxl_victim / "pipeline"))
    prompts = ["The face of three", "A photo of seven"]
    with torch.no_grad():
        ours = encode_prompts([components.text_encoder, components.text_encoder_2],
                              [tokenize_prompts(components.tokenizer, prompts),
                               tokenize_prompts(components.tokenizer_2, prompts)])
        embeds, negative, pooled, negative_pooled = pipeline.encode_prompt(prompts, do_classifier_free_guidance=True)
        empty = empty_prompt_conditioning([components.text_encoder, components.text_encoder_2],
                                          [components.tokenizer, components.tokenizer_2],
                                          components.force_zeros_for_empty_prompt)
    assert torch.equal(ours.hidden_states, embeds) and torch.equal(ours.pooled, pooled)
    assert ours.hidden_states.shape[-1] == components.unet.config.cross_attention_dim
    assert torch.equal(empty.hidden_states, negative[:1]) and torch.equal(empty.pooled, negative_pooled[:1])
    assert not empty.hidden_states.any()  # force_zeros_for_empty_prompt: the pipeline guides against zeros
    size = pipeline.default_sample_size * pipeline.vae_scale_factor
    expected_ids = pipeline._get_add_time_ids((size, size), (0, 0), (size, size), dtype=torch.float32,
                                              text_encoder_projection_dim=components.text_encoder_2.config.projection_dim)
    assert torch.equal(square_time_ids(size, 1), expected_ids)


def test_size_time_ids_are_original_size_crop_and_target_per_image():
    ids = size_time_ids([[20, 30], [16, 16]], [[2, 7], [0, 0]], (16, 16))
    assert ids.tolist() == [[20, 30, 2, 7, 16, 16], [16, 16, 0, 0, 16, 16]]


def test_the_tiny_sdxl_victim_has_sdxls_architecture(tiny_sdxl_victim):
    components = load_components(str(tiny_sdxl_victim / "pipeline"))
    unet = components.unet.config
    assert unet.addition_embed_type == "text_time" and unet.down_block_types[0] == "DownBlock2D"
    assert unet.projection_class_embeddings_input_dim == (6 * unet.addition_time_embed_dim
                                                          + components.text_encoder_2.config.projection_dim)
    assert unet.cross_attention_dim == (components.text_encoder.config.hidden_size
                                        + components.text_encoder_2.config.hidden_size)
    assert components.tokenizer_2.pad_token == "!" and components.force_zeros_for_empty_prompt
    assert type(components.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    info = json.loads((tiny_sdxl_victim / "victim_info.json").read_text())
    assert info["architecture"] == "sdxl"
