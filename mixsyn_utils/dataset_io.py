"""Hugging Face datasets in and out, and the provenance record each saved dataset carries.

Every script exchanges `datasets`: a `save_to_disk` folder, an imagefolder directory (images +
`metadata.jsonl`/`metadata.csv`), a folder of parquet files as the Hub stores them, or a Hub dataset id. A
dataset is saved whole or not at all (hidden sibling, then rename); its info's description holds a JSON record
of the script, flags and library versions (`dataset_provenance`). `push_to_hub` does not keep that description,
so a pushed dataset also gets the record as `provenance.json` in its repository, which loading reads back.
"""

import json
import re
import shutil
from pathlib import Path

import torch

from .cli import InputError, first_line
from .images import decode_rgb
from .outputs import atomic_replace_dir, output_write_errors, temp_sibling

HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
PROVENANCE_FILE = "provenance.json"


def is_hub_id(name_or_path):
    """True for a name that can only mean a Hub repo (`owner/name` or `name`), not a local path."""
    text = str(name_or_path)
    return HUB_ID.fullmatch(text) is not None and not text.startswith(".") and not Path(text).exists()


def check_path_or_hub_id(name_or_path, flag):
    """A flag that takes a local path or a Hub id must name one: a path that exists, or `owner/name`.

    A missing local path (a separator beyond owner/name, a leading `.` or `~`, an absolute path) is a typo, not a
    Hub id: it is refused here, naming the flag, instead of reaching the Hub client's own error (or a download).
    `name_or_path` may be None (flag not given) or a list (every entry is checked).
    """
    for value in name_or_path if isinstance(name_or_path, (list, tuple)) else [name_or_path]:
        if value is not None and not Path(value).exists() and not is_hub_id(value):
            raise InputError(f"{flag} {value} does not exist: no such local folder, and not a Hub id (owner/name)")


def load_image_dataset(name_or_path, split="train", required_columns=("image",), cache_dir=None, config_name=None,
                       data_dir=None, flag="dataset"):
    """Load a dataset from a `save_to_disk` folder, an imagefolder directory, a folder of parquet files (the Hub's
    layout) or a Hub id (`config_name`, `data_dir`).

    Returns a `datasets.Dataset` (one split). Raises `InputError` naming `flag` and the path when it is missing,
    empty, or lacks one of `required_columns`, and for a local folder holding a dataset script (`*.py`): code in a
    dataset folder is never run.
    """
    import datasets

    if name_or_path is None or str(name_or_path).strip() == "":
        raise InputError(f"{flag}: no dataset given (empty name or path)")
    path = Path(name_or_path)
    scripts = sorted(p.name for p in path.glob("*.py")) if path.is_dir() else []
    if scripts:
        raise InputError(f"{flag} {name_or_path} holds a dataset script ({', '.join(scripts)}), which is never run; "
                         "remove it")
    try:
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            if (path / "state.json").is_file() and not json.loads((path / "state.json").read_text()).get("_data_files"):
                raise InputError(f"{flag} {name_or_path} is empty")  # datasets itself fails with an IndexError
            loaded = datasets.load_from_disk(str(path))
        elif path.is_dir() and any(path.rglob("*.parquet")):  # the Hub's layout, e.g. a clone of a dataset repo
            loaded = datasets.load_dataset(str(path), cache_dir=cache_dir)
        elif path.is_dir():
            if not any(p.is_file() for p in path.rglob("*")):
                raise InputError(f"{flag} {name_or_path}: the folder is empty")
            loaded = datasets.load_dataset("imagefolder", data_dir=str(path), cache_dir=cache_dir)
        elif path.exists():
            raise InputError(f"{flag} {name_or_path} is a file, expected a folder or a Hub id")
        else:
            check_path_or_hub_id(name_or_path, flag)
            loaded = datasets.load_dataset(str(name_or_path), config_name, cache_dir=cache_dir, data_dir=data_dir)
    except InputError:
        raise
    except (FileNotFoundError, ValueError, ConnectionError, OSError, RuntimeError) as error:
        raise InputError(f"cannot load {flag} {name_or_path}: {first_line(error)}") from error
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise InputError(f"{flag} {name_or_path} has no split {split!r} (has {sorted(loaded)})")
        loaded = loaded[split]
    if len(loaded) == 0:
        raise InputError(f"{flag} {name_or_path} is empty")
    if not loaded.info.description:
        with_provenance(loaded, stored_provenance_file(name_or_path, config_name) or "")
    missing = [column for column in required_columns if column not in loaded.column_names]
    if missing:
        raise InputError(
            f"{flag} {name_or_path} has no column {missing[0]!r} (columns: {', '.join(loaded.column_names)})"
        )
    return loaded


