"""Plumbing every attack script shares: input checks, encoding, sharded resumable scoring, the scores dataset.

The attack maths itself lives in `diffusion.py`; the flags in `flags.add_attack_args`. An attack script gives
`score_all` a function `score_batch(batch: AttackBatch) -> {column: (B,) float64 array}`; everything else is here:

- members and non-members are scored together, in fixed global batches of `--batch_size`, so a batch's
  scores do not depend on how many processes run (`ResumableWork` units: a killed run resumes);
- each image is encoded by the VAE once (and with `--latents_cache_dir` once for every model sharing the VAE
  encoder), each unique caption by the text encoder once (per process);
- the scores dataset has columns `id, domain, is_member, score[, score_t{t}...]` and its info records
  the attack, the flags, the model and library versions, and `member_is_lower: true`;
- an attack that fits something on labelled rows (CLiD's α, SimA's t) fits it on a seeded calibration split
  (`calibration_rows`) and saves the scores of the other rows only.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .cli import InputError, first_line
from .dataset_io import (
    check_text_column,
    dataset_provenance,
    decoded_images,
    load_image_dataset,
    save_dataset,
    with_provenance,
)
from .images import image_to_tensor
from .metrics import calibration_split, roc_metrics
from .models import (
    components_from_pipeline,
    encode_images_to_latents,
    encode_prompts,
    load_model_variant,
    model_fingerprints,
    native_resolution,
    tokenize_prompts,
    weights_digest,
    warn_truncated_captions,
)
from .placeholders import load_token_map, rewrite_caption
from .resumable import ResumableWork, input_fingerprint, run_signature
from .seeds import SALT_ATTACK_CALIBRATION, derive_seed

# Bumped whenever image preprocessing or the latent encoding changes, so older cached z₀ are not reused.
LATENT_CACHE_VERSION = 1
# Fewest calibration images per class an attack may fit on: below 10 × 10 pairs, one pair moves the calibration
# AUC by more than 0.01, the size of the differences α or t are chosen by.
MIN_CALIBRATION_PER_CLASS = 10


def check_timestep(value, num_train_timesteps, flag, allow_zero=False):
    """An attack timestep must lie inside (0, T), or [0, T) for attacks that noise z₀ at t = 0 too."""
    low = 0 if allow_zero else 1
    if not low <= value < num_train_timesteps:
        interval = f"[0, {num_train_timesteps})" if allow_zero else f"(0, {num_train_timesteps})"
        raise InputError(f"{flag} must be in {interval}, got {value}")


def num_train_timesteps(args):
    """T of the model's noise scheduler, read from its config alone (cheap: checks run before loading weights)."""
    from diffusers import DDPMScheduler

    try:
        config = DDPMScheduler.load_config(args.pretrained_model_name_or_path, subfolder="scheduler",
                                           revision=args.revision)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot load --pretrained_model_name_or_path {args.pretrained_model_name_or_path}: "
                         f"{first_line(error)}") from error
    return int(config.get("num_train_timesteps", 1000))


def _pixel_digest(rgb):
    """Hash of the decoded RGB pixels (and size): equal for the same image saved under another id or format."""
    return hashlib.sha1(repr(rgb.size).encode() + rgb.tobytes()).hexdigest()


