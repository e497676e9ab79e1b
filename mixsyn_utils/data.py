"""Datasets in and out, image preprocessing, atomic outputs and resumable per-unit work.

Every script exchanges Hugging Face `datasets`: a `save_to_disk` folder, an imagefolder directory
(images + `metadata.jsonl`/`metadata.csv`), or a Hub dataset id. Outputs are written to a temporary
sibling folder and renamed into place, so a reader never sees a half-written dataset.
"""

import json
import os
import re
import shutil
import sys
import uuid
from pathlib import Path

import numpy as np
import torch
from PIL import Image


class InputError(ValueError):
    """Bad user input: a flag, file or dataset. Scripts print it as one line and exit 2."""


def run_cli(main, parse_args):
    """Entry point shared by every script: `main(parse_args())`, with `InputError` as a one-line error, exit 2."""
    try:
        main(parse_args())
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------------------------
# Loading and saving datasets
# ----------------------------------------------------------------------------------------------

def load_image_dataset(name_or_path, split="train", required_columns=("image",), cache_dir=None):
    """Load a dataset from a `save_to_disk` folder, an imagefolder directory or a Hub id.

    Returns a `datasets.Dataset` (one split). Raises `InputError` naming the path when it is missing,
    empty, or lacks one of `required_columns`.
    """
    import datasets

    if name_or_path is None or str(name_or_path).strip() == "":
        raise InputError("no dataset given (empty name or path)")
    path = Path(name_or_path)
    try:
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_dir():
            if not any(p.is_file() for p in path.rglob("*")):
                raise InputError(f"dataset folder {name_or_path} is empty")
            loaded = datasets.load_dataset("imagefolder", data_dir=str(path), cache_dir=cache_dir)
        elif path.exists():
            raise InputError(f"dataset path {name_or_path} is a file, expected a folder or a Hub id")
        elif not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(name_or_path)) or str(name_or_path).startswith("."):
            raise InputError(f"dataset folder {name_or_path} does not exist")
        else:
            loaded = datasets.load_dataset(str(name_or_path), cache_dir=cache_dir)
    except InputError:
        raise
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"cannot load dataset {name_or_path}: {first_line}") from error
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise InputError(f"dataset {name_or_path} has no split {split!r} (has {sorted(loaded)})")
        loaded = loaded[split]
    if len(loaded) == 0:
        raise InputError(f"dataset {name_or_path} is empty")
    missing = [column for column in required_columns if column not in loaded.column_names]
    if missing:
        raise InputError(
            f"dataset {name_or_path} has no column {missing[0]!r} (columns: {', '.join(loaded.column_names)})"
        )
    return loaded


def check_output_dir(output_dir, overwrite=False, flag="--output_dir"):
    """Refuse an output folder that exists and is not empty, unless `overwrite`. Call before heavy work."""
    if output_dir is None:
        raise InputError(f"{flag} is required")
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {output_dir} exists and is a file")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise InputError(f"{flag} {output_dir} exists and is not empty (pass --overwrite to replace it)")


