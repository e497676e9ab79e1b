"""Plumbing every attack script shares: input checks, encoding, sharded resumable scoring, the scores dataset.

The attack maths itself lives in `diffusion.py`; the flags in `flags.add_attack_args`; the scores dataset in
`scores.py`. An attack script gives `score_all` a function `score_batch(batch: AttackBatch) -> {column: (B,)
float64 array}`; everything else is here:

- members and non-members are scored together, in fixed global batches of `--batch_size`, so a batch's
  scores do not depend on how many processes run (`ResumableWork` units: a killed run resumes);
- each image is encoded by the VAE once (and with `--latents_cache_dir` once for every model sharing the VAE
  encoder), each unique caption by the text encoder once (per process);
- the attacked model is an `AttackedModel` (the pretrained pipeline and its fine-tuned parts), whose weights'
  sha256 the scores record (`model_record`);
- an attack that fits something on labelled rows (CLiD's α, SimA's t) fits it on a seeded calibration split
  (`calibration_rows`) and saves the scores of the other rows only.
"""

import hashlib
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from .cli import InputError, first_line
from .dataset_io import check_text_column, decoded_images, load_image_dataset
from .images import difference_hash, image_to_tensor, resize_and_crop
from .metrics import calibration_split
from .conditioning import TextConditioning, empty_prompt_conditioning, encode_prompts, square_time_ids
from .models import encode_images_to_latents, text_encoders_of, tokenize_prompts, tokenizers_of, warn_truncated_captions
from .placeholders import load_token_map, rewrite_caption
from .resumable import ResumableWork, input_fingerprint, model_weights_digest, weights_digest
from .scores import scores_to_dataset
from .seeds import SALT_ATTACK_CALIBRATION, derive_seed
from .variants import components_from_pipeline, load_model_variant, model_fingerprints

# Bumped whenever image preprocessing or the latent encoding changes, so older cached z₀ are not reused.
LATENT_CACHE_VERSION = 1
# Mean |Δ| in uint8 levels at or below which a member and a non-member are the same image after the shared
# preprocessing: on the fast victim (16 px) a 2× upscale of a member differs from it by 2.6 levels, the closest
# distinct member / non-member pair by 13.0.
SAME_IMAGE_MEAN_LEVELS = 4.0
# Fewest calibration images per class an attack may fit on: below 10 × 10 pairs, one pair moves the calibration
# AUC by more than 0.01, the size of the differences α or t are chosen by.
MIN_CALIBRATION_PER_CLASS = 10


def check_timestep(value, num_train_timesteps, flag, allow_zero=False):
    """An attack timestep must lie inside (0, T), or [0, T) for attacks that noise z₀ at t = 0 too."""
    low = 0 if allow_zero else 1
    if not low <= value < num_train_timesteps:
        interval = f"[0, {num_train_timesteps})" if allow_zero else f"(0, {num_train_timesteps})"
        raise InputError(f"{flag} must be in {interval}, got {value}")


@dataclass(frozen=True)
class AttackedModel:
    """The model an attack scores: the pretrained pipeline (`--pretrained_model_name_or_path`, `--revision`,
    `--variant`) plus the fine-tuned parts that replace or extend it (`--unet_path`, `--lora_weights`,
    `--textual_inversion`)."""

    pretrained_model_name_or_path: str
    revision: str = None
    variant: str = None
    unet_path: str = None
    lora_weights: str = None
    textual_inversion: str = None

    def as_dict(self):
        return {field.name: getattr(self, field.name) for field in fields(self)}


def num_train_timesteps(pretrained_model_name_or_path, revision=None):
    """T of the model's noise scheduler, read from its config alone (cheap: checks run before loading weights)."""
    from diffusers import DDPMScheduler

    try:
        config = DDPMScheduler.load_config(pretrained_model_name_or_path, subfolder="scheduler", revision=revision)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot load --pretrained_model_name_or_path {pretrained_model_name_or_path}: "
                         f"{first_line(error)}") from error
    return int(config.get("num_train_timesteps", 1000))


def _pixel_digest(rgb):
    """Hash of the decoded RGB pixels (and size): equal for the same image saved under another id or format."""
    return hashlib.sha1(repr(rgb.size).encode() + rgb.tobytes()).hexdigest()


