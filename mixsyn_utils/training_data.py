"""The training set of the three fine-tuning scripts: clean (+ perturbed, mixed) images with their own captions.

- `load_training_images`: `--dataset_name` or upstream's `--instance_data_dir`, mixed with
  `--perturbed_dataset_name` by `mixing.mix_datasets`;
- `TrainingImages` + `EpochBatchSampler`: a data order that is a function of (seed, epoch) only, and crops
  and flips seeded per (seed, epoch, image), so a resumed run skips exactly the batches it has seen;
- `load_class_images`: DreamBooth's prior-preservation images, generated once and cached.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

from .class_images import ensure_class_images
from .cli import InputError
from .dataset_io import (
    check_images_decode,
    check_text_column,
    image_files,
    load_image_dataset,
    read_provenance,
)
from .images import pil_to_tensor, resized_square_crop
from .mixing import mix_datasets
from .models import tokenize_prompts
from .resumable import input_fingerprint
from .seeds import CLASS_IMAGE_KEY_OFFSET, SALT_CAPTION, derive_seed


def load_instance_folder(instance_data_dir, instance_prompt, instance_domain="", flag="--instance_data_dir"):
    """Upstream's `--instance_data_dir`: every image file of the folder, captioned with `instance_prompt`.

    Image files are those with an extension Pillow reads (.png, .jpg, ...); other files (metadata, .DS_Store)
    are skipped as upstream skips them, but an image file that does not decode is an error, not a skip
    (`dataset_io.check_images_decode`). The images stay files (the dataset holds their paths and decodes on
    access), so a large folder costs no memory; `domain` is `instance_domain` for every row.
    """
    import datasets

    files = image_files(instance_data_dir)
    if not files:
        raise InputError(f"{flag} {instance_data_dir} holds no images")
    return datasets.Dataset.from_dict(
        {"id": [p.stem for p in files], "image": [str(p) for p in files],
         "prompt": [instance_prompt] * len(files), "domain": [instance_domain] * len(files)},
        features=datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                    "prompt": datasets.Value("string"), "domain": datasets.Value("string")}))


@dataclass
class TrainingSet:
    """The (mixed) training images: `rows` with an `image` column, the name of their caption column (None when
    the images have no captions), the mix, the content fingerprints of the datasets or folder they came from
    (for the run signature), and their `source`: "instance_data_dir" (the user's own images),
    "generate_synthetic.py" (a self-synthesized set, by its provenance) or "dataset"."""

    rows: object
    caption_column: str
    mix_info: dict
    fingerprints: dict
    source: str = "dataset"


def caption_column_of(caption_column, column_names):
    """--caption_column, else `text` (upstream's default) when the dataset has it, else `prompt` (generate_synthetic's)."""
    if caption_column is not None:
        return caption_column
    return "text" if "text" in column_names else "prompt"


def load_clean_images(dataset_name=None, train_data_dir=None, instance_data_dir=None, *, dataset_config_name=None,
                      cache_dir=None, image_column="image", caption_column=None, instance_prompt=None,
                      instance_domain=None, max_train_samples=None, seed=None, captions_required=True):
    """(rows, caption column, input fingerprints) of --dataset_name / --train_data_dir / --instance_data_dir.

    --train_data_dir alone is an imagefolder (captions from its metadata file); with --dataset_name it is the
    Hub dataset's data_dir. --max_train_samples keeps a subset seeded by --seed. Every image is decoded once and
    every caption checked here, before any model loads: a bad file fails in seconds, not at the step reading it.
    """
    if instance_data_dir is not None:
        clean = load_instance_folder(instance_data_dir, instance_prompt, instance_domain or "")
        check_images_decode(clean, "image", f"--instance_data_dir {instance_data_dir}")
        return clean, "prompt", {"instance_data_dir": input_fingerprint(instance_data_dir)}
    if dataset_name is not None:
        clean = load_image_dataset(dataset_name, required_columns=(image_column,), cache_dir=cache_dir,
                                   config_name=dataset_config_name, data_dir=train_data_dir, flag="--dataset_name")
    else:
        clean = load_image_dataset(train_data_dir, required_columns=(image_column,), cache_dir=cache_dir,
                                   flag="--train_data_dir")
    if image_column != "image":
        clean = clean.rename_column(image_column, "image")
    column = caption_column_of(caption_column, clean.column_names)
    if column not in clean.column_names:
        if captions_required or caption_column is not None:
            raise InputError(f"dataset {dataset_name or train_data_dir} has no column {column!r} "
                             f"(columns: {', '.join(clean.column_names)}); pass --caption_column")
        column = None
    if max_train_samples is not None and max_train_samples < len(clean):
        clean = clean.shuffle(seed=seed or 0).select(range(max_train_samples))
    label = f"--dataset_name {dataset_name}" if dataset_name else f"--train_data_dir {train_data_dir}"
    if column is not None:
        check_text_column(clean, column, label)
    check_images_decode(clean, "image", label)
    fingerprints = {flag: input_fingerprint(path, repo_type="dataset")
                    for flag, path in (("dataset_name", dataset_name), ("train_data_dir", train_data_dir))
                    if path is not None}
    return clean, column, fingerprints


def perturbation_budget(perturbed_dataset_name, provenance, clean_fingerprint):
    """The ℓ∞ budget η (`pgd_eps`) a perturbed set records, which its pairs are checked against
    (`mixing.check_perturbation_pairs`); None when it records none but names the clean set's fingerprint, which
    then matches this one (`perturb_antidreambooth.py` records both). Else `InputError`: nothing ties the set to
    these clean images but their ids."""
    pgd_eps = (provenance.get("flags") or {}).get("pgd_eps")
    if pgd_eps is not None:
        return float(pgd_eps)
    recorded = provenance.get("clean_dataset_fingerprint")
    if recorded is None:
        raise InputError(f"--perturbed_dataset_name {perturbed_dataset_name} records no pgd_eps (nor the clean set it "
                         "was made from), so its images cannot be checked against the clean ones; make it with "
                         "perturb_antidreambooth.py")
    if recorded != clean_fingerprint:
        raise InputError(f"--perturbed_dataset_name {perturbed_dataset_name} was made from another clean dataset "
                         "(its recorded fingerprint differs) and records no pgd_eps to check its pairs against")
    return None


def load_training_images(dataset_name=None, train_data_dir=None, instance_data_dir=None, *,
                         perturbed_dataset_name=None, mixup_mode="image", mixup_ratio=0.0, mixup_seed=0,
                         mixup_pattern="random", resolution=None, **clean_options):
    """The training set: `load_clean_images` (its options in `clean_options`), mixed with `perturbed_dataset_name`.

    Returns a `TrainingSet`: rows with `image` and their captions; with a perturbed set the images are
    `mix_datasets(clean, perturbed, ...)`, every pair checked against the set's budget (`perturbation_budget`).
    mix_info holds mode, ratio, seed, pattern and the perturbed set's PGD flags from its provenance (for the model
    card). Nothing is written: a script saves the rows (--save_mixed_dataset) once its model has loaded too.
    """
    clean, caption_column, fingerprints = load_clean_images(dataset_name, train_data_dir, instance_data_dir,
                                                            **clean_options)
    if instance_data_dir is not None:
        source = "instance_data_dir"
    else:
        source = "generate_synthetic.py" if read_provenance(clean).get("script") == "generate_synthetic.py" else "dataset"
    mix_info = {"mode": mixup_mode, "ratio": mixup_ratio, "seed": mixup_seed, "pattern": mixup_pattern,
                "perturbed_dataset": perturbed_dataset_name, "pgd": {}}
    training_rows = clean
    if perturbed_dataset_name is not None:
        perturbed = load_image_dataset(perturbed_dataset_name, required_columns=("image",),
                                       flag="--perturbed_dataset_name")
        check_images_decode(perturbed, "image", f"--perturbed_dataset_name {perturbed_dataset_name}")
        fingerprints["perturbed_dataset_name"] = input_fingerprint(perturbed_dataset_name, repo_type="dataset")
        provenance = read_provenance(perturbed)
        flags = provenance.get("flags", {})
        mix_info["pgd"] = {key: value for key, value in flags.items() if key.startswith("pgd_")}
        clean_fingerprint = fingerprints.get("dataset_name") or fingerprints.get("train_data_dir")
        pgd_eps = perturbation_budget(perturbed_dataset_name, provenance, clean_fingerprint)
        if len(clean) < len(perturbed) and clean_options.get("max_train_samples") is not None \
                and "id" in clean.column_names:
            kept = set(clean["id"])
            perturbed = perturbed.filter(lambda image_id: image_id in kept, input_columns=["id"])
        training_rows = mix_datasets(clean, perturbed, mixup_mode, mixup_ratio, mixup_seed, pattern=mixup_pattern,
                                     resolution=resolution, pgd_eps=pgd_eps)
    return TrainingSet(training_rows, caption_column, mix_info, fingerprints, source)


def caption_of_row(row, caption_column, rng):
    """The row's caption; from a list of captions one is drawn with `rng` (upstream draws one per epoch)."""
    caption = row[caption_column]
    if isinstance(caption, (list, tuple)):
        return str(caption[int(rng.integers(len(caption)))])
    return caption


