"""Shared fixtures: an offline environment, a fast tiny victim built once per session, script launchers.

The fast victim is the same builder as the embedded default (`make_tiny_victim.py`) with few steps and
few images, so it builds in seconds; only the benchmark builds the full victim.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

# No hub is reachable here or in CI: without these, every from_pretrained retries for ~46 s.
for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[variable] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

# The builder's 16-px, factor-2 architecture keeps every script's test fast; the default 32-px, factor-8 victim is
# built by the quick study (test_experiment.py) and tests/test_victim.py.
FAST_VICTIM_ARGS = [
    "--image_size", "16", "--vae_block_out_channels", "32", "64",
    "--members_per_domain", "4", "--nonmembers_per_domain", "4",
    "--vae_steps", "60", "--unet_steps", "150", "--train_batch_size", "40", "--rprecision_steps", "60", "--skip_report",
]


# The SDXL-architecture victim at the same fast size: few steps (its tests check code paths and float64 agreement,
# not the signal; benchmarks/bench_sdxl_victim.py measures the default build).
FAST_SDXL_VICTIM_ARGS = [
    "--architecture", "sdxl", "--image_size", "16", "--vae_block_out_channels", "32", "64",
    "--members_per_domain", "4", "--nonmembers_per_domain", "4",
    "--vae_steps", "30", "--unet_steps", "40", "--train_batch_size", "40", "--rprecision_steps", "30", "--skip_report",
]


def launch(script, argv, num_processes=1, port=None, env=None, timeout=600, check=True):
    """Run a repo script through `accelerate launch` (2 processes = CPU data parallel via --multi_gpu)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--num_processes", str(num_processes)]
    run_env = dict(os.environ, **(env or {}))
    if num_processes > 1:
        command += ["--multi_gpu", "--main_process_port", str(port or 29500 + os.getpid() % 1000)]
        run_env["ACCELERATE_USE_CPU"] = "1"
    command += [str(REPO_ROOT / script), *map(str, argv)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=run_env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def run_python(script, argv, env=None, timeout=600):
    """Run a repo script with plain `python` (no launcher); returns the CompletedProcess, never raises."""
    run_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *map(str, argv)], cwd=REPO_ROOT, env=run_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_victim(tmp_path_factory):
    """Path of a fast tiny victim folder (pipeline/, members/, nonmembers/, domains.json), built once."""
    import make_tiny_victim

    victim_dir = tmp_path_factory.mktemp("victim") / "victim"
    make_tiny_victim.main(make_tiny_victim.parse_args(["--output_dir", str(victim_dir), "--seed", "0", *FAST_VICTIM_ARGS]))
    return victim_dir


@pytest.fixture(scope="session")
def tiny_sdxl_victim(tmp_path_factory):
    """Path of a fast tiny SDXL-architecture victim folder (`make_tiny_victim.py --architecture sdxl`), built once."""
    import make_tiny_victim

    victim_dir = tmp_path_factory.mktemp("sdxl_victim") / "victim"
    make_tiny_victim.main(make_tiny_victim.parse_args(["--output_dir", str(victim_dir), "--seed", "0",
                                                       *FAST_SDXL_VICTIM_ARGS]))
    return victim_dir


@pytest.fixture(scope="session")
def sdxl_synthetic_dataset(tiny_sdxl_victim, tmp_path_factory):
    """A small self-synthesized dataset from the fast SDXL victim: 2 images per domain, 3 sampler steps."""
    import generate_synthetic

    output_dir = tmp_path_factory.mktemp("sdxl_synthetic") / "synthetic"
    generate_synthetic.main(generate_synthetic.parse_args([
        "--pretrained_model_name_or_path", str(tiny_sdxl_victim / "pipeline"),
        "--domains_file", str(tiny_sdxl_victim / "domains.json"), "--num_images_per_domain", "2",
        "--num_inference_steps", "3", "--sample_batch_size", "10", "--output_dir", str(output_dir),
    ]))
    return output_dir


@pytest.fixture(scope="session")
def synthetic_dataset(tiny_victim, tmp_path_factory):
    """A small self-synthesized dataset from the fast victim: 3 images per domain, 4 sampler steps."""
    import generate_synthetic

    output_dir = tmp_path_factory.mktemp("synthetic") / "synthetic"
    generate_synthetic.main(generate_synthetic.parse_args([
        "--pretrained_model_name_or_path", str(tiny_victim / "pipeline"),
        "--domains_file", str(tiny_victim / "domains.json"), "--num_images_per_domain", "3",
        "--num_inference_steps", "4", "--sample_batch_size", "8", "--output_dir", str(output_dir),
    ]))
    return output_dir


# Fixtures shared by several test files: registered once, so session fixtures run once per session.
pytest_plugins = ["attack_fixtures", "train_fixtures"]
