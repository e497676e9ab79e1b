"""ResumableWork, the run signature and input fingerprints (resumable.py), without a model: units are tiny datasets."""

import hashlib
import shutil

import datasets
import pytest

from mixsyn_utils.cli import InputError
from mixsyn_utils.resumable import OUTPUT_FLAGS, ResumableWork, input_fingerprint, run_signature


def unit_dataset(unit):
    return datasets.Dataset.from_dict({"unit": [unit, unit], "value": [unit * 10, unit * 10 + 1]})


def signature(**flags):
    return run_signature(dict({"seed": 0, "output_dir": "out", "batch_size": 4}, **flags))


def test_units_are_gathered_in_unit_order_and_cleaned_up(tmp_path):
    work = ResumableWork(tmp_path / "out", signature())
    gathered = work.run(3, unit_dataset)
    assert gathered["unit"] == [0, 0, 1, 1, 2, 2]
    assert (tmp_path / "out.partial").is_dir()
    work.cleanup()
    assert not (tmp_path / "out.partial").exists()


def test_killed_run_computes_only_the_missing_units(tmp_path):
    computed = []

    def dies_at_unit_2(unit):
        if unit == 2:
            raise KeyboardInterrupt("killed")
        computed.append(unit)
        return unit_dataset(unit)

    with pytest.raises(KeyboardInterrupt):
        ResumableWork(tmp_path / "out", signature()).run(4, dies_at_unit_2)
    computed.clear()
    gathered = ResumableWork(tmp_path / "out", signature()).run(4, lambda u: computed.append(u) or unit_dataset(u))
    assert computed == [2, 3] and gathered["unit"] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_resume_with_another_flag_is_refused_naming_it(tmp_path):
    ResumableWork(tmp_path / "out", signature()).run(2, unit_dataset)
    with pytest.raises(InputError, match=r"2 finished unit\(s\).*other --batch_size, --seed"):
        ResumableWork(tmp_path / "out", signature(seed=1, batch_size=8)).run(2, unit_dataset)


def test_resume_with_another_input_fingerprint_is_refused(tmp_path):
    first = run_signature({"seed": 0}, inputs={"member_dataset": "abc"})
    ResumableWork(tmp_path / "out", first).run(2, unit_dataset)
    changed = run_signature({"seed": 0}, inputs={"member_dataset": "abd"})
    with pytest.raises(InputError, match="other member_dataset"):
        ResumableWork(tmp_path / "out", changed).run(2, unit_dataset)


def test_other_settings_are_discarded_with_overwrite(tmp_path):
    ResumableWork(tmp_path / "out", signature()).run(2, unit_dataset)
    computed = []
    ResumableWork(tmp_path / "out", signature(seed=1), discard_other_settings=True).run(
        2, lambda u: computed.append(u) or unit_dataset(u))
    assert computed == [0, 1]


def test_output_flags_may_change_on_resume(tmp_path):
    ResumableWork(tmp_path / "out", signature()).run(2, unit_dataset)
    computed = []
    ResumableWork(tmp_path / "out", signature(output_dir="elsewhere", overwrite=True, hub_token="t")).run(
        2, lambda u: computed.append(u) or unit_dataset(u))
    assert computed == [] and {"output_dir", "overwrite", "hub_token"} <= OUTPUT_FLAGS


def test_a_run_that_fails_before_its_first_unit_leaves_nothing(tmp_path):
    def fails(unit):
        raise RuntimeError("bad input found late")

    with pytest.raises(RuntimeError):
        ResumableWork(tmp_path / "out", signature()).run(2, fails)
    assert not (tmp_path / "out.partial").exists()
    # ... so a corrected rerun with other flags is not blocked.
    assert ResumableWork(tmp_path / "out", signature(seed=3)).run(1, unit_dataset)["unit"] == [0, 0]


def save_rows(path, values):
    datasets.Dataset.from_dict({"id": [f"row-{v}" for v in values], "value": values}).save_to_disk(str(path))
    return path


def test_a_dataset_replaced_at_the_same_path_is_refused_on_resume(tmp_path):
    members = save_rows(tmp_path / "members", list(range(40)))
    first = run_signature({"seed": 0}, inputs={"member_dataset": input_fingerprint(members)})

    def killed_after_unit_0(unit):
        if unit == 1:
            raise KeyboardInterrupt("killed")
        return unit_dataset(unit)

    with pytest.raises(KeyboardInterrupt):
        ResumableWork(tmp_path / "out", first).run(4, killed_after_unit_0)
    shutil.rmtree(members)
    save_rows(members, list(range(100, 140)))  # same path, other rows
    replaced = run_signature({"seed": 0}, inputs={"member_dataset": input_fingerprint(members)})
    with pytest.raises(InputError, match=r"1 finished unit\(s\) of a killed run with other member_dataset"):
        ResumableWork(tmp_path / "out", replaced).run(4, unit_dataset)


def test_folder_fingerprint_follows_content_not_checkpoints_logs_or_card(tmp_path):
    model = tmp_path / "lora"
    model.mkdir()
    (model / "pytorch_lora_weights.safetensors").write_bytes(b"weights v1")
    before = input_fingerprint(model)
    (model / "checkpoint-2").mkdir()
    (model / "checkpoint-2" / "optimizer.bin").write_bytes(b"state")
    (model / "logs").mkdir()
    (model / "README.md").write_text("card with a privacy report")
    assert input_fingerprint(model) == before
    (model / "pytorch_lora_weights.safetensors").write_bytes(b"weights v2")
    assert input_fingerprint(model) != before
    assert input_fingerprint(model / "pytorch_lora_weights.safetensors") == \
        hashlib.sha256(b"weights v2").hexdigest()


def test_file_contents_are_hashed_once_per_process(tmp_path, monkeypatch):
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"x" * 1000)
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    assert input_fingerprint(weights) == input_fingerprint(weights)
    assert opened == [weights]


def test_a_hub_id_that_is_not_cached_is_fingerprinted_by_id_and_revision():
    assert input_fingerprint("someone/not-cached-model", revision="abc") == "someone/not-cached-model@abc"
    assert input_fingerprint(None) is None
