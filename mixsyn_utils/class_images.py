"""Prior-preservation class images: samples of the class prompt from the base model, generated once and cached.

The cache is upstream's: a folder of image files (`--class_data_dir`). Images already there count (upstream lets
you put your own), the missing ones up to `--num_class_images` are generated into it as `{index:05d}-{sha1}.png`,
and `class_images.json` records the prompt and model they were made with. A class-image dataset saved with
`save_to_disk` by earlier versions is read as it is. Used by the DreamBooth fine-tuning scripts and the
Anti-DreamBooth surrogate.
"""

import hashlib
import json
import os
from pathlib import Path

import torch

from .cli import InputError
from .dataset_io import check_images_decode, image_files, load_image_dataset, read_provenance
from .outputs import output_write_errors
from .resumable import ResumableWork, input_fingerprint
from .seeds import derive_seed
from .variants import load_pipeline

RECORD_FILE = "class_images.json"


def class_data_dir_of(class_data_dir, output_dir):
    """The class-image cache folder: --class_data_dir, or `<output_dir>.class_images` beside the output."""
    return class_data_dir or f"{str(output_dir).rstrip('/')}.class_images"


def _class_cache_key(pretrained_model_name_or_path, class_prompt, revision, variant, resolution):
    """What the class images depend on; the model's content fingerprint too, so another model saved at the
    same path does not reuse them."""
    return {"class_prompt": class_prompt, "model": str(pretrained_model_name_or_path), "revision": revision,
            "variant": variant, "resolution": resolution,
            "model_fingerprint": input_fingerprint(pretrained_model_name_or_path, revision)}


def _existing_class_images(class_data_dir, class_prompt, cache_key):
    """The class images already in `class_data_dir` (columns image, prompt), or None when there are none.

    An error when its record says they were made for another prompt or model.
    """
    import datasets

    path = Path(class_data_dir)
    if (path / "dataset_info.json").is_file():
        existing = load_image_dataset(str(path), required_columns=("image", "prompt"), flag="--class_data_dir")
        recorded = read_provenance(existing).get("class_images")
    else:
        files = image_files(path) if path.is_dir() else []
        record = path / RECORD_FILE
        recorded = json.loads(record.read_text()) if record.is_file() else None
        existing = None if not files else datasets.Dataset.from_dict(
            {"image": [str(file) for file in files], "prompt": [class_prompt] * len(files)},
            features=datasets.Features({"image": datasets.Image(), "prompt": datasets.Value("string")}))
    if recorded is not None and recorded != cache_key:
        raise InputError(f"--class_data_dir {class_data_dir} holds class images of another prompt or model; "
                         "use another folder")
    if existing is not None:
        check_images_decode(existing, "image", f"--class_data_dir {class_data_dir}")
    return existing


def ensure_class_images(pretrained_model_name_or_path, class_prompt, num_class_images, class_data_dir, *,
                        revision=None, variant=None, resolution=None, sample_batch_size=4, num_inference_steps=50,
                        guidance_scale=7.5, seed=0, accelerator=None, dtype=None):
    """Class images for prior preservation: `num_class_images` images of `class_prompt`, as a dataset (image, prompt).

    Images already in `class_data_dir` are used first (sorted by file name); the missing ones are sampled from
    the base model in `dtype`, image i with a generator seeded by `derive_seed(seed, i)`, so the set is the same
    on 1 or many processes; batches are `ResumableWork` units (a killed run resumes) and the main process writes
    the files. Returns the first `num_class_images` images.
    """
    import datasets

    if not class_prompt:
        raise InputError("--class_prompt is required with --with_prior_preservation")
    if num_class_images <= 0:
        raise InputError(f"--num_class_images must be positive, got {num_class_images}")
    cache_key = _class_cache_key(pretrained_model_name_or_path, class_prompt, revision, variant, resolution)
    existing = _existing_class_images(class_data_dir, class_prompt, cache_key)
    num_existing = 0 if existing is None else len(existing)
    if num_existing >= num_class_images:
        return existing.select(range(num_class_images))
    if (Path(class_data_dir) / "dataset_info.json").is_file():
        raise InputError(f"--class_data_dir {class_data_dir} holds {num_existing} class images saved as a dataset, "
                         f"fewer than --num_class_images {num_class_images}; use another folder")

    device = accelerator.device if accelerator is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    indices = list(range(num_existing, num_class_images))
    batches = [indices[start:start + sample_batch_size] for start in range(0, len(indices), sample_batch_size)]
    signature = dict(cache_key, num_class_images=num_class_images, num_existing=num_existing, seed=seed,
                     num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                     sample_batch_size=sample_batch_size, dtype=str(dtype))
    # A cache, not a result: an interrupted extension made with other settings is simply redone.
    work = ResumableWork(class_data_dir, signature, accelerator, discard_other_settings=True, flag="--class_data_dir")
    features = datasets.Features({"image": datasets.Image(), "prompt": datasets.Value("string")})
    loaded = {}

    def generate_batch(unit):
        if "pipeline" not in loaded:  # loaded only when a batch is left to make
            loaded["pipeline"] = load_pipeline(pretrained_model_name_or_path, revision, variant, dtype).to(device)
            loaded["pipeline"].set_progress_bar_config(disable=True)
        batch = batches[unit]
        generators = [torch.Generator(device="cpu").manual_seed(derive_seed(seed, i)) for i in batch]
        images = loaded["pipeline"]([class_prompt] * len(batch), height=resolution, width=resolution,
                                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                    generator=generators).images
        return datasets.Dataset.from_dict({"image": images, "prompt": [class_prompt] * len(batch)}, features=features)

    generated = work.run(len(batches), generate_batch, desc="Class images")
    loaded.clear()
    if generated is not None:  # main process
        folder = Path(class_data_dir)
        with output_write_errors(folder, "--class_data_dir"):
            folder.mkdir(parents=True, exist_ok=True)
            for index, image in zip(indices, generated["image"]):
                name = f"{index:05d}-{hashlib.sha1(image.tobytes()).hexdigest()[:16]}.png"
                try:
                    image.save(folder / f".{name}.tmp", format="PNG")  # whole or absent: no torn image is left
                    os.replace(folder / f".{name}.tmp", folder / name)
                finally:
                    (folder / f".{name}.tmp").unlink(missing_ok=True)
            (folder / RECORD_FILE).write_text(json.dumps(cache_key, indent=2, sort_keys=True))
        work.cleanup()
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return _existing_class_images(class_data_dir, class_prompt, cache_key).select(range(num_class_images))
