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
def png_bytes(size=(16, 16)):
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size, 3)).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def hostile_files(tmp_path):
    """An image folder's worth of bad files: truncated, zero-byte, and a path that does not exist."""
    good, truncated, empty = tmp_path / "good.png", tmp_path / "truncated.png", tmp_path / "empty.png"
    good.write_bytes(png_bytes())
    truncated.write_bytes(png_bytes((64, 64))[:300])
    empty.write_bytes(b"")
    return {"good": good, "truncated": truncated, "zero-byte": empty, "missing": tmp_path / "missing.png"}


@pytest.mark.parametrize("bad, reason", [("truncated", "truncated"), ("zero-byte", "cannot identify"),
                                         ("missing", "file not found")])
def test_an_image_file_that_does_not_decode_is_named_with_its_reason(hostile_files, bad, reason):
    from datasets import Dataset, Features, Image, Value

    from mixsyn_utils.dataset_io import check_images_decode

    dataset = Dataset.from_dict({"id": ["a", "b"], "image": [str(hostile_files["good"]), str(hostile_files[bad])]},
                                features=Features({"id": Value("string"), "image": Image()}))
    with pytest.raises(InputError, match=rf"^{hostile_files[bad]}: cannot decode \(.*{reason}"):
        check_images_decode(dataset, "image", "--dataset_name x")


def test_an_image_stored_in_a_dataset_that_does_not_decode_is_named_by_row_id(tmp_path):
    from datasets import Dataset, Features, Image, Value

    from mixsyn_utils.dataset_io import check_images_decode

    rows = {"id": ["ok", "cut"], "image": [{"bytes": png_bytes(), "path": None},
                                           {"bytes": png_bytes((64, 64))[:300], "path": None}]}
    Dataset.from_dict(rows, features=Features({"id": Value("string"), "image": Image()})).save_to_disk(
        str(tmp_path / "saved"))
    dataset = load_image_dataset(str(tmp_path / "saved"))
    with pytest.raises(InputError, match=r"^--dataset_name saved row id cut: cannot decode \("):
        check_images_decode(dataset, "image", "--dataset_name saved")


def test_a_saved_dataset_without_rows_is_empty_not_an_index_error(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"id": [], "image": []}).save_to_disk(str(tmp_path / "none"))
    with pytest.raises(InputError, match="none is empty"):
        load_image_dataset(str(tmp_path / "none"))


@pytest.mark.parametrize("caption, shown", [(None, "None"), ("  ", "empty")])
def test_a_none_or_empty_caption_is_named_by_column_and_row_id(caption, shown):
    from datasets import Dataset

    from mixsyn_utils.dataset_io import check_text_column

    dataset = Dataset.from_dict({"id": ["a", "b"], "prompt": ["The face of one", caption]})
    with pytest.raises(InputError, match=rf"^members row id b: column 'prompt' is {shown}$"):
        check_text_column(dataset, "prompt", "members")
