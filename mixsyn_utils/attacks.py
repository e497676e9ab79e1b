"""Plumbing the membership-inference attack scripts share: flags, input checks, encoding, sharded scoring, output.

The attack maths itself lives in `diffusion.py`. An attack script gives `score_all` a function
`score_batch(latents, context) -> {column: (B,) float64 array}`; everything else is here:

- members and non-members are scored together, in fixed global batches of `--batch_size`, so a batch's
  scores do not depend on how many processes run (round-robin over batches, `PartialResults` per batch);
- each image is encoded by the VAE once, each unique caption by the text encoder once (per process);
- the scores dataset has columns `id, domain, is_member, score[, score_t{t}...]` and its info records
  the attack, the flags, the model and library versions, and `member_is_lower: true`.
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from .data import (
    InputError,
    PartialResults,
    check_resolution,
    dataset_provenance,
    derive_seed,
    image_to_tensor,
    load_image_dataset,
    save_dataset,
    shard_units,
    with_provenance,
)
from .metrics import roc_metrics
from .models import (
    add_pretrained_model_args,
    components_from_pipeline,
    encode_prompts,
    load_model_variant,
    load_token_map,
    native_resolution,
    rewrite_caption,
    tokenize_prompts,
)

# Bumped whenever image preprocessing or the latent encoding changes, so older cached z₀ are not reused.
LATENT_CACHE_VERSION = 1

# Flags that do not change a score: a resumed run may differ in these.
_OUTPUT_FLAGS = ("output_dir", "overwrite", "push_to_hub", "hub_dataset_id", "hub_token", "latents_cache_dir")


def add_common_args(parser):
    """Model, data and output flags shared by `attack_secmi.py` and `attack_pia.py`."""
    model = parser.add_argument_group("model (the pretrained pipeline plus an optional fine-tuned variant)")
    add_pretrained_model_args(model)
    model.add_argument("--unet_path", type=str, default=None,
                       help="Fine-tuned UNet folder (checkpoint-N/unet or a pipeline folder) replacing the pretrained one.")
    model.add_argument("--lora_weights", type=str, default=None,
                       help="LoRA folder/file (UNet and/or text encoder), fused into the model before attacking.")
    model.add_argument("--textual_inversion", type=str, default=None,
                       help="Folder with token_map.json; captions are rewritten with the learned placeholders.")
    model.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                       help="Weights dtype; default: the accelerate config. SecMI's score is a small difference, keep fp32.")
    data = parser.add_argument_group("data")
    data.add_argument("--member_dataset", type=str, required=True,
                      help="Images the model was trained on (save_to_disk folder, imagefolder or Hub id).")
    data.add_argument("--nonmember_dataset", type=str, required=True,
                      help="Held-out images from the same distribution; must share no id and no image with members.")
    data.add_argument("--caption_column", type=str, default="prompt",
                      help="Column with each image's own caption, the text condition c of ε_θ(z, t, c).")
    data.add_argument("--null_prompt", action="store_true",
                      help="Condition on the empty prompt instead of the captions (a standard control).")
    data.add_argument("--resolution", type=int, default=None,
                      help="Image size fed to the VAE; default: the model's native size (unet sample_size × 8).")
    data.add_argument("--batch_size", type=int, default=64,
                      help="Images per UNet call (members and non-members together); lower it if memory runs out.")
    data.add_argument("--vae_sample", action="store_true",
                      help="z₀ = a VAE posterior sample (seeded per image) instead of the posterior mode.")
    data.add_argument("--seed", type=int, default=0, help="Seed for --vae_sample and for the naive attack's noise.")
    data.add_argument("--latents_cache_dir", type=str, default=None,
                      help="Keep each batch's z₀ here and reuse it in later runs whose VAE encoder, images, resolution "
                           "and batch size match (attacking many fine-tunes of one model skips the VAE and decoding).")
    out = parser.add_argument_group("output")
    out.add_argument("--output_dir", type=str, required=True, help="Where the scores dataset is saved (save_to_disk).")
    out.add_argument("--overwrite", action="store_true", help="Replace an existing non-empty --output_dir.")
    out.add_argument("--push_to_hub", action="store_true", help="Also push the scores dataset to the Hub (private).")
    out.add_argument("--hub_dataset_id", type=str, default=None, help="Hub dataset repo id for --push_to_hub.")
    out.add_argument("--hub_token", type=str, default=None, help="Hub token (prefer `huggingface-cli login`).")
    return parser


def check_common_args(args):
    """Flag checks that need no model or data; call at the end of `parse_args`."""
    if args.batch_size <= 0:
        raise InputError(f"--batch_size must be positive, got {args.batch_size}")
    check_resolution(args.resolution)
    if args.null_prompt and args.textual_inversion:
        raise InputError("--null_prompt ignores captions, so --textual_inversion placeholders would never be used")


def check_timestep(value, num_train_timesteps, flag):
    """An attack timestep must lie strictly inside (0, T)."""
    if not 0 < value < num_train_timesteps:
        raise InputError(f"{flag} must be in (0, {num_train_timesteps}), got {value}")


def num_train_timesteps(args):
    """T of the model's noise scheduler, read from its config alone (cheap: checks run before loading weights)."""
    from diffusers import DDPMScheduler

    try:
        config = DDPMScheduler.load_config(args.pretrained_model_name_or_path, subfolder="scheduler",
                                           revision=args.revision)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"cannot load --pretrained_model_name_or_path {args.pretrained_model_name_or_path}: {first_line}")
    return int(config.get("num_train_timesteps", 1000))


