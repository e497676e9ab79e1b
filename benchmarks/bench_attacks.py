#!/usr/bin/env python
"""Per-image attack time against the UNet floor, for every attack at its default setting (target ratio ≤ 1.2×).

floor = the same number of batched UNet forwards (same rows per call: the batch, or twice it with classifier-free
guidance; same latent shape, same text-context shape) on random latents, timed in the same process right after
the attack. The attack's time is the whole scoring loop (`score_all`: image decoding, VAE, text encoder, UNet,
per-batch partial saves). PFAMI also encodes its neighbours with the VAE: its UNet + VAE-encode floor counts
1 + N encodes per image.

    python benchmarks/bench_attacks.py --victim_dir outputs/victim            # the tiny victim
    python benchmarks/bench_attacks.py --victim_dir outputs/victim --sd_config --num_images 8 --batch_size 4 \
        --attacks pia  # SD-1.x-size UNet, VAE and text encoder (random weights) at 512 px; on a GPU add --device cuda
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import attack_clid  # noqa: E402
import attack_loss  # noqa: E402
import attack_pfami  # noqa: E402
import attack_pia  # noqa: E402
import attack_secmi  # noqa: E402
from mixsyn_utils.attacks import (  # noqa: E402
    AttackedModel,
    CaptionCache,
    load_attack_data,
    load_attack_model,
    score_all,
)
from mixsyn_utils.attack_scores import pia_scores, secmi_t_error  # noqa: E402
from mixsyn_utils.diffusion import NoisePredictor  # noqa: E402
from mixsyn_utils.flags import flag_values  # noqa: E402
from mixsyn_utils.models import configured_resolution, vae_scale_factor  # noqa: E402
from mixsyn_utils.resumable import run_signature  # noqa: E402


def attack_args(victim_dir, output_dir, batch_size):
    return SimpleNamespace(
        pretrained_model_name_or_path=str(Path(victim_dir) / "pipeline"), revision=None, variant=None, unet_path=None,
        lora_weights=None, textual_inversion=None, member_dataset=str(Path(victim_dir) / "members"),
        nonmember_dataset=str(Path(victim_dir) / "nonmembers"), caption_column="prompt", null_prompt=False,
        resolution=None, batch_size=batch_size, vae_sample=False, seed=0, latents_cache_dir=None, output_dir=str(output_dir),
        overwrite=True, push_to_hub=False, hub_dataset_id=None, hub_token=None,
    )


def attacked_model(args):
    """The `AttackedModel` of the attack flags, as the attack scripts build it."""
    return AttackedModel(args.pretrained_model_name_or_path, args.revision, args.variant, args.unet_path,
                         args.lora_weights, args.textual_inversion)


def attack_resolution(args):
    """--resolution, or the attacked model's native size from its configs (as the attack scripts choose it)."""
    return args.resolution or configured_resolution(args.pretrained_model_name_or_path, args.revision, args.unet_path)


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def unet_floor_seconds(unet, num_calls, latent_shape, context, device):
    """`num_calls` UNet forwards on random latents with the given `TextConditioning` (its rows = the batch; for
    SDXL with its pooled embedding and time ids, as the attack's calls get them)."""
    batch_size = len(context)
    latents = torch.randn(batch_size, *latent_shape, device=device)
    timesteps = torch.full((batch_size,), 100, device=device, dtype=torch.long)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(num_calls):
        unet(latents, timesteps, **context.unet_kwargs())
    synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def vae_floor_seconds(vae, batch_size, resolution, device):
    pixels = torch.rand(batch_size, 3, resolution, resolution, device=device) * 2 - 1
    synchronize(device)
    start = time.perf_counter()
    vae.encode(pixels).latent_dist.mode()
    synchronize(device)
    return time.perf_counter() - start


class UNetTimer:
    """Seconds spent inside the UNet's forward calls during a run (forward pre-hook to forward hook)."""

    def __init__(self, unet, device):
        self.seconds, self.device, self._start = 0.0, device, None
        self.handles = [unet.register_forward_pre_hook(self._enter), unet.register_forward_hook(self._leave)]

    def _enter(self, module, inputs):
        synchronize(self.device)
        self._start = time.perf_counter()

    def _leave(self, module, inputs, output):
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._start

    def remove(self):
        for handle in self.handles:
            handle.remove()