def image_files(folder):
    """The image files of a folder, sorted by name: files with an extension Pillow reads (.png, .jpg, …).

    Hidden files and other files (metadata, .DS_Store) are skipped as upstream skips them; an image file that
    does not decode is not skipped — `check_images_decode` reports it.
    """
    from PIL import Image

    extensions = set(Image.registered_extensions())
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions)


def stored_provenance_file(name_or_path, config_name=None):
    """The text of `provenance.json` beside a dataset pushed with `save_dataset`: in a local folder in the Hub's
    layout, or in a Hub dataset repo (from the cache when offline); None when there is none."""
    local = Path(name_or_path) / PROVENANCE_FILE
    if local.is_file():
        return local.read_text()
    if Path(name_or_path).exists() or config_name is not None:
        return None
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(str(name_or_path), PROVENANCE_FILE, repo_type="dataset")).read_text()
    except Exception:  # noqa: BLE001 - no such file, no network, no rights: the dataset simply has no record
        return None
def row_names(dataset, label):
    """How an error names each row: `<label> row id <id>` (the row's index when there is no `id` column)."""
    ids = dataset["id"] if "id" in dataset.column_names else range(len(dataset))
    return [f"{label} row id {row_id}" for row_id in ids]


def decoded_images(dataset, column="image", label="dataset"):
    """Every image of `column` in row order as 8-bit RGB (`images.decode_rgb`), read in batches of 256 rows.

    A missing, empty, truncated or unknown file raises `InputError("<file or row id>: cannot decode (<reason>)")`:
    a file read from disk is named by its path, an image stored in the dataset by `<label> row id <id>`.
    """
    import datasets

    records = dataset.select_columns([column])
    if isinstance(records.features[column], datasets.Image):
        records = records.cast_column(column, datasets.Image(decode=False))
    names = row_names(dataset, label)
    for start in range(0, len(records), 256):
        for offset, record in enumerate(records[start : start + 256][column]):
            on_disk = isinstance(record, dict) and record.get("bytes") is None and record.get("path")
            yield decode_rgb(record, name=record["path"] if on_disk else names[start + offset])


def check_images_decode(dataset, column="image", label="dataset"):
    """Decode every image once (`decoded_images`) before any heavy work, so a bad file fails now rather than at
    the batch that reads it hours later. Cost: one decode per image (README, Reliability)."""
    for _ in decoded_images(dataset, column, label):
        pass


def check_text_column(dataset, column, label="dataset"):
    """Every value of `column` (captions, domains) must be a non-empty string: a None caption would otherwise
    be read as the word "None". Else `InputError` naming the column and the row id."""
    for value, name in zip(dataset[column], row_names(dataset, label)):
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"{name}: column {column!r} is {'empty' if value is not None else 'None'}")


def save_dataset(dataset, output_dir, push_to_hub=False, hub_dataset_id=None, private=True, hub_token=None,
                 flag="--output_dir"):
    """Save `dataset` to `output_dir` atomically, then optionally push it to the Hub.

    The local copy is complete before any network call. A write that fails (a full disk) is one `InputError`
    naming `flag`, with nothing partial left (`outputs.output_write_errors`). A failed push (offline, no rights)
    leaves the local copy in place and is reported as a warning; it returns False instead of raising.
    """
    with output_write_errors(output_dir, flag):
        tmp_dir = temp_sibling(output_dir)
        try:
            dataset.save_to_disk(str(tmp_dir))
            atomic_replace_dir(tmp_dir, output_dir)
        finally:
            if tmp_dir.exists():
                shutil.rmtree(tmp_dir, ignore_errors=True)
    if not push_to_hub:
        return True
    from huggingface_hub import HfApi

    repo_id = hub_dataset_id or Path(output_dir).name
    try:
        api = HfApi(token=hub_token)
        repo_id = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True).repo_id
        dataset.push_to_hub(repo_id, private=private, token=hub_token)
        if dataset.info.description:
            api.upload_file(path_or_fileobj=dataset.info.description.encode(), path_in_repo=PROVENANCE_FILE,
                            repo_id=repo_id, repo_type="dataset",
                            commit_message="Provenance of the dataset (script, flags, versions)")
    except Exception as error:  # noqa: BLE001 - any network/auth failure must keep the local copy
        print(f"warning: push of {repo_id} to the Hub failed ({first_line(error)}); "
              f"the local copy at {output_dir} is complete")
        return False
    return True


def dataset_provenance(script, flags, extra=None):
    """JSON record of how a dataset was made: script, `flags` (`flags.flag_values(args)`: no token), library
    versions, and `extra`."""
    import accelerate
    import datasets
    import diffusers
    import transformers

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