def training_pixel_values(image, resolution, center_crop, random_flip, rng, interpolation="bicubic"):
    """PIL image → ((3, R, R) float32 in [-1, 1], original (height, width), crop (top, left)): shorter side resized to
    R (`interpolation`), crop, optional flip.

    The random crop offset and the flip are drawn from `rng`, which the caller seeds per (seed, epoch,
    image), so a resumed run sees the same crops as an uninterrupted one. The size and crop are SDXL's
    micro-conditioning (a flip after the crop leaves them unchanged, as upstream's SDXL scripts record them).
    """
    from PIL import Image

    image, original_size, crop_top_left = resized_square_crop(image, resolution, center_crop, rng=rng,
                                                              interpolation=interpolation)
    if random_flip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return pil_to_tensor(image), original_size, crop_top_left


class TrainingImages(torch.utils.data.Dataset):
    """Rows of the mixed set as `pixel_values` + the `input_ids` of their own (optionally rewritten) caption.

    `caption_fn(row, rng) -> str` picks/rewrites the caption (textual inversion puts placeholders in); `rng` is
    seeded by (seed, epoch, item), so a resumed run draws the same captions. Images are resized to `resolution`
    with `interpolation`, centre- or randomly cropped, optionally flipped; captions are tokenized to `max_length`
    by each of `tokenizers` (SDXL's two: `input_ids`, `input_ids_2`). Every example also carries
    `original_size` and `crop_top_left` (SDXL's time ids). With `class_images` (prior preservation) item i also
    carries class image i mod len(class_images).
    """

    def __init__(self, rows, tokenizers, resolution, caption_fn, *, center_crop=False, random_flip=False, seed=None,
                 interpolation="bicubic", max_length=None, class_images=None):
        self.rows, self.resolution, self.caption_fn = rows, resolution, caption_fn
        self.tokenizers = tuple(tokenizers) if isinstance(tokenizers, (list, tuple)) else (tokenizers,)
        self.center_crop, self.random_flip, self.seed = center_crop, random_flip, seed or 0
        self.interpolation, self.max_length = interpolation, max_length
        self.class_images = class_images
        self.epoch = 0
        self._token_ids = {}  # caption → ids; captions repeat (few templates × domains), so this stays small

    def _tokenize(self, caption):
        if caption not in self._token_ids:
            if len(self._token_ids) >= 4096:
                self._token_ids.clear()
            self._token_ids[caption] = [tokenize_prompts(tokenizer, [caption], self.max_length)[0]
                                        for tokenizer in self.tokenizers]
        return self._token_ids[caption]

    def __len__(self):
        return len(self.rows)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _encode(self, image, caption, key, prefix=""):
        rng = np.random.default_rng(derive_seed(self.seed, self.epoch, key))
        pixel_values, original_size, crop_top_left = training_pixel_values(
            image, self.resolution, self.center_crop, self.random_flip, rng, self.interpolation)
        example = {f"{prefix}pixel_values": pixel_values, f"{prefix}original_size": torch.tensor(original_size),
                   f"{prefix}crop_top_left": torch.tensor(crop_top_left)}
        for index, ids in enumerate(self._tokenize(caption)):
            example[f"{prefix}input_ids" + (f"_{index + 1}" if index else "")] = ids
        return example

    def __getitem__(self, index):
        row = self.rows[int(index)]
        caption = self.caption_fn(row, np.random.default_rng(derive_seed(self.seed, self.epoch, index, SALT_CAPTION)))
        example = self._encode(row["image"], caption, index)
        if self.class_images is not None:
            class_row = self.class_images[int(index) % len(self.class_images)]
            example.update(self._encode(class_row["image"], class_row["prompt"], CLASS_IMAGE_KEY_OFFSET + index,
                                        prefix="class_"))
        return example


