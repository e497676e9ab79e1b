"""Attack runs and the independent float64 reference shared by test_attacks.py, test_diffusion.py and
test_sdxl_attacks.py.

Registered as a pytest plugin in conftest.py, so each session fixture runs once for all files. The reference
calls diffusers' and transformers' models in float64 and nothing of mixsyn_utils: SDXL's conditioning is written
here from its definition (the penultimate hidden states of both encoders concatenated, encoder 2's projected
pooled output, the time ids (R, R, 0, 0, R, R), zeros as the unconditional embedding).
"""

import copy
import math

import datasets
import numpy as np
import pytest
import torch

import attack_clid
import attack_loss
import attack_pfami
import attack_pia
import attack_secmi
from mixsyn_utils.metrics import roc_metrics
from mixsyn_utils.seeds import derive_seed

PIA_TIMESTEPS = (100, 200)
T_SEC, K = 40, 10
GUIDANCE = 7.5
LOSS_TIMESTEPS, LOSS_DRAWS = (0, 300), 2
SIMA_TIMESTEPS = (0, 10, 100)
CLID_TIMESTEPS = (440, 450)
CLID_WEAK = (0.3, 0.7, "null")
PFAMI_TIMESTEPS, PFAMI_STRENGTHS = (0, 200), (0.95, 0.8, 0.7)
REFERENCE_IMAGES_PER_SET = 6
WORST_RELATIVE_ERROR = {}

