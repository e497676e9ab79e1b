"""ResumableWork and the run signature (resumable.py), without a model: units are tiny datasets."""

from argparse import Namespace

import datasets
import pytest

from mixsyn_utils.cli import InputError
from mixsyn_utils.resumable import OUTPUT_FLAGS, ResumableWork, run_signature


def unit_dataset(unit):
    return datasets.Dataset.from_dict({"unit": [unit, unit], "value": [unit * 10, unit * 10 + 1]})


def signature(**flags):
    return run_signature(Namespace(**dict({"seed": 0, "output_dir": "out", "batch_size": 4}, **flags)))


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
    first = run_signature(Namespace(seed=0), inputs={"member_dataset": "abc"})
    ResumableWork(tmp_path / "out", first).run(2, unit_dataset)
    changed = run_signature(Namespace(seed=0), inputs={"member_dataset": "abd"})
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
