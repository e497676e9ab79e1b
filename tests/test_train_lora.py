"""train_lora_mixsyn.py (and the shared training infrastructure): output, checkpoints, resume, flags, errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import (
    common_argv,
    max_abs_difference,
    run_in_process,
    spy_on,
    unet_output,
)

import train_lora_mixsyn as lora_script
from conftest import launch
from mixsyn_utils.cli import InputError

@pytest.fixture(scope="module")
def argv(tiny_victim, synthetic_dataset, perturbed_dataset):
    def make(output_dir, **overrides):
        return common_argv(tiny_victim, synthetic_dataset, perturbed_dataset, output_dir, **overrides)
    return make


@pytest.fixture(scope="module")
def uninterrupted(argv, tmp_path_factory):
    """6 updates (30 images, batch 2: one epoch is 15 batches), a checkpoint every 2, at most 2 kept."""
    output_dir = tmp_path_factory.mktemp("lora_full") / "out"
    run_in_process(lora_script, argv(output_dir, max_train_steps=6, checkpointing_steps=2, checkpoints_total_limit=2))
    return output_dir


def checkpoint_names(output_dir):
    return sorted(p.name for p in output_dir.iterdir() if p.name.startswith("checkpoint-"))


def test_lora_weights_load_with_load_lora_weights_and_change_the_unet(uninterrupted, tiny_victim):
    from diffusers import StableDiffusionPipeline

    weights = load_file(str(uninterrupted / "pytorch_lora_weights.safetensors"))
    assert weights and all("lora" in key for key in weights)
    pipeline = StableDiffusionPipeline.from_pretrained(str(tiny_victim / "pipeline"), safety_checker=None)
    before = unet_output(pipeline.unet)
    pipeline.load_lora_weights(str(uninterrupted))
    assert (unet_output(pipeline.unet) - before).abs().max() > 1e-4
    image = pipeline("The face of three", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (16, 16, 3)


def test_checkpoints_total_limit_keeps_the_newest_two(uninterrupted):
    assert checkpoint_names(uninterrupted) == ["checkpoint-4", "checkpoint-6"]
    assert not [p for p in uninterrupted.iterdir() if p.name.startswith(".")]


def test_resume_from_a_copied_checkpoint_ends_with_the_uninterrupted_weights(uninterrupted, argv, tmp_path):
    # The state a run killed right after checkpoint-4 leaves behind, moved outside its output folder.
    saved_state = tmp_path / "elsewhere" / "state-after-update-4"
    shutil.copytree(uninterrupted / "checkpoint-4", saved_state)
    run_in_process(lora_script, argv(tmp_path / "resumed", max_train_steps=6, checkpointing_steps=2,
                                     resume_from_checkpoint=saved_state))
    resumed = load_file(str(tmp_path / "resumed" / "pytorch_lora_weights.safetensors"))
    reference = load_file(str(uninterrupted / "pytorch_lora_weights.safetensors"))
    at_update_4 = load_file(str(saved_state / "pytorch_lora_weights.safetensors"))
    assert max_abs_difference(resumed, reference) <= 1e-6
    assert max_abs_difference(resumed, at_update_4) > 1e-4  # updates 5 and 6 did train
    assert checkpoint_names(tmp_path / "resumed") == ["checkpoint-6"]


def test_resume_latest_from_checkpoint_4_to_6_keeps_checkpoints_4_and_6(argv, tmp_path):
    output_dir = tmp_path / "out"
    run_in_process(lora_script, argv(output_dir, max_train_steps=4, checkpointing_steps=2, checkpoints_total_limit=2))
    assert checkpoint_names(output_dir) == ["checkpoint-2", "checkpoint-4"]
    run_in_process(lora_script, argv(output_dir, max_train_steps=6, checkpointing_steps=2, checkpoints_total_limit=2,
                                     resume_from_checkpoint="latest"))
    assert checkpoint_names(output_dir) == ["checkpoint-4", "checkpoint-6"]


def test_two_processes_train_and_save_once_with_only_our_own_console_lines(argv, tmp_path):
    output_dir = tmp_path / "out"
    result = launch("train_lora_mixsyn.py", argv(output_dir, max_train_steps=2, checkpointing_steps=2,
                                                 train_text_encoder=True, validation_prompt="The face of three",
                                                 num_validation_images=1), num_processes=2)
    console = result.stdout + result.stderr
    for noise in ("gemm_4bit", "kept in float32", "torch_dtype", "Could not find a config file", "No LoRA keys",
                  "Loading weights", "Loading pipeline components", "Optimizer state saved"):
        assert noise not in console
    assert checkpoint_names(output_dir) == ["checkpoint-2"]
    assert sorted(p.name for p in (output_dir / "checkpoint-2").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    assert [p.name for p in output_dir.glob("*.safetensors")] == ["pytorch_lora_weights.safetensors"]
    assert not [p for p in output_dir.iterdir() if p.name.startswith(".")]


def test_use_8bit_adam_trains_with_the_bitsandbytes_optimizer(argv, tmp_path):
    run_in_process(lora_script, argv(tmp_path / "out", use_8bit_adam=True, checkpointing_steps=2))
    state = torch.load(tmp_path / "out" / "checkpoint-2" / "optimizer.bin", weights_only=True)["state"]
    # bitsandbytes keeps its moments under its own key (torch's AdamW: exp_avg/exp_avg_sq).
    assert state and all("__bnb_optimizer_quant_state__" in entry and "exp_avg" not in entry
                         for entry in state.values())


def test_bf16_keeps_base_in_bf16_and_lora_in_fp32_and_validates(argv, tmp_path, monkeypatch):
    loaded = spy_on(monkeypatch, lora_script, "load_training_components")
    run_in_process(lora_script, argv(tmp_path / "out", mixed_precision="bf16", validation_prompt="The face of three",
                                     num_validation_images=1))
    unet = loaded[0].unet
    assert {p.dtype for n, p in unet.named_parameters() if "lora" not in n} == {torch.bfloat16}
    assert {p.dtype for n, p in unet.named_parameters() if "lora" in n} == {torch.float32}
    assert (tmp_path / "out" / "image_0.png").is_file()


def test_fp16_trains_and_validates_under_autocast(argv, tmp_path):
    run_in_process(lora_script, argv(tmp_path / "out", mixed_precision="fp16", max_train_steps=1,
                                     validation_prompt="The face of three", num_validation_images=1))
    assert (tmp_path / "out" / "image_0.png").is_file()


def test_gradient_checkpointing_is_enabled_on_the_unet(argv, tmp_path, monkeypatch):
    loaded = spy_on(monkeypatch, lora_script, "load_training_components")
    run_in_process(lora_script, argv(tmp_path / "out", gradient_checkpointing=True))
    assert loaded[0].unet.is_gradient_checkpointing
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


def test_model_card_follows_diffusers_conventions_without_local_paths(uninterrupted, tiny_victim, synthetic_dataset):
    from mixsyn_utils.resumable import weights_digest

    card = (uninterrupted / "README.md").read_text()
    assert "license: creativeml-openrail-m" in card and "- diffusers-training\n- lora\n- mixsyn" in card
    assert str(tiny_victim) not in card and str(synthetic_dataset) not in card and "base_model" not in card
    assert 'pipe.load_lora_weights("out")' in card
    assert "mode = image, ratio = 0.5, seed = 0" in card and "pgd_eps = 0.05" in card
    assert f"weights_sha256: {weights_digest(uninterrupted)}" in card


def test_push_to_hub_uploads_the_output_without_checkpoints(uninterrupted, monkeypatch):
    import huggingface_hub

    from mixsyn_utils.model_card import push_to_hub

    calls = {}
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.setdefault("repo", (repo_id, kw))
                        and huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.setdefault("upload", kw))
    args = lora_script.parse_args(["--pretrained_model_name_or_path", "x", "--dataset_name", "x",
                                   "--hub_model_id", "me/mixsyn-lora", "--hub_token", "hf_secret"])
    assert push_to_hub(uninterrupted, args.hub_model_id, args.hub_token) == "me/mixsyn-lora"
    assert calls["upload"]["folder_path"] == str(uninterrupted) and calls["upload"]["token"] == "hf_secret"
    assert "checkpoint-*" in calls["upload"]["ignore_patterns"]


def test_push_to_hub_offline_fails_clearly_after_saving_without_the_token(argv, tmp_path):
    with pytest.raises(InputError, match="--push_to_hub .*HF_HUB_OFFLINE") as error:
        run_in_process(lora_script, argv(tmp_path / "out", push_to_hub=True, hub_token="hf_secret_token",
                                         max_train_steps=1))
    assert "hf_secret_token" not in str(error.value)
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert "hf_secret_token" not in "".join(p.read_text(errors="ignore") for p in (tmp_path / "out").rglob("*")
                                             if p.is_file())


def test_unknown_mixup_mode_is_rejected(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        lora_script.parse_args([str(a) for a in argv(tmp_path / "out", mixup_mode="voxel")])
    assert exit_info.value.code == 2 and "--mixup_mode" in capsys.readouterr().err


def test_mixup_ratio_without_perturbed_set_is_an_error(argv, tmp_path):
    with pytest.raises(InputError, match="--perturbed_dataset_name"):
        lora_script.parse_args([str(a) for a in argv(tmp_path / "out", perturbed_dataset_name=None)])


def test_missing_caption_column_is_an_error(argv, tmp_path):
    with pytest.raises(InputError, match="no column 'text'"):
        run_in_process(lora_script, argv(tmp_path / "out", caption_column="text"))


def test_resume_from_a_missing_checkpoint_is_an_error(argv, tmp_path):
    with pytest.raises(InputError, match="--resume_from_checkpoint .*does not exist"):
        lora_script.parse_args([str(a) for a in argv(tmp_path / "out", resume_from_checkpoint=tmp_path / "nowhere")])


def test_resume_latest_without_checkpoints_starts_fresh(argv, tmp_path):
    from mixsyn_utils.checkpoints import resolve_resume_checkpoint

    args = lora_script.parse_args([str(a) for a in argv(tmp_path / "out", resume_from_checkpoint="latest")])
    assert resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir) is None


def test_privacy_report_that_is_not_an_evaluate_results_file_is_an_error(argv, tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"auc": 0.5}))
    with pytest.raises(InputError, match="--privacy_report .*no 'privacy' blocks"):
        lora_script.parse_args([str(a) for a in argv(tmp_path / "out", privacy_report=tmp_path / "results.json")])


def test_hub_token_with_wandb_is_refused(argv, tmp_path):
    with pytest.raises(InputError, match="--hub_token"):
        lora_script.parse_args([str(a) for a in argv(tmp_path / "out", hub_token="hf_x", report_to="wandb")])


def test_a_missing_model_fails_before_any_data_is_read_and_leaves_no_folder(argv, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the data was read before the model path was checked")

    monkeypatch.setattr(lora_script, "load_training_images", never)
    with pytest.raises(InputError, match=r"--pretrained_model_name_or_path .*no_model does not exist"):
        run_in_process(lora_script, argv(tmp_path / "out", pretrained_model_name_or_path=tmp_path / "no_model"))
    assert not (tmp_path / "out").exists()


def test_an_image_that_does_not_decode_fails_before_the_model_loads_and_leaves_no_folder(argv, tmp_path,
                                                                                          synthetic_dataset,
                                                                                          monkeypatch):
    import datasets

    rows = [dict(row) for row in datasets.load_from_disk(str(synthetic_dataset))]
    rows[5]["image"] = {"bytes": b"", "path": None}
    datasets.Dataset.from_list(rows).cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "zero"))

    def never(*args, **kwargs):
        raise AssertionError("the model loaded before the images were checked")

    monkeypatch.setattr(lora_script, "load_training_components", never)
    with pytest.raises(InputError, match=rf"zero row id {rows[5]['id']}: cannot decode \(cannot identify"):
        run_in_process(lora_script, argv(tmp_path / "out", dataset_name=tmp_path / "zero", perturbed_dataset_name=None,
                                         mixup_ratio=0))
    assert not (tmp_path / "out").exists()


def test_dora_unet_weights_load_in_the_attacks_loader_and_dora_with_text_encoder_is_refused(argv, tiny_victim,
                                                                                              tmp_path):
    """--use_dora writes a magnitude vector per adapted layer: the attacks' loader (`load_model_variant`) checks its
    length against the layer and fuses it; with --train_text_encoder the magnitudes would not load back, so the
    combination is refused before any work."""
    from mixsyn_utils.variants import load_model_variant

    with pytest.raises(InputError, match="--use_dora with --train_text_encoder"):
        lora_script.parse_args(argv(tmp_path / "refused", use_dora=True, train_text_encoder=True))
    assert not (tmp_path / "refused").exists()
    run_in_process(lora_script, argv(tmp_path / "dora", use_dora=True, max_train_steps=2))
    weights = load_file(str(tmp_path / "dora" / "pytorch_lora_weights.safetensors"))
    magnitudes = [key for key in weights if key.endswith("lora_magnitude_vector")]
    assert magnitudes
    base = unet_output(load_model_variant(str(tiny_victim / "pipeline")).unet)
    fused = unet_output(load_model_variant(str(tiny_victim / "pipeline"), lora_weights=str(tmp_path / "dora")).unet)
    assert (fused - base).abs().max() > 1e-5
    truncated = dict(weights)
    truncated[magnitudes[0]] = weights[magnitudes[0]][:-1]  # a magnitude vector one feature short
    (tmp_path / "bad").mkdir()
    from safetensors.torch import save_file

    save_file(truncated, str(tmp_path / "bad" / "pytorch_lora_weights.safetensors"))
    with pytest.raises(InputError, match="does not match the model: .*lora_magnitude_vector has width"):
        load_model_variant(str(tiny_victim / "pipeline"), lora_weights=str(tmp_path / "bad"))
