"""Prior-preservation class images: samples of the class prompt from the base model, generated once and cached.

Used by the DreamBooth fine-tuning scripts (`--with_prior_preservation`) and the Anti-DreamBooth surrogate.
"""

import json
from pathlib import Path

import torch

from .cli import InputError
from .dataset_io import check_images_decode, load_image_dataset, read_provenance, save_dataset, with_provenance
from .resumable import ResumableWork, input_fingerprint
from .seeds import derive_seed


def _class_cache_key(pretrained_model_name_or_path, class_prompt, revision, variant, resolution):
    """What the class images depend on; the model's content fingerprint too, so another model saved at the
    same path does not reuse them."""
    return {"class_prompt": class_prompt, "model": str(pretrained_model_name_or_path), "revision": revision,
            "variant": variant, "resolution": resolution,
            "model_fingerprint": input_fingerprint(pretrained_model_name_or_path, revision)}


def _load_cached_class_images(class_data_dir, cache_key):
    """The cached class images when `class_data_dir` holds a dataset made for the same prompt and model."""
    path = Path(class_data_dir)
    if not (path / "dataset_info.json").is_file():
        if path.exists() and path.is_dir() and any(path.iterdir()):
            raise InputError(f"--class_data_dir {class_data_dir} exists but is not a saved class-image dataset")
        return None
    cached = load_image_dataset(str(path), required_columns=("image", "prompt"))
    if read_provenance(cached).get("class_images") != cache_key:
        raise InputError(f"--class_data_dir {class_data_dir} holds class images of another prompt or model; "
                         "use another folder")
    check_images_decode(cached, "image", f"--class_data_dir {class_data_dir}")
    return cached


def ensure_class_images(pretrained_model_name_or_path, class_prompt, num_class_images, class_data_dir, *,
                        revision=None, variant=None, resolution=None, sample_batch_size=4, num_inference_steps=50,
                        guidance_scale=7.5, seed=0, accelerator=None, torch_dtype=None):
    """Class images for prior preservation: `num_class_images` samples of `class_prompt` from the base model.

    Cached in `class_data_dir` (a saved dataset with columns `image`, `prompt`; its info records the
    prompt, model and resolution). A cache with at least `num_class_images` rows is reused; a smaller
    one is extended. Image i is drawn with a generator seeded by `derive_seed(seed, i)`, so the set is the
    same on 1 or many processes; batches are `ResumableWork` units (a killed run resumes), and the main
    process writes the dataset atomically. Returns the first `num_class_images` rows.
    """
    import datasets
    from diffusers import StableDiffusionPipeline

    if not class_prompt:
        raise InputError("--class_prompt is required with --with_prior_preservation")
    if num_class_images <= 0:
        raise InputError(f"--num_class_images must be positive, got {num_class_images}")
    cache_key = _class_cache_key(pretrained_model_name_or_path, class_prompt, revision, variant, resolution)
    cached = _load_cached_class_images(class_data_dir, cache_key)
    num_cached = 0 if cached is None else len(cached)
    if num_cached >= num_class_images:
        return cached.select(range(num_class_images))

    device = accelerator.device if accelerator is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    indices = list(range(num_cached, num_class_images))
    batches = [indices[start:start + sample_batch_size] for start in range(0, len(indices), sample_batch_size)]
    signature = dict(cache_key, num_class_images=num_class_images, num_cached=num_cached, seed=seed,
                     num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                     sample_batch_size=sample_batch_size)
    # A cache, not a result: an interrupted extension made with other settings is simply redone.
    work = ResumableWork(class_data_dir, signature, accelerator, discard_other_settings=True)
    features = datasets.Features({"image": datasets.Image(), "prompt": datasets.Value("string")})
    loaded = {}

    def generate_batch(unit):
        if "pipeline" not in loaded:  # loaded only when a batch is left to make
            loaded["pipeline"] = StableDiffusionPipeline.from_pretrained(
                pretrained_model_name_or_path, revision=revision, variant=variant, torch_dtype=torch_dtype,
                safety_checker=None, requires_safety_checker=False, use_safetensors=True,
            ).to(device)
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
        parts = ([cached.select_columns(["image", "prompt"])] if cached is not None else []) + [generated]
        class_images = datasets.concatenate_datasets(parts)
        with_provenance(class_images, json.dumps({"class_images": cache_key}, sort_keys=True))
        save_dataset(class_images, class_data_dir)
        work.cleanup()
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return load_image_dataset(str(class_data_dir), required_columns=("image", "prompt")).select(
        range(num_class_images))
