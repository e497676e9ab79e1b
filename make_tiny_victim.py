#!/usr/bin/env python
"""Build the embedded default victim: a tiny Stable-Diffusion-architecture model pretrained on digits.

Everything is offline. The CLIP tokenizer is written from the BPE file that ships with open_clip, the
images come from `sklearn.datasets.load_digits` (10 private domains = 10 digit classes), and the model
is *pretrained* on a member split only, so that it leaks membership the way SD-1.4 leaks LAION images.

`--architecture sdxl` builds the same victim with SDXL's architecture: two CLIP text encoders (the second with a
projection, its tokenizer padding with "!"), a UNet without attention at its top level that takes the pooled text
embedding and the six size/crop time ids (`addition_embed_type="text_time"`), SDXL base's Euler scheduler config,
saved as a `StableDiffusionXLPipeline` (`force_zeros_for_empty_prompt`: dropped captions train on zeros, as the
pipeline's unconditional embedding). Same data, VAE, recipe and outputs.

Output (`--output_dir DIR`):
    DIR/pipeline      StableDiffusionPipeline.save_pretrained (load it like CompVis/stable-diffusion-v1-4), or
                      StableDiffusionXLPipeline (like stabilityai/stable-diffusion-xl-base-1.0)
    DIR/members       save_to_disk dataset: id, image, prompt, domain (the pretraining set)
    DIR/nonmembers    same columns, disjoint, stratified per domain, never trained on
    DIR/domains.json  domain names and prompt templates with their probabilities
    DIR/rprecision_model  the offline R-precision scorer: a domain classifier on the real images (safetensors)
    DIR/victim_info.json  build time and the membership figures (loss-attack AUC per seed, blind baseline)

Usage:
    python make_tiny_victim.py --output_dir outputs/victim --seed 0
"""

import copy
import gzip
import json
import shutil
import time
from pathlib import Path

import mixsyn_utils.quiet  # noqa: F401  (first: silences library messages that are emitted at import time)
import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils import check_min_version
from tqdm.auto import tqdm

# Shared with the other scripts (mixsyn_utils/):
from mixsyn_utils.cli import ArgumentParser, InputError, run_cli  # one-line errors for bad input (argparse's included)
from mixsyn_utils.dataset_io import load_image_dataset  # the saved member / non-member sets
# Pretraining captions use the paper's templates too, so self-synthesis prompts come from the same
# distribution as the victim's own training captions.
from mixsyn_utils.domains import PAPER_PROMPT_TEMPLATES, draw_prompt
from mixsyn_utils.dreambooth import denoising_loss, prediction_target  # ε or v target, Min-SNR-γ weighting
from mixsyn_utils.attack_scores import loss_attack_scores  # the loss attack: the victim's membership figures
from mixsyn_utils.diffusion import NoisePredictor, alphas_cumprod, q_sample  # ε̂, ᾱ_t, z_t
from mixsyn_utils.flags import require_non_negative, require_positive, require_range  # flag ranges
from mixsyn_utils.images import image_to_tensor  # the shared preprocessing
from mixsyn_utils.audit_statistics import blind_baseline_auc, blind_features  # the blind baseline
from mixsyn_utils.metrics import roc_metrics  # the membership figures
from mixsyn_utils.conditioning import TextConditioning, encode_prompts, square_time_ids  # the UNet's conditioning
from mixsyn_utils.models import (  # SD / SDXL components, z₀
    encode_images_to_latents,
    load_components,
    native_resolution,
    text_encoders_of,
    tokenize_prompts,
    tokenizers_of,
)
from mixsyn_utils.outputs import OutputLock, atomic_replace_dir, check_output_dir, temp_sibling  # whole or not at all
from mixsyn_utils.seeds import derive_seed  # the build's random streams
from mixsyn_utils.utility import train_domain_classifier  # the offline R-precision scorer

# Fails with a clear message when the installed diffusers is older than the one these scripts are written for.
check_min_version("0.42.0")

