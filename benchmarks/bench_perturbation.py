#!/usr/bin/env python
"""Does a CPU miniature satisfy the premises MixSyn needs? One candidate per call, every step cached in --work_dir.

A candidate = victim flags (make_tiny_victim.py) + self-synthesis + ASPL flags (perturb_antidreambooth.py) + the
fine-tune (train_dreambooth_mixsyn.py). Every script runs in-process through its own CLI parser (`main(parse_args
(argv))`), exactly as `run_experiment.py` passes flags. What is measured (never the membership AUC of a fine-tuned
model, never a MixSyn verdict):

- P1  independent R-precision of the pre-trained model's samples (a logistic regression on all 8x8 sklearn
      digits, applied to the samples area-downsampled to 8x8 grey: it never sees the builder's classifier).
- P2  loss-attack AUC [95% CI] of the pre-trained victim (t 50/100/200/300, attack seed 0).
- P4  L(x) = mean over t = 25, 75, …, 975 and 2 fixed noise draws of the victim's ε-MSE (common random numbers:
      `diffusion.loss_attack_scores`), on the clean, ASPL-perturbed and uniform ±η (sign) images, after the
      uint8 save; ratio = mean L(variant) / mean L(clean). Also the fraction of pixels at the budget.
- P3  per fine-tune (clean, perturbed, random-noise sets; --seeds) at every epoch level (checkpoints of one run
      at a constant lr): L on its own training images / the pre-trained L on them; R-precision (independent and
      the builder's classifier) / the pre-trained model's, same prompts and sampling seeds; L on real digits.
- P5  RMS pixel difference of samples with identical prompts and noise (perturbed vs clean at the same seed,
      clean seed pairs), and ‖Δθ‖ of UNet + text encoder in the same pairs.
- P6  (`damage` step) utility metrics on a ladder of models of known increasing damage (Gaussian noise on every
      UNet weight, σ = k × the tensor's RMS): R-precision, a pixel Fréchet distance to held-out real digits
      (8x8 grey, 64-d) and BRISQUE.
- P7  nearest distinct real pair in tiled ℓ2 (4x4 tiles, RMS on [0,1]); detection of positive controls
      (member + N(0, 0.02²) pixel noise; the member's VAE round trip D(E(x))) at δ.

    OMP_NUM_THREADS=1 python benchmarks/bench_perturbation.py --work_dir runs/c32f8 --steps victim prep p4 \\
        --victim_args="--image_size 32 --vae_block_out_channels 32 64 64 64 --vae_data public"
"""

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import generate_synthetic  # noqa: E402
import make_tiny_victim  # noqa: E402
import perturb_antidreambooth  # noqa: E402
import train_dreambooth_mixsyn  # noqa: E402
from mixsyn_utils.adversarial import quantize_within_budget  # noqa: E402
from mixsyn_utils.dataset_io import load_image_dataset  # noqa: E402
from mixsyn_utils.attack_scores import loss_attack_scores  # noqa: E402
from mixsyn_utils.audit_statistics import bootstrap_ci  # noqa: E402
from mixsyn_utils.diffusion import NoisePredictor  # noqa: E402
from mixsyn_utils.extraction import tiled_l2_distances  # noqa: E402
from mixsyn_utils.images import image_to_tensor  # noqa: E402
from mixsyn_utils.metrics import roc_metrics  # noqa: E402
from mixsyn_utils.conditioning import encode_prompts  # noqa: E402
from mixsyn_utils.models import encode_images_to_latents, load_components, tokenize_prompts  # noqa: E402
from mixsyn_utils.utility import brisque_scores, classifier_r_precision_hits  # noqa: E402

LOSS_TIMESTEPS = tuple(range(25, 1000, 50))
TEMPLATES = ("The face of {}", "A photo of {}")


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def timed(record, key):
    class Timer:
        def __enter__(self):
            self.start, self.cpu = time.time(), time.process_time()

        def __exit__(self, *exc):
            record[key] = round(time.time() - self.start, 1)
            record[key.replace("_s", "_cpu_s")] = round(time.process_time() - self.cpu, 1)
    return Timer()


# ----------------------------------------------------------------------------------------------
# Models and images
# ----------------------------------------------------------------------------------------------

