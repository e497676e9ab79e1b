"""train_textual_inversion_mixsyn.py: per-domain learned tokens, their files, the token map, errors."""

import shutil

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import common_argv, run_in_process

import train_textual_inversion_mixsyn as ti_script
from mixsyn_utils.cli import InputError
from mixsyn_utils.placeholders import load_token_map, rewrite_caption


@pytest.fixture(scope="module")
def argv(tiny_victim, synthetic_dataset, perturbed_dataset):
    def make(output_dir, **overrides):
        overrides.setdefault("learning_rate", 5e-2)
        overrides.setdefault("repeats", 1)
        return common_argv(tiny_victim, synthetic_dataset, perturbed_dataset, output_dir, **overrides)
    return make


@pytest.fixture(scope="module")
def two_vector_run(argv, tmp_path_factory):
    """6 updates of batch 8, 2 vectors per domain, a checkpoint at update 4."""
    output_dir = tmp_path_factory.mktemp("ti") / "out"
    # batch 8 × 4 updates > 30 images: every domain's token gets gradients
    run_in_process(ti_script, argv(output_dir, max_train_steps=6, checkpointing_steps=4, num_vectors=2,
                                   train_batch_size=8))
    return output_dir


def test_token_map_lists_every_domain_with_its_placeholder_and_file(two_vector_run, synthetic_dataset):
    from datasets import load_from_disk

    domains = set(load_from_disk(str(synthetic_dataset))["domain"])
    token_map = load_token_map(two_vector_run)
    assert set(token_map) == domains
    for domain, entry in token_map.items():
        assert entry == {"placeholder": f"<{domain}>", "file": f"learned_embeds-{domain}.safetensors",
                         "num_vectors": 2}
        assert list(load_file(str(two_vector_run / entry["file"]))) == [f"<{domain}>"]


def test_learned_tokens_load_with_the_documented_loop_and_reproduce_training_captions(two_vector_run, tiny_victim):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(str(tiny_victim / "pipeline"), safety_checker=None)
    token_map = load_token_map(two_vector_run)
    for entry in token_map.values():  # the loop the README and the model card show
        pipeline.load_textual_inversion(str(two_vector_run), weight_name=entry["file"])
    caption = rewrite_caption("The face of three", "three", token_map)
    # What the pipeline makes of the bare placeholder is exactly the caption the token trained with.
    assert pipeline.maybe_convert_prompt("The face of <three>", pipeline.tokenizer) == caption
    ids = pipeline.tokenizer(caption).input_ids
    learned = load_file(str(two_vector_run / "learned_embeds-three.safetensors"))["<three>"]
    placeholder_ids = pipeline.tokenizer.convert_tokens_to_ids(["<three>", "<three>_1"])
    assert ids[4:6] == placeholder_ids
    assert torch.equal(pipeline.text_encoder.get_input_embeddings().weight[placeholder_ids].detach(), learned)
    image = pipeline("The face of <three>", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (16, 16, 3)


def test_only_placeholder_rows_train(two_vector_run, tiny_victim):
    from transformers import CLIPTextModel, CLIPTokenizer

    base = CLIPTextModel.from_pretrained(str(tiny_victim / "pipeline"), subfolder="text_encoder")
    trained = CLIPTextModel.from_pretrained(str(two_vector_run / "checkpoint-4" / "text_encoder"))
    base_rows = base.get_input_embeddings().weight.detach()
    trained_rows = trained.get_input_embeddings().weight.detach()
    assert torch.equal(trained_rows[: len(base_rows)], base_rows)
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_victim / "pipeline"), subfolder="tokenizer")
    initial = base_rows[tokenizer.encode("three", add_special_tokens=False)].mean(0)
    learned = load_file(str(two_vector_run / "learned_embeds-three.safetensors"))["<three>"]
    assert (learned - initial).abs().max() > 1e-4


