"""A user copies one script into their own project and `pip install`s the helper package: the copied training and
attack scripts run against the tiny victim with `mixsyn_utils` from the installed package, not from this repo."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def installed_package(tmp_path_factory):
    """`pip install` of the package sources copied out of the repo (so the repo holds no build files afterwards),
    into a folder used as PYTHONPATH; build isolation off, so nothing is downloaded."""
    root = tmp_path_factory.mktemp("package")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    shutil.copytree(REPO_ROOT / "mixsyn_utils", source / "mixsyn_utils",
                    ignore=shutil.ignore_patterns("__pycache__"))
    site = root / "site"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                             "--no-index", "--target", str(site), str(source)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return site


def run_copied(script, argv, project, site):
    """`accelerate launch` of a copied script from its own folder, with only the installed package importable."""
    env = dict(os.environ, PYTHONPATH=str(site))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(project / script), *map(str, argv)]
    return subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=600)


def test_copied_training_and_attack_scripts_run_with_the_installed_package(installed_package, tmp_path, tiny_victim,
                                                                           synthetic_dataset):
    project = tmp_path / "my_project"
    project.mkdir()
    for script in ("train_lora_mixsyn.py", "attack_loss.py"):
        shutil.copy(REPO_ROOT / script, project / script)
    where = subprocess.run([sys.executable, "-c", "import mixsyn_utils; print(mixsyn_utils.__file__)"], cwd=project,
                           env=dict(os.environ, PYTHONPATH=str(installed_package)), capture_output=True, text=True)
    assert Path(where.stdout.strip()).is_relative_to(installed_package), where.stdout + where.stderr

    trained = run_copied("train_lora_mixsyn.py", [
        "--pretrained_model_name_or_path", tiny_victim / "pipeline", "--dataset_name", synthetic_dataset,
        "--output_dir", tmp_path / "lora", "--max_train_steps", 1, "--train_batch_size", 2, "--seed", 0,
        "--report_to", "tensorboard"], project, installed_package)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()

    attacked = run_copied("attack_loss.py", [
        "--pretrained_model_name_or_path", tiny_victim / "pipeline", "--lora_weights", tmp_path / "lora",
        "--member_dataset", tiny_victim / "members", "--nonmember_dataset", tiny_victim / "nonmembers",
        "--output_dir", tmp_path / "scores"], project, installed_package)
    assert attacked.returncode == 0, attacked.stderr[-3000:]
    assert (tmp_path / "scores" / "dataset_info.json").is_file()
    assert not any(path.name.endswith(".egg-info") or path.name == "build" for path in REPO_ROOT.iterdir())
