"""Utility of generated images: CLIP-R-precision (or an offline domain classifier), the Fréchet distance of pixel
features to real images, and BRISQUE.

Upsampling rule (one rule, applied the same way to every model compared): an image whose shorter side is
below a metric's minimum is enlarged by the smallest *integer* factor s = ⌈min_side / shorter_side⌉ with
bicubic resampling (so each source pixel maps onto an s×s block and no half-pixel shift is introduced).
- BRISQUE: min side 96 px. Its features are computed at two scales with a 7×7 Gaussian window; at 16 px
  the second scale (8×8) is barely larger than the window and the statistics are dominated by padding.
  Upsampling blurs, which BRISQUE scores as worse, so compare BRISQUE only between runs at one resolution.
- CLIP: no extra rule here — open_clip's own preprocess resizes the shorter side to the model's input size
  (224 px for ViT-B/32) with bicubic resampling and center-crops.
- Offline domain classifier: images are resized (bicubic) to the classifier's training resolution.
- Pixel Fréchet distance: grey images box-filtered to 8×8 (64 features in [0, 1]); on small images it tracks
  damage where BRISQUE (made for natural photographs of hundreds of pixels) does not.
"""

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .brisque import load_svr
from .cli import InputError, first_line
from .images import decode_rgb

BRISQUE_MIN_SIDE = 96
CLASSIFIER_CONFIG = "config.json"
CLASSIFIER_WEIGHTS = "model.safetensors"


def upsample_to_min_side(image, min_side):
    """The module's upsampling rule: bicubic by s = ⌈min_side / shorter side⌉ when the shorter side < min_side."""
    image = decode_rgb(image)
    shorter = min(image.size)
    if shorter >= min_side:
        return image
    factor = math.ceil(min_side / shorter)
    return image.resize((image.width * factor, image.height * factor), Image.BICUBIC)


