#!/usr/bin/env python
"""Per-image attack time against the UNet floor, for PIA and SecMI (issue 5; target ratio ≤ 1.2×).

floor = the same number of batched UNet forwards (same batch size, same latent shape, same text-context
shape) on random latents, timed in the same process right after the attack. The attack's time is the
whole scoring loop (`score_all`: image decoding, VAE, text encoder, UNet, per-batch partial saves).

    python benchmarks/bench_attacks.py --victim_dir outputs/victim            # the tiny victim
    python benchmarks/bench_attacks.py --sd_config --num_images 8 --device cuda  # SD-1.x-size UNet, random weights
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixsyn_utils.attacks import load_attack_data, load_attack_model, score_all  # noqa: E402
from mixsyn_utils.diffusion import alphas_cumprod, pia_scores, secmi_t_error  # noqa: E402


class NoProgress:
    def __init__(self, **kwargs):
        pass

    def update(self, n):
        pass

    def close(self):
        pass


class SingleProcess:
    is_main_process, process_index, num_processes = True, 0, 1

    def wait_for_everyone(self):
        pass


def attack_args(victim_dir, output_dir, batch_size):
    return SimpleNamespace(
        pretrained_model_name_or_path=str(Path(victim_dir) / "pipeline"), revision=None, variant=None, unet_path=None,
        lora_weights=None, textual_inversion=None, member_dataset=str(Path(victim_dir) / "members"),
        nonmember_dataset=str(Path(victim_dir) / "nonmembers"), caption_column="prompt", null_prompt=False,
        resolution=None, batch_size=batch_size, vae_sample=False, seed=0, output_dir=str(output_dir),
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


def measure(name, rows, components, args, score_batch, calls_per_image, device):
    with tempfile.TemporaryDirectory() as scratch:
        args.output_dir = str(Path(scratch) / name)
        synchronize(device)
        start = time.perf_counter()
        partial, num_batches = score_all(rows, components, args, SingleProcess(), score_batch, NoProgress)
        synchronize(device)
        attack_seconds = time.perf_counter() - start
        partial.cleanup()
    latent_shape = (components.unet.config.in_channels, *([components.unet.config.sample_size] * 2))
    context_shape = (components.tokenizer.model_max_length, components.text_encoder.config.hidden_size)
    # Full batches only in the floor too: same number of forwards of the same sizes as the attack.
    floor = 0.0
    for start in range(0, len(rows), args.batch_size):
        size = min(args.batch_size, len(rows) - start)
        floor += unet_floor_seconds(components.unet, calls_per_image, size, latent_shape, context_shape, device)
    per_image, floor_per_image = attack_seconds / len(rows), floor / len(rows)
    print(f"{name:6s} {len(rows)} images: {per_image * 1e3:8.2f} ms/image, floor {floor_per_image * 1e3:8.2f} ms/image, "
          f"ratio {per_image / floor_per_image:.3f}x")


def build_sd_victim(victim_dir):
    """An SD-1.x-config UNet (random weights) on the tiny victim's VAE/text encoder: UNet cost of SD at 64×64×4."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipeline = StableDiffusionPipeline.from_pretrained(str(Path(victim_dir) / "pipeline"), safety_checker=None,
                                                       requires_safety_checker=False)
    pipeline.unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=pipeline.text_encoder.config.hidden_size)
    return pipeline


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victim_dir", type=str, required=True, help="A make_tiny_victim.py output folder.")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--t_sec", type=int, default=100)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--num_images", type=int, default=None, help="Score only this many images.")
    parser.add_argument("--sd_config", action="store_true", help="Swap in an SD-1.x-size UNet (random weights).")
    cli = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        args = attack_args(cli.victim_dir, Path(scratch) / "scores", cli.batch_size)
        if cli.sd_config:
            pipeline_dir = Path(scratch) / "sd" / "pipeline"
            build_sd_victim(cli.victim_dir).save_pretrained(str(pipeline_dir))
            args.pretrained_model_name_or_path = str(pipeline_dir)  # native size: 64×64 latents, as SD-1.x
        rows = load_attack_data(args)[: cli.num_images]
        components = load_attack_model(args, torch.device(cli.device))
        alpha_bar = alphas_cumprod(components.noise_scheduler).to(cli.device)
        pia = lambda latents, context: {"score": pia_scores(components.unet, latents, context, alpha_bar, [200])[200]}  # noqa: E731
        secmi = lambda latents, context: {"score": secmi_t_error(components.unet, latents, context, alpha_bar,  # noqa: E731
                                                                 cli.t_sec, cli.k)[0]}
        measure("warmup", rows[: cli.batch_size], components, args, pia, 2, cli.device)
        measure("pia", rows, components, args, pia, 2, cli.device)
        measure("secmi", rows, components, args, secmi, cli.t_sec // cli.k + 1, cli.device)


if __name__ == "__main__":
    main()