def check_no_image_in_both_sets(rows, hashes, resolution):
    """No member and non-member may be one image after the shared preprocessing (`images.resize_and_crop` to the
    attack `resolution`, what the model sees), e.g. a member saved again upscaled among the non-members.

    Candidates are the pairs whose `difference_hash` (`hashes[i]` of row i, preprocessed) agrees on one of its
    four 16-bit bands, which finds every pair within 3 differing bits without comparing all pairs; a candidate
    with mean |Δ| ≤ `SAME_IMAGE_MEAN_LEVELS` uint8 levels is refused, naming both ids.
    """
    members_by_band = {}
    for index, row in enumerate(rows):
        if row["is_member"]:
            for band in range(4):
                members_by_band.setdefault((band, hashes[index] >> (16 * band) & 0xFFFF), []).append(index)
    cache = {}

    def pixels(index):
        if index not in cache:
            if len(cache) > 256:
                cache.clear()
            cache[index] = np.asarray(resize_and_crop(batch_images([rows[index]])[0], resolution), dtype=np.int16)
        return cache[index]

    for index, row in enumerate(rows):
        if row["is_member"]:
            continue
        candidates = {member for band in range(4)
                      for member in members_by_band.get((band, hashes[index] >> (16 * band) & 0xFFFF), [])}
        for member in sorted(candidates):
            difference = float(np.abs(pixels(member) - pixels(index)).mean())
            if difference <= SAME_IMAGE_MEAN_LEVELS:
                raise InputError(f"--member_dataset and --nonmember_dataset hold the same image after preprocessing "
                                 f"to {resolution} px (mean difference {difference:.1f}/255): {rows[member]['id']} "
                                 f"and {row['id']}")


def load_attack_data(member_dataset, nonmember_dataset, caption_column="prompt", null_prompt=False,
                     textual_inversion=None, resolution=None):
    """Members and non-members as one list of rows {id, domain, is_member, caption, digest, source}, checked.

    `source` = (image-only view of the dataset, index): images are decoded again batch by batch rather than
    all kept in memory. `digest` identifies the decoded pixels (`_pixel_digest`).

    Raises `InputError` for an empty set, a missing caption column, a None or empty caption, an image that does
    not decode (`dataset_io.decoded_images`, before any model loads), or any id or identical image present in
    both sets (such an image's label is undefined and would poison the evaluation); with the attack `resolution`,
    also for an image present in both sets after preprocessing (`check_no_image_in_both_sets`).
    """
    required = ("image",) if null_prompt else ("image", caption_column)
    token_map = load_token_map(textual_inversion) if textual_inversion else None
    rows, digests, sources, hashes = [], {}, [], []
    for flag, path, is_member in (("--member_dataset", member_dataset, True),
                                  ("--nonmember_dataset", nonmember_dataset, False)):
        if path is None:
            raise InputError(f"{flag} is required")
        dataset = load_image_dataset(path, required_columns=required, flag=flag)
        if token_map is not None and "domain" not in dataset.column_names:
            raise InputError(f"{flag} {path} has no 'domain' column, needed to apply --textual_inversion placeholders")
        if not null_prompt:
            check_text_column(dataset, caption_column, f"{flag} {path}")
        prefix = "member" if is_member else "nonmember"
        sources.append(dataset.select_columns(["image"]))
        rgb_images = decoded_images(dataset, "image", f"{flag} {path}")
        for index, (row, rgb) in enumerate(zip(dataset.remove_columns("image"), rgb_images)):
            domain = str(row.get("domain", "") or "")
            caption = "" if null_prompt else str(row[caption_column])
            if token_map is not None:
                caption = rewrite_caption(caption, domain, token_map)
            rows.append({"id": str(row["id"]) if "id" in row else f"{prefix}-{index:06d}", "domain": domain,
                         "is_member": is_member, "caption": caption, "digest": _pixel_digest(rgb),
                         "source": (sources[-1], index)})
            digests.setdefault(rows[-1]["digest"], set()).add((is_member, rows[-1]["id"]))
            if resolution is not None:
                hashes.append(difference_hash(resize_and_crop(rgb, resolution)))
    member_ids = {row["id"] for row in rows if row["is_member"]}
    shared_ids = sorted(member_ids & {row["id"] for row in rows if not row["is_member"]})
    if shared_ids:
        raise InputError(f"--member_dataset and --nonmember_dataset share {len(shared_ids)} id(s), e.g. {shared_ids[0]}")
    for owners in digests.values():
        if len({is_member for is_member, _ in owners}) == 2:
            names = sorted(name for _, name in owners)
            raise InputError(f"--member_dataset and --nonmember_dataset hold identical pixels: {', '.join(names[:4])}")
    if resolution is not None:
        check_no_image_in_both_sets(rows, hashes, resolution)
    return rows


