"""Resumable, sharded work and the run signature a resumed run must match.

Five jobs are lists of independent units (a batch of images to sample or score, a group of images to perturb):
self-synthesis, Anti-DreamBooth, prior-preservation class images, evaluation's sampling and every attack.
`ResumableWork.run` computes the units of this process (round-robin, so a unit's result never depends on
which process ran it), saves each result the moment it is finished in `<output_dir>.partial/unit-N`, and
gathers all units on the main process. A killed run finds its finished units and computes only the rest.

`weights_digest` names the weights a folder holds (what a model card's numbers were measured on).

The run signature (`run_signature`) is the one rule for what a resumed run must share with the killed one:
every flag except `OUTPUT_FLAGS` (where results go and how progress is logged), plus the fingerprints of its
inputs (`input_fingerprint`: the content of every dataset, model, weights and domains file it reads), so an
input replaced at the same path is caught too. The same rule guards the training scripts' checkpoints.
"""

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from .cli import InputError
from .outputs import atomic_replace_dir, output_write_errors, temp_sibling

# Flags that change where results go or how they are logged, never a result: a resumed run may differ in these.
OUTPUT_FLAGS = frozenset({
    "output_dir", "overwrite", "push_to_hub", "hub_dataset_id", "hub_model_id", "hub_token", "logging_dir",
    "report_to", "resume_from_checkpoint", "checkpointing_steps", "checkpoints_total_limit", "privacy_report",
    "save_mixed_dataset", "latents_cache_dir", "dataloader_num_workers", "validation_prompt",
    "num_validation_images", "validation_steps", "validation_epochs", "validation_scheduler", "save_steps",
    "save_as_full_pipeline", "no_safe_serialization", "skip_save_text_encoder", "local_rank", "cache_dir",
})
SIGNATURE_FILE = "run_signature.json"
# What a folder's fingerprint leaves out: what a run writes beside its weights that never changes a result
# (resumable checkpoints, tracker logs, the model card) and hidden entries (partial writes, caches).
UNFINGERPRINTED = re.compile(r"^(\..*|checkpoint-\d+|logs|README\.md)$")
HASH_CHUNK_BYTES = 1 << 24
_file_digests = {}  # (path, size, mtime, inode) -> sha256: each file is read once per process


