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
    save_dataset,
)
from .flags import class_data_dir_of
from .images import pil_to_tensor, resize_and_crop
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
    the images have no captions), the mix, and the content fingerprints of the datasets or folder they came from
    (for the run signature)."""

    rows: object
    caption_column: str
    mix_info: dict
    fingerprints: dict
    fingerprints: dict


def caption_column_of(args, column_names):
    """--caption_column, else `text` (upstream's default) when the dataset has it, else `prompt` (generate_synthetic's)."""
    if args.caption_column is not None:
        return args.caption_column
    return "text" if "text" in column_names else "prompt"


def load_clean_images(args, captions_required=True):
    """(rows, caption column, input fingerprints) of --dataset_name / --train_data_dir / --instance_data_dir.

    --train_data_dir alone is an imagefolder (captions from its metadata file); with --dataset_name it is the
    Hub dataset's data_dir. --max_train_samples keeps a subset seeded by --seed. Every image is decoded once and
    every caption checked here, before any model loads: a bad file fails in seconds, not at the step reading it.
    """
    if args.instance_data_dir is not None:
        clean = load_instance_folder(args.instance_data_dir, args.instance_prompt, args.instance_domain or "")
        check_images_decode(clean, "image", f"--instance_data_dir {args.instance_data_dir}")
        return clean, "prompt", {"instance_data_dir": input_fingerprint(args.instance_data_dir)}
    if args.dataset_name is not None:
        clean = load_image_dataset(args.dataset_name, required_columns=(args.image_column,), cache_dir=args.cache_dir,
                                   config_name=args.dataset_config_name, data_dir=args.train_data_dir)
    else:
        clean = load_image_dataset(args.train_data_dir, required_columns=(args.image_column,), cache_dir=args.cache_dir)
    if args.image_column != "image":
        clean = clean.rename_column(args.image_column, "image")
    caption_column = caption_column_of(args, clean.column_names)
    if caption_column not in clean.column_names:
        if captions_required or args.caption_column is not None:
            source = args.dataset_name or args.train_data_dir
            raise InputError(f"dataset {source} has no column {caption_column!r} "
                             f"(columns: {', '.join(clean.column_names)}); pass --caption_column")
        caption_column = None
    if args.max_train_samples is not None and args.max_train_samples < len(clean):
        clean = clean.shuffle(seed=args.seed or 0).select(range(args.max_train_samples))
    label = f"--dataset_name {args.dataset_name}" if args.dataset_name else f"--train_data_dir {args.train_data_dir}"
    if caption_column is not None:
        check_text_column(clean, caption_column, label)
    check_images_decode(clean, "image", label)
    fingerprints = {flag: input_fingerprint(getattr(args, flag), repo_type="dataset")
                    for flag in ("dataset_name", "train_data_dir") if getattr(args, flag) is not None}
    return clean, caption_column, fingerprints


def load_training_images(args, is_main_process=True, captions_required=True):
    """The training set: `load_clean_images`, mixed with `--perturbed_dataset_name`.

    Returns a `TrainingSet`: rows with `image` and their captions; with a perturbed set the images are
    `mix_datasets(clean, perturbed, ...)`. mix_info holds mode, ratio, seed, pattern and the perturbed set's PGD
    flags from its provenance (for the model card). --save_mixed_dataset saves the rows trained on.
    """
    clean, caption_column, fingerprints = load_clean_images(args, captions_required)
    mix_info = {"mode": args.mixup_mode, "ratio": args.mixup_ratio, "seed": args.mixup_seed,
                "pattern": args.mixup_pattern, "perturbed_dataset": args.perturbed_dataset_name, "pgd": {}}
    training_rows = clean
    if args.perturbed_dataset_name is not None:
        perturbed = load_image_dataset(args.perturbed_dataset_name, required_columns=("image",))
        check_images_decode(perturbed, "image", f"--perturbed_dataset_name {args.perturbed_dataset_name}")
        fingerprints["perturbed_dataset_name"] = input_fingerprint(args.perturbed_dataset_name, repo_type="dataset")
        flags = read_provenance(perturbed).get("flags", {})
        mix_info["pgd"] = {key: value for key, value in flags.items() if key.startswith("pgd_")}
        if len(clean) < len(perturbed) and args.max_train_samples is not None and "id" in clean.column_names:
            kept = set(clean["id"])
            perturbed = perturbed.filter(lambda image_id: image_id in kept, input_columns=["id"])
        training_rows = mix_datasets(clean, perturbed, args.mixup_mode, args.mixup_ratio, args.mixup_seed,
                                     pattern=args.mixup_pattern, resolution=args.resolution)
    if args.save_mixed_dataset and is_main_process:
        save_dataset(training_rows, args.save_mixed_dataset)
    return TrainingSet(training_rows, caption_column, mix_info, fingerprints)


def caption_of_row(row, caption_column, rng):
    """The row's caption; from a list of captions one is drawn with `rng` (upstream draws one per epoch)."""
    caption = row[caption_column]
    if isinstance(caption, (list, tuple)):
        return str(caption[int(rng.integers(len(caption)))])
    return caption