def brisque_features(pixels):
    """BRISQUE's 36 features of RGB images (N, 3, H, W) in [0, 1], scaled to [−1, 1], with piq's functions.

    Luma Y = round(YIQ_Y(255 · x)) (MATLAB's rgb2gray rounding), natural-scene statistics at full and half
    size (18 each: GGD shape and variance, then AGGD shape, mean, left and right variances of 4 neighbour
    products), scaled by the ranges of the MATLAB release (piq's `_scale_features`).
    """
    import importlib

    from piq.functional import imresize, rgb2yiq

    piq_brisque = importlib.import_module("piq.brisque")  # the module; `piq.brisque` the attribute is a function
    luma = torch.round(rgb2yiq(pixels * 255)[:, :1])
    features = []
    for _ in range(2):
        features.append(piq_brisque._natural_scene_statistics(luma))
        luma = imresize(luma, sizes=(luma.size(2) // 2, luma.size(3) // 2))
    return piq_brisque._scale_features(torch.cat(features, dim=-1))


def brisque_svr_score(scaled_features, svr):
    """The LIVE ε-SVR: score(f) = Σ_i α_i exp(−γ ‖f − SV_i‖²) − ρ, float64; f (N, 36) -> (N,).

    `svr` = `brisque.load_svr()` (α, SV, γ = 0.05, ρ = −153.591 from the checked libsvm text).
    """
    features = np.asarray(scaled_features, dtype=np.float64)
    squared_distances = ((features[:, None, :] - svr["support_vectors"][None]) ** 2).sum(-1)
    return np.exp(-svr["gamma"] * squared_distances) @ svr["coefficients"] - svr["rho"]


def brisque_scores(images):
    """BRISQUE (Mittal et al. 2012) per image, float64 RGB in [0, 1]; lower = better quality.

    `brisque_features` then `brisque_svr_score` with the offline model (`python -m mixsyn_utils.brisque
    --install`); `piq.brisque` itself is never called (it unpickles its weights). Images without spatial
    variance (e.g. all black) have no defined BRISQUE; they get NaN and are counted by the caller.
    """
    svr = load_svr()
    scores = []
    for image in images:
        array = np.asarray(upsample_to_min_side(image, BRISQUE_MIN_SIDE), dtype=np.float64) / 255.0
        pixels = torch.from_numpy(array).permute(2, 0, 1)[None]
        try:
            scores.append(float(brisque_svr_score(brisque_features(pixels).numpy(), svr)[0]))
        except AssertionError:  # piq's statistics assert non-zero variance of the normalized luminance
            scores.append(float("nan"))
    return np.array(scores)


# ----------------------------------------------------------------------------------------------
# Offline R-precision scorer: a domain classifier trained on the victim's real images
# ----------------------------------------------------------------------------------------------

class DomainClassifier(torch.nn.Module):
    """A two-layer MLP on RGB pixels in [-1, 1] at a fixed resolution: logits over the domains."""

    def __init__(self, resolution, num_domains, hidden_size=128):
        super().__init__()
        self.resolution = resolution
        self.layers = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(3 * resolution * resolution, hidden_size), torch.nn.GELU(),
            torch.nn.Dropout(0.2), torch.nn.Linear(hidden_size, num_domains))

    def forward(self, pixel_values):
        return self.layers(pixel_values)


def _classifier_pixels(images, resolution):
    arrays = [np.asarray(decode_rgb(image).resize((resolution, resolution), Image.BICUBIC), dtype=np.float32)
              for image in images]
    return torch.from_numpy(np.stack(arrays) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


def _fit(classifier, pixels, labels, seed, steps, learning_rate=3e-3):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=learning_rate, weight_decay=1e-2)
    classifier.train()
    for _ in range(steps):
        # Light pixel noise: generated images are noisier than the clean digits the classifier learns from.
        noisy = pixels + 0.1 * torch.randn(pixels.shape, generator=generator)
        loss = torch.nn.functional.cross_entropy(classifier(noisy), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    classifier.eval()
    return classifier


def train_domain_classifier(datasets, output_dir, seed=0, steps=400, hidden_size=128):
    """Train the offline R-precision scorer on real images (columns `image`, `domain`) and save it.

    Writes `output_dir/model.safetensors` and `output_dir/config.json` (resolution, domain names, held-out
    accuracy of a seeded 80/20 fit, then the final fit on all images). No pickles. Returns the config dict.
    """
    from safetensors.torch import save_file

    images = [image for dataset in datasets for image in dataset["image"]]
    domains = [domain for dataset in datasets for domain in dataset["domain"]]
    domain_names = sorted(set(domains))
    resolution = min(min(image.size) for image in images)
    pixels = _classifier_pixels(images, resolution)
    labels = torch.tensor([domain_names.index(domain) for domain in domains])
    holdout = np.random.default_rng(seed).random(len(labels)) < 0.2
    torch.manual_seed(seed)
    probe = _fit(DomainClassifier(resolution, len(domain_names), hidden_size), pixels[~holdout], labels[~holdout],
                 seed, steps)
    with torch.no_grad():
        heldout_accuracy = float((probe(pixels[holdout]).argmax(1) == labels[holdout]).float().mean())
    torch.manual_seed(seed)
    classifier = _fit(DomainClassifier(resolution, len(domain_names), hidden_size), pixels, labels, seed, steps)
    config = {"kind": "mlp_domain_classifier", "resolution": resolution, "hidden_size": hidden_size,
              "domain_names": domain_names, "num_train_images": len(labels),
              "heldout_accuracy_80_20": heldout_accuracy, "seed": seed, "steps": steps}
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in classifier.state_dict().items()},
              str(output_dir / CLASSIFIER_WEIGHTS))
    (output_dir / CLASSIFIER_CONFIG).write_text(json.dumps(config, indent=2))
    return config


