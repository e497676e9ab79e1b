"""The premises the study's claims rest on, measured on this run's models before any claim is read.

- P1 the pre-trained model follows its prompts: R-precision ≥ `min_r_precision`.
- P2 the pre-trained model leaks: the lower end of its worst-case AUC interval > `min_auc_lower_bound`.
- P3 a fine-tune fits its data without damage: ≥ `min_epochs` passes over its images, its denoising loss on its own
  training images ≤ `max_own_loss_ratio` × the pre-trained model's, R-precision ≥ `min_utility_fraction` × the
  pre-trained model's.
- P4 the perturbation acts: the pre-trained victim's loss on the perturbed images ≥ `min_perturbation_ratio` × its
  loss on the clean ones, and that excess ≥ `random_multiple` × the excess of ±η random noise (same ℓ∞).
- P5 the perturbation is learned: generations of the model trained on perturbed images differ from those of the model
  trained on clean ones (same training seed, same prompts and sampler noise) by at least as much as two clean
  models of different training seeds differ.
- P6 the quality metric tracks known damage: it ranks the pre-trained model with growing weight noise in order.
- P7 extraction is calibrated: δ lies below the closest distinct pair of real images, and members with small pixel
  noise (a positive control) are extracted.

`denoising_loss_per_image` is the loss of P3 and P4: L(x) = mean over `loss_timesteps` t and draws j of
‖ε_j − ε̂(√ᾱ_t z₀ + √(1−ᾱ_t) ε_j, t, c)‖²/d (`attack_scores.loss_attack_scores`: the same ε_j for every image, z₀ the
posterior mode, c the image's own caption).
"""

import math

import numpy as np
import torch

from mixsyn_utils.attack_scores import loss_attack_scores
from mixsyn_utils.attacks import CaptionCache, batch_pixel_values, encode_pixel_latents
from mixsyn_utils.dataset_io import load_image_dataset
from mixsyn_utils.diffusion import NoisePredictor
from mixsyn_utils.domains import generation_plan, load_domains
from mixsyn_utils.extraction import eidetic_extraction, tiled_l2_distances
from mixsyn_utils.images import resize_and_crop
from mixsyn_utils.mixing import mix_datasets
from mixsyn_utils.models import native_resolution, text_encoders_of
from mixsyn_utils.seeds import derive_seed
from mixsyn_utils.utility import classifier_r_precision_hits, frechet_distance, gaussian_moments, pixel_features
from mixsyn_utils.variants import components_from_pipeline, load_model_variant

# Salts of the premises' own random streams (weight noise of P6, pixel noise of P7's control).
SALT_DAMAGE = 23
SALT_CONTROL = 29


def dataset_rows(dataset):
    """Rows for `attacks.batch_pixel_values`: the dataset's images in order, each with its caption."""
    view = dataset.select_columns(["image"])
    return [{"source": (view, index), "caption": caption} for index, caption in enumerate(dataset["prompt"])]


@torch.no_grad()
def denoising_loss_per_image(components, dataset, timesteps, seed, num_draws, batch_size=100):
    """(N,) float64 L(x) of every image of `dataset` (columns image, prompt) under `components` (see module doc)."""
    predictor = NoisePredictor.of(components.unet, components.noise_scheduler)
    resolution = native_resolution(components.unet, components.vae)
    captions = CaptionCache(components, resolution)  # SDXL: both encoders and the uncropped image's time ids
    rows, losses = dataset_rows(dataset), []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        latents = encode_pixel_latents(components.vae, batch_pixel_values(batch, resolution), False, seed, start)
        by_timestep = loss_attack_scores(predictor, latents, captions([row["caption"] for row in batch]),
                                         timesteps, seed, num_draws)
        losses.append(torch.stack(list(by_timestep.values())).mean(0).double().cpu().numpy())
    return np.concatenate(losses)


def load_model(pipeline_dir, lora_weights=None):
    """A fine-tuned DreamBooth pipeline (or the pre-trained one, with `lora_weights` fused when given) as eval-mode
    components without gradients."""
    components = components_from_pipeline(load_model_variant(str(pipeline_dir), lora_weights=lora_weights))
    for module in (components.unet, components.vae, *text_encoders_of(components)):
        module.requires_grad_(False).eval()
    return components


def perturbation_ratios(victim, clean, perturbed_by_noise, timesteps, seed, num_draws):
    """P4's figures: {noise: mean_i L(x_i + δ_i) / mean_i L(x_i)} with the pre-trained victim (images paired by id)."""
    clean_loss = denoising_loss_per_image(victim, clean, timesteps, seed, num_draws).mean()
    ratios = {}
    for noise, perturbed in perturbed_by_noise.items():
        order = {image_id: index for index, image_id in enumerate(perturbed["id"])}
        aligned = perturbed.select([order[image_id] for image_id in clean["id"]])
        ratios[noise] = float(denoising_loss_per_image(victim, aligned, timesteps, seed, num_draws).mean() / clean_loss)
    return ratios


