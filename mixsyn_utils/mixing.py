"""MixSyn training sets: clean self-synthesized images mixed with their adversarially perturbed versions.

Mixup-I (`mode="image"`): a ratio r of the images is replaced by its perturbed version, stratified per
domain. Mixup-P (`mode="pixel"`): every image is m ⊙ x_pert + (1 − m) ⊙ x_clean with a binary mask m
covering a ratio r of the pixel positions. r = 0 is the clean set, r = 1 the fully perturbed set.
"""

import atexit
import hashlib
import json
import shutil
import tempfile

import numpy as np

from .cli import InputError
from .dataset_io import with_provenance
from .images import resize_and_crop
from .seeds import SALT_MIX_SELECTION, SALT_MIX_TIES, derive_seed

MODES = ("image", "pixel")
PATTERNS = ("random", "block")


def num_selected(ratio, total):
    """round(r · n), halves rounded up (not to even), so r = 0.5 of 3 images perturbs 2."""
    return int(np.floor(ratio * total + 0.5 + 1e-9))


def image_selection(domains, ratio, seed):
    """Mixup-I choice: a boolean array, True where the perturbed image is used; exactly round(r · n) True.

    Stratified: domain d gets ⌊r · n_d⌋ images plus one more for the domains with the largest fractional
    parts r · n_d − ⌊r · n_d⌋ (ties broken by a permutation seeded by `seed`) until the total is round(r · n);
    within a domain the images are the first of a permutation seeded by (`seed`, domain index).
    """
    domains = np.asarray(list(domains), dtype=object)
    names = sorted(set(domains.tolist()))
    counts = np.array([int(np.sum(domains == name)) for name in names])
    exact = ratio * counts
    quotas = np.floor(exact + 1e-9).astype(int)
    remainder = num_selected(ratio, len(domains)) - int(quotas.sum())
    tie_order = np.random.default_rng(derive_seed(seed, SALT_MIX_TIES)).permutation(len(names))
    by_fraction = sorted(tie_order, key=lambda d: -(exact[d] - quotas[d]))
    for d in by_fraction[:remainder]:
        quotas[d] += 1
    selected = np.zeros(len(domains), dtype=bool)
    for d, name in enumerate(names):
        rows = np.flatnonzero(domains == name)
        order = np.random.default_rng(derive_seed(seed, SALT_MIX_SELECTION, d)).permutation(len(rows))
        selected[rows[order[:quotas[d]]]] = True
    return selected


def pixel_mask(height, width, ratio, seed, pattern="random"):
    """Mixup-P mask m ∈ {0, 1}^{H×W} (shared by the channels) with exactly round(r · H · W) ones.

    `random`: the first round(r·H·W) positions of a permutation seeded by `seed`.
    `block`: a contiguous region (MixSyn Fig. 3, "half part of every image"): the first round(r·H·W)
    positions in row-major order counted from a side (top, bottom, left or right) chosen by `seed`.
    """
    count = num_selected(ratio, height * width)
    rng = np.random.default_rng(seed)
    if pattern == "random":
        flat = np.zeros(height * width, dtype=bool)
        flat[rng.permutation(height * width)[:count]] = True
        return flat.reshape(height, width)
    side = int(rng.integers(4))
    if side in (0, 1):  # fill whole rows from the top (0) or bottom (1)
        flat = np.zeros(height * width, dtype=bool)
        flat[:count] = True
        mask = flat.reshape(height, width)
        return mask if side == 0 else mask[::-1, ::-1].copy()
    flat = np.zeros(height * width, dtype=bool)  # fill whole columns from the left (2) or right (3)
    flat[:count] = True
    mask = flat.reshape(width, height).T
    return mask.copy() if side == 2 else mask[::-1, ::-1].copy()


def id_key(image_id):
    """A stable 63-bit integer for a row id (mask seeds must not depend on row order or process)."""
    return int.from_bytes(hashlib.sha256(str(image_id).encode()).digest()[:8], "big") >> 1


def _pair_by_id(clean, perturbed):
    for name, dataset in (("clean", clean), ("perturbed", perturbed)):
        for column in ("id", "image"):
            if column not in dataset.column_names:
                raise InputError(f"the {name} dataset has no {column!r} column")
    clean_ids, perturbed_ids = list(clean["id"]), list(perturbed["id"])
    for name, ids in (("clean", clean_ids), ("perturbed", perturbed_ids)):
        if len(set(ids)) != len(ids):
            duplicate = next(i for i in ids if ids.count(i) > 1)
            raise InputError(f"the {name} dataset lists id {duplicate!r} twice")
    perturbed_row = {image_id: row for row, image_id in enumerate(perturbed_ids)}
    missing = [i for i in clean_ids if i not in perturbed_row]
    if missing:
        raise InputError(f"id {missing[0]!r} of the clean dataset has no perturbed version")
    clean_set = set(clean_ids)
    extra = [i for i in perturbed_ids if i not in clean_set]
    if extra:
        raise InputError(f"id {extra[0]!r} of the perturbed dataset is not in the clean dataset")
    return [perturbed_row[i] for i in clean_ids]