def test_resume_from_a_copied_checkpoint_ends_with_the_uninterrupted_embeddings(two_vector_run, argv, tmp_path,
                                                                                 tiny_victim):
    from transformers import CLIPTextModel

    # The state a run killed right after checkpoint-4 leaves behind, moved outside its output folder.
    saved_state = tmp_path / "elsewhere" / "state-after-update-4"
    shutil.copytree(two_vector_run / "checkpoint-4", saved_state)
    run_in_process(ti_script, argv(tmp_path / "resumed", max_train_steps=6, checkpointing_steps=4, num_vectors=2,
                                   train_batch_size=8, resume_from_checkpoint=saved_state))
    token_map = load_token_map(two_vector_run)
    resumed = torch.cat([load_file(str(tmp_path / "resumed" / e["file"]))[e["placeholder"]] for e in token_map.values()])
    reference = torch.cat([load_file(str(two_vector_run / e["file"]))[e["placeholder"]] for e in token_map.values()])
    assert (resumed.double() - reference.double()).abs().max() <= 1e-6
    base_rows = CLIPTextModel.from_pretrained(str(tiny_victim / "pipeline"), subfolder="text_encoder").config.vocab_size
    at_update_4 = CLIPTextModel.from_pretrained(str(saved_state / "text_encoder")).get_input_embeddings().weight
    placeholder_rows_at_4 = at_update_4[base_rows:].detach()
    assert len(placeholder_rows_at_4) == len(resumed)
    # updates 5 and 6 did train: some learned vector is none of the update-4 vectors
    distance_to_update_4 = (resumed[:, None, :] - placeholder_rows_at_4[None]).abs().amax(-1).amin(-1)
    assert distance_to_update_4.max() > 1e-4


@pytest.fixture(scope="module")
def ada_lovelace_run(argv, tmp_path_factory, synthetic_dataset):
    """Upstream's single-concept input with a capitalised, two-word domain and 2 vectors per token."""
    from datasets import load_from_disk

    work_dir = tmp_path_factory.mktemp("ti_instance")
    instance_dir = work_dir / "ada"
    instance_dir.mkdir()
    for row in load_from_disk(str(synthetic_dataset)).filter(lambda row: row["domain"] == "three"):
        row["image"].save(instance_dir / f"{row['id']}.png")
    (instance_dir / "notes.txt").write_text("not an image")  # skipped, as upstream does
    run_in_process(ti_script, argv(work_dir / "out", dataset_name=None, instance_data_dir=instance_dir,
                                   instance_prompt="The face of Ada Lovelace", instance_domain="Ada Lovelace",
                                   perturbed_dataset_name=None, mixup_ratio=0, max_train_steps=2, num_vectors=2))
    return work_dir / "out"


def test_single_concept_is_one_learned_embeds_file_with_a_lower_case_token(ada_lovelace_run):
    assert load_token_map(ada_lovelace_run) == {
        "Ada Lovelace": {"placeholder": "<ada-lovelace>", "file": "learned_embeds.safetensors", "num_vectors": 2}}
    assert [p.name for p in ada_lovelace_run.glob("*.safetensors")] == ["learned_embeds.safetensors"]
    assert list(load_file(str(ada_lovelace_run / "learned_embeds.safetensors"))) == ["<ada-lovelace>"]


def test_pipeline_prompt_uses_every_vector_of_a_capitalised_domain(ada_lovelace_run, tiny_victim, monkeypatch):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(str(tiny_victim / "pipeline"), safety_checker=None)
    pipeline.load_textual_inversion(str(ada_lovelace_run))  # upstream's call: finds learned_embeds.safetensors
    placeholder_ids = pipeline.tokenizer.convert_tokens_to_ids(["<ada-lovelace>", "<ada-lovelace>_1"])
    prompt = rewrite_caption("The face of Ada Lovelace", "Ada Lovelace", load_token_map(ada_lovelace_run),
                             for_pipeline=True)
    encoded = []
    original_forward = pipeline.text_encoder.forward
    monkeypatch.setattr(pipeline.text_encoder, "forward",
                        lambda input_ids, **kwargs: encoded.append(input_ids) or original_forward(input_ids, **kwargs))
    pipeline(prompt, num_inference_steps=2, guidance_scale=1.0, output_type="np")
    assert prompt == "The face of <ada-lovelace>"
    assert set(placeholder_ids) <= set(encoded[0][0].tolist())


