"""Training checkpoints: where a run resumes from, what it must match, and saving them whole.

Where the diffusers examples are known to go wrong, this module does it differently:
- `--resume_from_checkpoint` takes a path anywhere (or a checkpoint name inside --output_dir); a path that does
  not exist is an error; a checkpoint made with other flags or inputs is refused (`training_signature`), and so
  is one whose RNG states do not load;
- checkpoints are written to a hidden folder, renamed when whole, and rotated by the main process only after
  every process has finished writing;
- a run that fails before its first checkpoint leaves no folder behind (`removed_if_nothing_finished`).
"""

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from .cli import InputError, first_line
from .models import LatentEncoder
from .resumable import run_signature, signature_differences

TRAINING_STATE_FILE = "training_state.json"
# Schedules whose learning rate at update n does not depend on the total number of updates: with these a resumed
# run may train for longer than the original (the first updates are the same whatever the total).
LENGTH_FREE_SCHEDULES = ("constant", "constant_with_warmup")


def checkpoint_step(path):
    """The update count stored in a checkpoint (its training_state.json, else its `checkpoint-N` name)."""
    state_file = Path(path) / TRAINING_STATE_FILE
    if state_file.is_file():
        return int(json.loads(state_file.read_text())["global_step"])
    match = re.fullmatch(r"checkpoint-(\d+)", Path(path).name)
    if match is None:
        raise InputError(f"--resume_from_checkpoint {path} is not a checkpoint (no {TRAINING_STATE_FILE})")
    return int(match.group(1))


