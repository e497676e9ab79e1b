"""Training checkpoints: where a run resumes from, what it must match, and saving them whole.

Where the diffusers examples are known to go wrong, this module does it differently:
- `--resume_from_checkpoint` takes a path anywhere (or a checkpoint name inside --output_dir); a path that does
  not exist is an error, and so is `latest` on a folder that holds a run but no checkpoint (upstream would start
  over in it), or an outside checkpoint resumed into a folder holding another run;
- a checkpoint is resumed only when everything a resumed run depends on is the same (`check_resume`, before the
  output folder is touched): its recorded flags and inputs (`training_signature`; a checkpoint without them is
  refused), its number of processes (the batch order and RNG streams depend on it), RNG states that load, and
  model folders holding safetensors;
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
# The flags that set the training length (the horizon of every other schedule).
LENGTH_FLAGS = ("max_train_steps", "num_train_epochs")


def read_training_state(path):
    """A checkpoint's training_state.json: {"global_step", "signature", "num_processes"}.

    A checkpoint without it (upstream's format) is refused: its flags and inputs cannot be compared with the run
    resuming it, which is the only guard against continuing a run with other data or settings.
    """
    state_file = Path(path) / TRAINING_STATE_FILE
    if not state_file.is_file():
        raise InputError(f"--resume_from_checkpoint {path} has no {TRAINING_STATE_FILE}, so its flags and inputs "
                         "cannot be checked against this run (an upstream checkpoint?); resume only from checkpoints "
                         "this project wrote")
    try:
        state = json.loads(state_file.read_text())
        int(state["global_step"])
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(f"--resume_from_checkpoint {path}: {TRAINING_STATE_FILE} is not readable "
                         f"({first_line(error)})") from None
    return state


def checkpoint_step(path):
    """The update count stored in a checkpoint's training_state.json."""
    return int(read_training_state(path)["global_step"])


def list_checkpoints(output_dir):
    """Finished `checkpoint-N` folders of `output_dir`, oldest first."""
    if not Path(output_dir).is_dir():
        return []
    found = [p for p in Path(output_dir).iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def holds_anything(folder):
    return Path(folder).is_dir() and any(Path(folder).iterdir())


def resolve_resume_checkpoint(resume_from_checkpoint, output_dir):
    """The folder to resume from: None for a fresh start (no flag, or `latest` on an absent or empty `output_dir`).

    A path that is not a folder is looked up by its name inside `output_dir`, as upstream does for
    `--resume_from_checkpoint checkpoint-1500`. Refused: `latest` on a folder that holds something but no
    `checkpoint-N` (a finished or foreign run: upstream would train over it from scratch); a checkpoint outside
    `output_dir` when `output_dir` holds anything (another run's weights would be continued from this one's
    state); a checkpoint without training_state.json (`read_training_state`).
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        if not found and holds_anything(output_dir):
            raise InputError(f"--resume_from_checkpoint latest: --output_dir {output_dir} holds no checkpoint-N to "
                             "resume (a finished or foreign run); pass --overwrite instead to start over")
        if found:
            read_training_state(found[-1])
        return str(found[-1]) if found else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir() and (Path(output_dir) / path.name).is_dir():
        path = Path(output_dir) / path.name
    if not path.is_dir():
        raise InputError(f"--resume_from_checkpoint {resume_from_checkpoint} does not exist "
                         "(pass 'latest' to resume from --output_dir or start fresh)")
    if Path(output_dir).resolve() not in path.resolve().parents and holds_anything(output_dir):
        raise InputError(f"--resume_from_checkpoint {resume_from_checkpoint} lies outside --output_dir {output_dir}, "
                         f"which holds another run; resume into an empty --output_dir, or from a checkpoint-N of "
                         f"{output_dir}")
    read_training_state(path)
    return str(path)


def training_signature(flags, inputs=None):
    """The run signature a checkpoint records and a resumed run must match (`resumable.run_signature`).

    `flags`: `flags.flag_values(args)`. With a schedule that does not depend on the total
    (`LENGTH_FREE_SCHEDULES`) the training length may grow on resume, so --max_train_steps and --num_train_epochs
    are left out of it.
    """
    signature = run_signature(flags, inputs)
    if flags.get("lr_scheduler") in LENGTH_FREE_SCHEDULES:
        for flag in LENGTH_FLAGS:
            signature["flags"].pop(flag, None)
    return signature


def save_checkpoint(accelerator, output_dir, global_step, signature, checkpoints_total_limit=None):
    """Save the full training state to `output_dir/checkpoint-N` and keep the newest `checkpoints_total_limit`.

    training_state.json records the update count, the run signature and the number of processes.

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
        state = {"global_step": global_step, "signature": signature, "num_processes": accelerator.num_processes}
        (partial_dir / TRAINING_STATE_FILE).write_text(json.dumps(state, indent=2))
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


def check_resume(resume_path, signature, num_processes, process_index=0):
    """Refuse a checkpoint this run cannot continue exactly; call before the output folder is touched.

    - its recorded `training_signature` must equal `signature`; a longer run on a schedule whose horizon is the
      total length (cosine, linear, ...) is named as such, since every resumed update would get another rate;
    - it must have been made by `num_processes` processes: accelerate writes one `random_states_<rank>.pkl` per
      process (the files are counted, so upstream's checkpoints are covered too), and the data order and RNG
      streams depend on the count;
    - this process's RNG states must load (`check_random_states`);
    - its `unet/`, `text_encoder/` and `vae/` folders must hold safetensors (a pickled `.bin` is never loaded).
    """
    if resume_path is None:
        return
    state = read_training_state(resume_path)
    recorded = state.get("signature") or {}
    if recorded != signature:
        changed = signature_differences(recorded, signature)
        scheduler = signature["flags"].get("lr_scheduler")
        if changed and set(changed) <= {f"--{flag}" for flag in LENGTH_FLAGS} and scheduler not in LENGTH_FREE_SCHEDULES:
            moved = ", ".join(f"{flag} {recorded['flags'].get(flag[2:])} -> {signature['flags'].get(flag[2:])}"
                              for flag in changed)
            kept = " ".join(f"{flag} {recorded['flags'].get(flag[2:])}" for flag in changed)
            raise InputError(f"--resume_from_checkpoint {resume_path}: {moved} moves the {scheduler} schedule's "
                             "horizon, so every resumed update would get another learning rate; resume with "
                             f"{kept}, or train with a constant schedule to extend a run")
        raise InputError(f"--resume_from_checkpoint {resume_path} was made with other {', '.join(changed)}; resume "
                         "with the same flags and inputs")
    made_by = len(list(Path(resume_path).glob("random_states_*.pkl")))
    if made_by != num_processes or state.get("num_processes", num_processes) != num_processes:
        made_by = made_by if made_by != num_processes else state["num_processes"]
        raise InputError(f"--resume_from_checkpoint {resume_path} was made by {made_by} processes, this run has "
                         f"{num_processes}: the batch order and random streams would differ; launch with "
                         f"--num_processes {made_by}")
    check_random_states(resume_path, process_index)
    for subfolder in ("unet", "text_encoder", "vae"):
        folder = Path(resume_path) / subfolder
        if folder.is_dir() and not any(folder.glob("*.safetensors")):
            raise InputError(f"--resume_from_checkpoint {resume_path}: {subfolder}/ has no safetensors weights "
                             "(a pickled .bin is never loaded)")


def load_resume_state(accelerator, resume_path):
    """Load a checkpoint `check_resume` accepted (models, optimizer, schedule, RNG states); returns the update count
    it reached (0 for a fresh start). Call after `accelerator.prepare` and the checkpoint hooks."""
    if resume_path is None:
        return 0
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
    before its first checkpoint or while saving its weights (tracker logs, a half-written checkpoint, hidden
    staging): a corrected rerun is not refused as an occupied folder. A folder holding anything else is left
    alone. The scripts wrap the training loop and the final save in it."""
    try:
        yield
    except BaseException:
        output_dir = Path(output_dir)
        transient = re.compile(rf"^({re.escape(Path(logging_dir).parts[0])}|\.checkpoint-\d+\.incomplete|"
                               r"\..+\.tmp-[0-9a-f]+)$")
        if accelerator.is_main_process and output_dir.is_dir() and not list_checkpoints(output_dir) \
                and all(transient.match(entry.name) for entry in output_dir.iterdir()):
            shutil.rmtree(output_dir, ignore_errors=True)
        raise
