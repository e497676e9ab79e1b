"""Datasets in and out (dataset_io.py) and private domains (domains.py)."""

import json

import pytest

from mixsyn_utils.cli import InputError
from mixsyn_utils.dataset_io import load_image_dataset, save_dataset
from mixsyn_utils.domains import PAPER_PROMPT_TEMPLATES, draw_prompt, load_domains


def test_load_image_dataset_reads_imagefolder_with_captions(tmp_path):
    from PIL import Image

    for index in range(2):
        Image.new("L", (10, 12), color=index * 100).save(tmp_path / f"img{index}.png")
    (tmp_path / "metadata.jsonl").write_text(
        "\n".join(json.dumps({"file_name": f"img{i}.png", "prompt": f"A photo of {i}"}) for i in range(2)))
    dataset = load_image_dataset(str(tmp_path), required_columns=("image", "prompt"))
    assert sorted(dataset["prompt"]) == ["A photo of 0", "A photo of 1"]


def test_load_image_dataset_names_the_missing_column(tiny_victim):
    with pytest.raises(InputError, match=r"members has no column 'caption'"):
        load_image_dataset(str(tiny_victim / "members"), required_columns=("image", "caption"))


def test_load_image_dataset_rejects_missing_and_empty(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_image_dataset(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="is empty"):
        load_image_dataset(str(tmp_path / "empty"))


def test_save_dataset_failed_push_keeps_local_copy(tmp_path, capsys):
    from datasets import Dataset

    output_dir = tmp_path / "out"
    pushed = save_dataset(Dataset.from_dict({"x": [1, 2]}), output_dir, push_to_hub=True, hub_dataset_id="me/x")
    assert pushed is False
    assert "local copy" in capsys.readouterr().out
    assert (output_dir / "dataset_info.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_load_domains_formats(tmp_path):
    (tmp_path / "d.txt").write_text("alice\nbob\n")
    names, templates = load_domains(str(tmp_path / "d.txt"))
    assert names == ["alice", "bob"] and templates[0] == ("The face of {}", 0.7)
    (tmp_path / "d.yaml").write_text("- alice")
    with pytest.raises(InputError, match=r"unknown format '.yaml'"):
        load_domains(str(tmp_path / "d.yaml"))


def test_prompt_templates_are_drawn_with_their_probabilities():
    drawn = [draw_prompt("x", PAPER_PROMPT_TEMPLATES, 0, i) for i in range(4000)]
    assert abs(drawn.count("The face of x") / 4000 - 0.7) < 0.03


def test_provenance_survives_a_push_in_the_hubs_parquet_layout(tmp_path, monkeypatch):
    """A pushed dataset loses its info's description; the provenance.json pushed beside it brings it back."""
    import datasets
    import huggingface_hub
    from PIL import Image

    from mixsyn_utils.dataset_io import read_provenance, with_provenance

    hub_repo = tmp_path / "hub" / "me" / "perturbed"  # what a clone of the Hub repo holds after the push

    def push_to_hub(dataset, repo_id, **kwargs):  # the Hub's layout: parquet shards under data/
        dataset.to_parquet(str(hub_repo / "data" / "train-00000-of-00001.parquet"))

    def upload_file(self, path_or_fileobj, path_in_repo, repo_id, **kwargs):
        (hub_repo / path_in_repo).write_bytes(path_or_fileobj)

    monkeypatch.setattr(datasets.Dataset, "push_to_hub", push_to_hub)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: huggingface_hub.RepoUrl(
        f"https://huggingface.co/datasets/{repo_id}"))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_file", upload_file)
    record = json.dumps({"script": "perturb_antidreambooth.py", "flags": {"pgd_eps": 0.05, "pgd_alpha": 0.005}})
    dataset = datasets.Dataset.from_dict({"id": ["a", "b"], "image": [Image.new("RGB", (4, 4))] * 2},
                                         features=datasets.Features({"id": datasets.Value("string"),
                                                                     "image": datasets.Image()}))
    assert save_dataset(with_provenance(dataset, record), tmp_path / "local", push_to_hub=True,
                        hub_dataset_id="me/perturbed")
    pushed = load_image_dataset(str(hub_repo))
    assert pushed["id"] == ["a", "b"] and read_provenance(pushed) == json.loads(record)
    (hub_repo / "provenance.json").unlink()
    assert read_provenance(load_image_dataset(str(hub_repo))) == {}  # the parquet files alone do not keep it