def measure(name, rows, components, args, resolution, score_batch, calls_per_image, device, encodes=1,
            rows_per_call=1):
    """Per-image time of `score_all` against the UNet floor, and against the UNet + `encodes` VAE-encodes floor.

    Also the UNet's own time inside the run: on a machine shared with other jobs the load drifts between the
    run and the separately timed floor; attack time / in-run UNet time is measured over the same seconds.
    """
    with tempfile.TemporaryDirectory() as scratch:
        args.output_dir = str(Path(scratch) / name)
        # The scripts compute their run signature (flags and input fingerprints) before `score_all`; its output
        # folder is fresh here, so the flags alone stand in for it (not timed, as in the scripts).
        signature = run_signature(flag_values(args))
        timer = UNetTimer(components.unet, device)
        synchronize(device)
        start = time.perf_counter()
        _, work = score_all(rows, components, score_batch, accelerator=None, output_dir=args.output_dir,
                            signature=signature, resolution=resolution, batch_size=args.batch_size,
                            vae_sample=args.vae_sample, seed=args.seed, latents_cache_dir=args.latents_cache_dir,
                            overwrite=args.overwrite, desc=name)
        synchronize(device)
        attack_seconds = time.perf_counter() - start
        timer.remove()
        work.cleanup()
    latent_shape = (components.unet.config.in_channels, *([resolution // vae_scale_factor(components.vae)] * 2))
    # Full batches only in the floor too: same number of forwards of the same sizes as the attack. The context is
    # the text encoder's: random N(0, 1) contexts made the CPU UNet 5-16% slower than real ones (alternating runs).
    # `CaptionCache` is what `score_all` conditions with (`conditioning.encode_prompts` of every text encoder; the
    # guided attacks' second row per image is the model's unconditional embedding, `None`).
    captions = CaptionCache(components, resolution)
    floor = vae_floor = 0.0
    for start in range(0, len(rows), args.batch_size):
        batch = rows[start : start + args.batch_size]
        context = captions([row["caption"] for row in batch] + [None] * len(batch) * (rows_per_call - 1))
        floor += unet_floor_seconds(components.unet, calls_per_image, latent_shape, context, device)
        size = len(batch)
        vae_floor += encodes * vae_floor_seconds(components.vae, size, resolution, device) if encodes else 0.0
    per_image, floor_per_image, vae_per_image = (value / len(rows) for value in (attack_seconds, floor, vae_floor))
    line = (f"{name:18s} {len(rows)} images, {calls_per_image} calls × {rows_per_call} row(s): "
            f"{per_image * 1e3:9.2f} ms/image; UNet floor {floor_per_image * 1e3:9.2f} ms/image, "
            f"ratio {per_image / floor_per_image:.3f}x; in-run UNet {timer.seconds / len(rows) * 1e3:9.2f} ms/image, "
            f"ratio {attack_seconds / timer.seconds:.3f}x")
    if encodes:  # z₀ (and PFAMI's neighbours) encoded here, not read from the latents cache
        line += (f"; UNet + {encodes} VAE-encode floor {(floor_per_image + vae_per_image) * 1e3:9.2f} ms/image, "
                 f"ratio {per_image / (floor_per_image + vae_per_image):.3f}x")
    print(line)
    return {"ms_per_image": per_image * 1e3, "unet_floor_ms": floor_per_image * 1e3,
            "ratio": per_image / floor_per_image, "unet_floor_and_encodes_ms": (floor_per_image + vae_per_image) * 1e3,
            "in_run_unet_ms": timer.seconds / len(rows) * 1e3, "in_run_ratio": attack_seconds / timer.seconds}


def build_sd_victim(victim_dir):
    """Full-size SD-1.x UNet, VAE and CLIP-L text encoder (random weights; cost does not depend on them) with the
    tiny victim's tokenizer and scheduler: attacked at 512 px, the per-image cost is that of Stable Diffusion."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from bench_pgd import SD14_TEXT, SD14_UNET, SD14_VAE

    pipeline = StableDiffusionPipeline.from_pretrained(str(Path(victim_dir) / "pipeline"), safety_checker=None,
                                                       requires_safety_checker=False)
    torch.manual_seed(0)
    pipeline.unet, pipeline.vae = UNet2DConditionModel(**SD14_UNET), AutoencoderKL(**SD14_VAE)
    pipeline.text_encoder = CLIPTextModel(CLIPTextConfig(**SD14_TEXT))
    pipeline.tokenizer.model_max_length = 77
    return pipeline


def default_args(script, victim_dir, *flags):
    """A script's own defaults for its attack flags (the figures below are the defaults' cost)."""
    return script.parse_args(["--pretrained_model_name_or_path", str(Path(victim_dir) / "pipeline"),
                              "--member_dataset", "unused", "--nonmember_dataset", "unused",
                              "--output_dir", "unused", *flags])


def attacks_at_defaults(components, victim_dir, resolution, device):
    """{name: (score_batch, UNet calls per image, rows per call, VAE encodes per image)} of every attack with its
    script's defaults, scoring through the scripts' own column functions."""
    predictor = NoisePredictor.of(components.unet, components.noise_scheduler)
    predictor = NoisePredictor(predictor.unet, predictor.alpha_bar.to(device), predictor.prediction_type)
    pia = default_args(attack_pia, victim_dir)
    secmi = default_args(attack_secmi, victim_dir)
    loss, sima = (default_args(attack_loss, victim_dir, "--method", method) for method in ("loss", "sima"))
    clid, pfami = default_args(attack_clid, victim_dir), default_args(attack_pfami, victim_dir)

    def pia_batch(batch, guidance_scale):  # as attack_pia.py: c_∅ only with guidance
        null_context = batch.null_context() if guidance_scale != 1.0 else None
        return {"score": pia_scores(predictor, batch.latents, batch.context, pia.attack_timesteps, pia.lp,
                                    guidance_scale=guidance_scale, null_context=null_context)[10]}

    return {
        "pia (w 7.5)": (lambda batch: pia_batch(batch, pia.guidance_scale), 1 + len(pia.attack_timesteps), 2, 1),
        "pia (w 1)": (lambda batch: pia_batch(batch, 1.0), 1 + len(pia.attack_timesteps), 1, 1),
        "secmi": (lambda batch: {"score": secmi_t_error(predictor, batch.latents, batch.context, secmi.t_sec,
                                                        secmi.k)[0]}, secmi.t_sec // secmi.k + 1, 1, 1),
        "loss": (lambda batch: attack_loss.score_columns(batch, predictor, loss),
                 len(attack_loss.timesteps_of(loss)) * loss.num_noise_draws, 1, 1),
        "sima": (lambda batch: attack_loss.score_columns(batch, predictor, sima), len(attack_loss.timesteps_of(sima)),
                 1, 1),
        "clid": (lambda batch: attack_clid.clid_raw_columns(batch, components, predictor, clid),
                 (1 + len(clid.weak_caption)) * len(clid.attack_timesteps) * clid.num_noise_draws, 1, 1),
        "pfami": (lambda batch: attack_pfami.pfami_columns(batch, components, predictor, pfami, resolution),
                  (1 + len(pfami.crop_strengths)) * len(pfami.attack_timesteps) * pfami.num_noise_draws, 1,
                  1 + len(pfami.crop_strengths)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victim_dir", type=str, required=True, help="A make_tiny_victim.py output folder.")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num_images", type=int, default=None, help="Score only this many images.")
    parser.add_argument("--sd_config", action="store_true",
                        help="Swap in SD-1.x-size UNet, VAE and text encoder (random weights), attacked at 512 px.")
    parser.add_argument("--attacks", nargs="+", default=None,
                        help="Attacks to time (names as printed; default: all). Their cost is their scripts' defaults.")
    parser.add_argument("--output", type=str, default=None, help="Also write the figures as JSON here.")
    cli = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        args = attack_args(cli.victim_dir, Path(scratch) / "scores", cli.batch_size)
        if cli.sd_config:
            pipeline_dir = Path(scratch) / "sd" / "pipeline"
            build_sd_victim(cli.victim_dir).save_pretrained(str(pipeline_dir))
            args.pretrained_model_name_or_path = str(pipeline_dir)  # native size: 512 px, 64×64 latents
        resolution = attack_resolution(args)
        data_args = (args.member_dataset, args.nonmember_dataset, args.caption_column, args.null_prompt,
                     args.textual_inversion, resolution)
        load_attack_data(*data_args)  # first call: imports, dataset loading
        start = time.perf_counter()
        all_rows = load_attack_data(*data_args)
        input_pass = (time.perf_counter() - start) / len(all_rows)
        rows = all_rows[: cli.num_images]
        components = load_attack_model(attacked_model(args), torch.device(cli.device))
        attacks = attacks_at_defaults(components, cli.victim_dir, resolution, cli.device)
        attacks = {name: attacks[name] for name in attacks if cli.attacks is None or name.split()[0] in cli.attacks
                   or name in cli.attacks}
        print(f"input checks (decode + hash every image once, before scoring; second call): {input_pass * 1e3:.2f} ms/image")
        warmup = attacks_at_defaults(components, cli.victim_dir, resolution, cli.device)["loss"]
        measure("warmup", rows[: cli.batch_size], components, args, resolution, warmup[0], warmup[1], cli.device)
        figures = {}
        for name, (score_batch, calls, rows_per_call, encodes) in attacks.items():
            figures[name] = measure(name, rows, components, args, resolution, score_batch, calls, cli.device,
                                    encodes, rows_per_call)
        # With --latents_cache_dir, a second attacked model sharing the VAE encoder reads z₀ from the cache.
        args.latents_cache_dir = str(Path(scratch) / "latents")
        measure("fill cache", rows, components, args, resolution, warmup[0], warmup[1], cli.device)
        for name, (score_batch, calls, rows_per_call, encodes) in attacks.items():
            figures[f"{name} (cached z0)"] = measure(f"{name} (cached z0)", rows, components, args, resolution,
                                                     score_batch, calls, cli.device, encodes - 1, rows_per_call)
    if cli.output:
        Path(cli.output).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
