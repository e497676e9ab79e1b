"""The training set of the three fine-tuning scripts: clean (+ perturbed, mixed) images with their own captions.

- `load_training_images`: `--dataset_name` or upstream's `--instance_data_dir`, mixed with
  `--perturbed_dataset_name` by `mixing.mix_datasets`;
- `TrainingImages` + `EpochBatchSampler`: a data order that is a function of (seed, epoch) only, and crops
  and flips seeded per (seed, epoch, image), so a resumed run skips exactly the batches it has seen;
- `load_class_images`: DreamBooth's prior-preservation images, generated once and cached.
"""

import math
from pathlib import Path

import numpy as np
import torch

from .data import InputError, load_image_dataset, pil_to_tensor, read_provenance, resize_and_crop, save_dataset


def load_instance_folder(instance_data_dir, instance_prompt, instance_domain=""):
    """Upstream's `--instance_data_dir`: every image file of the folder, captioned with `instance_prompt`.

    The images stay files (the dataset holds their paths and decodes on access), so a large folder
    costs no memory; `domain` is `instance_domain` for every row.
    """
    import datasets
    from PIL import Image

    files = sorted(p for p in Path(instance_data_dir).iterdir() if p.is_file() and not p.name.startswith("."))
    image_files = []
    for path in files:
        try:
            with Image.open(path) as image:
                image.verify()
        except OSError:
            continue  # upstream skips non-images the same way (metadata files, .DS_Store)
        image_files.append(path)
    if not image_files:
        raise InputError(f"--instance_data_dir {instance_data_dir} holds no images")
    return datasets.Dataset.from_dict(
        {"id": [p.stem for p in image_files], "image": [str(p) for p in image_files],
         "prompt": [instance_prompt] * len(image_files), "domain": [instance_domain] * len(image_files)},
        features=datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                    "prompt": datasets.Value("string"), "domain": datasets.Value("string")}))


def load_training_images(args, is_main_process=True):
    """The mixed training set and a record of how it was mixed (for the model card).

    Returns (dataset, mix_info). The dataset has `image` and the caption column (`prompt` for
    `--instance_data_dir`); with `--perturbed_dataset_name` its images are `mix_datasets(clean, perturbed,
    ...)`. mix_info holds mode, ratio, seed, pattern and the perturbed set's PGD flags from its provenance.
    """
    if args.instance_data_dir is not None:
        clean = load_instance_folder(args.instance_data_dir, args.instance_prompt, args.instance_domain or "")
        args.caption_column = "prompt"
    else:
        clean = load_image_dataset(args.dataset_name, required_columns=(args.image_column, args.caption_column))
        if args.image_column != "image":
            clean = clean.rename_column(args.image_column, "image")
    mix_info = {"mode": args.mixup_mode, "ratio": args.mixup_ratio, "seed": args.mixup_seed,
                "pattern": args.mixup_pattern, "perturbed_dataset": args.perturbed_dataset_name, "pgd": {}}
    if args.perturbed_dataset_name is None:
        return clean, mix_info
    from .mixing import mix_datasets

    perturbed = load_image_dataset(args.perturbed_dataset_name, required_columns=("image",))
    flags = read_provenance(perturbed).get("flags", {})
    mix_info["pgd"] = {key: value for key, value in flags.items() if key.startswith("pgd_")}
    mixed = mix_datasets(clean, perturbed, args.mixup_mode, args.mixup_ratio, args.mixup_seed,
                         pattern=args.mixup_pattern, resolution=args.resolution)
    if args.save_mixed_dataset and is_main_process:
        save_dataset(mixed, args.save_mixed_dataset)
    return mixed, mix_info


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

    `caption_fn(row) -> str` picks/rewrites the caption (textual inversion puts placeholders in).
    With `class_images` (prior preservation) item i also carries class image i mod len(class_images).
    """

    def __init__(self, rows, tokenizer, resolution, caption_fn, center_crop=False, random_flip=False, seed=0,
                 class_images=None):
        self.rows, self.tokenizer, self.resolution, self.caption_fn = rows, tokenizer, resolution, caption_fn
        self.center_crop, self.random_flip, self.seed, self.class_images = center_crop, random_flip, seed, class_images
        self.epoch = 0
        self._token_ids = {}  # caption → ids; captions repeat (few templates × domains), so this stays small

    def _tokenize(self, caption):
        from .models import tokenize_prompts

        if caption not in self._token_ids:
            if len(self._token_ids) >= 4096:
                self._token_ids.clear()
            self._token_ids[caption] = tokenize_prompts(self.tokenizer, [caption])[0]
        return self._token_ids[caption]

    def __len__(self):
        return len(self.rows)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _encode(self, image, caption, key):
        from .data import derive_seed

        rng = np.random.default_rng(derive_seed(self.seed, self.epoch, key))
        return (training_pixel_values(image, self.resolution, self.center_crop, self.random_flip, rng),
                self._tokenize(caption))

    def __getitem__(self, index):
        row = self.rows[int(index)]
        pixel_values, input_ids = self._encode(row["image"], self.caption_fn(row), index)
        example = {"pixel_values": pixel_values, "input_ids": input_ids}
        if self.class_images is not None:
            class_row = self.class_images[int(index) % len(self.class_images)]
            example["class_pixel_values"], example["class_input_ids"] = self._encode(
                class_row["image"], class_row["prompt"], 10**9 + index)
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
        from .data import derive_seed

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


def load_class_images(args, accelerator):
    """Class images for prior preservation (generated once, cached), or None without the flag."""
    if not args.with_prior_preservation:
        return None
    from .dreambooth import ensure_class_images

    if args.class_data_dir is None or not args.class_prompt:
        raise InputError("--with_prior_preservation needs --class_data_dir and --class_prompt")
    return ensure_class_images(args.pretrained_model_name_or_path, args.class_prompt, args.num_class_images,
                               args.class_data_dir, revision=args.revision, variant=args.variant,
                               resolution=args.resolution, sample_batch_size=args.sample_batch_size,
                               seed=args.seed or 0, accelerator=accelerator)