# One rule for z₀ everywhere; the narrow posterior makes its two forms agree (victim_info.json: the ratio).
LATENT_RULE = ("UNet pretraining, every fine-tune and PGD train on VAE posterior samples z0 = s(mu + sigma n); "
               "attacks score the mode s mu; the posterior is narrow (mean sigma / std of mu reported)")
DOMAIN_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
RESOLUTION = 32  # the default --image_size
# UNet pretraining steps per architecture (--unet_steps' default): README, "The embedded victim", has the curves.
DEFAULT_UNET_STEPS = {"sd": 700, "sdxl": 700}
SDXL_TIME_EMBED_DIM = 8  # addition_time_embed_dim (SDXL base: 256), the sinusoid width of each of the 6 time ids


def parse_args(input_args=None):
    parser = ArgumentParser(description="Build and pretrain the tiny offline SD-architecture victim.",
                            allow_abbrev=False)
    parser.add_argument("--output_dir", type=str, required=True, help="Where pipeline/, members/, nonmembers/ go.")
    parser.add_argument("--architecture", type=str, default="sd", choices=["sd", "sdxl"],
                        help="'sd': SD-1.x's (one CLIP encoder, cross attention at every UNet level); 'sdxl': SDXL's "
                             "(two CLIP encoders each of width --cross_attention_dim / 2, pooled text and size/crop "
                             "time ids added to the timestep embedding, no attention at the UNet's top level).")
    parser.add_argument("--seed", type=int, default=0, help="Fixes the split, the captions and all weights.")
    parser.add_argument("--members_per_domain", type=int, default=25, help="Pretraining images per digit class.")
    parser.add_argument("--nonmembers_per_domain", type=int, default=25, help="Held-out images per digit class.")
    parser.add_argument("--vae_steps", type=int, default=400, help="VAE pretraining steps (run first).")
    parser.add_argument(
        "--unet_steps", type=int, default=None,
        help="UNet pretraining steps (default: 700). Membership signal and prompt conditioning "
             "grow with them (README: the measured curves).",
    )
    parser.add_argument("--train_batch_size", type=int, default=64, help="Batch size of UNet pretraining.")
    parser.add_argument("--vae_batch_size", type=int, default=32, help="Batch size of VAE pretraining.")
    parser.add_argument("--learning_rate", type=float, default=5e-4, help="AdamW lr, cosine decay, both stages.")
    parser.add_argument(
        "--ema_decay", type=float, default=0.999,
        help="EMA of UNet weights saved as the model; without it the leakage swings between nearby steps.",
    )
    parser.add_argument("--caption_dropout", type=float, default=0.1,
                        help="Fraction of UNet steps trained on the empty prompt (SD used 0.1); needed for guidance.")
    parser.add_argument("--rprecision_steps", type=int, default=400,
                        help="Training steps of the offline R-precision domain classifier saved in DIR/rprecision_model.")
    parser.add_argument("--prediction_type", type=str, default="epsilon", choices=["epsilon", "v_prediction"],
                        help="UNet target: ε, or v = √ᾱ_t ε − √(1−ᾱ_t) z₀ (as SD-2.x); written into the scheduler "
                             "config that every script reads.")
    parser.add_argument("--vae_logvar_init", type=float, default=-10.0,
                        help="Initial posterior log-variance of the VAE (the logvar half of quant_conv: weights 0, "
                             "bias this value). Keeps the posterior narrow, as SD's VAE is, so that a posterior "
                             "sample (pretraining, fine-tuning, PGD) and the mode (attacks) differ by ≪ the latent "
                             "spread; victim_info.json reports the ratio.")
    parser.add_argument("--text_encoder_lr", type=float, default=5e-4,
                        help="The CLIP text encoder trains jointly with the UNet at this lr (0 = frozen random "
                             "encoder: the UNet then learns an unconditional model and ignores the prompt).")
    parser.add_argument("--cross_attention_dim", type=int, default=64,
                        help="Width of the CLIP text encoder = the UNet's cross_attention_dim.")
    parser.add_argument("--attention_heads", type=int, default=2,
                        help="Attention heads of the UNet's transformer blocks (diffusers' attention_head_dim).")
    parser.add_argument("--snr_gamma", type=float, default=1.0,
                        help="Min-SNR-γ weighting of the UNet pretraining loss (Hang et al. 2023); 0 = plain "
                             "MSE as SD-1.x. Weighting towards high-noise steps is what makes the prompt matter "
                             "within the step budget (README: measured curves).")
    parser.add_argument("--image_size", type=int, default=RESOLUTION,
                        help="Pixels per side of the images (8x8 digits are upscaled bicubically to this size).")
    parser.add_argument("--vae_block_out_channels", type=int, nargs="+", default=[32, 64, 64, 64],
                        help="Widths of the VAE's blocks; each block but the last halves the size, so the latent "
                             "is image_size / 2^(n-1) per side (32 64 64 64: factor 8, SD's; 32 64: factor 2). SD's "
                             "factor keeps SD's 48 pixel values per latent value, so the ℓ∞ budget η = 0.05 buys "
                             "the same first-order loss change per latent value as on SD-1.4.")
    parser.add_argument("--vae_data", type=str, default="public", choices=["members", "public"],
                        help="What the VAE trains on: 'public', every digit of load_digits in neither the member nor "
                             "the non-member split (disjoint from both, as SD's VAE never saw the attacked LAION "
                             "images), or the member images (its reconstruction error alone then separates members).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing non-empty --output_dir.")
    parser.add_argument("--skip_report", action="store_true", help="Do not compute the membership figures at the end.")
    args = parser.parse_args(input_args)
    if args.unet_steps is None:
        args.unet_steps = DEFAULT_UNET_STEPS[args.architecture]
    require_positive(args, "members_per_domain", "nonmembers_per_domain", "train_batch_size", "vae_batch_size",
                     "rprecision_steps", "learning_rate", "cross_attention_dim", "attention_heads", "image_size")
    factor = 2 ** (len(args.vae_block_out_channels) - 1)
    if args.image_size % (2 * factor):
        raise InputError(f"--image_size {args.image_size} must be a multiple of {2 * factor} (the VAE factor "
                         f"{factor} times the UNet's one downsampling)")
    require_non_negative(args, "vae_steps", "unet_steps", "seed", "text_encoder_lr", "snr_gamma")
    # exp(-30) ≈ 1e-13: a narrower posterior is a point; above 0 it is wider than the latent spread it must stay under.
    require_range(args, "vae_logvar_init", -30, 0)
    multiple = 8 if args.architecture == "sdxl" else 4
    if args.cross_attention_dim % multiple:
        raise InputError(f"--cross_attention_dim must be a multiple of {multiple} (the text encoders' 4 heads), "
                         f"got {args.cross_attention_dim}")
    for flag in ("caption_dropout", "ema_decay"):
        require_range(args, flag, 0, 1, include_high=False)
    return args