BATCH_KEYS = ("pixel_values", "input_ids", "input_ids_2", "original_size", "crop_top_left")


def collate_examples(examples):
    """Stack a batch; with prior preservation the class rows follow the instance rows (upstream order)."""
    batch = {"num_instance": len(examples)}
    for key in BATCH_KEYS:
        if key in examples[0]:
            batch[key] = torch.stack([e[key] for e in examples] + [e[f"class_{key}"] for e in examples
                                                                   if f"class_{key}" in e])
    batch["pixel_values"] = batch["pixel_values"].float()
    return batch


class EpochBatchSampler:
    """Batches of this process's share of a permutation that depends only on (seed, epoch).

    Each epoch: π = randperm(N) seeded by (seed, epoch), padded by wrap-around to a multiple of the
    number of processes; process p takes π[p::P] and cuts it into batches of `batch_size` (last one
    may be short). `resume_at(epoch, batches_done)` makes that epoch start after its first `batches_done`
    batches, which is how a resumed run skips exactly what it has already trained on.
    """

    def __init__(self, num_items, batch_size, seed, process_index=0, num_processes=1):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.process_index, self.num_processes = process_index, num_processes
        self.epoch, self.skip_batches, self.resume = 0, 0, (None, 0)

    def resume_at(self, epoch, batches_done):
        self.resume = (epoch, batches_done)

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.skip_batches = self.resume[1] if epoch == self.resume[0] else 0

    def epoch_batches(self):
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        order = torch.randperm(self.num_items, generator=generator).tolist()
        order += order[: (-len(order)) % self.num_processes]
        mine = order[self.process_index :: self.num_processes]
        return [mine[start : start + self.batch_size] for start in range(0, len(mine), self.batch_size)]

    def __iter__(self):
        return iter(self.epoch_batches()[self.skip_batches :])

    def __len__(self):
        return len(self.epoch_batches()) - self.skip_batches

    def batches_per_epoch(self):
        return math.ceil(math.ceil(self.num_items / self.num_processes) / self.batch_size)