def load_domain_classifier(model_dir):
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    if not (model_dir / CLASSIFIER_CONFIG).is_file() or not (model_dir / CLASSIFIER_WEIGHTS).is_file():
        raise InputError(f"--rprecision_model {model_dir} has no {CLASSIFIER_CONFIG} + {CLASSIFIER_WEIGHTS}")
    config = json.loads((model_dir / CLASSIFIER_CONFIG).read_text())
    classifier = DomainClassifier(config["resolution"], len(config["domain_names"]), config["hidden_size"])
    classifier.load_state_dict(load_file(str(model_dir / CLASSIFIER_WEIGHTS)))
    return classifier.eval(), config


def classifier_r_precision_hits(model_dir, images, domains):
    """hit_i = [argmax_d classifier(x_i)_d = domain_i]: R-precision with R = 1 against all domains."""
    classifier, config = load_domain_classifier(model_dir)
    unknown = sorted(set(domains) - set(config["domain_names"]))
    if unknown:
        raise InputError(f"--rprecision_model {model_dir} does not know domain(s) {unknown}")
    with torch.no_grad():
        predicted = classifier(_classifier_pixels(images, config["resolution"])).argmax(1).numpy()
    return np.array([config["domain_names"][p] == domain for p, domain in zip(predicted, domains)])


def clip_weights_file(clip_model, clip_pretrained):
    """The safetensors file open_clip loads: `clip_pretrained` itself, or what open_clip fetches for a tag.

    open_clip unpickles any other checkpoint (`torch.load`), so anything but safetensors is refused.
    """
    import open_clip

    path = clip_pretrained
    if not Path(clip_pretrained).exists():
        config = open_clip.get_pretrained_cfg(clip_model, clip_pretrained)
        if not config:
            raise InputError(f"--clip_pretrained {clip_pretrained} is neither a file nor an open_clip tag of "
                             f"{clip_model}")
        path = open_clip.download_pretrained(config)  # prefers the Hub's safetensors copy
    if not str(path).endswith(".safetensors"):
        raise InputError(f"--clip_pretrained {clip_pretrained} resolves to {path}, not a .safetensors file "
                         "(pickled checkpoints are never loaded)")
    return str(path)


def clip_r_precision_hits(images, prompts, domains, domain_names, clip_model, clip_pretrained, device="cpu"):
    """CLIP-R-precision (Park et al. 2021) with R = 1, candidates = the image's prompt for every domain.

    For image x_i with prompt p_i of domain d_i, candidates c_d = p_i with d_i replaced by d, for every
    domain d. hit_i = [argmax_d cos(E_img(x_i), E_txt(c_d)) = d_i]. `clip_pretrained` is an open_clip tag
    (e.g. laion2b_s34b_b79k) or a local checkpoint path (offline).
    """
    import open_clip

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            clip_model, pretrained=clip_weights_file(clip_model, clip_pretrained), device=device)
    except (RuntimeError, OSError, ValueError) as error:
        raise InputError(f"--clip_model {clip_model} / --clip_pretrained {clip_pretrained}: "
                         f"{first_line(error)}") from error
    tokenizer = open_clip.get_tokenizer(clip_model)
    model.eval()
    hits = []
    with torch.no_grad():
        for image, prompt, domain in zip(images, prompts, domains):
            candidates = [prompt.replace(domain, other) for other in domain_names]
            image_features = model.encode_image(preprocess(decode_rgb(image))[None].to(device))
            text_features = model.encode_text(tokenizer(candidates).to(device))
            similarity = torch.nn.functional.normalize(image_features, dim=-1) @ \
                torch.nn.functional.normalize(text_features, dim=-1).T
            hits.append(domain_names[int(similarity.argmax())] == domain)
    return np.array(hits)


def pixel_features(images, size=8):
    """(N, size²) float64: each image decoded (`images.decode_rgb`), converted to grey (ITU-R 601 luma, Pillow's
    "L"), box-filtered to size × size, in [0, 1]."""
    return np.stack([np.asarray(decode_rgb(image).convert("L").resize((size, size), Image.BOX), dtype=np.float64)
                     .reshape(-1) / 255.0 for image in images])