# Every attack as the session runs it on the fast victim (batch 24: batches mix members and non-members), with
# its UNet rows per image: (script, flags, rows per image).
ATTACK_RUNS = {
    "pia": (attack_pia, ["--method", "pia", "--attack_timesteps", *PIA_TIMESTEPS, "--guidance_scale", GUIDANCE],
            2 * (1 + len(PIA_TIMESTEPS))),
    "pian": (attack_pia, ["--method", "pian", "--attack_timesteps", *PIA_TIMESTEPS, "--guidance_scale", 1],
             1 + len(PIA_TIMESTEPS)),
    "secmi": (attack_secmi, ["--t_sec", T_SEC, "--k", K], T_SEC // K + 1),
    "loss": (attack_loss, ["--method", "loss", "--attack_timesteps", *LOSS_TIMESTEPS, "--num_noise_draws", LOSS_DRAWS],
             len(LOSS_TIMESTEPS) * LOSS_DRAWS),
    "sima": (attack_loss, ["--method", "sima", "--attack_timesteps", *SIMA_TIMESTEPS], len(SIMA_TIMESTEPS)),
    "clid": (attack_clid, ["--attack_timesteps", *CLID_TIMESTEPS, "--weak_caption", *CLID_WEAK],
             (1 + len(CLID_WEAK)) * len(CLID_TIMESTEPS)),
    "pfami": (attack_pfami, ["--attack_timesteps", *PFAMI_TIMESTEPS, "--crop_strengths", *PFAMI_STRENGTHS],
              (1 + len(PFAMI_STRENGTHS)) * len(PFAMI_TIMESTEPS)),
}


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


def run_attack(script, argv, model_wrapper=None):
    """Run an attack script's main in this process; returns (scores dataset, UNet samples forwarded).

    `model_wrapper(components)` may replace parts of the loaded model before the attack uses it.
    """
    counter = UNetSampleCounter()
    load_attack_model = original_load = script.load_attack_model
    if model_wrapper is not None:
        load_attack_model = lambda *a, **k: model_wrapper(original_load(*a, **k))  # noqa: E731
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(script, "load_attack_model", counter.wrap(load_attack_model))
        args = script.parse_args(argv)
        script.main(args)
    return datasets.load_from_disk(args.output_dir), counter.samples


@pytest.fixture(scope="session")
def attack_runs(tiny_victim, tmp_path_factory):
    """Each attack of `ATTACK_RUNS` run once on the fast victim: {name: (scores dataset, UNet samples)}."""
    root = tmp_path_factory.mktemp("attacks")
    return {name: run_attack(script, common_argv(tiny_victim, root / name, *flags, "--batch_size", 24))
            for name, (script, flags, _) in ATTACK_RUNS.items()}


@pytest.fixture(scope="session")
def sdxl_attack_runs(tiny_sdxl_victim, tmp_path_factory):
    """Each attack of `ATTACK_RUNS` run once on the fast SDXL victim: {name: (scores dataset, UNet samples)}."""
    root = tmp_path_factory.mktemp("sdxl_attacks")
    return {name: run_attack(script, common_argv(tiny_sdxl_victim, root / name, *flags, "--batch_size", 24))
            for name, (script, flags, _) in ATTACK_RUNS.items()}


class VelocityUNet(torch.nn.Module):
    """An ε-prediction UNet that answers in v: v = √ᾱ_t ε̂ − √(1−ᾱ_t) ẑ₀ with ẑ₀ = (z_t − √(1−ᾱ_t) ε̂) / √ᾱ_t,
    computed from its own ε̂ and the input z_t (float64 arithmetic). Scores must not change."""

    def __init__(self, unet, alpha_bar):
        super().__init__()
        self.unet, self.alpha_bar, self.config = unet, alpha_bar, unet.config

    def forward(self, sample, timestep, encoder_hidden_states, **conditioning):
        from types import SimpleNamespace

        epsilon = self.unet(sample, timestep, encoder_hidden_states, **conditioning).sample.double()
        a = self.alpha_bar[timestep.cpu()].view(-1, 1, 1, 1).to(sample.device)
        z0 = (sample.double() - (1 - a).sqrt() * epsilon) / a.sqrt()
        return SimpleNamespace(sample=(a.sqrt() * epsilon - (1 - a).sqrt() * z0).to(sample.dtype))


def as_velocity_model(components):
    """The attacked model with its UNet answering in v and its scheduler saying prediction_type v_prediction."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(components.noise_scheduler.config, prediction_type="v_prediction")
    components.unet = VelocityUNet(components.unet, scheduler.alphas_cumprod.double())
    components.noise_scheduler = scheduler
    return components


# ----------------------------------------------------------------------------------------------
# Independent float64 reference: plain loops, one image at a time, straight from the papers' equations
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def reference_model(tiny_victim):
    return build_reference_model(tiny_victim)


@pytest.fixture(scope="session")
def sdxl_reference_model(tiny_sdxl_victim):
    return build_reference_model(tiny_sdxl_victim, sdxl=True)


def build_reference_model(tiny_victim, sdxl=False):
    """The victim in float64, its ᾱ table from the SD-1.x formula, and a few members and non-members.

    `sdxl`: the victim is a `StableDiffusionXLPipeline`; its unconditional embedding is zeros
    (`force_zeros_for_empty_prompt`) and every UNet call gets the time ids of the uncropped R-px image.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if sdxl:
        pipeline = StableDiffusionXLPipeline.from_pretrained(str(tiny_victim / "pipeline"), add_watermarker=False)
        assert pipeline.config.force_zeros_for_empty_prompt
        names = ("unet", "vae", "text_encoder", "text_encoder_2")
    else:
        pipeline = StableDiffusionPipeline.from_pretrained(str(tiny_victim / "pipeline"), safety_checker=None,
                                                           requires_safety_checker=False)
        names = ("unet", "vae", "text_encoder")
    model = {name: copy.deepcopy(getattr(pipeline, name)).to(torch.float64).eval() for name in names}
    model["tokenizer"] = pipeline.tokenizer
    model["tokenizer_2"] = getattr(pipeline, "tokenizer_2", None)
    model["resolution"] = pipeline.unet.config.sample_size * 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # SD-1.x scaled_linear
    model["alpha_bar"] = torch.cumprod(1.0 - betas, 0)
    empty = reference_context(model, "")
    model["null_context"] = {name: torch.zeros_like(value) if name != "time_ids" else value
                             for name, value in empty.items()} if sdxl else empty
    rows = []
    for name in ("members", "nonmembers"):  # a few of each keeps the float64 loops cheap
        for row in datasets.load_from_disk(str(tiny_victim / name)).select(range(REFERENCE_IMAGES_PER_SET)):
            pixels = torch.from_numpy(np.asarray(row["image"].convert("RGB"), dtype=np.float64) / 127.5 - 1.0)
            pixels = pixels.permute(2, 0, 1)[None]
            rows.append({"id": row["id"], "prompt": row["prompt"], "pixels": pixels, "z0": reference_z0(model, pixels),
                         "context": reference_context(model, row["prompt"])})
    model["rows"] = rows
    return model


def padded_ids(tokenizer, prompt):
    return tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def reference_context(model, prompt):
    """SD: c = text encoder of the caption padded to model_max_length (its last hidden state).

    SDXL: {"hidden": [h¹₋₂ ‖ h²₋₂] (the penultimate layer of each encoder, concatenated on the last axis),
    "pooled": encoder 2's text_embeds (its projection of the final-LayerNorm output at the first end-of-text token),
    "time_ids": [[R, R, 0, 0, R, R]]}.
    """
    if model.get("tokenizer_2") is None:
        return model["text_encoder"](padded_ids(model["tokenizer"], prompt))[0]
    first = model["text_encoder"](padded_ids(model["tokenizer"], prompt), output_hidden_states=True)
    second = model["text_encoder_2"](padded_ids(model["tokenizer_2"], prompt), output_hidden_states=True)
    size = float(model["resolution"])
    return {"hidden": torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1),
            "pooled": second.text_embeds,
            "time_ids": torch.tensor([[size, size, 0.0, 0.0, size, size]], dtype=torch.float64)}