def _pixel_digest(image):
    """Hash of the decoded RGB pixels (and size): equal for the same image saved under another id or format."""
    rgb = image.convert("RGB")
    return hashlib.sha1(repr(rgb.size).encode() + rgb.tobytes()).hexdigest()


def load_attack_data(args):
    """Members and non-members as one list of rows {id, domain, is_member, caption, digest, source}, checked.

    `source` = (image-only view of the dataset, index): images are decoded again batch by batch rather than
    all kept in memory. `digest` identifies the decoded pixels (`_pixel_digest`).

    Raises `InputError` for an empty set, a missing caption column, or any id or identical image present in
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
        prefix = "member" if is_member else "nonmember"
        sources.append(dataset.select_columns(["image"]))
        for index, row in enumerate(dataset):
            domain = str(row.get("domain", "") or "")
            caption = "" if args.null_prompt else str(row[args.caption_column])
            if token_map is not None:
                caption = rewrite_caption(caption, domain, token_map)
            rows.append({"id": str(row["id"]) if "id" in row else f"{prefix}-{index:06d}", "domain": domain,
                         "is_member": is_member, "caption": caption, "digest": _pixel_digest(row["image"]),
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
    """The attacked model's components on `device`, in eval mode without gradients; its ᾱ table (float64)."""
    pipeline = load_model_variant(
        args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant, unet_path=args.unet_path,
        lora_weights=args.lora_weights, textual_inversion=args.textual_inversion,
    )
    components = components_from_pipeline(pipeline)
    for module in (components.unet, components.vae, components.text_encoder):
        module.to(device=device, dtype=dtype).requires_grad_(False).eval()
    if args.resolution is None:
        args.resolution = native_resolution(components.unet, components.vae)
    return components


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