def training_pixel_values(image, resolution, center_crop, random_flip, rng, interpolation="bicubic"):
    """PIL image → (3, R, R) float32 in [-1, 1]: shorter side resized to R (`interpolation`), crop, optional flip.

    The random crop offset and the flip are drawn from `rng`, which the caller seeds per (seed, epoch,
    image), so a resumed run sees the same crops as an uninterrupted one.
    """
    from PIL import Image

    image = resize_and_crop(image, resolution, center_crop, rng=rng, interpolation=interpolation)
    if random_flip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return pil_to_tensor(image)


class TrainingImages(torch.utils.data.Dataset):
    """Rows of the mixed set as `pixel_values` + `input_ids` of their own (optionally rewritten) caption.

    `caption_fn(row, rng) -> str` picks/rewrites the caption (textual inversion puts placeholders in); `rng` is
    seeded by (seed, epoch, item), so a resumed run draws the same captions. The data flags (--resolution,
    --center_crop, --random_flip, --image_interpolation_mode, --tokenizer_max_length, --seed) come from `args`.
    With `class_images` (prior preservation) item i also carries class image i mod len(class_images).
    """

    def __init__(self, rows, tokenizer, resolution, caption_fn, args, class_images=None):
        self.rows, self.tokenizer, self.resolution, self.caption_fn = rows, tokenizer, resolution, caption_fn
        self.center_crop, self.random_flip, self.seed = args.center_crop, args.random_flip, args.seed or 0
        self.interpolation, self.max_length = args.image_interpolation_mode, args.tokenizer_max_length
        self.class_images = class_images
        self.epoch = 0
        self._token_ids = {}  # caption → ids; captions repeat (few templates × domains), so this stays small

    def _tokenize(self, caption):
        if caption not in self._token_ids:
            if len(self._token_ids) >= 4096:
                self._token_ids.clear()
            self._token_ids[caption] = tokenize_prompts(self.tokenizer, [caption], self.max_length)[0]
        return self._token_ids[caption]

    def __len__(self):
        return len(self.rows)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _encode(self, image, caption, key):
        rng = np.random.default_rng(derive_seed(self.seed, self.epoch, key))
        return (training_pixel_values(image, self.resolution, self.center_crop, self.random_flip, rng,
                                      self.interpolation),
                self._tokenize(caption))

    def __getitem__(self, index):
        row = self.rows[int(index)]
        caption = self.caption_fn(row, np.random.default_rng(derive_seed(self.seed, self.epoch, index, SALT_CAPTION)))
        pixel_values, input_ids = self._encode(row["image"], caption, index)
        example = {"pixel_values": pixel_values, "input_ids": input_ids}
        if self.class_images is not None:
            class_row = self.class_images[int(index) % len(self.class_images)]
            example["class_pixel_values"], example["class_input_ids"] = self._encode(
                class_row["image"], class_row["prompt"], CLASS_IMAGE_KEY_OFFSET + index)
        return example


def collate_examples(examples):
    """Stack a batch; with prior preservation the class rows follow the instance rows (upstream order)."""
    pixel_values = [e["pixel_values"] for e in examples] + [e["class_pixel_values"] for e in examples
                                                            if "class_pixel_values" in e]
    input_ids = [e["input_ids"] for e in examples] + [e["class_input_ids"] for e in examples if "class_input_ids" in e]
    return {"pixel_values": torch.stack(pixel_values).float(), "input_ids": torch.stack(input_ids),
            "num_instance": len(examples)}


class EpochBatchSampler:
    """Batches of this process's share of a permutation that depends only on (seed, epoch).

    Each epoch: π = randperm(N) seeded by (seed, epoch), padded by wrap-around to a multiple of the
    number of processes; process p takes π[p::P] and cuts it into batches of `batch_size` (last one
    may be short). `set_epoch(epoch, skip_batches)` drops the first batches, which is how a resumed run
    skips what it has already trained on.
    """

    def __init__(self, num_items, batch_size, seed, process_index=0, num_processes=1):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.process_index, self.num_processes = process_index, num_processes
        self.epoch, self.skip_batches = 0, 0

    def set_epoch(self, epoch, skip_batches=0):
        self.epoch, self.skip_batches = epoch, skip_batches

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


def make_dataloader(dataset, args, accelerator):
    """A DataLoader over `dataset` with an `EpochBatchSampler`; its own generator keeps the global RNG untouched."""
    sampler = EpochBatchSampler(len(dataset), args.train_batch_size, args.seed or 0, accelerator.process_index,
                                accelerator.num_processes)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_examples,
                                         num_workers=args.dataloader_num_workers,
                                         generator=torch.Generator().manual_seed(0))
    return loader, sampler


def load_class_images(args, resolution, accelerator):
    """Class images for prior preservation (generated once, cached), or None without the flag.

    Generated in --prior_generation_precision; by default ('no') fp16 on a GPU and fp32 elsewhere (upstream's rule).
    """
    if not args.with_prior_preservation:
        return None
    precision = args.prior_generation_precision
    if precision in (None, "no"):
        precision = "fp16" if accelerator.device.type == "cuda" else "fp32"
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return ensure_class_images(args.pretrained_model_name_or_path, args.class_prompt, args.num_class_images,
                               class_data_dir_of(args), revision=args.revision, variant=args.variant,
                               resolution=resolution, sample_batch_size=args.sample_batch_size,
                               num_inference_steps=args.class_num_inference_steps, seed=args.seed or 0,
                               accelerator=accelerator, dtype=dtype)