def unet_epsilon(model, z, t, context):
    """The UNet's output at (z, t) with the text context (SDXL: and its pooled text and time ids)."""
    if isinstance(context, dict):
        return model["unet"](z, torch.tensor([t]), context["hidden"],
                             added_cond_kwargs={"text_embeds": context["pooled"], "time_ids": context["time_ids"]}).sample
    return model["unet"](z, torch.tensor([t]), context).sample


@torch.no_grad()
def reference_z0(model, pixels):
    """z₀ = scaling · VAE posterior mode of (1, 3, H, W) pixels in [-1, 1]."""
    return model["vae"].encode(pixels).latent_dist.mode() * model["vae"].config.scaling_factor


@torch.no_grad()
def eps(model, z, t, context, guidance=1.0):
    """ε̂(z, t, c), with guidance w: ε̂(c_∅) + w (ε̂(c) − ε̂(c_∅)) from two separate UNet calls."""
    conditional = unet_epsilon(model, z, t, context)
    if guidance == 1.0:
        return conditional
    unconditional = unet_epsilon(model, z, t, model["null_context"])
    return unconditional + guidance * (conditional - unconditional)


def reference_pia(model, row, t, method, guidance=1.0):
    z0, context = row["z0"], row["context"]
    e0 = eps(model, z0, 0, context, guidance)
    if method == "pian":
        e0 = e0 / e0.abs().mean() * math.sqrt(2 / math.pi)
    a = model["alpha_bar"][t]
    zt = a.sqrt() * z0 + (1 - a).sqrt() * e0
    return float(((eps(model, zt, t, context, guidance) - e0).abs() ** 4).sum())


def reference_loss(model, row, t, draws, seed=0, context=None, z0=None):
    """mean_j ‖ε_j − ε̂(z_t, t, c)‖² / d with ε_j from the documented generator derive_seed(seed, 13, t, j)."""
    z0 = row["z0"] if z0 is None else z0
    context = row["context"] if context is None else context
    total = 0.0
    for draw in range(draws):
        generator = torch.Generator().manual_seed(derive_seed(seed, 13, t, draw))
        noise = torch.randn((1, *z0.shape[1:]), generator=generator).double()
        a = model["alpha_bar"][t]
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        total += float(((eps(model, zt, t, context) - noise) ** 2).mean())
    return total / draws


