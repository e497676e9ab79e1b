"""Issue 2: the shared module, the embedded tiny victim and self-synthesis (generate_synthetic.py)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT, launch, run_python

import make_tiny_victim
from mixsyn_utils import InputError, load_components, load_domains, load_image_dataset, save_dataset, tokenize_prompts


# ---------------------------------------------------------------- tokenizer and pipeline round trip

def test_offline_tokenizer_matches_clip_bpe(tmp_path):
    tokenizer = make_tiny_victim.write_clip_tokenizer(tmp_path)
    ids = tokenizer("The face of seven").input_ids
    # CLIP ViT-L/14 ids: <|startoftext|>=49406, "the</w>"=518, "face</w>"=1710, "of</w>"=539, "seven</w>"=5757, eos=49407
    assert ids == [49406, 518, 1710, 539, 5757, 49407]
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77


def test_victim_pipeline_round_trip(tiny_victim):
    from diffusers import StableDiffusionPipeline

    components = load_components(str(tiny_victim / "pipeline"))
    assert components.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert components.noise_scheduler.config.num_train_timesteps == 1000
    assert np.isclose(float(components.noise_scheduler.betas[0]), 0.00085) and np.isclose(float(components.noise_scheduler.betas[-1]), 0.012)
    assert components.unet.config.cross_attention_dim == components.text_encoder.config.hidden_size
    ids = tokenize_prompts(components.tokenizer, ["The face of three"])
    assert ids.shape == (1, 77)
    pipeline = StableDiffusionPipeline.from_pretrained(str(tiny_victim / "pipeline"), safety_checker=None)
    image = pipeline("The face of three", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                     height=16, width=16).images[0]
    assert image.size == (16, 16)


def test_victim_splits_are_disjoint_and_stratified(tiny_victim):
    members = load_image_dataset(str(tiny_victim / "members"), required_columns=("id", "image", "prompt", "domain"))
    nonmembers = load_image_dataset(str(tiny_victim / "nonmembers"), required_columns=("id", "image", "prompt", "domain"))
    assert not set(members["id"]) & set(nonmembers["id"])
    domains = json.loads((tiny_victim / "domains.json").read_text())["domains"]
    assert len(domains) == 10
    for split in (members, nonmembers):
        counts = {d: split["domain"].count(d) for d in domains}
        assert set(counts.values()) == {4}
        assert split[0]["image"].size == (16, 16)
        assert all(domain in prompt for domain, prompt in zip(split["domain"], split["prompt"]))


def test_victim_build_is_deterministic(tmp_path):
    argv = ["--members_per_domain", "2", "--nonmembers_per_domain", "2", "--vae_steps", "3", "--unet_steps", "3",
            "--train_batch_size", "8", "--rprecision_steps", "2", "--skip_report"]
    for name in ("a", "b"):
        make_tiny_victim.main(make_tiny_victim.parse_args(["--output_dir", str(tmp_path / name), "--seed", "5", *argv]))
    make_tiny_victim.main(make_tiny_victim.parse_args(["--output_dir", str(tmp_path / "c"), "--seed", "6", *argv]))
    for module in ("unet", "vae"):
        weights = [load_file(str(tmp_path / name / "pipeline" / module / "diffusion_pytorch_model.safetensors"))
                   for name in ("a", "b", "c")]
        assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
        assert not all(torch.equal(weights[0][key], weights[2][key]) for key in weights[0])


# ---------------------------------------------------------------- shared data helpers

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


# ---------------------------------------------------------------- generate_synthetic.py

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
    from mixsyn_utils import PAPER_PROMPT_TEMPLATES, draw_prompt

    drawn = [draw_prompt("x", PAPER_PROMPT_TEMPLATES, 0, i) for i in range(4000)]
    assert abs(drawn.count("The face of x") / 4000 - 0.7) < 0.03


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