def perturbation_acts(ratios, min_ratio, random_multiple):
    """P4's reading: ratio_aspl ≥ min_ratio and (ratio_aspl − 1) ≥ random_multiple · (ratio_random − 1), the ratios of
    `perturbation_ratios` (a missing one reads NaN, and P4 fails)."""
    aspl, random = ratios.get("aspl", math.nan), ratios.get("random", math.nan)
    return bool(aspl >= min_ratio and aspl - 1 >= random_multiple * (random - 1))


def training_images(clean, perturbed, mode, ratio, pattern, mixup_seed, resolution):
    """The images a setting trained on (the training scripts' `mix_datasets`, same arguments)."""
    if ratio == 0:
        return clean
    return mix_datasets(clean, perturbed, mode, ratio, mixup_seed, pattern=pattern, resolution=resolution)


def generation_rms(generations_a, generations_b):
    """RMS pixel difference ([0, 1] units) between two models' generations with the same ids (same prompt and noise)."""
    order = {image_id: index for index, image_id in enumerate(generations_b["id"])}
    squared = []
    for image_id, image in zip(generations_a["id"], generations_a["image"]):
        a = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
        b = np.asarray(generations_b[order[image_id]]["image"].convert("RGB"), dtype=np.float64) / 255.0
        squared.append(((a - b) ** 2).mean())
    return float(np.sqrt(np.mean(squared)))


@torch.no_grad()
def damage_ladder(pretrained_dir, levels, domains_file, nonmembers, rprecision_model, num_per_prompt,
                  num_inference_steps, guidance_scale, sample_seed, sample_batch_size=100):
    """P6's ladder: for each k in `levels`, the pre-trained model with Gaussian noise k × RMS(w) added to every UNet
    weight tensor w (seeded by `derive_seed(0, SALT_DAMAGE, level index)`), sampled with evaluate.py's plan; returns
    [{k, pixel_frechet_distance, r_precision}] (Fréchet distance to the non-members, lower is better)."""
    domain_names, templates = load_domains(domains_file)
    plan = generation_plan(domain_names, templates, num_per_prompt, sample_seed)
    reference = gaussian_moments(pixel_features(nonmembers["image"]))
    ladder = []
    for index, level in enumerate(levels):
        pipeline = load_model_variant(str(pretrained_dir))
        pipeline.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(derive_seed(0, SALT_DAMAGE, index))
        for tensor in pipeline.unet.parameters():
            rms = tensor.detach().double().pow(2).mean().sqrt().item()
            tensor.add_(level * rms * torch.randn(tensor.shape, generator=generator).to(tensor.dtype))
        images = []
        for start in range(0, len(plan), sample_batch_size):
            rows = plan[start:start + sample_batch_size]
            images += pipeline([row["prompt"] for row in rows], num_inference_steps=num_inference_steps,
                               guidance_scale=guidance_scale,
                               generator=[torch.Generator().manual_seed(row["seed"]) for row in rows]).images
        hits = classifier_r_precision_hits(rprecision_model, images, [row["domain"] for row in plan])
        ladder.append({"k": level, "pixel_frechet_distance": frechet_distance(gaussian_moments(pixel_features(images)), reference),
                       "r_precision": 100.0 * float(np.mean(hits))})
    return ladder


def ranks_in_order(values, increasing=True):
    """Whether `values` are strictly monotone (Spearman ρ = ±1 against the damage order, no tie)."""
    steps = np.diff(np.asarray(values, dtype=np.float64))
    return bool(np.all(steps > 0) if increasing else np.all(steps < 0))


def extraction_calibration(members, nonmembers, delta, k, num_tiles, sigma, seed=0):
    """P7's figures: the closest distinct pair of real images (tiled ℓ2, members ∪ non-members) and the fraction of
    members extracted from a positive control: each member plus N(0, σ²) pixel noise ([0, 1] units, seeded by
    `derive_seed(seed, SALT_CONTROL)`), rounded to uint8 as a generated image is."""
    resolution = min(members[0]["image"].size)

    def pixels(images):
        return np.stack([np.asarray(resize_and_crop(image, resolution), dtype=np.float64) / 255.0 for image in images])

    member_pixels, nonmember_pixels = pixels(members["image"]), pixels(nonmembers["image"])
    real = np.concatenate([member_pixels, nonmember_pixels])
    distances = tiled_l2_distances(real, real, num_tiles)
    np.fill_diagonal(distances, np.inf)
    distinct = distances[distances > 0]
    rng = np.random.default_rng(derive_seed(seed, SALT_CONTROL))
    control = np.round(np.clip(member_pixels + rng.normal(0.0, sigma, member_pixels.shape), 0, 1) * 255) / 255
    result = eidetic_extraction(member_pixels, control, nonmember_pixels, k, delta, num_tiles)
    return {"nearest_distinct_real_pair": float(distinct.min()), "delta": delta, "control_sigma": sigma,
            "control_detected": float(result["member_extracted"].mean()),
            "control_false_positives": result["false_positives"]}


def load_set(path):
    return load_image_dataset(str(path), required_columns=("image",))
