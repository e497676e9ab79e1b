#!/usr/bin/env python
"""Cost of one Anti-DreamBooth PGD step per image against its floor, and the projected ASPL cost.

Floor: one VAE-encoder + UNet forward and backward to the pixels at the same batch (what any PGD step
on a latent diffusion model must do). The PGD step is `mixsyn_utils.adversarial.pgd_attack` itself.
Models: a full-size SD-1.x UNet, VAE and CLIP text encoder built from their configs with random weights
(the cost does not depend on the weights). The projection for `--images_per_domain` × `--num_domains`:

    per domain = S · (2 · F · t_train + A · n · t_pgd),   S = max_train_steps (50), F = max_f_train_steps (3),
                                                          A = max_adv_train_steps (6), n = images per domain

with t_train one surrogate step (1 instance + 1 class image, AdamW) and t_pgd one PGD step per image.
t_train is measured with `--measure_training` (needs ~4x the UNet's size in memory: copy, grads, AdamW
state); otherwise it is estimated as 2 floor images (stated in the output).

    python benchmarks/bench_pgd.py --resolution 512 --batch_size 8          # on a GPU: the real projection
    python benchmarks/bench_pgd.py --resolution 64 --batch_size 2 --steps 2  # on a CPU: the ratio only
"""

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, like the scripts

from mixsyn_utils.adversarial import pgd_attack, train_surrogate
from mixsyn_utils.diffusion import alphas_cumprod, q_sample

SD14_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SD14_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, sample_size=512,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD14_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="PGD step cost vs its floor; projected ASPL cost.")
    parser.add_argument("--resolution", type=int, default=512, help="Pixels per side (SD-1.x: 512).")
    parser.add_argument("--batch_size", type=int, default=8, help="Images per PGD step (--pgd_batch_size).")
    parser.add_argument("--steps", type=int, default=5, help="Timed repetitions of each measurement.")
    parser.add_argument("--dtype", type=str, default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="Weights dtype of the frozen models (the surrogate UNet stays fp32 when trained).")
    parser.add_argument("--measure_training", action="store_true", help="Also time one surrogate training step.")
    parser.add_argument("--images_per_domain", type=int, default=100, help="n in the projection (MixSyn: 100).")
    parser.add_argument("--num_domains", type=int, default=40, help="Domains in the projection.")
    parser.add_argument("--max_train_steps", type=int, default=50, help="S in the projection.")
    parser.add_argument("--max_f_train_steps", type=int, default=3, help="F in the projection.")
    parser.add_argument("--max_adv_train_steps", type=int, default=6, help="A in the projection.")
    return parser.parse_args(input_args)


def build_models(device, dtype):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    models = SimpleNamespace(
        unet=UNet2DConditionModel(**SD14_UNET), vae=AutoencoderKL(**SD14_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SD14_TEXT)),
        noise_scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                      clip_sample=False))
    for module in (models.unet, models.vae, models.text_encoder):
        module.requires_grad_(False).to(device, dtype=dtype).eval()
    return models


def timed(function, steps, device):
    function()  # warm-up (allocator, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        function()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def floor_step(models, pixels, context, generator):
    """VAE-encoder + UNet forward and backward to the pixels, nothing else (the floor of a PGD step)."""
    pixels = pixels.clone().requires_grad_(True)
    latents = models.vae.encode(pixels).latent_dist.sample(generator=generator) * models.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    timesteps = torch.randint(0, 1000, (len(latents),), generator=generator).to(latents.device)
    prediction = models.unet(q_sample(latents, noise, timesteps, alphas_cumprod(models.noise_scheduler)),
                             timesteps, context).sample
    loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
    return torch.autograd.grad(loss, pixels)[0]


def main(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    models = build_models(device, dtype)
    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(args.batch_size, 3, args.resolution, args.resolution, generator=generator) * 2 - 1)
    pixels = pixels.to(device, dtype)
    input_ids = torch.randint(0, SD14_TEXT["vocab_size"], (args.batch_size, 77), generator=generator)
    with torch.no_grad():
        context = models.text_encoder(input_ids.to(device))[0]

    floor_s = timed(lambda: floor_step(models, pixels, context, generator), args.steps, device) / args.batch_size
    pgd_s = timed(lambda: pgd_attack(models, pixels, pixels, input_ids, 1, 0.005, 0.05, generator,
                                     batch_size=args.batch_size), args.steps, device) / args.batch_size
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
          f"{args.resolution} px, batch {args.batch_size}, {args.dtype}, "
          "full-size SD-1.x UNet/VAE/CLIP-L, random weights")
    print(f"floor (VAE-encoder + UNet fwd+bwd) per image: {floor_s * 1e3:9.1f} ms")
    print(f"PGD step (pgd_attack) per image:              {pgd_s * 1e3:9.1f} ms")
    print(f"ratio PGD step / floor:                       {pgd_s / floor_s:9.3f}")

    if args.measure_training:
        models.unet.to(torch.float32)
        two = pixels[:1].float(), input_ids[:1], pixels[1:2].float(), input_ids[1:2]
        copy_s = timed(lambda: train_surrogate(models, *two, 0, 5e-7, generator), args.steps, device)
        with_steps_s = timed(lambda: train_surrogate(models, *two, 2, 5e-7, generator), args.steps, device)
        train_s, basis = (with_steps_s - copy_s) / 2, "measured"
    else:
        copy_s, train_s, basis = 0.0, 2 * floor_s, "estimated as 2 floor images (not measured)"
    per_iteration_s = (2 * args.max_f_train_steps * train_s + 2 * copy_s
                       + args.max_adv_train_steps * args.images_per_domain * pgd_s)
    total_s = args.num_domains * args.max_train_steps * per_iteration_s
    pgd_share = args.max_adv_train_steps * args.images_per_domain * pgd_s / per_iteration_s
    print(f"surrogate step (1 instance + 1 class image): {train_s * 1e3:9.1f} ms ({basis}); "
          f"copy f→f′ {copy_s:.2f} s")
    print(f"projected ASPL, {args.images_per_domain} images × {args.num_domains} domains, S={args.max_train_steps}, "
          f"F={args.max_f_train_steps}, A={args.max_adv_train_steps}: {total_s / 3600:.1f} h on this device "
          f"at {args.resolution} px (PGD share {pgd_share:.0%})")


if __name__ == "__main__":
    main(parse_args())