def load_attack_model(model, device, dtype=torch.float32):
    """The `AttackedModel`'s components on `device`, in eval mode without gradients."""
    pipeline = load_model_variant(**model.as_dict())
    components = components_from_pipeline(pipeline)
    for module in (components.unet, components.vae, *text_encoders_of(components)):
        module.to(device=device, dtype=dtype).requires_grad_(False).eval()
    return components


class CaptionCache:
    """The UNet's conditioning per caption (`conditioning.encode_prompts`): each unique caption goes through the
    text encoder(s) once. SDXL rows carry the time ids of an uncropped R × R image, (R, R, 0, 0, R, R)
    (`square_time_ids`): the size and crop a training image was given are not in the image, so an attacker
    assumes the pipeline's default. `None` stands for the model's unconditional embedding (`null`)."""

    def __init__(self, components, resolution):
        self.text_encoders, self.tokenizers = text_encoders_of(components), tokenizers_of(components)
        self.force_zeros = getattr(components, "force_zeros_for_empty_prompt", False)
        self.resolution, self.rows = resolution, {}

    @torch.no_grad()
    def __call__(self, captions):
        """`TextConditioning` of the captions, one row each (a caption None: the unconditional row)."""
        new = sorted(set(captions) - set(self.rows) - {None})
        if new:
            encoded = encode_prompts(self.text_encoders, [tokenize_prompts(tokenizer, new)
                                                          for tokenizer in self.tokenizers])
            self.rows.update((caption, encoded.select(i)) for i, caption in enumerate(new))
        if None in captions and None not in self.rows:
            self.rows[None] = empty_prompt_conditioning(self.text_encoders, self.tokenizers, self.force_zeros)
        stacked = TextConditioning.cat([self.rows[caption] for caption in captions])
        return stacked.with_time_ids(square_time_ids(self.resolution, len(captions)))


def batch_images(rows):
    """The rows' PIL images, fetched with one indexed read per source dataset (rows of a batch are contiguous)."""
    images = [None] * len(rows)
    by_source = {}
    for position, row in enumerate(rows):
        by_source.setdefault(id(row["source"][0]), (row["source"][0], []))[1].append((position, row["source"][1]))
    for view, members in by_source.values():
        for (position, _), image in zip(members, view[[index for _, index in members]]["image"]):
            images[position] = image
    return images


def batch_pixel_values(rows, resolution):
    """The rows' images as one (B, 3, H, W) float32 tensor in [-1, 1] (`image_to_tensor`)."""
    return torch.stack([image_to_tensor(image, resolution) for image in batch_images(rows)])


@torch.no_grad()
def encode_pixel_latents(vae, pixel_values, sample, seed, first_index):
    """z₀ of a batch of pixels (`encode_images_to_latents`): the posterior mode, or with `sample` one draw per
    image from a generator seeded by `derive_seed(seed, global index)`, so a draw does not depend on its batch
    or process.
    """
    generators = [torch.Generator().manual_seed(derive_seed(seed, first_index + i)) for i in range(len(pixel_values))]
    latents = encode_images_to_latents(vae, pixel_values, sample=sample, generator=generators if sample else None)
    # Contiguous, as when read back from the latents cache: the UNet's kernels differ by layout in the last bits.
    return latents.contiguous()


def encode_batch_latents(vae, rows, resolution, sample, seed, first_index):
    """z₀ of a batch of rows: `encode_pixel_latents` of their `batch_pixel_values`."""
    return encode_pixel_latents(vae, batch_pixel_values(rows, resolution), sample, seed, first_index)


