"""The publish path: attack scores record the sha256 of the weights they attacked, and `evaluate.py --write_card`
attaches privacy numbers to a trained folder's card (and pushes it) only when they were measured on its weights."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file
from train_fixtures import common_argv, run_in_process

import evaluate
import train_lora_mixsyn as lora_script
from mixsyn_utils.attacks import AttackedModel, model_record
from mixsyn_utils.cli import InputError
from mixsyn_utils.dataset_io import read_provenance
from mixsyn_utils.resumable import weights_digest
from mixsyn_utils.scores import write_scores

LORA_FILE = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def lora_folder(tiny_victim, synthetic_dataset, perturbed_dataset, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("card") / "mixsyn-lora"
    run_in_process(lora_script, common_argv(tiny_victim, synthetic_dataset, perturbed_dataset, output_dir,
                                            max_train_steps=1))
    return output_dir


def attack_scores(tiny_victim, lora_weights, output_dir):
    """A scores dataset as the attack scripts write it (`write_scores`), for a LoRA at `lora_weights`."""
    from datasets import Dataset

    rng = np.random.default_rng(0)
    is_member = [True] * 20 + [False] * 20
    scores = Dataset.from_dict({"id": [f"img-{i}" for i in range(40)], "domain": ["three"] * 40,
                                "is_member": is_member, "score": rng.normal(size=40) - 0.5 * np.array(is_member)})
    model = AttackedModel(str(tiny_victim / "pipeline"), lora_weights=str(lora_weights))
    write_scores(scores, output_dir, script="attack_pia.py", attack="pia", flags={}, model=model_record(model))
    return output_dir


def other_weights(lora_folder, tmp_path):
    """A copy of the folder whose LoRA weights differ in one value."""
    other = tmp_path / "other-lora"
    shutil.copytree(lora_folder, other)
    state = load_file(str(other / LORA_FILE))
    first = next(iter(state))
    state[first] = state[first] + 1e-3
    save_file(state, str(other / LORA_FILE))
    return other


def test_attack_scores_record_the_sha256_of_the_weights_they_attacked(lora_folder, tiny_victim, tmp_path):
    from datasets import load_from_disk

    scores = load_from_disk(str(attack_scores(tiny_victim, lora_folder, tmp_path / "pia")))
    digest = weights_digest(lora_folder)
    assert read_provenance(scores)["model"]["weights_sha256"] == {
        "pretrained_model_name_or_path": weights_digest(tiny_victim / "pipeline"), "lora_weights": digest}
    assert weights_digest(lora_folder / LORA_FILE) == digest  # the file alone names the same weights


def test_write_card_attaches_privacy_of_these_weights_and_pushes_the_card(lora_folder, tiny_victim, tmp_path,
                                                                          monkeypatch):
    import huggingface_hub

    uploaded = {}

    def upload_folder(**kwargs):
        uploaded.update(kwargs, card=(Path(kwargs["folder_path"]) / "README.md").read_text())

    monkeypatch.setattr(huggingface_hub, "create_repo",
                        lambda repo_id, **kw: huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    scores = attack_scores(tiny_victim, lora_folder, tmp_path / "pia")
    evaluate.main(evaluate.parse_args(["--scores", str(scores), "--output_dir", str(tmp_path / "eval"),
                                       "--bootstrap", "20", "--write_card", str(lora_folder), "--push_to_hub",
                                       "--hub_model_id", "me/mixsyn-lora"]))
    card = (lora_folder / "README.md").read_text()
    assert "| pia (worst case) | pia |" in card and f"`{weights_digest(lora_folder)}`" in card
    assert uploaded["repo_id"] == "me/mixsyn-lora" and uploaded["card"] == card
    assert 'pipe.load_lora_weights("me/mixsyn-lora")' in card


def test_write_card_refuses_scores_measured_on_other_weights(lora_folder, tiny_victim, tmp_path):
    scores = attack_scores(tiny_victim, other_weights(lora_folder, tmp_path), tmp_path / "pia")
    card_before = (lora_folder / "README.md").read_text()
    with pytest.raises(InputError, match="--write_card: the scores 'pia' were measured on other weights"):
        evaluate.main(evaluate.parse_args(["--scores", str(scores), "--output_dir", str(tmp_path / "eval"),
                                           "--bootstrap", "20", "--write_card", str(lora_folder)]))
    assert (lora_folder / "README.md").read_text() == card_before