def load_attack_data(args):
    """Members and non-members as one list of rows {id, domain, is_member, caption, digest, source}, checked.

    `source` = (image-only view of the dataset, index): images are decoded again batch by batch rather than
    all kept in memory. `digest` identifies the decoded pixels (`_pixel_digest`).

    Raises `InputError` for an empty set, a missing caption column, a None or empty caption, an image that does
    not decode (`dataset_io.decoded_images`, before any model loads), or any id or identical image present in
    both sets (such an image's label is undefined and would poison the evaluation).
    """
    required = ("image",) if args.null_prompt else ("image", args.caption_column)
    token_map = load_token_map(args.textual_inversion) if args.textual_inversion else None
    rows, digests, sources = [], {}, []
    for flag, path, is_member in (("--member_dataset", args.member_dataset, True),
                                  ("--nonmember_dataset", args.nonmember_dataset, False)):
        if path is None:
            raise InputError(f"{flag} is required")
        dataset = load_image_dataset(path, required_columns=required)
        if token_map is not None and "domain" not in dataset.column_names:
            raise InputError(f"{flag} {path} has no 'domain' column, needed to apply --textual_inversion placeholders")
        if not args.null_prompt:
            check_text_column(dataset, args.caption_column, f"{flag} {path}")
        prefix = "member" if is_member else "nonmember"
        sources.append(dataset.select_columns(["image"]))
        rgb_images = decoded_images(dataset, "image", f"{flag} {path}")
        for index, (row, rgb) in enumerate(zip(dataset.remove_columns("image"), rgb_images)):
            domain = str(row.get("domain", "") or "")
            caption = "" if args.null_prompt else str(row[args.caption_column])
            if token_map is not None:
                caption = rewrite_caption(caption, domain, token_map)
            rows.append({"id": str(row["id"]) if "id" in row else f"{prefix}-{index:06d}", "domain": domain,
                         "is_member": is_member, "caption": caption, "digest": _pixel_digest(rgb),
                         "source": (sources[-1], index)})
            digests.setdefault(rows[-1]["digest"], set()).add((is_member, rows[-1]["id"]))
    member_ids = {row["id"] for row in rows if row["is_member"]}
    shared_ids = sorted(member_ids & {row["id"] for row in rows if not row["is_member"]})
    if shared_ids:
        raise InputError(f"--member_dataset and --nonmember_dataset share {len(shared_ids)} id(s), e.g. {shared_ids[0]}")
    for owners in digests.values():
        if len({is_member for is_member, _ in owners}) == 2:
            names = sorted(name for _, name in owners)
            raise InputError(f"--member_dataset and --nonmember_dataset hold identical pixels: {', '.join(names[:4])}")
    return rows


def load_attack_model(args, device, dtype=torch.float32):
    """The attacked model's components on `device`, in eval mode without gradients."""
    pipeline = load_model_variant(
        args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant, unet_path=args.unet_path,
        lora_weights=args.lora_weights, textual_inversion=args.textual_inversion,
    )
    components = components_from_pipeline(pipeline)
    for module in (components.unet, components.vae, components.text_encoder):
        module.to(device=device, dtype=dtype).requires_grad_(False).eval()
    return components


def attack_resolution(args, components):
    """--resolution, or the attacked model's native resolution."""
    return args.resolution or native_resolution(components.unet, components.vae)


class CaptionCache:
    """Text embeddings c per unique caption: each caption goes through the text encoder once."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer, self.text_encoder, self.embeddings = tokenizer, text_encoder, {}

    @torch.no_grad()
    def __call__(self, captions):
        new = sorted(set(captions) - set(self.embeddings))
        if new:
            encoded = encode_prompts(self.text_encoder, tokenize_prompts(self.tokenizer, new))
            self.embeddings.update(zip(new, encoded))
        return torch.stack([self.embeddings[caption] for caption in captions])


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


def batch_latents(components, rows, args, resolution, first_index, latent_cache=None):
    """z₀ of a batch: from `latent_cache` when it holds them, else encoded (and stored there)."""
    vae = components.vae
    if latent_cache is not None:
        latents = latent_cache.get(rows, first_index, vae.device, vae.dtype)
        if latents is not None:
            return latents
    latents = encode_batch_latents(vae, rows, resolution, args.vae_sample, args.seed, first_index)
    if latent_cache is not None:
        latent_cache.put(rows, first_index, latents)
    return latents


def scores_to_dataset(batch, scores):
    """One batch's rows (id, domain, is_member) with its score columns: (B,) float64, or a flat float32 map."""
    from datasets import Dataset, Features, Sequence, Value

    columns = {"id": [row["id"] for row in batch], "domain": [row["domain"] for row in batch],
               "is_member": [row["is_member"] for row in batch]}
    features = {"id": Value("string"), "domain": Value("string"), "is_member": Value("bool")}
    for name, values in scores.items():
        values = np.asarray(values.cpu() if torch.is_tensor(values) else values)
        if values.ndim == 1:
            columns[name], features[name] = values.astype(np.float64), Value("float64")
        else:  # a per-image map (SecMI-NN's error map), stored flat
            columns[name] = list(values.reshape(len(batch), -1).astype(np.float32))
            features[name] = Sequence(Value("float32"))
    return Dataset.from_dict(columns, features=Features(features))