def vae_encoder_digest(vae):
    """sha256 of what z₀ depends on in the VAE: encoder and quant_conv weights (with dtypes), scaling factor."""
    digest = hashlib.sha256(repr(float(vae.config.scaling_factor)).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        if name.startswith(("encoder.", "quant_conv.")):
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class LatentCache:
    """Batches of z₀ on disk (safetensors), keyed by everything they depend on.

    Key = sha256(VAE encoder digest, device type, resolution, posterior mode or sample (+ seed and the batch's
    first global index, which seed the draws), the pixel digests of the batch's images). A fine-tuned UNet, LoRA
    or textual inversion leaves the key unchanged; a trained VAE encoder or other images change it.
    Files are written atomically, so concurrent processes and killed runs leave no torn entry.
    """

    def __init__(self, cache_dir, vae, resolution, sample, seed):
        self.cache_dir = Path(cache_dir)
        self.sample = bool(sample)
        # The device type too: a GPU's kernels give latents that differ from a CPU's in the last bits.
        self.recipe = [LATENT_CACHE_VERSION, vae_encoder_digest(vae), vae.device.type, int(resolution), self.sample,
                       int(seed) if self.sample else None]

    def _path(self, rows, first_index):
        payload = json.dumps(self.recipe + [first_index if self.sample else None, [row["digest"] for row in rows]])
        return self.cache_dir / f"latents-{hashlib.sha256(payload.encode()).hexdigest()[:40]}.safetensors"

    def get(self, rows, first_index, device, dtype):
        from safetensors.torch import load_file

        path = self._path(rows, first_index)
        if not path.exists():
            return None
        return load_file(str(path))["latents"].to(device=device, dtype=dtype)

    def put(self, rows, first_index, latents):
        from safetensors.torch import save_file

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        path = self._path(rows, first_index)
        tmp_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"latents": latents.detach().cpu().contiguous()}, str(tmp_path))
        os.replace(tmp_path, path)


def batch_latents(vae, rows, resolution, first_index, vae_sample=False, seed=0, latent_cache=None):
    """z₀ of a batch: from `latent_cache` when it holds them, else encoded (and stored there)."""
    if latent_cache is not None:
        latents = latent_cache.get(rows, first_index, vae.device, vae.dtype)
        if latents is not None:
            return latents
    latents = encode_batch_latents(vae, rows, resolution, vae_sample, seed, first_index)
    if latent_cache is not None:
        latent_cache.put(rows, first_index, latents)
    return latents


@dataclass
class AttackBatch:
    """One global batch as an attack sees it."""

    rows: list                  # the rows of `load_attack_data` (id, domain, is_member, caption, source)
    first_index: int            # global index of rows[0], which seeds per-image draws
    latents: torch.Tensor       # z₀ (B, C, h, w)
    context: TextConditioning   # c, the conditioning of each row's caption (B rows)
    captions: CaptionCache      # the conditioning of any other prompt (weakened captions, the unconditional one)

    def null_context(self):
        """c_∅ for every row: the model's unconditional embedding, what classifier-free guidance subtracts (the
        encoded empty prompt; zeros for an SDXL pipeline with `force_zeros_for_empty_prompt`)."""
        return self.captions([None] * len(self.rows))


def assumed_time_ids(components, resolution):
    """The SDXL time ids every UNet call of an attack gets, [R, R, 0, 0, R, R] (`CaptionCache`), for the scores'
    record; None for SD-1.x/2.x, which has none."""
    if getattr(components, "text_encoder_2", None) is None:
        return None
    return [int(value) for value in square_time_ids(resolution, 1)[0].tolist()]


def timestep_columns(by_timestep):
    """{t: (B,) score} → `score` = the mean over t, and with several t one `score_t{t}` column each."""
    columns = {"score": torch.stack(list(by_timestep.values())).mean(0)}
    if len(by_timestep) > 1:
        columns.update({f"score_t{t}": values for t, values in by_timestep.items()})
    return columns


