"""Specification of the Anti-DreamBooth perturbation (`perturb_antidreambooth.py`, `mixsyn_utils.adversarial`)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, load_from_disk
from PIL import Image

from conftest import REPO_ROOT, launch, run_python
from mixsyn_utils.adversarial import (
    diffusion_prediction,
    pgd_attack,
    pgd_step,
    quantize_within_budget,
    train_surrogate,
)
from mixsyn_utils.class_images import ensure_class_images
from mixsyn_utils.cli import InputError
from mixsyn_utils.images import image_to_tensor, resize_and_crop

PGD_EPS = 0.05
RESOLUTION = 16
CLASS_PROMPT = "A photo of a number"
# Same thread count in every process: 1 and 2 processes must agree bit for bit.
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def clean_subset(synthetic_dataset, tmp_path_factory):
    """Three domains of the synthetic set (9 images): three groups, so sharding and resume have work to split."""
    dataset = load_from_disk(str(synthetic_dataset))
    subset = dataset.filter(lambda row: row["domain"] in ("zero", "one", "two"))
    path = tmp_path_factory.mktemp("clean") / "clean"
    subset.save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("perturb")


def aspl_argv(tiny_victim, clean_subset, work_dir, output_name):
    return [
        "--pretrained_model_name_or_path", tiny_victim / "pipeline", "--dataset_name", clean_subset,
        "--method", "aspl", "--max_train_steps", "1", "--max_f_train_steps", "2", "--max_adv_train_steps", "3",
        "--learning_rate", "5e-4", "--with_prior_preservation", "--class_prompt", CLASS_PROMPT,
        "--num_class_images", "2", "--class_num_inference_steps", "2", "--class_data_dir", work_dir / "class_images",
        "--pgd_eps", str(PGD_EPS), "--seed", "0", "--output_dir", work_dir / output_name,
    ]


def run_in_process(argv):
    """`main(parse_args(argv))` in this process, on one thread like the launched processes."""
    import perturb_antidreambooth

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        perturb_antidreambooth.main(perturb_antidreambooth.parse_args([str(a) for a in argv]))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def aspl_output(tiny_victim, clean_subset, work_dir):
    """ASPL through `accelerate launch` on two CPU processes (groups sharded between them)."""
    launch("perturb_antidreambooth.py", aspl_argv(tiny_victim, clean_subset, work_dir, "aspl_2proc"),
           num_processes=2, env=THREADS)
    return work_dir / "aspl_2proc"


@pytest.fixture(scope="module")
def aspl_one_process(tiny_victim, clean_subset, work_dir):
    run_in_process(aspl_argv(tiny_victim, clean_subset, work_dir, "aspl_1proc"))
    return work_dir / "aspl_1proc"


def _uint8(image):
    return np.asarray(image.convert("RGB"), dtype=np.int64)


def _images(path):
    return [_uint8(image) for image in load_from_disk(str(path))["image"]]


# ----------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------

def test_aspl_runs_end_to_end_via_accelerate_launch(aspl_output, clean_subset):
    clean, perturbed = load_from_disk(str(clean_subset)), load_from_disk(str(aspl_output))
    assert perturbed["id"] == clean["id"] and perturbed["prompt"] == clean["prompt"]
    assert perturbed["domain"] == clean["domain"]
    assert {"linf", "l2"} <= set(perturbed.column_names)
    assert all(0 < linf <= PGD_EPS for linf in perturbed["linf"]) and all(l2 > 0 for l2 in perturbed["l2"])
    assert not Path(f"{aspl_output}.partial").exists()


def test_saved_images_respect_linf_budget_after_reload(aspl_output, clean_subset):
    clean = load_from_disk(str(clean_subset))
    perturbed = load_from_disk(str(aspl_output))
    for clean_image, image, linf in zip(clean["image"], perturbed["image"], perturbed["linf"]):
        delta = (_uint8(image) - _uint8(resize_and_crop(clean_image, RESOLUTION))).astype(np.float64) / 127.5
        assert np.abs(delta).max() <= PGD_EPS
        assert np.abs(delta).max() == pytest.approx(linf, abs=1e-12)


def test_two_processes_give_identical_images(aspl_output, aspl_one_process):
    assert load_from_disk(str(aspl_one_process))["id"] == load_from_disk(str(aspl_output))["id"]
    assert all((a == b).all() for a, b in zip(_images(aspl_one_process), _images(aspl_output)))


def test_resume_after_kill_gives_the_uninterrupted_result(aspl_one_process, tiny_victim, clean_subset, work_dir,
                                                          monkeypatch):
    import perturb_antidreambooth

    argv = [str(a) for a in aspl_argv(tiny_victim, clean_subset, work_dir, "aspl_resumed")]
    partial_dir = work_dir / "aspl_resumed.partial"
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "perturb_antidreambooth.py"), *argv], cwd=REPO_ROOT,
                               env=dict(os.environ, **THREADS), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(partial_dir.glob("unit-*")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)  # our own child, killed by its id
    process.wait()
    assert not (work_dir / "aspl_resumed").exists(), "the run finished before it could be killed"
    finished_before_kill = len(list(partial_dir.glob("unit-*")))
    assert finished_before_kill >= 1

    computed = []
    original = perturb_antidreambooth.perturb_group
    monkeypatch.setattr(perturb_antidreambooth, "perturb_group",
                        lambda *args, **kwargs: computed.append(args[2]) or original(*args, **kwargs))
    run_in_process(argv)
    assert len(computed) == 3 - finished_before_kill  # finished groups are not recomputed
    assert all((a == b).all() for a, b in zip(_images(aspl_one_process), _images(work_dir / "aspl_resumed")))


def test_fsmg_runs_end_to_end_via_accelerate_launch(tiny_victim, clean_subset, work_dir):
    launch("perturb_antidreambooth.py", [
        "--pretrained_model_name_or_path", tiny_victim / "pipeline", "--dataset_name", clean_subset,
        "--method", "fsmg", "--fsmg_train_steps", "3", "--fsmg_pgd_steps", "4",
        "--learning_rate", "5e-4", "--pgd_eps", str(PGD_EPS), "--output_dir", work_dir / "fsmg",
    ], env=THREADS)
    perturbed = load_from_disk(str(work_dir / "fsmg"))
    assert perturbed["id"] == load_from_disk(str(clean_subset))["id"]
    assert all(0 < linf <= PGD_EPS for linf in perturbed["linf"])


def test_class_images_are_cached_and_reused(aspl_output, tiny_victim, work_dir, monkeypatch):
    import diffusers

    def no_generation(*args, **kwargs):
        raise AssertionError("cached class images must not be generated again")

    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_pretrained", no_generation)
    cached = ensure_class_images(tiny_victim / "pipeline", CLASS_PROMPT, 2, work_dir / "class_images",
                                 resolution=RESOLUTION, num_inference_steps=2)
    assert len(cached) == 2 and cached["prompt"] == [CLASS_PROMPT] * 2
    with pytest.raises(InputError, match="another prompt or model"):
        ensure_class_images(tiny_victim / "pipeline", "A photo of a cat", 2, work_dir / "class_images",
                            resolution=RESOLUTION)


# ----------------------------------------------------------------------------------------------
# The maths
# ----------------------------------------------------------------------------------------------

def test_pgd_raises_the_surrogate_loss(tiny_victim, clean_subset):
    from mixsyn_utils.models import load_components, tokenize_prompts

    components = load_components(str(tiny_victim / "pipeline"))
    for module in (components.vae, components.unet, components.text_encoder):
        module.requires_grad_(False)
    rows = load_from_disk(str(clean_subset)).select(range(3))
    clean = torch.stack([image_to_tensor(image, RESOLUTION) for image in rows["image"]])
    input_ids = tokenize_prompts(components.tokenizer, rows["prompt"])
    # the surrogate PGD attacks is fine-tuned on the images, as ASPL's f′ and FSMG's model are
    surrogate = train_surrogate(components, clean, input_ids, None, None, 20, 5e-3, torch.Generator().manual_seed(0))
    perturbed = pgd_attack(surrogate, clean, clean, input_ids, 20, 0.005, PGD_EPS, torch.Generator().manual_seed(0))

    def losses(pixels, draws=64):  # the same t, noise and posterior draws for both sets: a paired comparison
        generator = torch.Generator().manual_seed(123)
        with torch.no_grad():  # all draws in one batch: row k·3 + i is draw k of image i
            prediction, target, _ = diffusion_prediction(surrogate, pixels.repeat(draws, 1, 1, 1),
                                                         input_ids.repeat(draws, 1), generator)
        return ((prediction - target) ** 2).flatten(1).mean(1).view(draws, -1).mean(1).double().numpy()

    increase = losses(perturbed) - losses(clean)
    # measured: +0.0019 on a loss of ≈0.61, about 12 standard errors at 64 draws
    assert increase.mean() > 4 * increase.std(ddof=1) / np.sqrt(len(increase))


def test_aspl_trains_the_surrogate_on_every_image_in_turn(tiny_victim, monkeypatch):

    from mixsyn_utils import adversarial
    from mixsyn_utils.models import load_components, tokenize_prompts

    components = load_components(str(tiny_victim / "pipeline"))
    for module in (components.vae, components.unet, components.text_encoder):
        module.requires_grad_(False)
    # Five images, each a constant level, so the trained image is known from its pixels.
    levels = torch.linspace(-0.8, 0.8, 5)
    clean = levels.view(5, 1, 1, 1).expand(5, 3, RESOLUTION, RESOLUTION).clone()
    input_ids = tokenize_prompts(components.tokenizer, ["The face of zero"] * 5)
    seen, original = [], adversarial.diffusion_prediction

    def recording(trained, pixel_values, *args, **kwargs):
        if pixel_values.requires_grad is False and len(pixel_values) == 1:  # a surrogate training step
            seen.append(int(torch.argmin((levels - pixel_values.mean()).abs())))
        return original(trained, pixel_values, *args, **kwargs)

    monkeypatch.setattr(adversarial, "diffusion_prediction", recording)
    adversarial.aspl_perturb_group(components, clean, input_ids, None, None, torch.Generator().manual_seed(0),
                                   outer_steps=2, surrogate_steps=3, pgd_steps=1, pgd_alpha=0.005, pgd_eps=0.05,
                                   learning_rate=1e-5)
    # iteration 0: f′ on images 0,1,2 then f on 0,1,2 (perturbed); iteration 1: images 3,4,0 twice
    assert seen == [0, 1, 2, 0, 1, 2, 3, 4, 0, 3, 4, 0]


def test_pgd_step_matches_float64_reference():
    rng = np.random.default_rng(0)
    original = rng.uniform(-1, 1, (2, 3, 4, 4))
    current = np.clip(original + rng.uniform(-0.05, 0.05, original.shape), -1, 1)
    grad = rng.normal(size=original.shape)
    reference = np.clip(original + np.clip(current + 0.02 * np.sign(grad) - original, -0.05, 0.05), -1, 1)
    result = pgd_step(*(torch.from_numpy(a) for a in (current, grad, original)), 0.02, 0.05)
    np.testing.assert_allclose(result.numpy(), reference, rtol=0, atol=1e-15)


def test_quantize_rounds_toward_clean_where_rounding_would_exceed_budget():
    pgd_eps = 6.6 / 127.5  # 6.6 uint8 levels: a full-budget δ rounds to 7 levels, past the budget
    original_uint8 = torch.full((1, 3, 2, 2), 100, dtype=torch.uint8)
    perturbed = original_uint8.double() / 127.5 - 1.0 + pgd_eps
    assert torch.round((perturbed + 1) * 127.5).max() == 107  # plain rounding would break the budget
    quantized = quantize_within_budget(perturbed, original_uint8, pgd_eps)
    assert (quantized.long() - 100).tolist() == torch.full((1, 3, 2, 2), 6).tolist()


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

def _argv(**flags):
    base = {"pretrained_model_name_or_path": "unused", "dataset_name": "unused", "output_dir": "unused"}
    base.update(flags)
    return [item for key, value in base.items() for item in (f"--{key}", str(value))]


@pytest.mark.parametrize("pgd_eps", [0, -0.05, 1.5])
def test_pgd_eps_outside_zero_one_is_rejected(pgd_eps):
    import perturb_antidreambooth

    with pytest.raises(InputError, match=r"--pgd_eps must be in \(0, 1\]"):
        perturb_antidreambooth.parse_args(_argv(pgd_eps=pgd_eps))


def test_pgd_alpha_above_eps_is_rejected_in_one_line():
    result = run_python("perturb_antidreambooth.py", _argv(pgd_eps=0.05, pgd_alpha=0.1))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: --pgd_alpha must be in (0, --pgd_eps=0.05], got 0.1"


def _save_rows(path, rows):
    Dataset.from_list(rows).save_to_disk(str(path))
    return path


def test_empty_group_is_rejected_before_loading_the_model(tmp_path):
    import perturb_antidreambooth

    image = Image.new("RGB", (RESOLUTION, RESOLUTION))
    dataset = _save_rows(tmp_path / "clean", [
        {"id": "a", "image": image, "prompt": "The face of one", "domain": "one"},
        {"id": "b", "image": image, "prompt": "The face of one", "domain": ""},
    ])
    args = perturb_antidreambooth.parse_args(_argv(dataset_name=dataset, output_dir=tmp_path / "out",
                                                   pretrained_model_name_or_path=tmp_path / "no_model"))
    with pytest.raises(InputError, match="--group_by domain: row id 'b' has an empty group"):
        perturb_antidreambooth.main(args)


@pytest.fixture(scope="module")
def odd_inputs_output(tiny_victim, tmp_path_factory):
    """Grayscale, RGBA and off-size images through the whole script (in process, one group, one iteration)."""
    import perturb_antidreambooth

    rng = np.random.default_rng(0)
    work = tmp_path_factory.mktemp("odd")
    images = [Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L"),
              Image.fromarray(rng.integers(0, 256, (24, 24, 4), dtype=np.uint8), mode="RGBA"),
              Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8), mode="RGB")]
    rows = [{"id": f"odd-{i}", "image": image, "prompt": "The face of one", "domain": "one"}
            for i, image in enumerate(images)]
    dataset = _save_rows(work / "clean", rows)
    perturb_antidreambooth.main(perturb_antidreambooth.parse_args([
        "--pretrained_model_name_or_path", str(tiny_victim / "pipeline"), "--dataset_name", str(dataset),
        "--max_train_steps", "1", "--max_f_train_steps", "1", "--max_adv_train_steps", "2",
        "--learning_rate", "5e-4", "--output_dir", str(work / "out"),
    ]))
    return images, load_from_disk(str(work / "out"))


def test_grayscale_and_rgba_inputs_are_converted_not_rejected(odd_inputs_output):
    images, perturbed = odd_inputs_output
    for clean_image, image in zip(images[:2], perturbed["image"][:2]):
        assert image.mode == "RGB"
        delta = (_uint8(image) - _uint8(resize_and_crop(clean_image, RESOLUTION))).astype(np.float64) / 127.5
        assert 0 < np.abs(delta).max() <= PGD_EPS


def test_images_of_mixed_sizes_are_resized_to_the_working_resolution(odd_inputs_output):
    _, perturbed = odd_inputs_output
    assert [image.size for image in perturbed["image"]] == [(RESOLUTION, RESOLUTION)] * 3


def test_random_control_moves_every_pixel_by_the_budget_with_a_seeded_sign(tiny_victim, clean_subset, work_dir):
    argv = ["--pretrained_model_name_or_path", tiny_victim / "pipeline", "--dataset_name", clean_subset,
            "--method", "random", "--pgd_eps", str(PGD_EPS), "--seed", "0"]
    run_in_process(argv + ["--output_dir", work_dir / "random_a"])
    run_in_process(argv + ["--output_dir", work_dir / "random_b"])
    run_in_process(argv[:-1] + ["1", "--output_dir", work_dir / "random_c"])
    clean = load_from_disk(str(clean_subset))
    first, again, other_seed = (load_from_disk(str(work_dir / name)) for name in ("random_a", "random_b", "random_c"))
    levels = int(np.floor(127.5 * PGD_EPS))  # the uint8 steps η allows: 6
    deltas = []
    for clean_image, image in zip(clean["image"], first["image"]):
        original = np.asarray(resize_and_crop(clean_image, RESOLUTION), dtype=np.int16)
        delta = np.asarray(image, dtype=np.int16) - original
        # Exactly ±levels, or the clip to [0, 255] of that step where it crosses the border (then 0 < |δ| < levels
        # or δ = 0 for a pixel already at the border).
        up, down = np.clip(original + levels, 0, 255) - original, np.clip(original - levels, 0, 255) - original
        assert np.all((delta == up) | (delta == down))
        interior = (original >= levels) & (original <= 255 - levels)
        deltas.append(delta[interior])
    signs = np.concatenate([d.ravel() for d in deltas]) > 0
    assert 0.45 < signs.mean() < 0.55
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first["image"], again["image"]))
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first["image"], other_seed["image"]))
    assert max(first["linf"]) <= PGD_EPS