def reference_sima(model, row, t):
    """Σ ε̂(z₀, t, c)⁴ on the clean latent."""
    return float((eps(model, row["z0"], t, row["context"]) ** 4).sum())


def reference_weak_caption(prompt, weak, tokenizer):
    """"" for null; else word i → <|endoftext|> iff at most ⌊weak·n − 0.01⌋ words have a strictly larger
    largest-BPE-id (the authors' top-rate cut with ties, by word rarity)."""
    if weak == "null":
        return ""
    words = prompt.split()
    rarity = [max(tokenizer.encode(word, add_special_tokens=False)) for word in words]
    allowed = int(weak * len(words) - 0.01)
    return " ".join("<|endoftext|>" if sum(other > mine for other in rarity) <= allowed else word
                    for word, mine in zip(words, rarity))


def reference_clid(model, row, timesteps, weak_captions, seed=0):
    """(L, D): the caption's loss and the mean discrepancy of the weakened captions, means over t (one draw); the
    null caption is the unconditional embedding (SD: the encoded ""; SDXL: zeros)."""
    weak_contexts = [model["null_context"] if weak == "null" else
                     reference_context(model, reference_weak_caption(row["prompt"], weak, model["tokenizer"]))
                     for weak in weak_captions]
    losses, discrepancies = [], []
    for t in timesteps:
        loss = reference_loss(model, row, t, 1, seed)
        losses.append(loss)
        discrepancies.append(np.mean([reference_loss(model, row, t, 1, seed, context) - loss
                                      for context in weak_contexts]))
    return float(np.mean(losses)), float(np.mean(discrepancies))


def reference_pfami(model, row, timesteps, strengths, seed=0):
    """−mean_{t,n} (L_t(x_n) − L_t(x)) / L_t(x), x_n by torchvision's CenterCrop(⌊λ·16⌋) then Resize(16)."""
    import torchvision.transforms.functional as TF

    size = row["pixels"].shape[-1]
    neighbours = [reference_z0(model, TF.resize(TF.center_crop(row["pixels"], [int(size * s)] * 2), [size, size],
                                                interpolation=TF.InterpolationMode.BILINEAR))
                  for s in strengths]
    fluctuations = []
    for t in timesteps:
        loss = reference_loss(model, row, t, 1, seed)
        fluctuations += [(reference_loss(model, row, t, 1, seed, z0=z0) - loss) / loss for z0 in neighbours]
    return -float(np.mean(fluctuations))


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


def worst_relative_error(scores, reference_fn, model, name, column="score"):
    """max over the reference rows the dataset holds (CLiD and SimA leave their calibration rows out) of
    |score − reference| / |reference|."""
    by_id = dict(zip(scores["id"], scores[column]))
    compared = [row for row in model["rows"] if row["id"] in by_id]
    assert len(compared) >= REFERENCE_IMAGES_PER_SET, f"only {len(compared)} reference rows scored"
    expected = {row["id"]: reference_fn(row) for row in compared}
    worst = max(abs(by_id[image_id] - value) / abs(value) for image_id, value in expected.items())
    WORST_RELATIVE_ERROR[name] = worst
    print(f"\nworst relative error vs float64 reference, {name}: {worst:.2e} ({len(compared)} images)")
    return worst


def members_lower_auc(dataset, column="score"):
    """AUC of a scores dataset with members expected LOWER (an AUC below 0.5: members score higher)."""
    values, is_member = np.asarray(dataset[column], dtype=np.float64), np.asarray(dataset["is_member"], dtype=bool)
    return roc_metrics(-values[is_member], -values[~is_member])["auc"]