# ----------------------------------------------------------------------------------------------
# Tokenizer, written offline from open_clip's copy of the CLIP BPE merges
# ----------------------------------------------------------------------------------------------

def _bytes_to_unicode():
    """GPT-2/CLIP byte -> printable unicode map (the BPE alphabet)."""
    codes = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = codes[:]
    extra = 0
    for byte in range(256):
        if byte not in codes:
            codes.append(byte)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def write_clip_tokenizer(tokenizer_dir, model_max_length=77):
    """Write vocab.json + merges.txt of the real CLIP ViT-L/14 tokenizer and return a CLIPTokenizer."""
    import open_clip
    from transformers import CLIPTokenizer

    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    alphabet = _bytes_to_unicode()
    vocab = alphabet + [token + "</w>" for token in alphabet] + ["".join(pair) for pair in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tokenizer_dir = Path(tokenizer_dir)
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    (tokenizer_dir / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n")
    return CLIPTokenizer(
        str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"), model_max_length=model_max_length
    )


# ----------------------------------------------------------------------------------------------
# Data: digits, split per domain into members and non-members
# ----------------------------------------------------------------------------------------------

def digit_image(digits, index, resolution):
    """Digit `index` of load_digits as a `resolution`-px RGB PIL image (0–16 scaled to 0–255, bicubic)."""
    from PIL import Image

    gray = (digits.images[index] * (255.0 / 16.0)).round().astype(np.uint8)
    return Image.fromarray(gray).resize((resolution, resolution), Image.BICUBIC).convert("RGB")


def digits_splits(seed, members_per_domain, nonmembers_per_domain, resolution=RESOLUTION, with_public=False):
    """Two disjoint lists of rows (id, image, prompt, domain), stratified per digit class; with `with_public`
    also a third: every other digit (the public split, disjoint from both)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    members, nonmembers, public = [], [], []
    for label, domain in enumerate(DOMAIN_NAMES):
        indices = rng.permutation(np.flatnonzero(digits.target == label))
        needed = members_per_domain + nonmembers_per_domain
        if needed > len(indices):
            raise InputError(f"digit {label} has {len(indices)} images, fewer than the {needed} requested per domain")
        for rows, chosen in ((members, indices[:members_per_domain]), (nonmembers, indices[members_per_domain:needed])):
            for index in chosen:
                rows.append({
                    "id": f"digit-{int(index):04d}",
                    "image": digit_image(digits, index, resolution),
                    "prompt": draw_prompt(domain, PAPER_PROMPT_TEMPLATES, seed, int(index)),
                    "domain": domain,
                })
        public += [{"id": f"digit-{int(index):04d}", "image": digit_image(digits, index, resolution), "domain": domain}
                   for index in indices[needed:]] if with_public else []
    return (members, nonmembers, public) if with_public else (members, nonmembers)


def rows_to_tensor(rows):
    array = np.stack([np.asarray(row["image"], dtype=np.float32) for row in rows]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------------
# Model: the SD-1.x architecture at toy size
# ----------------------------------------------------------------------------------------------

def build_models(seed, cross_attention_dim=64, attention_heads=2, vae_logvar_init=-10.0, resolution=RESOLUTION,
                 vae_block_out_channels=(32, 64, 64, 64), architecture="sd"):
    """VAE (`resolution` px -> (resolution/f)²×4 latents, f = 2^(len(vae_block_out_channels)-1); default 32 px ->
    4x4x4, SD's factor 8), a UNet and its text encoders (`architecture`, see `build_unet_and_text_encoders`);
    weights from `seed`. Returns (vae, unet, [text encoders])."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=resolution,
        down_block_types=("DownEncoderBlock2D",) * len(vae_block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_block_out_channels),
        block_out_channels=tuple(vae_block_out_channels), layers_per_block=1, norm_num_groups=32,
    )
    # quant_conv maps the encoder output to (mean, logvar): a constant, very negative logvar at the start gives
    # a narrow posterior (σ = e^{init/2}) that the reconstruction loss has no reason to widen.
    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[channels:] = 0.0
        vae.quant_conv.bias[channels:] = float(vae_logvar_init)
    latent_size = resolution // 2 ** (len(vae_block_out_channels) - 1)
    unet, text_encoders = build_unet_and_text_encoders(latent_size, cross_attention_dim, attention_heads, architecture)
    return vae, unet, text_encoders


def build_unet_and_text_encoders(latent_size, cross_attention_dim=64, attention_heads=2, architecture="sd"):
    """The UNet and its CLIP text encoders at toy size.

    sd: cross attention at both UNet levels and the mid block; one CLIP encoder of width `cross_attention_dim`.
    sdxl: SDXL's layout (DownBlock2D then CrossAttnDownBlock2D with 2 transformer layers, linear projections, heads
    growing with depth) and its added embedding: `text_time`, 6 time ids of `SDXL_TIME_EMBED_DIM` sinusoids each plus
    the pooled text, `projection_class_embeddings_input_dim` = 6 · 8 + P; two 3-layer CLIP encoders of width
    D = `cross_attention_dim` / 2 (quick_gelu, padding with <|endoftext|>; gelu with a D → P = D projection, padding
    with "!" id 0), whose penultimate layers concatenate to the UNet's `cross_attention_dim`.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    clip = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                num_attention_heads=4)
    if architecture == "sd":
        unet = UNet2DConditionModel(
            sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cross_attention_dim, attention_head_dim=attention_heads, norm_num_groups=32,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            **clip, hidden_size=cross_attention_dim, intermediate_size=2 * cross_attention_dim, num_hidden_layers=2,
            pad_token_id=49407))
        return unet, [text_encoder]
    width = cross_attention_dim // 2
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(attention_heads, 2 * attention_heads), transformer_layers_per_block=(1, 2),
        use_linear_projection=True, cross_attention_dim=cross_attention_dim, norm_num_groups=32,
        addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + width, flip_sin_to_cos=True, freq_shift=0,
    )
    sizes = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3, projection_dim=width)
    text_encoder = CLIPTextModel(CLIPTextConfig(**clip, **sizes, hidden_act="quick_gelu", pad_token_id=49407))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip, **sizes, hidden_act="gelu", pad_token_id=0))
    return unet, [text_encoder, text_encoder_2]


def cosine_optimizer(parameters, learning_rate, steps):
    """AdamW + warm-up and cosine decay; `parameters` may be param groups with their own lr."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=1e-2)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, min(50, steps // 10), max(steps, 1))


def pretrain_vae(vae, pixel_values, args):
    """Reconstruction + tiny KL (β=1e-6, as in LDM's autoencoders); then set scaling_factor = 1/std(z)."""
    optimizer, scheduler = cosine_optimizer(vae.parameters(), args.learning_rate, args.vae_steps)
    generator = torch.Generator().manual_seed(derive_seed(args.seed, 1))
    vae.train()
    for _ in tqdm(range(args.vae_steps), desc="VAE pretraining"):
        batch = pixel_values[torch.randint(len(pixel_values), (args.vae_batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(reconstruction, batch) + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    vae.eval()
    with torch.no_grad():
        latents = vae.encode(pixel_values).latent_dist.mode()
    # SD-1.x uses 0.18215 = 1/std of its latents; the same rule gives unit-variance latents here.
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return float(loss.detach()) if args.vae_steps else float("nan")


@torch.no_grad()
def posterior_statistics(vae, pixel_values):
    """Scaled posterior mean μ and std σ per image, and the ratio mean(σ) / std(μ) (how far a sample can move)."""
    posterior = vae.encode(pixel_values).latent_dist
    scale = vae.config.scaling_factor
    mean, std = posterior.mean * scale, posterior.std * scale
    return mean, std, float(std.mean() / mean.std())


def pretrain_unet(unet, text_encoders, latent_mean, latent_std, prompt_index, prompt_ids, noise_scheduler, args,
                  after_step=None):
    """Pretraining on member latents (target ε or v); returns the EMA copies of the UNet and text encoders.

    z₀ = μ + σ·n, a fresh posterior sample every step, as SD was trained and as every fine-tune and PGD here
    encode. `prompt_ids` holds, per text encoder, each distinct member caption and, last, the empty prompt; image
    i's caption is row `prompt_index[i]`. With `--text_encoder_lr > 0` the text encoders train jointly (their own lr).
    Caption dropout: SD-1.x trains on the empty prompt's embedding; SDXL on zeros (its pipeline's unconditional
    embedding). SDXL's time ids are those of the uncropped images, (R, R, 0, 0, R, R). `after_step(n, ema_unet,
    ema_text_encoders)`, when given, sees the EMA models after every update n (the victim benchmark's snapshots).
    """
    train_text = args.text_encoder_lr > 0
    groups = [{"params": list(unet.parameters()), "lr": args.learning_rate}]
    if train_text:
        for text_encoder in text_encoders:
            text_encoder.requires_grad_(True).train()
        groups.append({"params": [p for text_encoder in text_encoders for p in text_encoder.parameters()],
                       "lr": args.text_encoder_lr})
    optimizer, scheduler = cosine_optimizer(groups, args.learning_rate, args.unet_steps)
    models = [unet, *text_encoders] if train_text else [unet]
    ema_models = [copy.deepcopy(model).requires_grad_(False) for model in models]
    generator = torch.Generator().manual_seed(derive_seed(args.seed, 2))
    num_timesteps = noise_scheduler.config.num_train_timesteps
    alpha_bar = alphas_cumprod(noise_scheduler)
    empty_index = len(prompt_ids[0]) - 1
    snr_gamma = args.snr_gamma if args.snr_gamma > 0 else None
    zeros_when_dropped = len(text_encoders) > 1
    with torch.no_grad():
        frozen_embeddings = None if train_text else encode_prompts(text_encoders, prompt_ids)
    unet.train()
    for step in tqdm(range(args.unet_steps), desc="UNet pretraining"):
        rows = torch.randint(len(latent_mean), (args.train_batch_size,), generator=generator)
        latents = latent_mean[rows] + latent_std[rows] * torch.randn(latent_mean[rows].shape, generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, num_timesteps, (len(rows),), generator=generator)
        noisy_latents = q_sample(latents, noise, timesteps, alpha_bar)
        # Caption dropout, as in SD's training: the unconditional embedding is what classifier-free guidance
        # subtracts at sampling time, so the model must have seen it.
        drop = torch.rand(len(rows), generator=generator) < args.caption_dropout
        embeddings = encode_prompts(text_encoders, prompt_ids) if train_text else frozen_embeddings
        if zeros_when_dropped:
            conditioning = zeroed_rows(embeddings.select(prompt_index[rows]), drop)
        else:
            conditioning = embeddings.select(torch.where(drop, torch.full_like(rows, empty_index), prompt_index[rows]))
        conditioning = conditioning.with_time_ids(square_time_ids(args.image_size, len(rows)))
        prediction = unet(noisy_latents, timesteps, **conditioning.unet_kwargs()).sample
        loss = denoising_loss(prediction, prediction_target(noise_scheduler, latents, noise, timesteps), timesteps,
                              noise_scheduler, snr_gamma)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        # EMA with warm-up (as diffusers' EMAModel): a constant 0.999 would keep 0.999^1500 ≈ 22% of the
        # random initial weights after 1500 steps and the samples would be noise.
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema_model, model in zip(ema_models, models):
                for ema_param, param in zip(ema_model.parameters(), model.parameters()):
                    ema_param.lerp_(param, 1.0 - decay)
        if after_step is not None:
            after_step(step + 1, ema_models[0], ema_models[1:] if train_text else text_encoders)
    ema_unet = ema_models[0].eval()
    ema_text_encoders = ema_models[1:] if train_text else text_encoders
    return ema_unet, [text_encoder.requires_grad_(False).eval() for text_encoder in ema_text_encoders]


def zeroed_rows(conditioning, drop):
    """`conditioning` with the text and pooled text of the rows `drop` (B,) set to zero."""
    keep = (~drop).to(conditioning.hidden_states.dtype)
    return TextConditioning(conditioning.hidden_states * keep[:, None, None],
                            None if conditioning.pooled is None else conditioning.pooled * keep[:, None])


def write_tokenizers(tokenizer_dir, architecture="sd"):
    """The CLIP tokenizer (`write_clip_tokenizer`); for SDXL also its second tokenizer: the same BPE files padding with
    "!" (id 0), as diffusers loads SDXL's OpenCLIP-bigG tokenizer."""
    from transformers import CLIPTokenizer

    tokenizer = write_clip_tokenizer(tokenizer_dir)
    if architecture == "sd":
        return [tokenizer]
    tokenizer_2 = CLIPTokenizer(str(Path(tokenizer_dir) / "vocab.json"), str(Path(tokenizer_dir) / "merges.txt"),
                                model_max_length=tokenizer.model_max_length, pad_token="!")
    return [tokenizer, tokenizer_2]


def pipeline_scheduler(architecture, prediction_type="epsilon"):
    """The sampling scheduler saved with the pipeline, each with the scaled-linear β 0.00085–0.012 schedule over 1000
    steps: SD-1.4's PNDM config, or SDXL base's Euler config (leading spacing, steps offset 1)."""
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  steps_offset=1, prediction_type=prediction_type)
    if architecture == "sdxl":
        return EulerDiscreteScheduler(**common, interpolation_type="linear", timestep_spacing="leading",
                                      use_karras_sigmas=False)
    pndm = PNDMScheduler(**common, skip_prk_steps=True, set_alpha_to_one=False)
    pndm.register_to_config(clip_sample=False)  # as in SD-1.x's scheduler_config.json, read by DDPM/DDIM
    return pndm


def victim_pipeline(vae, unet, text_encoders, tokenizers, scheduler):
    """A `StableDiffusionPipeline` (one text encoder) or `StableDiffusionXLPipeline` (two) of the parts."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if len(text_encoders) == 1:
        return StableDiffusionPipeline(vae=vae, text_encoder=text_encoders[0], tokenizer=tokenizers[0], unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1],
                                     tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)


def build_tiny_victim(args, after_step=None):
    """Build, pretrain and save the victim under a temp folder; returns a dict of timings and figures.

    `after_step`: passed to `pretrain_unet`."""
    from datasets import Dataset, Features, Image as ImageFeature, Value
    from diffusers import DDPMScheduler

    start = time.time()
    torch.manual_seed(args.seed)
    work_dir = temp_sibling(args.output_dir)
    try:
        tokenizers = write_tokenizers(work_dir / "_tokenizer", args.architecture)
        vae, unet, text_encoders = build_models(args.seed, args.cross_attention_dim, args.attention_heads,
                                                args.vae_logvar_init, args.image_size, args.vae_block_out_channels,
                                                args.architecture)
        for text_encoder in text_encoders:
            text_encoder.requires_grad_(False).eval()
        scheduler = pipeline_scheduler(args.architecture, args.prediction_type)
        noise_scheduler = DDPMScheduler.from_config(scheduler.config)  # training reads the schedule as DDPM

        members, nonmembers, public = digits_splits(args.seed, args.members_per_domain, args.nonmembers_per_domain,
                                                    args.image_size, with_public=True)
        member_pixels = rows_to_tensor(members)
        # The VAE's training set: the members (default), or the public split disjoint from members and non-members.
        vae_loss = pretrain_vae(vae, member_pixels if args.vae_data == "members" else rows_to_tensor(public), args)
        vae.requires_grad_(False)
        latent_mean, latent_std, posterior_ratio = posterior_statistics(vae, member_pixels)
        distinct_prompts = sorted({row["prompt"] for row in members})
        prompt_index = torch.tensor([distinct_prompts.index(row["prompt"]) for row in members])
        prompt_ids = [tokenize_prompts(tokenizer, distinct_prompts + [""]) for tokenizer in tokenizers]
        vae_seconds = time.time() - start
        unet, text_encoders = pretrain_unet(unet, text_encoders, latent_mean, latent_std, prompt_index, prompt_ids,
                                            noise_scheduler, args, after_step)
        unet_seconds = time.time() - start - vae_seconds

        victim_pipeline(vae, unet, text_encoders, tokenizers, scheduler).save_pretrained(
            work_dir / "pipeline", safe_serialization=True)
        shutil.rmtree(work_dir / "_tokenizer")
        features = Features({"id": Value("string"), "image": ImageFeature(), "prompt": Value("string"), "domain": Value("string")})
        for name, rows in (("members", members), ("nonmembers", nonmembers)):
            Dataset.from_list(rows, features=features).save_to_disk(str(work_dir / name))
        (work_dir / "domains.json").write_text(json.dumps({
            "domains": DOMAIN_NAMES,
            "templates": [{"template": template, "p": p} for template, p in PAPER_PROMPT_TEMPLATES],
            "source": "sklearn.datasets.load_digits; one domain per digit class",
        }, indent=2))
        # The offline R-precision scorer (no pretrained CLIP here): a domain classifier on the real digits.
        classifier = train_domain_classifier([Dataset.from_list(members), Dataset.from_list(nonmembers)],
                                             work_dir / "rprecision_model", seed=args.seed, steps=args.rprecision_steps)
        figures = {"seed": args.seed, "architecture": args.architecture,
                   "rprecision_heldout_accuracy": classifier["heldout_accuracy_80_20"],
                   "vae_final_loss": vae_loss, "posterior_std_over_latent_std": posterior_ratio,
                   "latent_rule": LATENT_RULE, "prediction_type": args.prediction_type,
                   "image_size": args.image_size, "vae_block_out_channels": list(args.vae_block_out_channels),
                   "vae_data": args.vae_data, "vae_training_images": len(members) if args.vae_data == "members"
                   else len(public),
                   "unet_steps": args.unet_steps, "vae_seconds": round(vae_seconds, 1),
                   "unet_seconds": round(unet_seconds, 1), "build_seconds": round(time.time() - start, 1)}
        (work_dir / "victim_info.json").write_text(json.dumps(figures, indent=2))
        atomic_replace_dir(work_dir, args.output_dir)
    finally:
        if work_dir.exists():
            shutil.rmtree(work_dir, ignore_errors=True)
    return figures


@torch.no_grad()
def loss_attack_member_scores(components, dataset, timesteps, seed, batch_size=64):
    """Per image −L(x) of `diffusion.loss_attack_scores` averaged over `timesteps` (higher = more member-like)."""
    predictor = NoisePredictor.of(components.unet, components.noise_scheduler)
    resolution = native_resolution(components.unet, components.vae)
    scores = []
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        pixel_values = torch.stack([image_to_tensor(image, resolution) for image in rows["image"]])
        latents = encode_images_to_latents(components.vae, pixel_values)
        context = encode_prompts(text_encoders_of(components), [tokenize_prompts(tokenizer, rows["prompt"])
                                                                for tokenizer in tokenizers_of(components)])
        context = context.with_time_ids(square_time_ids(resolution, len(context)))
        by_timestep = loss_attack_scores(predictor, latents, context, timesteps, seed=seed)
        scores.append(-torch.stack([by_timestep[t] for t in timesteps]).mean(0))
    return torch.cat(scores).numpy()


def victim_membership_figures(victim_dir, attack_seeds=(0, 1, 2), timesteps=(50, 100, 200, 300)):
    """Loss-attack AUC per attack seed (members expected to have the lower loss), and the model-free blind baseline."""
    components = load_components(str(Path(victim_dir) / "pipeline"))
    members = load_image_dataset(str(Path(victim_dir) / "members"), required_columns=("image", "prompt"))
    nonmembers = load_image_dataset(str(Path(victim_dir) / "nonmembers"), required_columns=("image", "prompt"))
    results = {}
    for attack_seed in tqdm(attack_seeds, desc="Membership figures (loss attack per seed)"):
        member_scores = loss_attack_member_scores(components, members, timesteps, attack_seed)
        nonmember_scores = loss_attack_member_scores(components, nonmembers, timesteps, attack_seed)
        results[f"loss_attack_auc_seed{attack_seed}"] = roc_metrics(member_scores, nonmember_scores)["auc"]
    features = blind_features(list(members["image"]) + list(nonmembers["image"]),
                              list(members["prompt"]) + list(nonmembers["prompt"]))
    blind = blind_baseline_auc(features, [True] * len(members) + [False] * len(nonmembers))
    results["blind_baseline_auc"], results["blind_baseline_auc_ci"] = blind["auc"], blind["auc_ci"]
    return results


def main(args):
    with OutputLock(args.output_dir):  # a second build into this folder is refused
        check_output_dir(args.output_dir, args.overwrite)
        print(f"Building the tiny victim (seed {args.seed}, {args.vae_steps} VAE + {args.unet_steps} UNet steps)...")
        figures = build_tiny_victim(args)
        print(f"Saved to {args.output_dir} in {figures['build_seconds']} s")
        if not args.skip_report:
            membership = victim_membership_figures(args.output_dir)
            for name, value in membership.items():
                print(f"{name}: {value}")
            figures.update(membership)
            info_path = Path(args.output_dir) / "victim_info.json"
            info_path.write_text(json.dumps(figures, indent=2))
        return figures


if __name__ == "__main__":
    run_cli(main, parse_args)