@torch.no_grad()
def encode_batch_latents(vae, rows, resolution, sample, seed, first_index):
    """z₀ = scaling_factor · E(x): posterior mode, or with `sample` one draw seeded by (seed, global index)."""
    pixel_values = torch.stack([image_to_tensor(image, resolution) for image in batch_images(rows)])
    posterior = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
    if sample:
        # One generator per image: its draw must not depend on which batch or process holds it.
        generators = [torch.Generator().manual_seed(derive_seed(seed, first_index + i)) for i in range(len(rows))]
        noise = torch.stack([torch.randn(posterior.mean.shape[1:], generator=g) for g in generators])
        latents = posterior.mean + posterior.std * noise.to(posterior.mean)
    else:
        latents = posterior.mode()
    # Contiguous, as when read back from the latents cache: the UNet's kernels differ by layout in the last bits.
    return (latents * vae.config.scaling_factor).contiguous()


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

    Key = sha256(VAE encoder digest, resolution, posterior mode or sample (+ seed and the batch's first
    global index, which seed the draws), the pixel digests of the batch's images). A fine-tuned UNet, LoRA
    or textual inversion leaves the key unchanged; a trained VAE encoder or other images change it.
    Files are written atomically, so concurrent processes and killed runs leave no torn entry.
    """

    def __init__(self, cache_dir, vae, resolution, sample, seed):
        self.cache_dir = Path(cache_dir)
        # The device type too: a GPU's kernels give latents that differ from a CPU's in the last bits.
        self.recipe = [LATENT_CACHE_VERSION, vae_encoder_digest(vae), vae.device.type, int(resolution), bool(sample),
                       int(seed) if sample else None]

    def _path(self, rows, first_index):
        sample = self.recipe[4]
        payload = json.dumps(self.recipe + [first_index if sample else None, [row["digest"] for row in rows]])
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


def batch_latents(components, rows, args, first_index, latent_cache=None):
    """z₀ of a batch: from `latent_cache` when it holds them, else encoded (and stored there)."""
    vae = components.vae
    if latent_cache is not None:
        latents = latent_cache.get(rows, first_index, vae.device, vae.dtype)
        if latents is not None:
            return latents
    latents = encode_batch_latents(vae, rows, args.resolution, args.vae_sample, args.seed, first_index)
    if latent_cache is not None:
        latent_cache.put(rows, first_index, latents)
    return latents


def run_meta(args):
    """Flags a resumed run must share with the killed one (everything that changes a score)."""
    return {key: value for key, value in sorted(vars(args).items())
            if key not in _OUTPUT_FLAGS and isinstance(value, (int, float, str, bool, list, type(None)))}


def score_all(rows, components, args, accelerator, score_batch, progress_factory):
    """Score every row in global batches sharded over processes; returns the `PartialResults` and batch count.

    `score_batch(latents, context) -> {column: (B,) array or (B, ...) map}` runs the attack on one batch.
    Each finished batch is saved at once, so a killed run resumes with the batches it has not finished.
    """
    from datasets import Dataset, Features, Sequence, Value

    partial = PartialResults(args.output_dir)
    if accelerator.is_main_process:
        partial.write_meta(run_meta(args))
    accelerator.wait_for_everyone()
    num_batches = (len(rows) + args.batch_size - 1) // args.batch_size
    mine = shard_units(range(num_batches), accelerator.process_index, accelerator.num_processes)
    todo = [unit for unit in mine if not partial.is_done(unit)]
    captions = CaptionCache(components.tokenizer, components.text_encoder)
    latent_cache = None
    if args.latents_cache_dir:
        latent_cache = LatentCache(args.latents_cache_dir, components.vae, args.resolution, args.vae_sample, args.seed)
    progress = progress_factory(total=len(mine), initial=len(mine) - len(todo))
    for unit in todo:
        start = unit * args.batch_size
        batch = rows[start : start + args.batch_size]
        latents = batch_latents(components, batch, args, start, latent_cache)
        with torch.no_grad():
            scores = score_batch(latents, captions([row["caption"] for row in batch]))
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
        partial.save(unit, Dataset.from_dict(columns, features=Features(features)))
        progress.update(1)
    progress.close()
    accelerator.wait_for_everyone()
    return partial, num_batches


def model_record(args):
    """The attacked model: pretrained id plus any fine-tuned parts."""
    return {key: getattr(args, key) for key in (
        "pretrained_model_name_or_path", "revision", "variant", "unet_path", "lora_weights", "textual_inversion")}


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


def scores_summary(dataset):
    """{column: AUC} of a saved scores dataset, members-lower convention (for logs and tests)."""
    is_member = np.asarray(dataset["is_member"], dtype=bool)
    summary = {}
    for column in [name for name in dataset.column_names if name.startswith("score")]:
        values = np.asarray(dataset[column], dtype=np.float64)
        summary[column] = roc_metrics(-values[is_member], -values[~is_member])["auc"]
    return json.loads(json.dumps(summary))