def components_of(victim_dir, model_dir=None):
    """The victim's components, with the UNet and text encoder of a fine-tune (a pipeline or a checkpoint dir)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    components = load_components(str(Path(victim_dir) / "pipeline"))
    if model_dir is not None:
        components.unet = UNet2DConditionModel.from_pretrained(str(Path(model_dir) / "unet"))
        if (Path(model_dir) / "text_encoder").is_dir():
            components.text_encoder = CLIPTextModel.from_pretrained(str(Path(model_dir) / "text_encoder"))
    for module in (components.unet, components.vae, components.text_encoder):
        module.eval().requires_grad_(False)
    return components


def pixels_of(images, resolution):
    return torch.stack([image_to_tensor(image, resolution) for image in images])


@torch.no_grad()
def mean_losses(components, pixels, prompts, seed=0, draws=2, batch_size=100):
    """(N,) L(x): ε-MSE averaged over LOSS_TIMESTEPS × `draws` fixed noises (the same for every image/variant)."""
    predictor = NoisePredictor.of(components.unet, components.noise_scheduler)
    out = []
    for start in range(0, len(pixels), batch_size):
        latents = encode_images_to_latents(components.vae, pixels[start:start + batch_size])
        context = encode_prompts([components.text_encoder],
                                 [tokenize_prompts(components.tokenizer, prompts[start:start + batch_size])])
        by_t = loss_attack_scores(predictor, latents, context, LOSS_TIMESTEPS, seed=seed, num_noise_draws=draws)
        out.append(torch.stack([by_t[t] for t in LOSS_TIMESTEPS]).mean(0))
    return torch.cat(out).numpy()


def sample_images(victim_dir, model_dir, domains, per_prompt, steps=20, guidance=7.5, seed=1000):
    """Seeded samples: domains × the two paper templates × per_prompt; image k uses generator seed + its index."""
    from diffusers import StableDiffusionPipeline

    components = components_of(victim_dir, model_dir)
    pipeline = StableDiffusionPipeline.from_pretrained(
        str(Path(victim_dir) / "pipeline"), unet=components.unet, text_encoder=components.text_encoder,
        safety_checker=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    size = components.unet.config.sample_size * 2 ** (len(components.vae.config.block_out_channels) - 1)
    plan = [(domain, template.format(domain), k) for domain in domains for template in TEMPLATES
            for k in range(per_prompt)]
    images = []
    for start in range(0, len(plan), 100):
        chunk = plan[start:start + 100]
        images += pipeline([p for _, p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance,
                           generator=[torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))],
                           height=size, width=size).images
    return images, [d for d, _, _ in plan]


_SCORER = None


def digits8(images):
    """Images -> (N, 64) grey 8x8 in the 0–16 scale of load_digits (area downsampling)."""
    from PIL import Image

    return np.stack([np.asarray(image.convert("L").resize((8, 8), Image.BOX), dtype=np.float64).reshape(-1) * 16 / 255
                     for image in images])


def independent_scorer():
    global _SCORER
    if _SCORER is None:
        from sklearn.datasets import load_digits
        from sklearn.linear_model import LogisticRegression

        digits = load_digits()
        _SCORER = LogisticRegression(max_iter=5000).fit(digits.data, digits.target)
    return _SCORER


def r_precision(images, domains, victim_dir):
    names = make_tiny_victim.DOMAIN_NAMES
    independent = independent_scorer().predict(digits8(images)) == np.array([names.index(d) for d in domains])
    builder = classifier_r_precision_hits(Path(victim_dir) / "rprecision_model", images, domains)
    return {"independent": float(independent.mean()), "builder_classifier": float(builder.mean()),
            "independent_ci": binomial_ci(independent)}


def binomial_ci(hits, resamples=1000, seed=0):
    rng = np.random.default_rng(seed)
    means = hits[rng.integers(0, len(hits), (resamples, len(hits)))].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def frechet_distance(features_a, features_b):
    from scipy import linalg

    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))


def images_array(images):
    return np.stack([np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0 for image in images])


def weight_vector(model_dir, victim_dir):
    components = components_of(victim_dir, model_dir)
    return torch.cat([p.detach().flatten() for m in (components.unet, components.text_encoder)
                      for p in m.parameters()])


# ----------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------

def step_victim(args, work, report):
    victim_dir = work / "victim"
    if not (victim_dir / "victim_info.json").is_file():
        argv = ["--output_dir", str(victim_dir), "--seed", str(args.victim_seed), "--skip_report", "--overwrite"]
        make_tiny_victim.main(make_tiny_victim.parse_args(argv + shlex.split(args.victim_args)))
    info = json.loads((victim_dir / "victim_info.json").read_text())
    report["victim"] = {k: info[k] for k in info if k not in ("latent_rule",)}


def step_synthetic(args, work, report):
    victim_dir = work / "victim"
    timings = report.setdefault("timings", {})
    if not (work / "synthetic").is_dir():
        with timed(timings, "synthetic_s"):
            argv = ["--pretrained_model_name_or_path", str(victim_dir / "pipeline"),
                    "--domains_file", str(victim_dir / "domains.json"), "--num_images_per_domain",
                    str(args.images_per_domain), "--num_inference_steps", "25", "--guidance_scale", "7.5",
                    "--sample_batch_size", "50", "--seed", "0", "--output_dir", str(work / "synthetic")]
            generate_synthetic.main(generate_synthetic.parse_args(argv))
    if args.domains and not (work / "synthetic_subset").is_dir():  # a subset of domains (feasibility runs)
        full = load_image_dataset(str(work / "synthetic"))
        full.filter(lambda row: row["domain"] in args.domains).save_to_disk(str(work / "synthetic_subset"))


def step_prep(args, work, report):
    step_synthetic(args, work, report)
    victim_dir = work / "victim"
    timings = report.setdefault("timings", {})
    train_set = work / "synthetic"
    if args.domains:
        train_set = work / "synthetic_subset"
    aspl_dir = work / f"aspl_{args.aspl_tag}"
    if not aspl_dir.is_dir():
        with timed(timings, f"aspl_{args.aspl_tag}_s"):
            argv = ["--pretrained_model_name_or_path", str(victim_dir / "pipeline"), "--dataset_name", str(train_set),
                    "--method", "aspl", "--learning_rate", "5e-4", "--with_prior_preservation",
                    "--class_prompt", "A photo of a digit", "--num_class_images", "20",
                    "--class_data_dir", str(work / "class_images"), "--seed", "0", "--output_dir", str(aspl_dir)]
            perturb_antidreambooth.main(perturb_antidreambooth.parse_args(argv + shlex.split(args.aspl_args)))
    random_dir = work / f"random_{args.aspl_tag}"
    if not random_dir.is_dir():
        make_random_noise(train_set, random_dir, pgd_eps_of(args))


def make_random_noise(clean_dir, output_dir, eps, seed=0):
    """Uniform ±η sign noise per pixel and channel, saved like ASPL (uint8, within the budget, its `pgd_eps` in the
    provenance: the training scripts check perturbed pairs against it)."""
    import datasets
    from PIL import Image

    from mixsyn_utils.dataset_io import dataset_provenance, with_provenance

    clean = load_image_dataset(str(clean_dir))
    generator = torch.Generator().manual_seed(seed)
    images, linf = [], []
    for image in clean["image"]:
        u0 = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)[None]
        x = u0.float() / 127.5 - 1
        signs = torch.randint(0, 2, x.shape, generator=generator).float() * 2 - 1
        u = quantize_within_budget(x + eps * signs, u0, eps)
        linf.append(float((u.float() - u0.float()).abs().max() / 127.5))
        images.append(Image.fromarray(u[0].permute(1, 2, 0).numpy()))
    columns = {name: clean[name] for name in clean.column_names if name != "image"}
    features = datasets.Features({**{k: v for k, v in clean.features.items() if k != "image"},
                                  "image": datasets.Image(), "linf": datasets.Value("float64")})
    noisy = datasets.Dataset.from_dict({**columns, "image": images, "linf": linf}, features=features)
    provenance = dataset_provenance("bench_perturbation.py", {"method": "random", "pgd_eps": eps, "seed": seed})
    with_provenance(noisy, provenance).save_to_disk(str(output_dir))


def pgd_eps_of(args):
    return float(perturb_antidreambooth.parse_args(
        ["--pretrained_model_name_or_path", "x", "--dataset_name", "x", "--output_dir", "x"]
        + shlex.split(args.aspl_args)).pgd_eps)


def step_p4(args, work, report):
    victim_dir = work / "victim"
    components = components_of(victim_dir)
    size = components.unet.config.sample_size * 2 ** (len(components.vae.config.block_out_channels) - 1)
    train_set = work / ("synthetic_subset" if args.domains else "synthetic")
    clean = load_image_dataset(str(train_set))
    prompts = list(clean["prompt"])
    clean_pixels = pixels_of(clean["image"], size)
    base = mean_losses(components, clean_pixels, prompts)
    out = {"images": len(clean), "loss_clean": float(base.mean())}
    for kind in ("aspl", "random"):
        variant = load_image_dataset(str(work / f"{kind}_{args.aspl_tag}"))
        pixels = pixels_of(variant["image"], size)
        losses = mean_losses(components, pixels, prompts)
        delta = (pixels - clean_pixels).abs()
        eps = float(delta.max())
        out[kind] = {"loss": float(losses.mean()), "ratio": float(losses.mean() / base.mean()),
                     "per_image_ratio_median": float(np.median(losses / base)),
                     "linf": eps, "fraction_at_budget": float((delta >= eps - 1.5 / 127.5).float().mean())}
    out["criterion"] = {"aspl_ge_1.3": out["aspl"]["ratio"] >= 1.3,
                        "aspl_excess_over_10x_random_excess": (out["aspl"]["ratio"] - 1) >= 10 * (out["random"]["ratio"] - 1)}
    # The real digits too: how far the synthetic images are from the victim's own data.
    members = load_image_dataset(str(victim_dir / "members"))
    out["loss_real_members"] = float(mean_losses(components, pixels_of(members["image"], size),
                                                 list(members["prompt"])).mean())
    report.setdefault("p4", {})[args.aspl_tag] = out
    log(f"P4 {args.aspl_tag}: {json.dumps(out)}")


def step_aspl_curve(args, work, report):
    """P4 against ASPL iterations: the library's ASPL loop (`mixsyn_utils.adversarial`, the same calls as
    perturb_antidreambooth.py) with the uint8-saved perturbation snapshotted after --curve_iterations."""

    from mixsyn_utils.adversarial import pgd_attack, train_surrogate
    from mixsyn_utils.class_images import ensure_class_images
    from mixsyn_utils.seeds import derive_seed

    victim_dir = work / "victim"
    aspl = perturb_antidreambooth.parse_args(
        ["--pretrained_model_name_or_path", str(victim_dir / "pipeline"), "--dataset_name", "x", "--output_dir", "x",
         "--learning_rate", "5e-4", "--with_prior_preservation", "--class_prompt", "A photo of a digit",
         "--num_class_images", "20"] + shlex.split(args.aspl_args))
    components = components_of(victim_dir)
    size = components.unet.config.sample_size * 2 ** (len(components.vae.config.block_out_channels) - 1)
    train_set = work / ("synthetic_subset" if args.domains else "synthetic")
    clean = load_image_dataset(str(train_set))
    class_images = ensure_class_images(str(victim_dir / "pipeline"), aspl.class_prompt, 20, str(work / "class_images"),
                                       resolution=size, seed=0)
    class_pixels = pixels_of(class_images["image"], size)
    class_ids = tokenize_prompts(components.tokenizer, class_images["prompt"])
    clean_pixels = pixels_of(clean["image"], size)
    clean_uint8 = torch.round((clean_pixels + 1.0) * 127.5).to(torch.uint8)
    prompts = list(clean["prompt"])
    base = mean_losses(components, clean_pixels, prompts)
    snapshots = {k: clean_pixels.clone() for k in args.curve_iterations}
    groups = sorted(set(clean["domain"]))
    start, cpu_start = time.time(), time.process_time()
    for group_index, group in enumerate(groups):
        rows = [i for i, d in enumerate(clean["domain"]) if d == group]
        pixels = clean_pixels[rows]
        ids = tokenize_prompts(components.tokenizer, [prompts[i] for i in rows])
        generator = torch.Generator().manual_seed(derive_seed(0, group_index))
        train = dict(learning_rate=aspl.learning_rate, generator=generator, prior_loss_weight=aspl.prior_loss_weight,
                     train_text_encoder=aspl.train_text_encoder)
        model = components
        perturbed = pixels.clone()
        for iteration in range(max(args.curve_iterations)):
            first = iteration * aspl.max_f_train_steps
            surrogate = train_surrogate(model, pixels, ids, class_pixels, class_ids, aspl.max_f_train_steps,
                                        first_step=first, **train)
            perturbed = pgd_attack(surrogate, perturbed, pixels, ids, aspl.max_adv_train_steps, aspl.pgd_alpha,
                                   aspl.pgd_eps, generator, aspl.pgd_batch_size)
            del surrogate
            model = train_surrogate(model, perturbed, ids, class_pixels, class_ids, aspl.max_f_train_steps,
                                    first_step=first, **train)
            if iteration + 1 in snapshots:
                saved = quantize_within_budget(perturbed, clean_uint8[rows], aspl.pgd_eps)
                snapshots[iteration + 1][rows] = saved.float() / 127.5 - 1.0
        log(f"ASPL curve: group {group} done ({time.time() - start:.0f} s)")
    seconds = time.time() - start
    cpu_seconds = time.process_time() - cpu_start
    curve = {}
    for k, pixels in snapshots.items():
        losses = mean_losses(components, pixels, prompts)
        delta = (pixels - clean_pixels).abs()
        curve[str(k)] = {"ratio": float(losses.mean() / base.mean()),
                         "fraction_at_budget": float((delta >= aspl.pgd_eps - 1.5 / 127.5).float().mean())}
    noise_dir = work / f"random_{args.aspl_tag}"
    if not noise_dir.is_dir():
        make_random_noise(train_set, noise_dir, aspl.pgd_eps)
    noisy = pixels_of(load_image_dataset(str(noise_dir))["image"], size)
    random_ratio = float(mean_losses(components, noisy, prompts).mean() / base.mean())
    out = {"images": len(clean), "aspl_args": args.aspl_args, "curve": curve, "random_ratio": random_ratio,
           "seconds": round(seconds, 1), "seconds_per_image_at_max_iterations": round(seconds / len(clean), 2),
           "cpu_seconds": round(cpu_seconds, 1), "cpu_seconds_per_image": round(cpu_seconds / len(clean), 2),
           "loss_clean": float(base.mean())}
    report.setdefault("aspl_curve", {})[args.aspl_tag] = out
    log(f"ASPL curve {args.aspl_tag}: {json.dumps(out)}")


def train_model(args, work, setting, seed, epochs_total, checkpoint_every):
    """DreamBooth (Eq. 6 flags of the demo config) on clean / perturbed (ratio 1) / random-noise (ratio 1) images."""
    output = work / "models" / f"{setting}-{args.train_tag}-seed{seed}"
    if (output / "unet").is_dir():
        return output
    train_set = work / ("synthetic_subset" if args.domains else "synthetic")
    argv = ["--pretrained_model_name_or_path", str(work / "victim" / "pipeline"), "--dataset_name", str(train_set),
            "--with_prior_preservation", "--train_text_encoder", "--class_prompt", "A photo of a digit",
            "--num_class_images", "20", "--class_data_dir", str(work / "class_images"),
            "--train_batch_size", str(args.train_batch_size), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
            "--learning_rate", str(args.learning_rate), "--max_train_steps", str(epochs_total),
            "--checkpointing_steps", str(checkpoint_every), "--report_to", "tensorboard", "--seed", str(seed),
            "--output_dir", str(output), "--overwrite"] + shlex.split(args.train_args)
    if setting != "clean":
        argv += ["--perturbed_dataset_name", str(work / f"{setting}_{args.aspl_tag}"), "--mixup_mode", "image",
                 "--mixup_ratio", "1.0"]
    train_dreambooth_mixsyn.main(train_dreambooth_mixsyn.parse_args(argv))
    return output


def updates_per_epoch(args, work):
    train_set = work / ("synthetic_subset" if args.domains else "synthetic")
    n = len(load_image_dataset(str(train_set)))
    return int(np.ceil(n / args.train_batch_size))


def step_finetune(args, work, report):
    per_epoch = updates_per_epoch(args, work)
    total = int(round(max(args.epochs) * per_epoch))
    every = int(round(args.checkpoint_epochs * per_epoch))
    timings = report.setdefault("timings", {})
    for setting in args.settings:
        for seed in args.seeds:
            key = f"train_{setting}_{args.train_tag}_seed{seed}_s"
            if key in timings:
                continue
            start, cpu = time.time(), time.process_time()
            train_model(args, work, setting, seed, total, every)
            timings[key] = round(time.time() - start, 1)
            timings[key.replace("_s", "_cpu_s")] = round(time.process_time() - cpu, 1)
            timings[f"train_updates_{args.train_tag}"] = total
            log(f"trained {setting} seed {seed}: {timings[key]} s for {total} updates ({per_epoch}/epoch)")
            save(report, args)


def model_dirs(args, work, setting, seed):
    """{epochs: dir} of one run: its checkpoints and the final pipeline."""
    per_epoch = updates_per_epoch(args, work)
    root = work / "models" / f"{setting}-{args.train_tag}-seed{seed}"
    dirs = {}
    for checkpoint in root.glob("checkpoint-*"):
        dirs[round(int(checkpoint.name.split("-")[1]) / per_epoch, 3)] = checkpoint
    dirs[round(int(round(max(args.epochs) * per_epoch)) / per_epoch, 3)] = root
    return dict(sorted(dirs.items()))


def step_measure(args, work, report):
    victim_dir = work / "victim"
    domains = args.domains or make_tiny_victim.DOMAIN_NAMES
    base_components = components_of(victim_dir)
    size = base_components.unet.config.sample_size * 2 ** (len(base_components.vae.config.block_out_channels) - 1)
    train_set = work / ("synthetic_subset" if args.domains else "synthetic")
    own = {"clean": load_image_dataset(str(train_set))}
    for setting in args.settings:
        if setting != "clean":
            own[setting] = load_image_dataset(str(work / f"{setting}_{args.aspl_tag}"))
    own_pixels = {k: pixels_of(v["image"], size) for k, v in own.items()}
    prompts = list(own["clean"]["prompt"])
    members = load_image_dataset(str(victim_dir / "members")).select(range(0, 250, 2))  # every domain, half
    member_pixels, member_prompts = pixels_of(members["image"], size), list(members["prompt"])
    result = report.setdefault("finetune", {}).setdefault(args.train_tag, {})
    pre = result.get("pretrained")
    if pre is None:
        images, sample_domains = sample_images(victim_dir, None, domains, args.samples_per_prompt)
        pre = {"r_precision": r_precision(images, sample_domains, victim_dir),
               "loss_own": {k: float(mean_losses(base_components, v, prompts).mean()) for k, v in own_pixels.items()},
               "loss_members": float(mean_losses(base_components, member_pixels, member_prompts, draws=1).mean())}
        np.save(work / f"samples_pretrained_{args.samples_per_prompt}.npy", images_array(images))
        result["pretrained"] = pre
    for setting, pixels in own_pixels.items():  # the pre-trained L on every training set measured so far
        if setting not in pre["loss_own"]:
            pre["loss_own"][setting] = float(mean_losses(base_components, pixels, prompts).mean())
    samples = {}
    for setting in args.settings:
        for seed in args.seeds:
            for epochs, model_dir in model_dirs(args, work, setting, seed).items():
                if args.measure_epochs and not any(abs(epochs - e) < 1e-6 for e in args.measure_epochs):
                    continue
                key = f"{setting}-seed{seed}-ep{epochs:g}"
                sample_path = work / "samples" / f"{args.train_tag}-{key}.npy"
                if key not in result:
                    components = components_of(victim_dir, model_dir)
                    images, sample_domains = sample_images(victim_dir, model_dir, domains, args.samples_per_prompt)
                    sample_path.parent.mkdir(exist_ok=True)
                    np.save(sample_path, images_array(images))
                    rp = r_precision(images, sample_domains, victim_dir)
                    loss_own = float(mean_losses(components, own_pixels[setting], prompts).mean())
                    result[key] = {
                        "setting": setting, "seed": seed, "epochs": epochs,
                        "loss_own": loss_own, "loss_own_ratio": loss_own / pre["loss_own"][setting],
                        "loss_members": float(mean_losses(components, member_pixels, member_prompts, draws=1).mean()),
                        "r_precision": rp,
                        "r_precision_ratio": rp["independent"] / max(pre["r_precision"]["independent"], 1e-9),
                    }
                    log(f"{key}: {json.dumps(result[key])}")
                    save(report, args)
                samples[(setting, seed, epochs)] = (np.load(sample_path), model_dir)
    # P5: perturbed vs clean at the same seed, clean seed pairs; generations and weights.
    p5 = report.setdefault("p5", {}).setdefault(args.train_tag, {})
    epoch_levels = sorted({e for (_, _, e) in samples})
    for epochs in epoch_levels:
        level = {}
        for setting in args.settings:
            if setting == "clean":
                continue
            pairs = [(samples[(setting, s, epochs)], samples[("clean", s, epochs)]) for s in args.seeds
                     if (setting, s, epochs) in samples and ("clean", s, epochs) in samples]
            level[f"{setting}_vs_clean_same_seed"] = pair_distances(pairs, victim_dir)
        clean_seeds = [s for s in args.seeds if ("clean", s, epochs) in samples]
        pairs = [(samples[("clean", a, epochs)], samples[("clean", b, epochs)])
                 for i, a in enumerate(clean_seeds) for b in clean_seeds[i + 1:]]
        if pairs:
            level["clean_seed_pairs"] = pair_distances(pairs, victim_dir)
        p5.setdefault(f"ep{epochs:g}", {}).update(level)
        log(f"P5 ep{epochs:g}: {json.dumps(level)}")


def pair_distances(pairs, victim_dir):
    if not pairs:
        return None
    rms, weights = [], []
    for (images_a, dir_a), (images_b, dir_b) in pairs:
        rms.append(float(np.sqrt(((images_a - images_b) ** 2).mean())))
        weights.append(float((weight_vector(dir_a, victim_dir) - weight_vector(dir_b, victim_dir)).norm()))
    return {"generation_rms": rms, "generation_rms_mean": float(np.mean(rms)), "weight_l2": weights,
            "weight_l2_mean": float(np.mean(weights))}


def step_p2(args, work, report):
    victim_dir = work / "victim"
    components = components_of(victim_dir)
    members = load_image_dataset(str(victim_dir / "members"))
    nonmembers = load_image_dataset(str(victim_dir / "nonmembers"))
    member = make_tiny_victim.loss_attack_member_scores(components, members, (50, 100, 200, 300), 0)
    nonmember = make_tiny_victim.loss_attack_member_scores(components, nonmembers, (50, 100, 200, 300), 0)
    report["p2"] = {"loss_attack_auc": roc_metrics(member, nonmember)["auc"],
                    "loss_attack_auc_ci": bootstrap_ci(member, nonmember)["auc"]}
    log(f"P2: {report['p2']}")


def step_p1(args, work, report):
    victim_dir = work / "victim"
    images, domains = sample_images(victim_dir, None, make_tiny_victim.DOMAIN_NAMES, 10, steps=25)
    report["p1"] = r_precision(images, domains, victim_dir)
    report["p1"]["num_samples"] = len(images)
    log(f"P1: {report['p1']}")


def step_p7(args, work, report):
    victim_dir = work / "victim"
    components = components_of(victim_dir)
    members = load_image_dataset(str(victim_dir / "members"))
    nonmembers = load_image_dataset(str(victim_dir / "nonmembers"))
    size = components.unet.config.sample_size * 2 ** (len(components.vae.config.block_out_channels) - 1)
    real = images_array(list(members["image"]) + list(nonmembers["image"]))
    distances = tiled_l2_distances(real, real)
    np.fill_diagonal(distances, np.inf)
    member_array = images_array(members["image"])
    rng = np.random.default_rng(0)
    noisy = np.clip(member_array + rng.normal(0, 0.02, member_array.shape), 0, 1)
    noisy = np.round(noisy * 255) / 255
    with torch.no_grad():
        pixels = pixels_of(members["image"], size)
        latents = encode_images_to_latents(components.vae, pixels) / components.vae.config.scaling_factor
        decoded = components.vae.decode(latents).sample.clamp(-1, 1)
    round_trip = np.round((decoded.permute(0, 2, 3, 1).numpy() + 1) * 127.5) / 255
    noise_d = np.diag(tiled_l2_distances(member_array, noisy))
    vae_d = np.diag(tiled_l2_distances(member_array, round_trip))
    nearest = float(distances.min())
    out = {"nearest_distinct_real_pair": nearest, "nearest_pair_percentiles_1_5_50":
           [float(np.percentile(distances.min(1), q)) for q in (1, 5, 50)],
           "noise_control_distance_max": float(noise_d.max()), "noise_control_distance_median": float(np.median(noise_d)),
           "vae_round_trip_distance_median": float(np.median(vae_d)), "vae_round_trip_distance_p95":
           float(np.percentile(vae_d, 95)), "vae_round_trip_distance_max": float(vae_d.max())}
    for delta in sorted({0.1, *args.deltas}):
        out[f"delta_{delta:g}"] = {"below_nearest_pair": delta < nearest,
                                   "noise_control_detected": float((noise_d <= delta).mean()),
                                   "vae_round_trip_detected": float((vae_d <= delta).mean())}
    report["p7"] = out
    log(f"P7: {json.dumps(out)}")


def step_damage(args, work, report):
    """P6: utility metrics on models with Gaussian noise of σ = k·RMS(tensor) added to every UNet weight."""
    from PIL import Image

    victim_dir = work / "victim"
    nonmembers = load_image_dataset(str(victim_dir / "nonmembers"))
    real8 = digits8(nonmembers["image"])
    out = {}
    for level in args.damage_levels:
        damaged_dir = work / "damage" / f"k{level:g}"
        if not (damaged_dir / "unet").is_dir():
            components = components_of(victim_dir)
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for parameter in components.unet.parameters():
                    rms = parameter.pow(2).mean().sqrt()
                    parameter.add_(level * rms * torch.randn(parameter.shape, generator=generator))
            components.unet.save_pretrained(str(damaged_dir / "unet"))
        images, domains = sample_images(victim_dir, damaged_dir, make_tiny_victim.DOMAIN_NAMES, args.samples_per_prompt)
        rp = r_precision(images, domains, victim_dir)
        out[f"k{level:g}"] = {"r_precision": rp, "frechet_pixels8": frechet_distance(digits8(images), real8),
                              "brisque_mean": float(np.nanmean(brisque_scores(images)))}
        log(f"damage k{level:g}: {json.dumps(out[f'k{level:g}'])}")
        grid = images_array(images[::20])  # one sample per domain and template
        Image.fromarray((np.concatenate(list(grid), axis=1) * 255).round().astype(np.uint8)).save(
            work / "damage" / f"k{level:g}.png")
    report["p6"] = out


def save(report, args):
    path = Path(args.work_dir) / "report.json"
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", required=True)
    parser.add_argument("--steps", nargs="+", required=True,
                        choices=["victim", "p1", "p2", "p7", "synthetic", "prep", "p4", "aspl_curve", "finetune", "measure",
                                 "damage"])
    parser.add_argument("--victim_args", default="", help="Extra flags of make_tiny_victim.py.")
    parser.add_argument("--victim_seed", type=int, default=0)
    parser.add_argument("--images_per_domain", type=int, default=20)
    parser.add_argument("--domains", nargs="*", default=None, help="Perturb/fine-tune only these domains.")
    parser.add_argument("--aspl_tag", default="ref", help="Name of this ASPL setting (folders aspl_<tag>).")
    parser.add_argument("--aspl_args", default="--max_train_steps 50 --max_f_train_steps 3 --max_adv_train_steps 6 "
                                                "--pgd_eps 0.05 --pgd_alpha 0.005")
    parser.add_argument("--curve_iterations", type=int, nargs="+", default=[1, 3, 5, 10, 25, 50])
    parser.add_argument("--train_tag", default="t0")
    parser.add_argument("--train_args", default="", help="Extra flags of train_dreambooth_mixsyn.py.")
    parser.add_argument("--learning_rate", type=float, default=2.5e-4)
    parser.add_argument("--train_batch_size", type=int, default=8)
    parser.add_argument("--epochs", type=float, nargs="+", default=[10, 50])
    parser.add_argument("--checkpoint_epochs", type=float, default=10)
    parser.add_argument("--measure_epochs", type=float, nargs="*", default=None,
                        help="Measure only these epoch levels of the runs (default: every checkpoint).")
    parser.add_argument("--settings", nargs="+", default=["clean", "aspl", "random"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--samples_per_prompt", type=int, default=5)
    parser.add_argument("--deltas", type=float, nargs="*", default=[])
    parser.add_argument("--damage_levels", type=float, nargs="+", default=[0, 0.02, 0.05, 0.1, 0.2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "report.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    report.setdefault("calls", []).append(" ".join(sys.argv[1:]))
    steps = {"victim": step_victim, "p1": step_p1, "p2": step_p2, "p7": step_p7, "prep": step_prep, "p4": step_p4,
             "finetune": step_finetune, "measure": step_measure, "damage": step_damage,
             "aspl_curve": step_aspl_curve, "synthetic": step_synthetic}
    for name in args.steps:
        start, cpu = time.time(), time.process_time()
        log(f"step {name}")
        steps[name](args, work, report)
        report.setdefault("timings", {})[f"step_{name}_{args.aspl_tag}_{args.train_tag}_s"] = round(time.time() - start, 1)
        report["timings"][f"step_{name}_{args.aspl_tag}_{args.train_tag}_cpu_s"] = round(time.process_time() - cpu, 1)
        save(report, args)
    log(f"done: {path}")


if __name__ == "__main__":
    main()