def file_digest(path):
    """sha256 of a file's bytes, read once per process (cached by path, size, modification time and inode)."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _file_digests:
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            for chunk in iter(lambda: file.read(HASH_CHUNK_BYTES), b""):
                digest.update(chunk)
        _file_digests[key] = digest.hexdigest()
    return _file_digests[key]


def input_fingerprint(name_or_path, revision=None, repo_type="model"):
    """What a resumed run compares to know an input is the same: a content hash, not a path.

    A local file: its sha256. A local folder: sha256 over (relative path, sha256) of every file below it but
    `UNFINGERPRINTED` entries. A Hub id: `id@commit` of the cached snapshot (`id@revision` when none is
    cached). None for no input.
    """
    if name_or_path is None:
        return None
    path = Path(name_or_path)
    if path.is_file():
        return file_digest(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for root, folders, files in os.walk(path):
            folders[:] = sorted(name for name in folders if not UNFINGERPRINTED.match(name))
            for name in sorted(files):
                if not UNFINGERPRINTED.match(name):
                    file_path = Path(root, name)
                    digest.update(f"{file_path.relative_to(path).as_posix()}:{file_digest(file_path)}\n".encode())
        return digest.hexdigest()
    try:
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(str(name_or_path), revision=revision, repo_type=repo_type, local_files_only=True)
        return f"{name_or_path}@{Path(snapshot).name}"
    except Exception:  # noqa: BLE001 - not cached (or not a Hub id): the id and revision are all there is
        return f"{name_or_path}@{revision or 'main'}"


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def weights_digest(path):
    """sha256 identifying the weights a folder (or one weights file) holds: the same bytes give the same digest.

    digest = sha256 of the JSON list [[name, sha256(file bytes)], …] over the weight files (`WEIGHT_SUFFIXES`)
    sorted by their path relative to `path` (a single file: its name); checkpoint-N/, hidden and log folders
    are not published weights and are left out. Unlike `input_fingerprint` (every file, for resume),
    a changed README or config leaves it unchanged: it names the weights a model card's numbers were measured on.
    """
    root = Path(path)
    if root.is_file():
        files = [(root.name, root)]
    else:
        files = sorted((file.relative_to(root).as_posix(), file) for file in root.rglob("*")
                       if file.is_file() and file.suffix in WEIGHT_SUFFIXES
                       and not any(part.startswith((".", "checkpoint-")) or part == "logs"
                                   for part in file.relative_to(root).parts[:-1]))
    entries = [[name, file_digest(file)] for name, file in files]
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def model_weights_digest(name_or_path, revision=None):
    """What names the weights a model flag loads: `weights_digest` of a local folder or file; for a Hub id, the
    `id@commit` of its cached snapshot (`input_fingerprint`; `id@revision` when none is cached)."""
    if Path(name_or_path).exists():
        return weights_digest(name_or_path)
    return input_fingerprint(name_or_path, revision)


def run_signature(flags, inputs=None):
    """{"flags": every flag but OUTPUT_FLAGS, "inputs": {name: fingerprint}} as plain JSON values.

    `flags`: the run's flag values (`flags.flag_values(args)`).
    """
    kept = {key: value for key, value in sorted(flags.items()) if key not in OUTPUT_FLAGS}
    return json.loads(json.dumps({"flags": kept, "inputs": inputs or {}}, default=str))


def signature_differences(recorded, current):
    """The flag and input names whose values differ between two signatures, sorted."""
    changed = []
    for part in ("flags", "inputs"):
        old, new = recorded.get(part, {}), current.get(part, {})
        changed += [f"--{key}" if part == "flags" else key
                    for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    return changed


def read_signature(folder):
    path = Path(folder) / SIGNATURE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_signature(folder, signature):
    path = Path(folder) / SIGNATURE_FILE
    tmp_path = path.with_name(f".{SIGNATURE_FILE}.tmp")
    tmp_path.write_text(json.dumps(signature, indent=2, sort_keys=True))
    os.replace(tmp_path, path)


class ResumableWork:
    """Units 0..N−1 of one job, each saved as a small dataset in `<output_dir>.partial/` as soon as it is done.

    `signature`: the run's `run_signature` (or any JSON dict that fixes the results). A `.partial` folder with
    finished units of another signature is an error naming the differences, or is discarded with
    `discard_other_settings` (the scripts' `--overwrite`); one without finished units is simply replaced, so a
    run that failed before finishing a unit never blocks the corrected rerun. A write that fails (a full disk) is
    one `InputError` naming `flag` (`outputs.output_write_errors`); the finished units stay for the rerun.
    """

    def __init__(self, output_dir, signature, accelerator=None, discard_other_settings=False, flag="--output_dir"):
        self.output_dir, self.flag = Path(output_dir), flag
        self.work_dir = Path(f"{Path(output_dir)}.partial")
        self.signature, self.accelerator = json.loads(json.dumps(signature)), accelerator
        self.discard_other_settings = discard_other_settings

    @property
    def is_main_process(self):
        return self.accelerator is None or self.accelerator.is_main_process

    def _barrier(self):
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def _unit_dir(self, unit):
        return self.work_dir / f"unit-{unit}"

    def finished_units(self):
        if not self.work_dir.is_dir():
            return []
        return sorted(int(p.name.split("-")[1]) for p in self.work_dir.iterdir() if p.name.startswith("unit-"))

    def _claim(self):
        """Main process: keep a `.partial` folder of the same run, replace one of another (see the class doc)."""
        recorded = read_signature(self.work_dir)
        if recorded != self.signature and self.work_dir.exists():
            finished = self.finished_units()
            if finished and not self.discard_other_settings:
                changed = ", ".join(signature_differences(recorded or {}, self.signature)) or "settings"
                raise InputError(f"{self.work_dir} holds {len(finished)} finished unit(s) of a killed run with other "
                                 f"{changed}; rerun with the same flags and inputs, or pass --overwrite to discard them")
            shutil.rmtree(self.work_dir)
        with output_write_errors(self.output_dir, self.flag):
            self.work_dir.mkdir(parents=True, exist_ok=True)
            write_signature(self.work_dir, self.signature)

    def _save(self, unit, dataset):
        import datasets

        datasets.disable_progress_bars()  # one bar per unit would drown the job's own progress bar
        with output_write_errors(self.output_dir, self.flag):
            tmp_dir = temp_sibling(self._unit_dir(unit))
            try:
                dataset.save_to_disk(str(tmp_dir))
                atomic_replace_dir(tmp_dir, self._unit_dir(unit))
            finally:
                shutil.rmtree(tmp_dir, ignore_errors=True)  # gone after the rename; a half-written unit otherwise

    def run(self, num_units, compute_unit, desc="units"):
        """Compute this process's unfinished units with `compute_unit(unit) -> datasets.Dataset`; gather them.

        Returns the concatenation of all units in unit order on the main process, None on the others.
        """
        import datasets
        from tqdm.auto import tqdm

        if self.is_main_process:
            try:
                self._claim()
            except BaseException:
                if not self.finished_units():
                    shutil.rmtree(self.work_dir, ignore_errors=True)
                raise
        self._barrier()
        process_index, num_processes = ((0, 1) if self.accelerator is None else
                                        (self.accelerator.process_index, self.accelerator.num_processes))
        mine = list(range(num_units))[process_index::num_processes]
        finished = set(self.finished_units())
        todo = [unit for unit in mine if unit not in finished]
        if len(todo) < len(mine):
            logging.getLogger(__name__).info(f"{desc}: {len(mine)} units on this process "
                                             f"({len(mine) - len(todo)} already done)")
        local_main = self.accelerator is None or self.accelerator.is_local_main_process
        progress = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=desc, disable=not local_main)
        try:
            for unit in todo:
                self._save(unit, compute_unit(unit))
                progress.update(1)
        except BaseException:
            if self.is_main_process and not self.finished_units():
                shutil.rmtree(self.work_dir, ignore_errors=True)  # nothing finished: leave nothing behind
            raise
        finally:
            progress.close()
        self._barrier()
        if not self.is_main_process:
            return None
        missing = sorted(set(range(num_units)) - set(self.finished_units()))
        if missing:
            raise RuntimeError(f"partial results missing for units {missing[:5]} in {self.work_dir}")
        return datasets.concatenate_datasets([datasets.load_from_disk(str(self._unit_dir(unit)))
                                              for unit in range(num_units)])

    def cleanup(self):
        """Main process, after the assembled output is saved: remove the per-unit results."""
        if self.is_main_process:
            shutil.rmtree(self.work_dir, ignore_errors=True)