def list_checkpoints(output_dir):
    """Finished `checkpoint-N` folders of `output_dir`, oldest first."""
    if not Path(output_dir).is_dir():
        return []
    found = [p for p in Path(output_dir).iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resolve_resume_checkpoint(resume_from_checkpoint, output_dir):
    """The folder to resume from: None for a fresh start (no flag, or `latest` with no checkpoint yet).

    A path that is not a folder is looked up by its name inside `output_dir`, as upstream does for
    `--resume_from_checkpoint checkpoint-1500`.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return str(found[-1]) if found else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir() and (Path(output_dir) / path.name).is_dir():
        path = Path(output_dir) / path.name
    if not path.is_dir():
        raise InputError(f"--resume_from_checkpoint {resume_from_checkpoint} does not exist "
                         "(pass 'latest' to resume from --output_dir or start fresh)")
    checkpoint_step(path)
    return str(path)


def training_signature(flags, inputs=None):
    """The run signature a checkpoint records and a resumed run must match (`resumable.run_signature`).

    `flags`: `flags.flag_values(args)`. With a schedule that does not depend on the total
    (`LENGTH_FREE_SCHEDULES`) the training length may grow on resume, so --max_train_steps and --num_train_epochs
    are left out of it.
    """
    signature = run_signature(flags, inputs)
    if flags.get("lr_scheduler") in LENGTH_FREE_SCHEDULES:
        for flag in ("max_train_steps", "num_train_epochs"):
            signature["flags"].pop(flag, None)
    return signature


def save_checkpoint(accelerator, output_dir, global_step, signature, checkpoints_total_limit=None):
    """Save the full training state to `output_dir/checkpoint-N` and keep the newest `checkpoints_total_limit`.

    Every process writes into one hidden folder (its RNG state is per process); after a barrier the main
    process renames it into place and only then deletes old checkpoints, so a crash never leaves fewer
    than the limit of whole checkpoints and no process races another's deletion.
    """
    final_dir = Path(output_dir) / f"checkpoint-{global_step}"
    partial_dir = Path(output_dir) / f".checkpoint-{global_step}.incomplete"
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial_dir))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial_dir / TRAINING_STATE_FILE).write_text(json.dumps({"global_step": global_step,
                                                                   "signature": signature}, indent=2))
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(partial_dir, final_dir)
        logging.getLogger(__name__).info(f"Saved the training state to {final_dir}")
        if checkpoints_total_limit is not None:
            for old in list_checkpoints(output_dir)[:-checkpoints_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final_dir


def register_pretrained_checkpoint_hooks(accelerator):
    """Keep diffusers/transformers models in checkpoints as `unet/`, `text_encoder/` (SDXL: `text_encoder_2/`), `vae/`
    folders.

    So `checkpoint-N/unet` loads with `UNet2DConditionModel.from_pretrained` (as upstream DreamBooth), always
    from safetensors.
    """
    def pretrained_model(model):
        model = accelerator.unwrap_model(model)
        return model.vae if isinstance(model, LatentEncoder) else model

    def subfolder(model):
        return {"UNet2DConditionModel": "unet", "CLIPTextModel": "text_encoder",
                "CLIPTextModelWithProjection": "text_encoder_2", "AutoencoderKL": "vae"}.get(type(model).__name__)

    def save_hook(models, weights, output_dir):
        if not accelerator.is_main_process:
            return
        for index in reversed(range(len(models))):
            model = pretrained_model(models[index])
            if subfolder(model) is not None:
                model.save_pretrained(str(Path(output_dir) / subfolder(model)), safe_serialization=True)
                weights.pop(index)

    def load_hook(models, input_dir):
        for index in reversed(range(len(models))):
            model = pretrained_model(models[index])
            if subfolder(model) is not None:
                loaded = type(model).from_pretrained(str(Path(input_dir) / subfolder(model)), use_safetensors=True)
                model.load_state_dict(loaded.state_dict())
                models.pop(index)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def resume_training_state(accelerator, resume_path, signature):
    """Load a checkpoint (models, optimizer, schedule, RNG states); returns the update count reached (0 without).

    A checkpoint whose recorded `training_signature` differs from this run's is refused, naming the flags.
    """
    if resume_path is None:
        return 0
    state_file = Path(resume_path) / TRAINING_STATE_FILE
    recorded = json.loads(state_file.read_text()).get("signature") if state_file.is_file() else None
    if recorded is not None and recorded != signature:
        raise InputError(f"--resume_from_checkpoint {resume_path} was made with other "
                         f"{', '.join(signature_differences(recorded, signature))}; resume with the same flags "
                         "and inputs")
    check_random_states(resume_path, accelerator.process_index)
    accelerator.print(f"Resuming from checkpoint {resume_path}")
    accelerator.load_state(str(resume_path))
    return checkpoint_step(resume_path)


def check_random_states(resume_path, process_index):
    """This process's RNG states must load: `load_state` only logs an unreadable file at INFO level and goes on
    with fresh RNG streams, and the resumed weights then differ from an uninterrupted run's."""
    from accelerate.utils import load as accelerate_load

    states_file = Path(resume_path) / f"random_states_{process_index}.pkl"
    try:
        accelerate_load(states_file)  # accelerate's own weights-only loader, as `load_state` calls it
    except Exception as error:  # noqa: BLE001 - missing, truncated or foreign: all end the same way
        raise InputError(f"--resume_from_checkpoint {resume_path}: {states_file.name} cannot be read "
                         f"({first_line(error)})") from None


@contextlib.contextmanager
def removed_if_nothing_finished(accelerator, output_dir, logging_dir):
    """On failure, remove `output_dir` when no checkpoint was finished and it holds only what a run writes
    before its first checkpoint (tracker logs, a half-written checkpoint): a corrected rerun is not refused
    as an occupied folder. A folder holding anything else is left alone."""
    try:
        yield
    except BaseException:
        output_dir = Path(output_dir)
        transient = re.compile(rf"^({re.escape(Path(logging_dir).parts[0])}|\.checkpoint-\d+\.incomplete)$")
        if accelerator.is_main_process and output_dir.is_dir() and not list_checkpoints(output_dir) \
                and all(transient.match(entry.name) for entry in output_dir.iterdir()):
            shutil.rmtree(output_dir, ignore_errors=True)
        raise