def gaussian_moments(features, weights=None):
    """(mean, covariance) of feature rows, each row counted `weights[i]` times (a bootstrap resample's multiplicities;
    default once): μ = Σ wᵢxᵢ / Σw, Σ = Σ wᵢ(xᵢ − μ)(xᵢ − μ)ᵀ / (Σw − 1), the sample covariance of the resample."""
    features = np.asarray(features, dtype=np.float64)
    weights = np.ones(len(features)) if weights is None else np.asarray(weights, dtype=np.float64)
    mean = weights @ features / weights.sum()
    centred = features - mean
    return mean, (centred * weights[:, None]).T @ centred / (weights.sum() - 1.0)


def frechet_distance(moments_a, moments_b):
    """The Fréchet distance between two Gaussians (Heusel et al. 2017, the FID formula), from `gaussian_moments`:

    FD = ‖μ_a − μ_b‖² + Tr Σ_a + Tr Σ_b − 2 Tr (Σ_a Σ_b)^{1/2}, with Tr (Σ_a Σ_b)^{1/2} = Σᵢ √λᵢ(Σ_a^{1/2} Σ_b Σ_a^{1/2})
    (the eigenvalues of a symmetric positive semi-definite matrix; round-off below 0 clipped). Lower is closer.
    """
    (mean_a, cov_a), (mean_b, cov_b) = moments_a, moments_b
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b)
                 - 2.0 * np.sqrt(np.clip(cross, 0.0, None)).sum())


def utility_metrics(generations, rprecision_model=None, clip_model="ViT-B-32", clip_pretrained=None,
                    with_brisque=True, fidelity_reference=None):
    """Utility of a generations dataset (image, prompt, domain): R-precision top-1 × 100 and mean BRISQUE.

    R-precision uses CLIP when `clip_pretrained` is given, else the offline domain classifier, else none;
    the block names the scorer used. With `fidelity_reference` (real images) the pixel Fréchet distance of the
    generations to them (`frechet_distance` of `pixel_features`, lower is better). BRISQUE: lower is better;
    images where it is undefined are counted.
    Per-image values are kept (`r_precision_hits`, `brisque_scores`, in the generations' order, with their
    `ids`), so a study can resample images for its confidence intervals.
    """
    images, domains = list(generations["image"]), np.asarray(generations["domain"]).astype(str)
    block = {"num_images": len(images), "scorer": None, "r_precision_top1_x100": None,
             "ids": [str(i) for i in generations["id"]] if "id" in generations.column_names else None}
    if clip_pretrained is not None:
        hits = clip_r_precision_hits(images, list(generations["prompt"]), list(domains), sorted(set(domains)),
                                     clip_model, clip_pretrained)
        block["scorer"] = f"open_clip {clip_model} ({clip_pretrained})"
    elif rprecision_model is not None:
        hits = classifier_r_precision_hits(rprecision_model, images, list(domains))
        block["scorer"] = f"domain classifier {rprecision_model} (offline stand-in for CLIP)"
    if block["scorer"] is not None:
        block["r_precision_top1_x100"] = 100.0 * float(hits.mean())
        block["r_precision_per_domain_x100"] = {domain: 100.0 * float(hits[domains == domain].mean())
                                                for domain in sorted(set(domains))}
        block["r_precision_hits"] = [int(hit) for hit in hits]
    if fidelity_reference is not None:
        block["pixel_frechet_distance"] = frechet_distance(gaussian_moments(pixel_features(images)),
                                                           gaussian_moments(pixel_features(fidelity_reference)))
        block["pixel_frechet_reference_images"] = len(fidelity_reference)
    if with_brisque:
        scores = brisque_scores(images)
        block.update(brisque_mean=float(np.nanmean(scores)) if np.isfinite(scores).any() else None,
                     brisque_direction="lower is better (the paper's 'BRIS ↑' column is this value)",
                     brisque_nan_images=int(np.isnan(scores).sum()),
                     brisque_scores=[None if np.isnan(score) else float(score) for score in scores])
    return block