def atomic_replace_dir(tmp_dir, final_dir):
    """Move a finished folder into place; a previous `final_dir` is removed only after the new one is whole."""
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    old_dir = None
    if final_dir.exists():
        old_dir = final_dir.with_name(f".{final_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final_dir, old_dir)
    os.replace(tmp_dir, final_dir)
    if old_dir is not None:
        shutil.rmtree(old_dir, ignore_errors=True)


def temp_sibling(final_dir, tag="tmp"):
    """A fresh hidden folder beside `final_dir` (same filesystem, so the final rename is atomic)."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = final_dir.with_name(f".{final_dir.name}.{tag}-{uuid.uuid4().hex[:8]}")
    tmp_dir.mkdir()
    return tmp_dir


def save_dataset(dataset, output_dir, push_to_hub=False, hub_dataset_id=None, private=True, hub_token=None):
    """Save `dataset` to `output_dir` atomically, then optionally push it to the Hub.

    The local copy is complete before any network call. A failed push (offline, no rights) leaves
    the local copy in place and is reported as a warning; it returns False instead of raising.
    """
    tmp_dir = temp_sibling(output_dir)
    try:
        dataset.save_to_disk(str(tmp_dir))
        atomic_replace_dir(tmp_dir, output_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    if not push_to_hub:
        return True
    repo_id = hub_dataset_id or Path(output_dir).name
    try:
        dataset.push_to_hub(repo_id, private=private, token=hub_token)
    except Exception as error:  # noqa: BLE001 - any network/auth failure must keep the local copy
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"warning: push of {repo_id} to the Hub failed ({message}); the local copy at {output_dir} is complete")
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Image preprocessing: one rule for every script
# ----------------------------------------------------------------------------------------------

def check_resolution(resolution, flag="--resolution", multiple=8):
    if resolution is None:
        return
    if resolution <= 0 or resolution % multiple != 0:
        raise InputError(f"{flag} must be a positive multiple of {multiple}, got {resolution}")


def resize_and_crop(image, resolution, center_crop=True, rng=None):
    """RGB, shorter side resized to `resolution` (bicubic), then a square crop.

    The crop is centred, or with `center_crop=False` at an offset drawn from `rng` (a numpy Generator: left,
    then top), or at the top-left corner without `rng`. Grayscale, palette and RGBA images are converted to
    RGB (alpha dropped), never rejected.
    """
    image = image.convert("RGB")
    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if new_size != (width, height):
        image = image.resize(new_size, resample=Image.BICUBIC)
    if center_crop:
        left, top = (new_size[0] - resolution) // 2, (new_size[1] - resolution) // 2
    elif rng is not None:
        left = int(rng.integers(0, new_size[0] - resolution + 1))
        top = int(rng.integers(0, new_size[1] - resolution + 1))
    else:
        left = top = 0
    return image.crop((left, top, left + resolution, top + resolution))


def pil_to_tensor(image):
    """RGB PIL image -> float32 tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def image_to_tensor(image, resolution, center_crop=True):
    """PIL image -> float32 tensor (3, H, W) in [-1, 1] after `resize_and_crop`."""
    return pil_to_tensor(resize_and_crop(image, resolution, center_crop))


def tensor_to_image(pixel_values):
    """Tensor (3, H, W) in [-1, 1] -> uint8 RGB PIL image (rounded to nearest)."""
    array = ((pixel_values.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())


# ----------------------------------------------------------------------------------------------
# Resumable, shardable work: each finished unit (a batch, a group) is saved at once
# ----------------------------------------------------------------------------------------------

def shard_units(units, process_index, num_processes):
    """The units this process owns: round-robin, so the unit itself (not its process) fixes its result."""
    return list(units)[process_index::num_processes]


class PartialResults:
    """Per-unit results kept in `<output_dir>.partial/` until the whole output is assembled.

    A killed run finds the finished units there and skips them. Each unit is a small saved dataset
    written atomically, so a unit is either complete or absent. The folder is shared by all processes
    (one machine, or a shared filesystem).
    """

    def __init__(self, output_dir):
        self.work_dir = Path(f"{Path(output_dir)}.partial")

    def _unit_dir(self, key):
        return self.work_dir / f"unit-{key}"

    def is_done(self, key):
        return self._unit_dir(key).is_dir()

    def save(self, key, dataset):
        import datasets

        datasets.disable_progress_bars()  # one bar per unit would drown the script's own progress bar
        self.work_dir.mkdir(parents=True, exist_ok=True)
        final_dir = self._unit_dir(key)
        tmp_dir = temp_sibling(final_dir)
        dataset.save_to_disk(str(tmp_dir))
        atomic_replace_dir(tmp_dir, final_dir)

    def load(self, keys):
        import datasets

        missing = [key for key in keys if not self.is_done(key)]
        if missing:
            raise RuntimeError(f"partial results missing for units {missing[:5]} in {self.work_dir}")
        return datasets.concatenate_datasets([datasets.load_from_disk(str(self._unit_dir(key))) for key in keys])

    def write_meta(self, meta):
        """Record the flags of the run; a resume with other flags must not mix results."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        meta_path = self.work_dir / "run_meta.json"
        if meta_path.exists():
            previous = json.loads(meta_path.read_text())
            if previous != meta:
                changed = sorted(k for k in set(previous) | set(meta) if previous.get(k) != meta.get(k))
                raise InputError(
                    f"{self.work_dir} holds a killed run with other settings ({', '.join(changed)}); "
                    "delete it or rerun with the same flags"
                )
        else:
            tmp_path = meta_path.with_suffix(".tmp")
            tmp_path.write_text(json.dumps(meta, indent=2, sort_keys=True))
            os.replace(tmp_path, meta_path)

    def cleanup(self):
        shutil.rmtree(self.work_dir, ignore_errors=True)


def derive_seed(base_seed, *keys):
    """A 63-bit seed from `base_seed` and integer keys (e.g. an image index), independent of process count."""
    state = np.random.SeedSequence([int(base_seed)] + [int(key) for key in keys]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def dataset_provenance(script, args, extra=None):
    """JSON-serialisable record of how a dataset was made (stored in `DatasetInfo.description`)."""
    import accelerate
    import datasets
    import diffusers
    import transformers

    flags = {}
    for key, value in sorted(vars(args).items()):
        if "token" in key:  # never write a token
            continue
        flags[key] = value if isinstance(value, (int, float, str, bool, list, type(None))) else str(value)
    record = {
        "script": script,
        "flags": flags,
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
            "datasets": datasets.__version__,
        },
    }
    if extra:
        record.update(extra)
    return json.dumps(record, sort_keys=True)


def with_provenance(dataset, description):
    """Attach `description` (a JSON string) to the dataset info so `save_to_disk` keeps it."""
    dataset.info.description = description
    return dataset


def read_provenance(dataset):
    """The provenance dict stored by `with_provenance`, or {} when there is none."""
    try:
        return json.loads(dataset.info.description or "{}")
    except (TypeError, json.JSONDecodeError):
        return {}


# ----------------------------------------------------------------------------------------------
# Private domains and their prompt templates
# ----------------------------------------------------------------------------------------------

# MixSyn (Section 4.1): "The face of <name>" with p = 0.7, "A photo of <name>" with p = 0.3, drawn per image.
PAPER_PROMPT_TEMPLATES = (("The face of {}", 0.7), ("A photo of {}", 0.3))


def load_domains(domains_file=None, domain_names=None):
    """Domain names and (template, probability) pairs from `--domains_file` and/or repeated `--domain`.

    Accepted files: `.json` ({"domains": [...], "templates": [{"template", "p"}]} or a plain list of
    names) and `.txt` (one name per line). Templates default to the paper's; probabilities must sum to 1.
    """
    names, templates = list(domain_names or []), list(PAPER_PROMPT_TEMPLATES)
    if domains_file is not None:
        path = Path(domains_file)
        if not path.is_file():
            raise InputError(f"--domains_file {domains_file} does not exist")
        if path.suffix == ".json":
            try:
                content = json.loads(path.read_text())
            except json.JSONDecodeError as error:
                raise InputError(f"--domains_file {domains_file} is not valid JSON ({error.msg})") from error
            if isinstance(content, dict):
                listed = content.get("domains", [])
                if "templates" in content:
                    templates = [(entry["template"], float(entry["p"])) for entry in content["templates"]]
            else:
                listed = content
            names += [entry["name"] if isinstance(entry, dict) else str(entry) for entry in listed]
        elif path.suffix == ".txt":
            names += [line.strip() for line in path.read_text().splitlines() if line.strip()]
        else:
            raise InputError(f"--domains_file {domains_file}: unknown format {path.suffix!r} (use .json or .txt)")
    if not names:
        raise InputError("no domains given: pass --domains_file or --domain NAME")
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise InputError(f"domain {duplicate!r} is listed twice")
    if any("{}" not in template for template, _ in templates):
        raise InputError("every prompt template must contain '{}' where the domain name goes")
    if abs(sum(p for _, p in templates) - 1.0) > 1e-6 or any(p < 0 for _, p in templates):
        raise InputError(f"prompt template probabilities must be >= 0 and sum to 1, got {[p for _, p in templates]}")
    return names, templates


def draw_prompt(domain_name, templates, seed, index):
    """The prompt of image `index`: a template drawn with its probability from a seed fixed by (seed, index)."""
    rng = np.random.default_rng(derive_seed(seed, index, 7))
    choice = rng.choice(len(templates), p=[p for _, p in templates])
    return templates[choice][0].format(domain_name)
