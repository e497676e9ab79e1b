"""Self-synthesis (generate_synthetic.py): prompts, one vs two processes, resume after SIGKILL, bad input."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT, launch, run_python
from mixsyn_utils.dataset_io import load_image_dataset


def _generate_argv(victim, output_dir, images_per_domain=2, batch_size=4):
    return ["--pretrained_model_name_or_path", str(victim / "pipeline"), "--domains_file", str(victim / "domains.json"),
            "--num_images_per_domain", str(images_per_domain), "--num_inference_steps", "3",
            "--sample_batch_size", str(batch_size), "--output_dir", str(output_dir)]


def _images_by_id(path):
    dataset = load_image_dataset(str(path), required_columns=("id", "image", "prompt", "domain", "seed"))
    return {row["id"]: (np.asarray(row["image"]), row["prompt"], row["seed"]) for row in dataset}


def test_synthetic_prompts_follow_template_probabilities(synthetic_dataset):
    dataset = load_image_dataset(str(synthetic_dataset), required_columns=("prompt", "domain", "seed"))
    assert len(dataset) == 30 and len(set(dataset["id"])) == 30
    assert all(p in (f"The face of {d}", f"A photo of {d}") for p, d in zip(dataset["prompt"], dataset["domain"]))


def test_generate_one_and_two_processes_identical(tiny_victim, tmp_path):
    single_thread = {"OMP_NUM_THREADS": "1"}
    launch("generate_synthetic.py", _generate_argv(tiny_victim, tmp_path / "one"), env=single_thread)
    launch("generate_synthetic.py", _generate_argv(tiny_victim, tmp_path / "two"), num_processes=2, port=29611,
           env=single_thread)
    one, two = _images_by_id(tmp_path / "one"), _images_by_id(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) == 20
    for image_id in one:
        assert np.array_equal(one[image_id][0], two[image_id][0]) and one[image_id][1:] == two[image_id][1:]


def test_generate_resumes_after_kill(tiny_victim, tmp_path):
    argv = _generate_argv(tiny_victim, tmp_path / "resumed", images_per_domain=4, batch_size=2)
    partial_dir = Path(f"{tmp_path / 'resumed'}.partial")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "generate_synthetic.py"), *argv], cwd=REPO_ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(partial_dir.glob("unit-*"))) < 3:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before_resume = len(list(partial_dir.glob("unit-*")))
    assert 3 <= done_before_resume < 20, "the run must be killed mid-way"
    assert not (tmp_path / "resumed").exists()
    result = run_python("generate_synthetic.py", argv, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"({done_before_resume} already done)" in result.stderr + result.stdout
    run_python("generate_synthetic.py", _generate_argv(tiny_victim, tmp_path / "fresh", 4, 2), env={"OMP_NUM_THREADS": "1"})
    resumed, fresh = _images_by_id(tmp_path / "resumed"), _images_by_id(tmp_path / "fresh")
    assert resumed.keys() == fresh.keys()
    assert all(np.array_equal(resumed[k][0], fresh[k][0]) for k in fresh)
    assert not partial_dir.exists()


@pytest.mark.parametrize("change, message", [
    ({"--num_images_per_domain": "0"}, "--num_images_per_domain must be positive, got 0"),
    ({"--resolution": "20"}, "--resolution must be a positive multiple of 8, got 20"),
    ({"--domains_file": "{tmp}/domains.yaml"}, "unknown format '.yaml'"),
    ({"--domains_file": "{tmp}/missing.json"}, "missing.json does not exist"),
])
def test_generate_bad_input_is_one_line_error(tiny_victim, tmp_path, change, message):
    (tmp_path / "domains.yaml").write_text("- zero\n")
    argv = _generate_argv(tiny_victim, tmp_path / "out")
    for flag, value in change.items():
        if flag not in argv:
            argv.append(flag)
            argv.append("")
        argv[argv.index(flag) + 1] = value.format(tmp=tmp_path)
    result = run_python("generate_synthetic.py", argv)
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and message in last_line and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() and not Path(f"{tmp_path / 'out'}.partial").exists()


def test_generate_refuses_non_empty_output_dir(tiny_victim, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    result = run_python("generate_synthetic.py", _generate_argv(tiny_victim, tmp_path / "out"))
    assert result.returncode == 2 and "exists and is not empty (pass --overwrite" in result.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "user data"