def score_all(rows, components, score_batch, *, accelerator, output_dir, signature, resolution, batch_size,
              vae_sample=False, seed=0, latents_cache_dir=None, overwrite=False, desc="scoring"):
    """Score every row in global batches of `batch_size` (`ResumableWork` units sharded over processes).

    `score_batch(batch: AttackBatch) -> {column: (B,) array or (B, ...) map}` runs the attack on one batch.
    `signature`: the run signature a killed run's `<output_dir>.partial` must match (`resumable.run_signature`
    of the flags and `attack_inputs`); `overwrite` discards one of other settings.
    Returns (scores dataset on the main process / None elsewhere, the `ResumableWork` to clean up once saved).
    """
    work = ResumableWork(output_dir, signature, accelerator, discard_other_settings=overwrite)
    warn_truncated_captions(components.tokenizer, [row["caption"] for row in rows])
    num_batches = (len(rows) + batch_size - 1) // batch_size
    captions = CaptionCache(components, resolution)
    latent_cache = None
    if latents_cache_dir:
        latent_cache = LatentCache(latents_cache_dir, components.vae, resolution, vae_sample, seed)

    def score_unit(unit):
        start = unit * batch_size
        batch = rows[start : start + batch_size]
        latents = batch_latents(components.vae, batch, resolution, start, vae_sample, seed, latent_cache)
        with torch.no_grad():
            scores = score_batch(AttackBatch(batch, start, latents, captions([row["caption"] for row in batch]),
                                             captions))
        return scores_to_dataset(batch, scores)

    return work.run(num_batches, score_unit, desc=desc), work


def attacked_weights_digests(model):
    """{flag: digest} of every weight the `AttackedModel` loads: the pretrained pipeline (`model_weights_digest`: the
    sha256 of a local folder's weights, `id@commit` of a Hub id) and each fine-tuned part (`weights_digest`).

    A model card attaches scores only when its folder's digest is among them and, for weights trained on a base
    model (LoRA, textual inversion), when the pretrained digest is that base's; `evaluate.py` groups attacks on one
    model by these digests, whatever the spelling of its paths.
    """
    digests = {"pretrained_model_name_or_path": model_weights_digest(model.pretrained_model_name_or_path,
                                                                      model.revision)}
    for flag in ("unet_path", "lora_weights", "textual_inversion"):
        if getattr(model, flag):
            digests[flag] = weights_digest(getattr(model, flag))
    return digests


def attack_inputs(model, member_dataset, nonmember_dataset):
    """Fingerprints of what the scores depend on besides the flags: both image sets and every model part, so
    a killed attack resumed after one of them was replaced at the same path is refused."""
    return {"member_dataset": input_fingerprint(member_dataset, repo_type="dataset"),
            "nonmember_dataset": input_fingerprint(nonmember_dataset, repo_type="dataset"),
            **model_fingerprints(model.pretrained_model_name_or_path, model.revision, model.unet_path,
                                 model.lora_weights, model.textual_inversion)}


def calibration_rows(rows, fraction, seed, attack):
    """Boolean mask of the rows an attack fits on; it saves the scores of the other rows only.

    `metrics.calibration_split` of the rows' (is_member, domain) with `fraction` and the seed
    `derive_seed(seed, SALT_ATTACK_CALIBRATION)`, so it is not the half `evaluate.py` calibrates on with the
    same --seed. Raises `InputError` naming the number needed when a class gets fewer than
    `MIN_CALIBRATION_PER_CLASS` calibration images (checked before any image is scored).
    """
    is_member = np.asarray([row["is_member"] for row in rows], dtype=bool)
    mask = calibration_split(is_member, [row["domain"] for row in rows], derive_seed(seed, SALT_ATTACK_CALIBRATION),
                             fraction)
    members, nonmembers = int((mask & is_member).sum()), int((mask & ~is_member).sum())
    if min(members, nonmembers) < MIN_CALIBRATION_PER_CLASS:
        raise InputError(f"--calibration_fraction {fraction} gives {members} member and {nonmembers} non-member "
                         f"calibration images; {attack} needs at least {MIN_CALIBRATION_PER_CLASS} of each (raise "
                         "--calibration_fraction or score more images)")
    return mask


def calibration_record(rows, mask, fraction, seed, fit):
    """The dataset-info record of a calibration split: how it was drawn, its size and ids, what was fitted."""
    is_member = np.asarray([row["is_member"] for row in rows], dtype=bool)
    return {"fraction": fraction, "seed": f"derive_seed({seed}, SALT_ATTACK_CALIBRATION={SALT_ATTACK_CALIBRATION})",
            "num_members": int((mask & is_member).sum()), "num_nonmembers": int((mask & ~is_member).sum()),
            "ids": [row["id"] for row, calibrating in zip(rows, mask) if calibrating], **fit}


def model_record(model):
    """The attacked model as its scores record it: pretrained id, fine-tuned parts, sha256 of the weights attacked."""
    return dict(model.as_dict(), weights_sha256=attacked_weights_digests(model))
