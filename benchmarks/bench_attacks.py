#!/usr/bin/env python
"""Per-image attack time against the UNet floor, for PIA and SecMI (target ratio ≤ 1.2×).

floor = the same number of batched UNet forwards (same batch size, same latent shape, same text-context
shape) on random latents, timed in the same process right after the attack. The attack's time is the
whole scoring loop (`score_all`: image decoding, VAE, text encoder, UNet, per-batch partial saves).

    python benchmarks/bench_attacks.py --victim_dir outputs/victim            # the tiny victim
    python benchmarks/bench_attacks.py --victim_dir outputs/victim --sd_config --num_images 8 --batch_size 4
        # SD-1.x-size UNet, VAE and text encoder (random weights) at 512 px; on a GPU add --device cuda
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mixsyn_utils.attacks import attack_resolution, load_attack_data, load_attack_model, score_all  # noqa: E402
from mixsyn_utils.diffusion import NoisePredictor, pia_scores, secmi_t_error  # noqa: E402


def attack_args(victim_dir, output_dir, batch_size):
    return SimpleNamespace(
        pretrained_model_name_or_path=str(Path(victim_dir) / "pipeline"), revision=None, variant=None, unet_path=None,
        lora_weights=None, textual_inversion=None, member_dataset=str(Path(victim_dir) / "members"),
        nonmember_dataset=str(Path(victim_dir) / "nonmembers"), caption_column="prompt", null_prompt=False,
        resolution=None, batch_size=batch_size, vae_sample=False, seed=0, latents_cache_dir=None, output_dir=str(output_dir),
        overwrite=True, push_to_hub=False, hub_dataset_id=None, hub_token=None,
    )


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def unet_floor_seconds(unet, num_calls, batch_size, latent_shape, context_shape, device):
    latents = torch.randn(batch_size, *latent_shape, device=device)
    context = torch.randn(batch_size, *context_shape, device=device)
    timesteps = torch.full((batch_size,), 100, device=device, dtype=torch.long)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(num_calls):
        unet(latents, timesteps, context)
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


def measure(name, rows, components, args, score_batch, calls_per_image, device, encodes=True):
    """Per-image time of `score_all` against the UNet floor, and against UNet + VAE-encoder floor."""
    resolution = attack_resolution(args, components)
    with tempfile.TemporaryDirectory() as scratch:
        args.output_dir = str(Path(scratch) / name)
        synchronize(device)
        start = time.perf_counter()
        _, work = score_all(rows, components, args, resolution, None, score_batch, desc=name)
        synchronize(device)
        attack_seconds = time.perf_counter() - start
        work.cleanup()
    latent_shape = (components.unet.config.in_channels, *([components.unet.config.sample_size] * 2))
    context_shape = (components.tokenizer.model_max_length, components.text_encoder.config.hidden_size)
    # Full batches only in the floor too: same number of forwards of the same sizes as the attack.
    floor = vae_floor = 0.0
    for start in range(0, len(rows), args.batch_size):
        size = min(args.batch_size, len(rows) - start)
        floor += unet_floor_seconds(components.unet, calls_per_image, size, latent_shape, context_shape, device)
        vae_floor += vae_floor_seconds(components.vae, size, resolution, device)
    per_image, floor_per_image, vae_per_image = (value / len(rows) for value in (attack_seconds, floor, vae_floor))
    line = (f"{name:18s} {len(rows)} images: {per_image * 1e3:9.2f} ms/image; UNet floor {floor_per_image * 1e3:9.2f} "
            f"ms/image, ratio {per_image / floor_per_image:.3f}x")
    if encodes:  # z₀ computed here, not read from the latents cache
        line += (f"; UNet + VAE-encode floor {(floor_per_image + vae_per_image) * 1e3:9.2f} ms/image, "
                 f"ratio {per_image / (floor_per_image + vae_per_image):.3f}x")
    print(line)


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victim_dir", type=str, required=True, help="A make_tiny_victim.py output folder.")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--t_sec", type=int, default=100)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--num_images", type=int, default=None, help="Score only this many images.")
    parser.add_argument("--sd_config", action="store_true",
                        help="Swap in SD-1.x-size UNet, VAE and text encoder (random weights), attacked at 512 px.")
    parser.add_argument("--attacks", nargs="+", default=["pia", "secmi"], choices=["pia", "secmi"],
                        help="Attacks to time (SecMI costs t_sec/k + 1 UNet calls per image).")
    cli = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        args = attack_args(cli.victim_dir, Path(scratch) / "scores", cli.batch_size)
        if cli.sd_config:
            pipeline_dir = Path(scratch) / "sd" / "pipeline"
            build_sd_victim(cli.victim_dir).save_pretrained(str(pipeline_dir))
            args.pretrained_model_name_or_path = str(pipeline_dir)  # native size: 512 px, 64×64 latents
        load_attack_data(args)  # first call: imports, dataset loading
        start = time.perf_counter()
        all_rows = load_attack_data(args)
        input_pass = (time.perf_counter() - start) / len(all_rows)
        rows = all_rows[: cli.num_images]
        components = load_attack_model(args, torch.device(cli.device))
        predictor = NoisePredictor.of(components.unet, components.noise_scheduler)
        pia = lambda batch: {"score": pia_scores(predictor, batch.latents, batch.context, [200])[200]}  # noqa: E731
        secmi = lambda batch: {"score": secmi_t_error(predictor, batch.latents, batch.context,  # noqa: E731
                                                      cli.t_sec, cli.k)[0]}
        print(f"input checks (decode + hash every image once, before scoring; second call): {input_pass * 1e3:.2f} ms/image")
        attacks = {"pia": (pia, 2), "secmi": (secmi, cli.t_sec // cli.k + 1)}
        attacks = {name: attacks[name] for name in cli.attacks}
        measure("warmup", rows[: cli.batch_size], components, args, pia, 2, cli.device)
        for name, (score_batch, calls) in attacks.items():
            measure(name, rows, components, args, score_batch, calls, cli.device)
        # With --latents_cache_dir, a second attacked model sharing the VAE encoder reads z₀ from the cache.
        args.latents_cache_dir = str(Path(scratch) / "latents")
        measure("fill cache", rows, components, args, pia, 2, cli.device)
        for name, (score_batch, calls) in attacks.items():
            measure(f"{name} (cached z0)", rows, components, args, score_batch, calls, cli.device, encodes=False)


if __name__ == "__main__":
    main()