def check_perturbation_pairs(clean, perturbed, perturbed_rows, pgd_eps):
    """Every perturbed image must be its clean image plus a perturbation within the budget it records:

        ℓ∞ = max |u_pert − u_clean| ≤ 127.5 · η + 1   (uint8 levels; η = `pgd_eps` in [-1, 1] units)

    with both images brought to the perturbed image's own size by the shared `resize_and_crop` (the size and
    preprocessing the perturbation was computed at, so it is not resampled), and one level of slack for rounding.
    A perturbed set made from other images that happen to share the ids (another clean set, a mirrored copy) is far
    outside it. `perturbed_rows[i]` is the perturbed row paired with clean row i. Cost: one decode of each pair.
    """
    limit = 127.5 * pgd_eps + 1
    clean_images, perturbed_images = clean.select_columns(["image"]), perturbed.select_columns(["image"])
    for row, perturbed_row in enumerate(perturbed_rows):
        perturbed_image = perturbed_images[int(perturbed_row)]["image"]
        size = min(perturbed_image.size)
        difference = (np.asarray(resize_and_crop(perturbed_image, size), dtype=np.int16)
                      - np.asarray(resize_and_crop(clean_images[row]["image"], size), dtype=np.int16))
        linf = int(np.abs(difference).max())
        if linf > limit:
            raise InputError(f"--perturbed_dataset_name: row id {clean[row]['id']} differs from its clean image by "
                             f"{linf} levels (ℓ∞) > η + 1 = {limit:.1f} (pgd_eps {pgd_eps}): it was not made from "
                             "these clean images (--dataset_name)")


def mix_datasets(clean, perturbed, mode, ratio, seed, pattern="random", resolution=None, cache_dir=None,
                 pgd_eps=None):
    """The MixSyn training set: the clean dataset's rows with `image` mixed, plus `perturbed_fraction`, `mask_seed`.

    Rows are paired by `id` (a missing or extra id raises `InputError` naming it); with `pgd_eps` (the perturbed
    set's budget) every pair must also lie within it (`check_perturbation_pairs`). Images are converted
    to RGB and brought to `resolution` by the shared `resize_and_crop`; by default the perturbed images'
    size (the perturbation was computed there, so it is never resampled). Mixing is exact on uint8.
    `mask_seed`: the seed of the row's pixel mask (pixel mode) or of the per-domain selection (image mode).

    The mixed rows are streamed one at a time into an Arrow file under `cache_dir` (default: a fresh
    temporary folder, removed when the process exits) and memory-mapped from there, so memory does not
    grow with the number of rows; the input datasets' folders are never written to.
    """
    import datasets

    if mode not in MODES:
        raise InputError(f"--mixup_mode must be one of {', '.join(MODES)}, got {mode!r}")
    if pattern not in PATTERNS:
        raise InputError(f"--mixup_pattern must be one of {', '.join(PATTERNS)}, got {pattern!r}")
    try:
        ratio = float(ratio)
    except (TypeError, ValueError) as error:
        raise InputError(f"--mixup_ratio must be a number in [0, 1], got {ratio!r}") from error
    if not 0.0 <= ratio <= 1.0:
        raise InputError(f"--mixup_ratio must be in [0, 1], got {ratio}")
    perturbed_rows = _pair_by_id(clean, perturbed)
    if pgd_eps is not None:  # here, not in the generator below: `datasets` would wrap the error
        check_perturbation_pairs(clean, perturbed, perturbed_rows, pgd_eps)
    if resolution is None:
        resolution = min(perturbed[0]["image"].size)
    domains = clean["domain"] if "domain" in clean.column_names else ["all"] * len(clean)
    selected = image_selection(domains, ratio, seed) if mode == "image" else None
    domain_index = {name: d for d, name in enumerate(sorted(set(domains)))}

    def mixed_rows():
        from PIL import Image

        for row in range(len(clean)):
            example = clean[row]
            clean_array = np.asarray(resize_and_crop(example["image"], resolution))
            perturbed_array = np.asarray(resize_and_crop(perturbed[perturbed_rows[row]]["image"], resolution))
            if mode == "image":
                use_perturbed = bool(selected[row])
                mixed, fraction = (perturbed_array if use_perturbed else clean_array), float(use_perturbed)
                mask_seed = derive_seed(seed, SALT_MIX_SELECTION, domain_index[domains[row]])  # the domain's permutation
            else:
                mask_seed = derive_seed(seed, id_key(example["id"]) % (2**62))
                mask = pixel_mask(resolution, resolution, ratio, mask_seed, pattern)
                mixed = np.where(mask[:, :, None], perturbed_array, clean_array)
                fraction = float(mask.mean())
            example.update(image=Image.fromarray(mixed), perturbed_fraction=fraction, mask_seed=int(mask_seed))
            yield example  # `image` keeps its place among the clean columns

    features = clean.features.copy()
    features["image"] = datasets.Image()
    features["perturbed_fraction"] = datasets.Value("float64")
    features["mask_seed"] = datasets.Value("int64")
    recipe = {"mode": mode, "ratio": ratio, "seed": seed, "pattern": pattern, "resolution": resolution}
    if cache_dir is None:
        cache_dir = tempfile.mkdtemp(prefix="mixsyn-mixed-")
        atexit.register(shutil.rmtree, cache_dir, True)
    # An explicit fingerprint: hashing the generator would pickle both datasets (in-memory ones entirely).
    fingerprint = hashlib.sha256(json.dumps([clean._fingerprint, perturbed._fingerprint, recipe]).encode()).hexdigest()
    mixed_dataset = datasets.Dataset.from_generator(mixed_rows, features=features, cache_dir=str(cache_dir),
                                                    fingerprint=fingerprint[:32])
    return with_provenance(mixed_dataset, json.dumps({"mixing": recipe}))