@pytest.mark.parametrize("flags, message", [
    ({}, "--instance_domain is required"),
    ({"instance_domain": "seven"}, "no caption of domain 'seven' contains its name"),
])
def test_instance_folder_needs_a_domain_named_in_the_prompt(argv, tmp_path, flags, message):
    (tmp_path / "images").mkdir()
    with pytest.raises(InputError, match=message):
        ti_script.parse_args([str(a) for a in argv(tmp_path / "out", dataset_name=None, perturbed_dataset_name=None,
                                                   mixup_ratio=0, instance_data_dir=tmp_path / "images",
                                                   instance_prompt="The face of three", **flags)])


def test_dataset_domain_never_named_in_its_captions_is_an_error(argv, tmp_path, synthetic_dataset):
    from datasets import load_from_disk

    renamed = tmp_path / "renamed"
    dataset = load_from_disk(str(synthetic_dataset))
    dataset.map(lambda row: {"domain": "ada" if row["domain"] == "three" else row["domain"]}).save_to_disk(str(renamed))
    with pytest.raises(InputError, match="no caption of domain 'ada' contains its name"):
        run_in_process(ti_script, argv(tmp_path / "out", dataset_name=renamed, perturbed_dataset_name=None,
                                       mixup_ratio=0, max_train_steps=1))


def test_placeholder_already_in_vocabulary_is_an_error(argv, tmp_path):
    with pytest.raises(InputError, match="already in the tokenizer's vocabulary"):
        run_in_process(ti_script, argv(tmp_path / "out", placeholder_token_template="{domain}"))


def test_mixed_precision_defaults_to_the_accelerate_config(argv, tmp_path, monkeypatch):
    args = ti_script.parse_args([str(a) for a in argv(tmp_path / "out")])
    assert args.mixed_precision is None  # upstream textual_inversion.py defaulted to "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    used, accelerator_class = [], ti_script.Accelerator

    def recording_accelerator(**kwargs):
        accelerator = accelerator_class(**kwargs)
        used.append(accelerator.mixed_precision)
        return accelerator

    monkeypatch.setattr(ti_script, "Accelerator", recording_accelerator)
    run_in_process(ti_script, argv(tmp_path / "out", max_train_steps=1))
    assert used == ["bf16"]


def test_bf16_validation_runs_and_its_images_go_into_the_card(argv, tmp_path):
    run_in_process(ti_script, argv(tmp_path / "out", mixed_precision="bf16", max_train_steps=1,
                                   validation_prompt="The face of <three>", num_validation_images=1))
    assert (tmp_path / "out" / "image_0.png").is_file()
    assert "![img_0](./image_0.png)" in (tmp_path / "out" / "README.md").read_text()


@pytest.fixture(scope="module")
def tokenizer(tiny_victim):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(tiny_victim / "pipeline"), subfolder="tokenizer")


def test_captions_over_the_token_limit_are_counted_in_one_warning(tokenizer, caplog):
    from mixsyn_utils.models import warn_truncated_captions

    long_caption = "A photo of " + "very " * 80 + "three"
    captions = [long_caption, long_caption, "The face of three", "A photo of " + "tall " * 90 + "one"]
    with caplog.at_level("WARNING"):
        assert warn_truncated_captions(tokenizer, captions, "training captions") == 2
    warnings = [record.message for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("2 of 3 distinct training captions exceed the tokenizer's 77")


def test_a_placeholder_past_the_token_limit_is_refused_naming_the_row(tokenizer):
    token_map = {"three": {"placeholder": "<three>", "num_vectors": 1}}
    tokenizer.add_tokens(["<three>"])
    token_map["three"]["token_ids"] = tokenizer.convert_tokens_to_ids(["<three>"])
    fits = rewrite_caption("A photo of " + "very " * 60 + "three", "three", token_map)
    cut = rewrite_caption("A photo of " + "very " * 80 + "three", "three", token_map)
    ti_script.check_placeholders_within_limit(tokenizer, [fits], token_map, ["row id a"])
    with pytest.raises(InputError, match=r"^row id b: its placeholder lands at token 84, past the tokenizer's 77"):
        ti_script.check_placeholders_within_limit(tokenizer, [fits, cut], token_map, ["row id a", "row id b"])