def make_dataloader(dataset, batch_size, seed, accelerator, num_workers=0):
    """accelerate's `DataLoaderShard` over `dataset` with an `EpochBatchSampler` (this process's share of each
    epoch's order) and collated prior-preservation rows. It marks the last batch of an epoch, so
    `accelerator.accumulate` updates there, and moves batches to the accelerator's device. Its own generator
    keeps the global RNG untouched. Returns (dataloader, batch sampler)."""
    from accelerate.data_loader import DataLoaderShard

    sampler = EpochBatchSampler(len(dataset), batch_size, seed or 0, accelerator.process_index,
                                accelerator.num_processes)
    loader = DataLoaderShard(dataset, device=accelerator.device, batch_sampler=sampler, collate_fn=collate_examples,
                             num_workers=num_workers, generator=torch.Generator().manual_seed(0))
    return loader, sampler


def load_class_images(pretrained_model_name_or_path, class_prompt, num_class_images, class_data_dir, resolution,
                      accelerator, *, revision=None, variant=None, sample_batch_size=4, num_inference_steps=50,
                      prior_generation_precision=None, seed=None):
    """Class images for prior preservation (`class_images.ensure_class_images`: generated once, cached).

    Generated in `prior_generation_precision`; by default ('no') fp16 on a GPU and fp32 elsewhere (upstream's rule).
    """
    precision = prior_generation_precision
    if precision in (None, "no"):
        precision = "fp16" if accelerator.device.type == "cuda" else "fp32"
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return ensure_class_images(pretrained_model_name_or_path, class_prompt, num_class_images, class_data_dir,
                               revision=revision, variant=variant, resolution=resolution,
                               sample_batch_size=sample_batch_size, num_inference_steps=num_inference_steps,
                               seed=seed or 0, accelerator=accelerator, dtype=dtype)

