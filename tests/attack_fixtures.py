"""Attack runs and the independent float64 reference shared by test_attacks.py and test_diffusion.py.

Registered as a pytest plugin in conftest.py, so each session fixture runs once for both files.
"""

import copy
import math

import datasets
import numpy as np
import pytest
import torch

import attack_pia
import attack_secmi
from mixsyn_utils.metrics import roc_metrics

PIA_TIMESTEPS = (100, 200)
T_SEC, K = 40, 10
REFERENCE_IMAGES_PER_SET = 6
WORST_RELATIVE_ERROR = {}


def common_argv(victim, output_dir, *extra):
    return ["--pretrained_model_name_or_path", str(victim / "pipeline"), "--member_dataset", str(victim / "members"),
            "--nonmember_dataset", str(victim / "nonmembers"), "--output_dir", str(output_dir), *map(str, extra)]


class UNetSampleCounter:
    """Counts images passed through the UNet (sum of batch sizes over forward calls) via a forward hook."""

    def __init__(self):
        self.samples = 0

    def wrap(self, load_attack_model):
        def loader(*args, **kwargs):
            components = load_attack_model(*args, **kwargs)
            components.unet.register_forward_hook(lambda module, inputs, output: self._count(inputs))
            return components
        return loader

    def _count(self, inputs):
        self.samples += len(inputs[0])


def run_attack(script, argv):
    """Run an attack script's main in this process; returns (scores dataset, UNet samples forwarded)."""
    counter = UNetSampleCounter()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(script, "load_attack_model", counter.wrap(script.load_attack_model))
        args = script.parse_args(argv)
        script.main(args)
    return datasets.load_from_disk(args.output_dir), counter.samples


@pytest.fixture(scope="session")
def attack_runs(tiny_victim, tmp_path_factory):
    """Each attack run once on the fast victim, batch size 24 (batches mix members and non-members)."""
    root = tmp_path_factory.mktemp("attacks")
    runs = {}
    for method in ("pia", "pian"):
        runs[method] = run_attack(attack_pia, common_argv(
            tiny_victim, root / method, "--method", method, "--attack_timesteps", *PIA_TIMESTEPS, "--batch_size", 24))
    runs["secmi"] = run_attack(attack_secmi, common_argv(
        tiny_victim, root / "secmi", "--t_sec", T_SEC, "--k", K, "--batch_size", 24))
    return runs


# ----------------------------------------------------------------------------------------------
# Independent float64 reference: plain loops, one image at a time, straight from the papers' equations
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def reference_model(tiny_victim):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(str(tiny_victim / "pipeline"), safety_checker=None,
                                                       requires_safety_checker=False)
    model = {name: copy.deepcopy(getattr(pipeline, name)).to(torch.float64).eval()
             for name in ("unet", "vae", "text_encoder")}
    model["tokenizer"] = pipeline.tokenizer
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # SD-1.x scaled_linear
    model["alpha_bar"] = torch.cumprod(1.0 - betas, 0)
    rows = []
    for name in ("members", "nonmembers"):  # a few of each keeps the float64 loops cheap
        for row in datasets.load_from_disk(str(tiny_victim / name)).select(range(REFERENCE_IMAGES_PER_SET)):
            pixels = np.asarray(row["image"].convert("RGB"), dtype=np.float64) / 127.5 - 1.0
            rows.append({"id": row["id"], **reference_inputs(model, row["prompt"], torch.from_numpy(pixels))})
    model["rows"] = rows
    return model


@torch.no_grad()
def reference_inputs(model, prompt, pixels):
    """z₀ = scaling · VAE posterior mode, c = text encoder of the caption padded to model_max_length."""
    ids = model["tokenizer"]([prompt], padding="max_length", max_length=model["tokenizer"].model_max_length,
                             truncation=True, return_tensors="pt").input_ids
    context = model["text_encoder"](ids)[0]
    z0 = model["vae"].encode(pixels.permute(2, 0, 1)[None]).latent_dist.mode() * model["vae"].config.scaling_factor
    return {"z0": z0, "context": context}


def eps(model, z, t, context):
    return model["unet"](z, torch.tensor([t]), context).sample


def reference_pia(model, row, t, method):
    z0, context = row["z0"], row["context"]
    with torch.no_grad():
        e0 = eps(model, z0, 0, context)
        if method == "pian":
            e0 = e0 / e0.abs().mean() * math.sqrt(2 / math.pi)
        a = model["alpha_bar"][t]
        zt = a.sqrt() * z0 + (1 - a).sqrt() * e0
        return float(((eps(model, zt, t, context) - e0).abs() ** 4).sum())


def reference_loss(model, row, t, draws, seed=0):
    """mean_j ‖ε_j − ε̂(z_t, t, c)‖² / d with ε_j from the documented generator derive_seed(seed, 13, t, j)."""
    from mixsyn_utils.seeds import derive_seed

    z0, context = row["z0"], row["context"]
    total = 0.0
    with torch.no_grad():
        for draw in range(draws):
            generator = torch.Generator().manual_seed(derive_seed(seed, 13, t, draw))
            noise = torch.randn((1, *z0.shape[1:]), generator=generator).double()
            a = model["alpha_bar"][t]
            zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
            total += float(((eps(model, zt, t, context) - noise) ** 2).mean())
    return total / draws


def reference_secmi(model, row, t_sec, k):
    z0, context = row["z0"], row["context"]
    ab = model["alpha_bar"]

    def step(z, t, s):
        e = eps(model, z, t, context)
        return ab[s].sqrt() * (z - (1 - ab[t]).sqrt() * e) / ab[t].sqrt() + (1 - ab[s]).sqrt() * e

    with torch.no_grad():
        z = z0
        t = 0
        while t < t_sec - k:
            z = step(z, t, t + k)
            t += k
        back = step(step(z, t_sec - k, t_sec), t_sec, t_sec - k)
        return float(((back - z) ** 2).sum())


def worst_relative_error(scores, reference_fn, model, name):
    by_id = dict(zip(scores["id"], scores["score"]))
    worst = 0.0
    for row in model["rows"]:
        expected = reference_fn(row)
        worst = max(worst, abs(by_id[row["id"]] - expected) / abs(expected))
    WORST_RELATIVE_ERROR[name] = worst
    print(f"\nworst relative error vs float64 reference, {name}: {worst:.2e}")
    return worst


def column_scores(dataset, column):
    return dataset.rename_column("score", "score_mean").rename_column(column, "score") if column != "score" else dataset




def members_lower_auc(dataset, column="score"):
    """AUC of a scores dataset with members expected LOWER (an AUC below 0.5: members score higher)."""
    values, is_member = np.asarray(dataset[column], dtype=np.float64), np.asarray(dataset["is_member"], dtype=bool)
    return roc_metrics(-values[is_member], -values[~is_member])["auc"]
