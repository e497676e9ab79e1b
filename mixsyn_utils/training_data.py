"""The training set of the three fine-tuning scripts: clean (+ perturbed, mixed) images with their own captions.

- `load_training_images`: `--dataset_name` or upstream's `--instance_data_dir`, mixed with
  `--perturbed_dataset_name` by `mixing.mix_datasets`;
- `TrainingImages` + `EpochBatchSampler`: a data order that is a function of (seed, epoch) only, and crops
  and flips seeded per (seed, epoch, image), so a resumed run skips exactly the batches it has seen;
- `load_class_images`: DreamBooth's prior-preservation images, generated once and cached.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .class_images import ensure_class_images
from .cli import InputError
from .dataset_io import check_images_decode, check_text_column, load_image_dataset, read_provenance, save_dataset
from .flags import class_data_dir_of
from .images import pil_to_tensor, resize_and_crop
from .mixing import mix_datasets
from .models import tokenize_prompts, warn_truncated_captions
from .resumable import input_fingerprint
from .seeds import CLASS_IMAGE_KEY_OFFSET, derive_seed


def load_instance_folder(instance_data_dir, instance_prompt, instance_domain=""):
    """Upstream's `--instance_data_dir`: every image file of the folder, captioned with `instance_prompt`.

    Image files are those with an extension Pillow reads (.png, .jpg, ...); other files (metadata, .DS_Store)
    are skipped as upstream skips them, but an image file that does not decode is an error, not a skip
    (`dataset_io.check_images_decode`). The images stay files (the dataset holds their paths and decodes on
    access), so a large folder costs no memory; `domain` is `instance_domain` for every row.
    """
    import datasets
    from PIL import Image

    image_extensions = set(Image.registered_extensions())
    image_files = sorted(p for p in Path(instance_data_dir).iterdir()
                         if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in image_extensions)
    if not image_files:
        raise InputError(f"--instance_data_dir {instance_data_dir} holds no images")
    return datasets.Dataset.from_dict(
        {"id": [p.stem for p in image_files], "image": [str(p) for p in image_files],
         "prompt": [instance_prompt] * len(image_files), "domain": [instance_domain] * len(image_files)},
        features=datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                    "prompt": datasets.Value("string"), "domain": datasets.Value("string")}))


@dataclass
class TrainingSet:
    """The (mixed) training images: `rows` with an `image` column, the name of their caption column, the mix,
    and the content fingerprints of the datasets or folder they came from (for the run signature)."""

    rows: object
    caption_column: str
    mix_info: dict
    fingerprints: dict


def load_training_images(args, is_main_process=True):
    """The training set of `--dataset_name` or `--instance_data_dir`, mixed with `--perturbed_dataset_name`.

    Returns a `TrainingSet`: rows with `image` and their captions (`prompt` for `--instance_data_dir`); with a
    perturbed set the images are `mix_datasets(clean, perturbed, ...)`. mix_info holds mode, ratio, seed,
    pattern and the perturbed set's PGD flags from its provenance (for the model card). Every image is
    decoded once and every caption checked here, before any model loads: a bad file fails in seconds, not
    at the step that reads it.
    """
    caption_column = args.caption_column
    if args.instance_data_dir is not None:
        clean = load_instance_folder(args.instance_data_dir, args.instance_prompt, args.instance_domain or "")
        caption_column, source_flag, source = "prompt", "instance_data_dir", args.instance_data_dir
    else:
        clean = load_image_dataset(args.dataset_name, required_columns=(args.image_column, args.caption_column))
        if args.image_column != "image":
            clean = clean.rename_column(args.image_column, "image")
        source_flag, source = "dataset_name", args.dataset_name
    check_text_column(clean, caption_column, f"--{source_flag} {source}")
    check_images_decode(clean, "image", f"--{source_flag} {source}")
    fingerprints = {source_flag: input_fingerprint(source, repo_type="dataset")}
    mix_info = {"mode": args.mixup_mode, "ratio": args.mixup_ratio, "seed": args.mixup_seed,
                "pattern": args.mixup_pattern, "perturbed_dataset": args.perturbed_dataset_name, "pgd": {}}
    if args.perturbed_dataset_name is None:
        return TrainingSet(clean, caption_column, mix_info, fingerprints)
    perturbed = load_image_dataset(args.perturbed_dataset_name, required_columns=("image",))
    check_images_decode(perturbed, "image", f"--perturbed_dataset_name {args.perturbed_dataset_name}")
    fingerprints["perturbed_dataset_name"] = input_fingerprint(args.perturbed_dataset_name, repo_type="dataset")
    flags = read_provenance(perturbed).get("flags", {})
    mix_info["pgd"] = {key: value for key, value in flags.items() if key.startswith("pgd_")}
    mixed = mix_datasets(clean, perturbed, args.mixup_mode, args.mixup_ratio, args.mixup_seed,
                         pattern=args.mixup_pattern, resolution=args.resolution)
    if args.save_mixed_dataset and is_main_process:
        save_dataset(mixed, args.save_mixed_dataset)
    return TrainingSet(mixed, caption_column, mix_info, fingerprints)


def training_pixel_values(image, resolution, center_crop, random_flip, rng):
    """PIL image → (3, R, R) float32 in [-1, 1]: shorter side resized to R (bicubic), crop, optional flip.

    The random crop offset and the flip are drawn from `rng`, which the caller seeds per (seed, epoch,
    image), so a resumed run sees the same crops as an uninterrupted one.
    """
    from PIL import Image

    image = resize_and_crop(image, resolution, center_crop, rng=rng)
    if random_flip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return pil_to_tensor(image)


class TrainingImages(torch.utils.data.Dataset):
    """Rows of the mixed set as `pixel_values` + `input_ids` of their own (optionally rewritten) caption.

    `captions[i]` is row i's caption (textual inversion's with the placeholders in). They are
    tokenized once, here, with one warning counting those cut at the tokenizer's limit.
    With `class_images` (prior preservation) item i also carries class image i mod len(class_images).
    """

    def __init__(self, rows, tokenizer, resolution, captions, center_crop=False, random_flip=False, seed=0,
                 class_images=None):
        self.rows, self.tokenizer, self.resolution, self.captions = rows, tokenizer, resolution, captions
        self.center_crop, self.random_flip, self.seed, self.class_images = center_crop, random_flip, seed, class_images
        self.epoch = 0
        warn_truncated_captions(tokenizer, captions, "training captions")
        prompts = sorted(set(captions) | (set(class_images["prompt"]) if class_images is not None else set()))
        # Captions repeat (few templates × domains): one row of ids per distinct caption.
        self.token_ids = dict(zip(prompts, tokenize_prompts(tokenizer, prompts)))

    def __len__(self):
        return len(self.rows)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _encode(self, image, caption, key):
        rng = np.random.default_rng(derive_seed(self.seed, self.epoch, key))
        return (training_pixel_values(image, self.resolution, self.center_crop, self.random_flip, rng),
                self.token_ids[caption])

    def __getitem__(self, index):
        row = self.rows[int(index)]
        pixel_values, input_ids = self._encode(row["image"], self.captions[int(index)], index)
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
    """Class images for prior preservation (generated once, cached), or None without the flag."""
    if not args.with_prior_preservation:
        return None
    return ensure_class_images(args.pretrained_model_name_or_path, args.class_prompt, args.num_class_images,
                               class_data_dir_of(args), revision=args.revision, variant=args.variant,
                               resolution=resolution, sample_batch_size=args.sample_batch_size,
                               num_inference_steps=args.class_num_inference_steps, seed=args.seed or 0,
                               accelerator=accelerator)