@dataclass
class AttackBatch:
    """One global batch as an attack sees it."""

    rows: list                  # the rows of `load_attack_data` (id, domain, is_member, caption, source)
    first_index: int            # global index of rows[0], which seeds per-image draws
    latents: torch.Tensor       # z₀ (B, C, h, w)
    context: torch.Tensor       # c, the text embedding of each row's caption (B, L, D)
    captions: CaptionCache      # embeddings of any other prompt (the empty prompt, weakened captions)

    def null_context(self):
        """c_∅: the empty prompt's embedding for every row, what classifier-free guidance subtracts."""
        return self.captions([""] * len(self.rows))


def timestep_columns(by_timestep):
    """{t: (B,) score} → `score` = the mean over t, and with several t one `score_t{t}` column each."""
    columns = {"score": torch.stack(list(by_timestep.values())).mean(0)}
    if len(by_timestep) > 1:
        columns.update({f"score_t{t}": values for t, values in by_timestep.items()})
    return columns


def score_all(rows, components, args, resolution, accelerator, score_batch, desc):
    """Score every row in global batches of --batch_size (`ResumableWork` units sharded over processes).

    `score_batch(batch: AttackBatch) -> {column: (B,) array or (B, ...) map}` runs the attack on one batch.
    Returns (scores dataset on the main process / None elsewhere, the `ResumableWork` to clean up once saved).
    """
    work = ResumableWork(args.output_dir, run_signature(args, attack_inputs(args)), accelerator,
                         discard_other_settings=args.overwrite)
    warn_truncated_captions(components.tokenizer, [row["caption"] for row in rows])
    num_batches = (len(rows) + args.batch_size - 1) // args.batch_size
    captions = CaptionCache(components.tokenizer, components.text_encoder)
    latent_cache = None
    if args.latents_cache_dir:
        latent_cache = LatentCache(args.latents_cache_dir, components.vae, resolution, args.vae_sample, args.seed)

    def score_unit(unit):
        start = unit * args.batch_size
        batch = rows[start : start + args.batch_size]
        latents = batch_latents(components, batch, args, resolution, start, latent_cache)
        with torch.no_grad():
            scores = score_batch(AttackBatch(batch, start, latents, captions([row["caption"] for row in batch]),
                                             captions))
        return scores_to_dataset(batch, scores)

    return work.run(num_batches, score_unit, desc=desc), work


def attacked_weights_digests(args):
    """{flag: `weights_digest`} of the attacked model's own weights: each local fine-tuned part, or the local
    pretrained folder when there is none (a DreamBooth pipeline). A model card attaches scores only to these."""
    parts = [flag for flag in ("unet_path", "lora_weights", "textual_inversion") if getattr(args, flag)]
    return {flag: weights_digest(getattr(args, flag)) for flag in parts or ["pretrained_model_name_or_path"]
            if Path(getattr(args, flag)).exists()}


def attack_inputs(args):
    """Fingerprints of what the scores depend on besides the flags: both image sets and every model part, so
    a killed attack resumed after one of them was replaced at the same path is refused."""
    return {"member_dataset": input_fingerprint(args.member_dataset, repo_type="dataset"),
            "nonmember_dataset": input_fingerprint(args.nonmember_dataset, repo_type="dataset"),
            **model_fingerprints(args)}
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


def model_record(args):
    """The attacked model: pretrained id plus any fine-tuned parts, and the sha256 of the weights attacked."""
    record = {key: getattr(args, key) for key in (
        "pretrained_model_name_or_path", "revision", "variant", "unet_path", "lora_weights", "textual_inversion")}
    return dict(record, weights_sha256=attacked_weights_digests(args))


def write_scores(dataset, script, attack, args, extra=None):
    """Attach the provenance to the assembled scores, save atomically; print AUC and TPR@1%FPR per column.

    Main process only. Returns the saved dataset.
    """
    record = {"attack": attack, "model": model_record(args), "member_is_lower": True, **(extra or {})}
    with_provenance(dataset, dataset_provenance(script, args, extra=record))
    save_dataset(dataset, args.output_dir, args.push_to_hub, args.hub_dataset_id, hub_token=args.hub_token)
    is_member = np.asarray(dataset["is_member"], dtype=bool)
    for column in [name for name in dataset.column_names if name.startswith("score")]:
        values = np.asarray(dataset[column], dtype=np.float64)
        # Scores are errors (members lower); roc_metrics wants "higher = member", hence the minus sign.
        metrics = roc_metrics(-values[is_member], -values[~is_member])
        print(f"{attack} {column}: AUC {metrics['auc']:.4f}  TPR@1%FPR {metrics['tpr_at_1pct_fpr']:.4f}")
    return dataset
