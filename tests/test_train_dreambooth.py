"""train_dreambooth_mixsyn.py: the saved pipeline, checkpoint UNets, resume, trainable parts, prior preservation."""

import shutil

import pytest
from train_fixtures import (
    common_argv,
    max_abs_difference,
    run_in_process,
    unet_output,
)

import train_dreambooth_mixsyn as dreambooth_script
from mixsyn_utils.cli import InputError


@pytest.fixture(scope="module")
def argv(tiny_victim, synthetic_dataset, perturbed_dataset):
    def make(output_dir, **overrides):
        overrides.setdefault("learning_rate", 1e-3)  # the tiny model must move visibly in a few updates
        return common_argv(tiny_victim, synthetic_dataset, perturbed_dataset, output_dir, **overrides)
    return make


@pytest.fixture(scope="module")
def uninterrupted(argv, tmp_path_factory):
    """6 updates of the UNet in pixel mixup mode, a checkpoint every 2."""
    output_dir = tmp_path_factory.mktemp("dreambooth") / "out"
    run_in_process(dreambooth_script, argv(output_dir, max_train_steps=6, checkpointing_steps=2, mixup_mode="pixel"))
    return output_dir


def base_state(tiny_victim, name):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    model_class = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}[name]
    return model_class.from_pretrained(str(tiny_victim / "pipeline"), subfolder=name).state_dict()


def changed_keys(state_a, state_b, tolerance=0.0):
    return {key for key in state_a if (state_a[key].double() - state_b[key].double()).abs().max() > tolerance}


def test_output_loads_with_diffusion_pipeline_and_generates(uninterrupted, tiny_victim):
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    pipeline = DiffusionPipeline.from_pretrained(str(uninterrupted), safety_checker=None)
    base_unet = UNet2DConditionModel.from_pretrained(str(tiny_victim / "pipeline"), subfolder="unet")
    assert (unet_output(pipeline.unet) - unet_output(base_unet)).abs().max() > 1e-4
    image = pipeline("The face of three", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (16, 16, 3)


def test_checkpoint_unet_loads_with_unet_from_pretrained(uninterrupted):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(uninterrupted / "checkpoint-4" / "unet"))
    assert unet.config.sample_size == 8


def test_resume_from_a_copied_checkpoint_ends_with_the_uninterrupted_unet(uninterrupted, argv, tmp_path):
    from diffusers import UNet2DConditionModel

    saved_state = tmp_path / "elsewhere" / "after-4"
    shutil.copytree(uninterrupted / "checkpoint-4", saved_state)
    run_in_process(dreambooth_script, argv(tmp_path / "resumed", max_train_steps=6, checkpointing_steps=2,
                                           mixup_mode="pixel", resume_from_checkpoint=saved_state))
    resumed = UNet2DConditionModel.from_pretrained(str(tmp_path / "resumed"), subfolder="unet").state_dict()
    reference = UNet2DConditionModel.from_pretrained(str(uninterrupted), subfolder="unet").state_dict()
    assert max_abs_difference(resumed, reference) <= 1e-6


def test_trainable_vae_encoder_changes_only_the_image_encoder(argv, tmp_path, tiny_victim):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    run_in_process(dreambooth_script, argv(tmp_path / "out", trainable_modules="vae_encoder"))
    vae = AutoencoderKL.from_pretrained(str(tmp_path / "out"), subfolder="vae").state_dict()
    changed = changed_keys(vae, base_state(tiny_victim, "vae"))
    assert changed and all(key.startswith(("encoder.", "quant_conv.")) for key in changed)
    unet = UNet2DConditionModel.from_pretrained(str(tmp_path / "out"), subfolder="unet").state_dict()
    assert not changed_keys(unet, base_state(tiny_victim, "unet"))


def test_trainable_text_embeddings_changes_only_the_token_embedding(argv, tmp_path, tiny_victim):
    from transformers import CLIPTextModel

    run_in_process(dreambooth_script, argv(tmp_path / "out", trainable_modules="text_embeddings"))
    text_encoder = CLIPTextModel.from_pretrained(str(tmp_path / "out"), subfolder="text_encoder").state_dict()
    changed = changed_keys(text_encoder, base_state(tiny_victim, "text_encoder"))
    assert len(changed) == 1 and next(iter(changed)).endswith("embeddings.token_embedding.weight")


def test_prior_preservation_adds_class_rows_to_each_batch(argv, tmp_path, monkeypatch):
    import mixsyn_utils.training as training

    seen = []
    original = training.dreambooth_loss

    def recording_loss(model_pred, target, timesteps, noise_scheduler, num_instance, **kwargs):
        seen.append((model_pred.shape[0], num_instance, kwargs["prior_loss_weight"]))
        return original(model_pred, target, timesteps, noise_scheduler, num_instance, **kwargs)

    monkeypatch.setattr(training, "dreambooth_loss", recording_loss)
    run_in_process(dreambooth_script, argv(tmp_path / "out", with_prior_preservation=True, prior_loss_weight=0.5,
                                           class_data_dir=tmp_path / "class", class_prompt="A face",
                                           num_class_images=2, max_train_steps=1))
    assert seen == [(4, 2, 0.5)]  # 2 instance rows, then 2 class rows


def test_class_images_are_generated_once_into_the_class_folder_and_reused(argv, tmp_path):
    flags = dict(with_prior_preservation=True, class_data_dir=tmp_path / "class", class_prompt="A face",
                 num_class_images=2, max_train_steps=1)
    run_in_process(dreambooth_script, argv(tmp_path / "first", **flags))
    written = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "class").glob("*.png")}
    assert len(written) == 2
    run_in_process(dreambooth_script, argv(tmp_path / "second", **flags))
    assert {path.name: path.stat().st_mtime_ns for path in (tmp_path / "class").glob("*.png")} == written


def test_an_upstream_class_folder_is_used_and_topped_up(argv, tmp_path, synthetic_dataset):
    from datasets import load_from_disk

    class_dir = tmp_path / "class"
    class_dir.mkdir()
    load_from_disk(str(synthetic_dataset))[0]["image"].save(class_dir / "0-upstream.jpg")  # an image of upstream's run
    run_in_process(dreambooth_script, argv(tmp_path / "out", with_prior_preservation=True, class_data_dir=class_dir,
                                           class_prompt="A face", num_class_images=2, max_train_steps=1))
    assert (class_dir / "0-upstream.jpg").is_file() and len(list(class_dir.glob("*.png"))) == 1


def test_bf16_validation_runs_and_its_images_go_into_the_card(argv, tmp_path):
    run_in_process(dreambooth_script, argv(tmp_path / "out", mixed_precision="bf16", max_train_steps=1,
                                           validation_prompt="The face of three", num_validation_images=1))
    card = (tmp_path / "out" / "README.md").read_text()
    assert (tmp_path / "out" / "image_0.png").is_file() and "![img_0](./image_0.png)" in card
    assert "tags:\n- text-to-image\n- dreambooth\n- diffusers-training" in card


def test_unknown_trainable_module_is_an_error(argv, tmp_path):
    with pytest.raises(InputError, match="--trainable_modules"):
        dreambooth_script.parse_args([str(a) for a in argv(tmp_path / "out", trainable_modules="decoder")])
