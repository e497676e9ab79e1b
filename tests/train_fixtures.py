"""Helpers shared by the three fine-tuning test files: a perturbed copy of the synthetic set, in-process runs."""

import numpy as np
import pytest
import torch


def make_perturbed_dataset(synthetic_dir, output_dir, eps=0.05, seed=0):
    """The synthetic set with seeded uniform ±eps noise (in [-1, 1] units) on every image, same ids.

    Its provenance records `pgd_eps`, so the model card can show the budget as for a real PGD set.
    """
    import json

    import datasets
    from PIL import Image

    from mixsyn_utils.dataset_io import load_image_dataset, save_dataset, with_provenance

    clean = load_image_dataset(str(synthetic_dir))
    rng = np.random.default_rng(seed)
    images = []
    for image in clean["image"]:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
        array = np.clip(array + rng.uniform(-eps, eps, size=array.shape), -1, 1)
        images.append(Image.fromarray(((array + 1) * 127.5).round().astype(np.uint8)))
    columns = {name: clean[name] for name in clean.column_names if name != "image"}
    perturbed = datasets.Dataset.from_dict(dict(columns, image=images),
                                           features=datasets.Features(dict(clean.features, image=datasets.Image())))
    with_provenance(perturbed, json.dumps({"script": "test", "flags": {"pgd_eps": eps, "pgd_steps": 0}}))
    save_dataset(perturbed, str(output_dir))
    return output_dir


def run_in_process(script_module, argv):
    """`main(parse_args(argv))` of a training script with fresh accelerate state before and after."""
    from study.runner import run_script_in_process

    run_script_in_process(script_module, argv)


def max_abs_difference(state_a, state_b):
    """max |a − b| over the common keys of two state dicts (float64)."""
    assert set(state_a) == set(state_b)
    return max(float((state_a[k].double() - state_b[k].double()).abs().max()) for k in state_a)


def common_argv(victim, synthetic, perturbed, output_dir, **overrides):
    """A tiny, fast training command line on the mixed set (2 steps, batch 2, seed 0, no validation)."""
    flags = {"pretrained_model_name_or_path": victim / "pipeline", "dataset_name": synthetic,
             "perturbed_dataset_name": perturbed, "mixup_mode": "image", "mixup_ratio": 0.5, "mixup_seed": 0,
             "output_dir": output_dir, "train_batch_size": 2, "max_train_steps": 2, "checkpointing_steps": 1000,
             "seed": 0, "lr_warmup_steps": 0}
    flags.update(overrides)
    argv = []
    for key, value in flags.items():
        if value is None:
            continue
        argv += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return argv



@pytest.fixture(scope="session")
def perturbed_dataset(synthetic_dataset, tmp_path_factory):
    """The synthetic set with seeded ±0.05 noise, same ids (stands in for the PGD script's output)."""
    return make_perturbed_dataset(synthetic_dataset, tmp_path_factory.mktemp("perturbed") / "perturbed")


def spy_on(monkeypatch, module, name):
    """Replace `module.name` by a wrapper that records every return value in the returned list."""
    original, returned = getattr(module, name), []

    def wrapper(*args, **kwargs):
        returned.append(original(*args, **kwargs))
        return returned[-1]

    monkeypatch.setattr(module, name, wrapper)
    return returned


def unet_output(unet, seed=0):
    """ε_θ on a fixed random input (float64), to tell two UNets apart."""
    generator = torch.Generator().manual_seed(seed)
    config = unet.config
    latents = torch.randn(1, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    context = torch.randn(1, 77, config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(latents.to(unet.dtype), torch.tensor([500]), context.to(unet.dtype)).sample.double()


@pytest.fixture(scope="session")
def sdxl_perturbed_dataset(sdxl_synthetic_dataset, tmp_path_factory):
    """The SDXL victim's synthetic set with seeded ±0.05 noise, same ids."""
    return make_perturbed_dataset(sdxl_synthetic_dataset, tmp_path_factory.mktemp("sdxl_perturbed") / "perturbed")
