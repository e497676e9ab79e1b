"""Hostile inputs ("Nothing silently wrong"): one test per case a hostile user found.

Every case goes through a script's command line, as a user runs it: `python SCRIPT.py ARGS` is executed
in this process by `runpy` (the same `if __name__ == "__main__"` entry point, so `SystemExit` and what reaches
stderr are the user's), or through `accelerate launch` where processes matter. No internal function is called,
so the battery holds whatever shape the shared package takes, except `images.decode_rgb`, the shared decoder
whose EXIF rule a test names.

What "refused" means everywhere (`assert_refused`): exit status 2, stderr holds exactly one line, it starts with
`error: ` and names the flag or file; and nothing was written or replaced (`Tree` snapshots of every input are
byte-identical afterwards; no output folder, `.partial` or hidden staging sibling is left). A run that fails while
writing (a full disk) must end the same way, after whatever progress it printed (`assert_failed_cleanly`).

Inputs that a case could damage are copies in the test's own folder: the session fixtures are never pointed at.
"""

import contextlib
import hashlib
import io
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO_ROOT, launch

SCRIPTS = ("make_tiny_victim.py", "generate_synthetic.py", "perturb_antidreambooth.py", "train_dreambooth_mixsyn.py",
           "train_lora_mixsyn.py", "train_textual_inversion_mixsyn.py", "attack_clid.py", "attack_pfami.py",
           "attack_loss.py", "attack_secmi.py", "attack_pia.py", "evaluate.py", "run_experiment.py")


# ----------------------------------------------------------------------------------------------
# Running a script as its command line, and what a refusal must look like
# ----------------------------------------------------------------------------------------------

@dataclass
class Run:
    """What a user sees: exit status, stdout, stderr (a raw traceback, as Python prints it, exits 1)."""

    code: int
    out: str
    err: str

    @property
    def err_lines(self):
        return [line for line in self.err.splitlines() if line.strip()]

    def summary(self):
        tail = self.err_lines[-4:] or ["<empty stderr>"]
        return f"exit {self.code}; stderr ({len(self.err_lines)} lines) ends: " + " | ".join(tail)


def _reset_accelerate():
    """accelerate keeps process-global state; each in-process run starts from a fresh one, as a new process would."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def cli(script, *argv, nested=False):
    """`python SCRIPT ARGV` in this process (runpy, `__main__`), returning a `Run`.

    `nested=True`: a second run started from inside a running one (two concurrent runs of one process): the
    accelerate state is shared, not reset.
    """
    out, err = io.StringIO(), io.StringIO()
    saved_argv, code = sys.argv, 0
    sys.argv = [str(REPO_ROOT / script), *map(str, argv)]
    if not nested:
        _reset_accelerate()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(REPO_ROOT / script), run_name="__main__")
            except SystemExit as exit_:
                if isinstance(exit_.code, str):
                    print(exit_.code, file=sys.stderr)
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            except Exception:  # noqa: BLE001 - what Python would print for an uncaught exception
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = saved_argv
        if not nested:
            _reset_accelerate()
    return Run(code, out.getvalue(), err.getvalue())


def assert_refused(run, *names):
    """Exit 2 and one stderr line `error: ...` naming each of `names` (a flag, a file, a reason)."""
    lines = run.err_lines
    assert run.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), run.summary()
    missing = [name for name in names if name.lower() not in lines[0].lower()]
    assert not missing, f"the error does not name {missing}: {lines[0]}"


def assert_failed_cleanly(run, *names):
    """A run that failed while working: exit 2, no traceback, the last stderr line `error: ...` naming `names`."""
    lines = run.err_lines
    assert run.code == 2 and lines and lines[-1].startswith("error: ") and "Traceback" not in run.err, run.summary()
    missing = [name for name in names if name.lower() not in lines[-1].lower()]
    assert not missing, f"the error does not name {missing}: {lines[-1]}"


def argv_of(**flags):
    """--key value pairs; True is a bare switch, a list expands, None is left out."""
    argv = []
    for key, value in flags.items():
        if value is None or value is False:
            continue
        argv.append(f"--{key}")
        if value is not True:
            argv += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return argv


# ----------------------------------------------------------------------------------------------
# Snapshots: "nothing was written or replaced"
# ----------------------------------------------------------------------------------------------

class Tree:
    """sha256 of every file below some paths (hidden ones too) and the target of every link."""

    def __init__(self, *paths):
        self.paths = [Path(p) for p in paths]
        self.state = self._read()

    def _read(self):
        state = {}
        for root in self.paths:
            entries = [root] + (sorted(root.rglob("*")) if root.is_dir() and not root.is_symlink() else [])
            for path in entries:
                if path.is_symlink():
                    state[str(path)] = "link:" + os.readlink(path)
                elif path.is_file():
                    state[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
                elif path.is_dir():
                    state[str(path)] = "dir"
                else:
                    state[str(path)] = "absent"
        return state

    def assert_unchanged(self):
        now = self._read()
        changed = sorted(path for path in set(now) | set(self.state) if now.get(path) != self.state.get(path))
        assert not changed, f"{len(changed)} path(s) written, replaced or removed, e.g. {changed[:3]}"


def leftovers(output):
    """What a failed or refused run must not leave: the output, `<output>.partial`, hidden staging siblings."""
    output = Path(output)
    found = [str(output)] if output.exists() or output.is_symlink() else []
    found += [str(p) for p in (Path(f"{output}.partial"),) if p.exists()]
    if output.parent.is_dir():
        found += [str(p) for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]
    return found


def assert_nothing_left(*outputs):
    left = [path for output in outputs for path in leftovers(output)]
    assert not left, f"left behind: {left}"


def copy_of(source, target):
    shutil.copytree(source, target, symlinks=True)
    return Path(target)


# ----------------------------------------------------------------------------------------------
# Command lines and the runs several cases share
# ----------------------------------------------------------------------------------------------

def lora_argv(victim, dataset, output_dir, **changes):
    """A 2-update LoRA run on the clean set (no perturbed set), a checkpoint at update 2."""
    flags = dict(pretrained_model_name_or_path=victim / "pipeline", dataset_name=dataset, output_dir=output_dir,
                 train_batch_size=2, max_train_steps=2, checkpointing_steps=2, seed=0, lr_warmup_steps=0)
    flags.update(changes)
    return argv_of(**flags)


def attack_argv(victim, output_dir, members=None, nonmembers=None, pretrained=None, **changes):
    """attack_loss.py at one timestep and one noise draw: the cheapest attack."""
    flags = dict(pretrained_model_name_or_path=pretrained or victim / "pipeline",
                 member_dataset=members or victim / "members", nonmember_dataset=nonmembers or victim / "nonmembers",
                 output_dir=output_dir, attack_timesteps=100, batch_size=80)
    flags.update(changes)
    return argv_of(**flags)


def generate_argv(victim, output_dir, **changes):
    flags = dict(pretrained_model_name_or_path=victim / "pipeline", domain="zero", num_images_per_domain=1,
                 num_inference_steps=1, output_dir=output_dir)
    flags.update(changes)
    return argv_of(**flags)


class LogCapture(contextlib.AbstractContextManager):
    """Every log record's message while open (what the console would show at INFO)."""

    def __enter__(self):
        import logging

        self.records, self.handler = [], logging.Handler(logging.INFO)
        self.handler.emit = lambda record: self.records.append(record.getMessage())
        logging.getLogger().addHandler(self.handler)
        self.level = logging.getLogger().level
        logging.getLogger().setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        import logging

        logging.getLogger().removeHandler(self.handler)
        logging.getLogger().setLevel(self.level)
        return False


@pytest.fixture(scope="module")
def lora_run(tiny_victim, synthetic_dataset, tmp_path_factory):
    """A finished LoRA run on the clean set (ratio 0, no perturbed set): its folder (weights, card, checkpoint-2)
    and every log message it emitted."""
    output_dir = tmp_path_factory.mktemp("hostile_lora") / "lora"
    with LogCapture() as logs:
        run = cli("train_lora_mixsyn.py", *lora_argv(tiny_victim, synthetic_dataset, output_dir))
    assert run.code == 0, run.summary()
    assert (output_dir / "checkpoint-2" / "random_states_0.pkl").is_file()
    return output_dir, logs.records


@pytest.fixture(scope="module")
def spelled_scores(tiny_victim, tmp_path_factory):
    """The pre-trained victim attacked twice (loss at t 100 and t 300), its path spelled two ways: relative
    `victim/pipeline` and absolute with a trailing slash. {name: (scores folder, Run)}."""
    root = tmp_path_factory.mktemp("hostile_scores")
    saved = Path.cwd()
    os.chdir(tiny_victim.parent)
    try:
        relative = cli("attack_loss.py", *attack_argv(tiny_victim, root / "loss_t100", pretrained="victim/pipeline"))
    finally:
        os.chdir(saved)
    absolute = cli("attack_loss.py", *attack_argv(tiny_victim, root / "loss_t300",
                                                  pretrained=f"{tiny_victim / 'pipeline'}/", attack_timesteps=300))
    for run in (relative, absolute):
        assert run.code == 0, run.summary()
    return {"loss_t100": (root / "loss_t100", relative), "loss_t300": (root / "loss_t300", absolute)}


@pytest.fixture(scope="module")
def lora_scores(lora_run, tiny_victim, tmp_path_factory):
    """The LoRA of `lora_run` attacked on its own base model (the scores its card may carry)."""
    output_dir = tmp_path_factory.mktemp("hostile_lora_scores") / "loss"
    run = cli("attack_loss.py", *attack_argv(tiny_victim, output_dir, lora_weights=lora_run[0]))
    assert run.code == 0, run.summary()
    return output_dir


# ----------------------------------------------------------------------------------------------
# Data destroyed or replaced
# ----------------------------------------------------------------------------------------------

def _overlap_cases():
    """(script, flags builder, what must stay untouched, outputs that must not appear, names the error gives)."""
    def lora(flags):
        return lambda t, v, s, **_: ("train_lora_mixsyn.py", lora_argv(v, t / "data", **flags(t)))
    return {
        # 1. --output_dir is, contains or lies inside an input.
        "lora_output_dir_is_the_dataset": (
            lora(lambda t: dict(output_dir=t / "data", overwrite=True)), ["data"], [],
            ["--output_dir", "--dataset_name"]),
        "lora_output_dir_inside_the_dataset": (
            lora(lambda t: dict(output_dir=t / "data" / "run")), ["data"], [], ["--output_dir", "--dataset_name"]),
        "lora_output_dir_containing_the_dataset": (
            lora(lambda t: dict(output_dir=t, overwrite=True)), ["data"], [], ["--output_dir", "--dataset_name"]),
        # twin: --save_mixed_dataset written over the clean set while it trains from it.
        "lora_save_mixed_dataset_is_the_dataset": (
            lora(lambda t: dict(output_dir=t / "out", save_mixed_dataset=t / "data", overwrite=True)), ["data"],
            ["out"], ["--save_mixed_dataset", "--dataset_name"]),
        "dreambooth_output_dir_is_the_pretrained_model": (
            lambda t, v, s, **_: ("train_dreambooth_mixsyn.py", lora_argv(
                v, s, t / "model", pretrained_model_name_or_path=t / "model", overwrite=True)),
            ["model"], [], ["--output_dir", "--pretrained_model_name_or_path"]),
        "attack_output_dir_is_the_member_dataset": (
            lambda t, v, s, **_: ("attack_loss.py", attack_argv(v, t / "members", members=t / "members",
                                                                 overwrite=True)),
            ["members"], [], ["--output_dir", "--member_dataset"]),
        # twin: the latents cache written into the member set's folder.
        "attack_latents_cache_dir_inside_the_member_dataset": (
            lambda t, v, s, **_: ("attack_loss.py", attack_argv(v, t / "out", members=t / "members",
                                                                 latents_cache_dir=t / "members" / "latents")),
            ["members"], ["out"], ["--latents_cache_dir", "--member_dataset"]),
        "generate_output_dir_inside_the_pretrained_model": (
            lambda t, v, s, **_: ("generate_synthetic.py", generate_argv(
                v, t / "model" / "synthetic", pretrained_model_name_or_path=t / "model")),
            ["model"], [], ["--output_dir", "--pretrained_model_name_or_path"]),
        "evaluate_output_dir_is_a_scores_folder": (
            lambda t, v, s, scores, **_: ("evaluate.py", argv_of(scores=t / "scores", output_dir=t / "scores",
                                                                  overwrite=True, bootstrap=10)),
            ["scores"], [], ["--output_dir", "--scores"]),
        # twin: evaluate.py's --output_dir replacing the trained folder its card goes to.
        "evaluate_output_dir_is_the_write_card_folder": (
            lambda t, v, s, lora_scores, **_: ("evaluate.py", argv_of(
                scores=lora_scores, write_card=t / "lora", output_dir=t / "lora", overwrite=True, bootstrap=10)),
            ["lora"], [], ["--output_dir", "--write_card"]),
    }


OVERLAP_CASES = _overlap_cases()


@pytest.mark.parametrize("case", list(OVERLAP_CASES))
def test_an_output_that_is_contains_or_lies_inside_an_input_is_refused_and_the_input_survives(
        case, tiny_victim, synthetic_dataset, spelled_scores, lora_run, request, tmp_path):
    build, kept, outputs, names = OVERLAP_CASES[case]
    copy_of(synthetic_dataset, tmp_path / "data")
    copy_of(tiny_victim / "pipeline", tmp_path / "model")
    copy_of(tiny_victim / "members", tmp_path / "members")
    copy_of(spelled_scores["loss_t100"][0], tmp_path / "scores")
    copy_of(lora_run[0], tmp_path / "lora")
    extra = {"scores": tmp_path / "scores"}
    if "write_card" in case:
        extra["lora_scores"] = request.getfixturevalue("lora_scores")
    script, argv = build(tmp_path, tiny_victim, synthetic_dataset, **extra)
    before = Tree(*(tmp_path / name for name in kept))
    run = cli(script, *argv)
    assert_refused(run, *names)
    before.assert_unchanged()
    assert_nothing_left(*(tmp_path / name for name in outputs))


def test_resume_latest_on_a_finished_folder_without_checkpoints_is_refused(lora_run, tiny_victim, synthetic_dataset,
                                                                          tmp_path):
    # Upstream starts 'latest' afresh when no checkpoint exists; here that would retrain over a finished model.
    finished = copy_of(lora_run[0], tmp_path / "lora")
    shutil.rmtree(finished / "checkpoint-2")
    before = Tree(finished)
    run = cli("train_lora_mixsyn.py", *lora_argv(tiny_victim, synthetic_dataset, finished,
                                                 resume_from_checkpoint="latest"))
    assert_refused(run, "--resume_from_checkpoint", "no checkpoint")
    before.assert_unchanged()


def test_a_checkpoint_without_training_state_json_is_refused_because_its_flags_cannot_be_checked(
        lora_run, tiny_victim, synthetic_dataset, tmp_path):
    # An upstream-format checkpoint: accelerate's state without the run signature this project records.
    checkpoint = copy_of(lora_run[0] / "checkpoint-2", tmp_path / "upstream" / "checkpoint-2")
    (checkpoint / "training_state.json").unlink()
    before = Tree(checkpoint)
    run = cli("train_lora_mixsyn.py", *lora_argv(tiny_victim, synthetic_dataset, tmp_path / "resumed",
                                                 resume_from_checkpoint=checkpoint))
    assert_refused(run, "--resume_from_checkpoint", "training_state.json")
    before.assert_unchanged()
    assert_nothing_left(tmp_path / "resumed")


def test_training_longer_from_a_constant_schedule_checkpoint_is_allowed(lora_run, tiny_victim, synthetic_dataset,
                                                                        tmp_path):
    checkpoint = copy_of(lora_run[0] / "checkpoint-2", tmp_path / "saved" / "checkpoint-2")
    run = cli("train_lora_mixsyn.py", *lora_argv(tiny_victim, synthetic_dataset, tmp_path / "resumed",
                                                 resume_from_checkpoint=checkpoint, max_train_steps=3))
    assert run.code == 0, run.summary()
    assert (tmp_path / "resumed" / "pytorch_lora_weights.safetensors").is_file()


@pytest.fixture(scope="module")
def cosine_run(tiny_victim, synthetic_dataset, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("hostile_cosine") / "lora"
    run = cli("train_lora_mixsyn.py", *lora_argv(tiny_victim, synthetic_dataset, output_dir, lr_scheduler="cosine"))
    assert run.code == 0, run.summary()
    return output_dir


def test_training_longer_from_a_cosine_schedule_checkpoint_is_refused_naming_the_moved_horizon(
        cosine_run, tiny_victim, synthetic_dataset, tmp_path):
    checkpoint = copy_of(cosine_run / "checkpoint-2", tmp_path / "saved" / "checkpoint-2")
    before = Tree(checkpoint)
    run = cli("train_lora_mixsyn.py", *lora_argv(tiny_victim, synthetic_dataset, tmp_path / "resumed",
                                                 resume_from_checkpoint=checkpoint, max_train_steps=3,
                                                 lr_scheduler="cosine"))
    assert_refused(run, "--max_train_steps", "cosine")
    before.assert_unchanged()
    assert_nothing_left(tmp_path / "resumed")


def test_resuming_with_other_checkpointing_and_validation_flags_is_allowed(lora_run, tiny_victim, synthetic_dataset,
                                                                           tmp_path):
    checkpoint = copy_of(lora_run[0] / "checkpoint-2", tmp_path / "saved" / "checkpoint-2")
    run = cli("train_lora_mixsyn.py", *lora_argv(
        tiny_victim, synthetic_dataset, tmp_path / "resumed", resume_from_checkpoint=checkpoint, max_train_steps=3,
        checkpointing_steps=1, checkpoints_total_limit=1, validation_steps=7, validation_epochs=3,
        num_validation_images=1))
    assert run.code == 0, run.summary()
    assert sorted(p.name for p in (tmp_path / "resumed").glob("checkpoint-*")) == ["checkpoint-3"]


def _run_during(monkeypatch, owner, name, second_run):
    """Patch `owner.name` so that its first call starts `second_run()` (another run, concurrent with this one)."""
    original, started, results = getattr(owner, name), [], []

    def wrapper(*args, **kwargs):
        if not started:  # once: the second run's own calls come here too
            started.append(True)
            results.append(second_run())
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return results


def test_a_second_training_run_into_the_same_output_dir_is_refused_by_a_lock(tiny_victim, synthetic_dataset,
                                                                             tmp_path, monkeypatch):
    import torch

    argv = lora_argv(tiny_victim, synthetic_dataset, tmp_path / "lora", overwrite=True)
    second = _run_during(monkeypatch, torch.optim.AdamW, "step",
                         lambda: cli("train_lora_mixsyn.py", *argv, nested=True))
    first = cli("train_lora_mixsyn.py", *argv)
    assert second, "the first run never reached an optimizer step"
    assert_refused(second[0], "--output_dir")
    assert first.code == 0, first.summary()
    assert sorted(p.name for p in (tmp_path / "lora").glob("checkpoint-*")) == ["checkpoint-2"]
    assert not [p.name for p in (tmp_path / "lora").iterdir() if p.name.startswith(".")]  # no staging left inside


def test_a_second_synthesis_run_into_the_same_output_dir_is_refused_by_a_lock(tiny_victim, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    argv = generate_argv(tiny_victim, tmp_path / "synthetic", domain=None, sample_batch_size=1, overwrite=True)
    argv += ["--domain", "zero", "--domain", "one"]  # two batches
    second = _run_during(monkeypatch, StableDiffusionPipeline, "__call__",
                         lambda: cli("generate_synthetic.py", *argv, nested=True))
    first = cli("generate_synthetic.py", *argv)
    assert second, f"the first run never sampled: {first.summary()}"
    assert_refused(second[0], "--output_dir")
    assert first.code == 0, first.summary()
    assert not Path(f"{tmp_path / 'synthetic'}.partial").exists()


def test_resuming_into_another_runs_output_dir_from_an_outside_checkpoint_is_refused(lora_run, tiny_victim,
                                                                                    synthetic_dataset, tmp_path):
    ours = copy_of(lora_run[0], tmp_path / "ours")
    theirs = copy_of(lora_run[0], tmp_path / "theirs")
    before = Tree(ours, theirs)
    run = cli("train_lora_mixsyn.py", *lora_argv(tiny_victim, synthetic_dataset, ours, max_train_steps=3,
                                                 resume_from_checkpoint=theirs / "checkpoint-2"))
    assert_refused(run, "--resume_from_checkpoint", "--output_dir")
    before.assert_unchanged()


def test_a_two_process_checkpoint_resumed_by_one_process_is_refused(lora_run, tiny_victim, synthetic_dataset,
                                                                   tmp_path):
    # A 2-process checkpoint holds one RNG state per process (accelerate's random_states_0.pkl, _1.pkl).
    checkpoint = copy_of(lora_run[0] / "checkpoint-2", tmp_path / "two" / "checkpoint-2")
    shutil.copy(checkpoint / "random_states_0.pkl", checkpoint / "random_states_1.pkl")
    before = Tree(checkpoint)
    run = cli("train_lora_mixsyn.py", *lora_argv(tiny_victim, synthetic_dataset, tmp_path / "resumed",
                                                 resume_from_checkpoint=checkpoint))
    assert_refused(run, "--resume_from_checkpoint", "2 processes")
    before.assert_unchanged()
    assert_nothing_left(tmp_path / "resumed")


# ----------------------------------------------------------------------------------------------
# Results that look right and are not
# ----------------------------------------------------------------------------------------------

def other_base_model(tiny_victim, target):
    """A copy of the victim pipeline whose UNet differs in one weight by 1e-3 (another base model, same shapes)."""
    from safetensors.torch import load_file, save_file

    copy_of(tiny_victim / "pipeline", target)
    weights_file = target / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(weights_file))
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, str(weights_file), metadata={"format": "pt"})
    return target


def test_write_card_refuses_scores_of_the_lora_attacked_on_another_base_model(lora_run, lora_scores, tiny_victim,
                                                                               tmp_path):
    card_folder = copy_of(lora_run[0], tmp_path / "lora")
    other_base = other_base_model(tiny_victim, tmp_path / "other_base")
    attacked = cli("attack_loss.py", *attack_argv(tiny_victim, tmp_path / "scores_other_base",
                                                  pretrained=other_base, lora_weights=card_folder))
    assert attacked.code == 0, attacked.summary()
    before = Tree(card_folder)
    run = cli("evaluate.py", *argv_of(scores=tmp_path / "scores_other_base", write_card=card_folder,
                                      output_dir=tmp_path / "eval", bootstrap=10))
    assert_refused(run, "--write_card", "base model")
    before.assert_unchanged()
    assert_nothing_left(tmp_path / "eval")
    # The same LoRA attacked on its own base model is accepted (the refusal is about the base, not the LoRA).
    accepted = cli("evaluate.py", *argv_of(scores=lora_scores, write_card=card_folder,
                                           output_dir=tmp_path / "eval_own_base", bootstrap=10))
    assert accepted.code == 0, accepted.summary()
    assert "Measured membership-inference risk" in (card_folder / "README.md").read_text()


MIXSYN_CLAIM = "adversarially perturbed"


def card_of(folder):
    return (Path(folder) / "README.md").read_text()


def test_the_card_of_a_clean_run_without_a_perturbed_set_does_not_claim_a_mixsyn_mix(lora_run):
    card = card_of(lora_run[0])
    assert MIXSYN_CLAIM not in card, [line for line in card.splitlines() if MIXSYN_CLAIM in line]
    assert "ratio = 0.0" in card and "Perturbed set: none" in card


def test_the_card_of_a_ratio_0_run_given_a_perturbed_set_says_no_perturbed_image_was_trained_on(
        tiny_victim, synthetic_dataset, perturbed_dataset, tmp_path):
    run = cli("train_lora_mixsyn.py", *lora_argv(tiny_victim, synthetic_dataset, tmp_path / "lora",
                                                 perturbed_dataset_name=perturbed_dataset, mixup_ratio=0))
    assert run.code == 0, run.summary()
    card = card_of(tmp_path / "lora")
    assert MIXSYN_CLAIM not in card, [line for line in card.splitlines() if MIXSYN_CLAIM in line]
    assert "pgd_eps" not in card, [line for line in card.splitlines() if "pgd_eps" in line]


def test_the_card_of_a_run_on_the_users_own_photos_does_not_call_them_self_synthesized(tiny_victim,
                                                                                      synthetic_dataset, tmp_path):
    import datasets

    photos = tmp_path / "photos"
    photos.mkdir()
    for index, image in enumerate(datasets.load_from_disk(str(synthetic_dataset))["image"][:4]):
        image.save(photos / f"photo_{index}.png")
    run = cli("train_lora_mixsyn.py", *lora_argv(tiny_victim, None, tmp_path / "lora", instance_data_dir=photos,
                                                 instance_prompt="a photo of sks digit"))
    assert run.code == 0, run.summary()
    card = card_of(tmp_path / "lora")
    for claim in (MIXSYN_CLAIM, "self-synthesized"):
        assert claim not in card, [line for line in card.splitlines() if claim in line]


def test_attack_scripts_print_tpr_at_1pct_fpr_as_not_measurable_below_100_nonmembers(spelled_scores):
    # The fast victim has 40 non-members: FPR resolution 1/40 > 1%, the rule evaluate.py applies.
    for _, run in spelled_scores.values():
        printed = [line for line in run.out.splitlines() if "TPR@1%FPR" in line]
        assert printed, run.out[-500:]
        assert all("not measurable at this size" in line for line in printed), printed


def test_evaluate_groups_attacks_by_the_weights_not_by_how_the_model_path_is_spelled(spelled_scores, tmp_path):
    run = cli("evaluate.py", *argv_of(scores=[folder for folder, _ in spelled_scores.values()],
                                      output_dir=tmp_path / "eval", bootstrap=10))
    assert run.code == 0, run.summary()
    worst = json.loads((tmp_path / "eval" / "results.json").read_text())["worst_case"]
    assert len(worst) == 1, f"{len(worst)} worst cases for one model: {[case['model'] for case in worst]}"
    assert sorted(worst[0]["ranking"]) == ["loss_t100", "loss_t300"]


def test_a_perturbed_set_made_from_another_clean_set_with_the_same_ids_is_refused(tiny_victim, synthetic_dataset,
                                                                                 tmp_path):
    import datasets
    from PIL import ImageOps
    from train_fixtures import make_perturbed_dataset

    clean = datasets.load_from_disk(str(synthetic_dataset))
    other_clean = clean.map(lambda row: {"image": ImageOps.mirror(row["image"])})  # same ids, other images
    other_clean.save_to_disk(str(tmp_path / "other_clean"))
    make_perturbed_dataset(tmp_path / "other_clean", tmp_path / "perturbed_of_other")
    before = Tree(synthetic_dataset, tmp_path / "perturbed_of_other")
    run = cli("train_lora_mixsyn.py", *lora_argv(tiny_victim, synthetic_dataset, tmp_path / "lora",
                                                 perturbed_dataset_name=tmp_path / "perturbed_of_other",
                                                 mixup_ratio=0.5))
    assert_refused(run, "--perturbed_dataset_name")
    before.assert_unchanged()
    assert_nothing_left(tmp_path / "lora")


DOMAIN_FILES = {
    "domains_as_a_string": ({"domains": "zero"}, "--domains_file"),
    "names_giving_the_same_id": ({"domains": ["a b", "a_b"]}, "--domains_file"),
    "a_template_with_two_slots": ({"domains": ["zero"], "templates": [{"template": "The {} of {}", "p": 1.0}]},
                                  "--domains_file"),
    "a_template_without_probability": ({"domains": ["zero"], "templates": [{"template": "The face of {}"}]},
                                       "--domains_file"),
    # twins found while writing the cases above
    "a_null_domain": ({"domains": [None, "zero"]}, "--domains_file"),
    "a_probability_that_is_not_a_number": ({"domains": ["zero"], "templates": [{"template": "A {}", "p": "high"}]},
                                           "--domains_file"),
    "templates_as_a_string": ({"domains": ["zero"], "templates": "The face of {}"}, "--domains_file"),
    "a_domain_entry_without_name": ({"domains": [{"label": "zero"}]}, "--domains_file"),
}


@pytest.mark.parametrize("case", list(DOMAIN_FILES))
def test_a_malformed_domains_file_is_one_line_before_any_model_loads(case, tiny_victim, tmp_path):
    content, flag = DOMAIN_FILES[case]
    (tmp_path / "domains.json").write_text(json.dumps(content))
    run = cli("generate_synthetic.py", *generate_argv(tiny_victim, tmp_path / "out", domain=None,
                                                      domains_file=tmp_path / "domains.json"))
    assert_refused(run, flag)
    assert_nothing_left(tmp_path / "out")


@pytest.mark.parametrize("names", [[""], ["   "], ["zero", " zero"]], ids=["empty", "blank", "same_after_strip"])
def test_an_empty_or_blank_domain_flag_is_refused(names, tiny_victim, tmp_path):
    repeated = [item for name in names for item in ("--domain", name)]  # --domain is repeated, one name each
    run = cli("generate_synthetic.py", *generate_argv(tiny_victim, tmp_path / "out", domain=None), *repeated)
    assert_refused(run, "--domain")
    assert_nothing_left(tmp_path / "out")


def test_attack_pia_guidance_scale_below_zero_or_nan_is_refused_at_parse_time(tiny_victim, tmp_path):
    # The model path does not exist: a check made only after parsing would fail on it instead, naming it.
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "keep").write_text("x")
    for value in ("-2", "nan"):
        run = cli("attack_pia.py", *attack_argv(tiny_victim, tmp_path / "occupied", pretrained=tmp_path / "missing"),
                  f"--guidance_scale={value}")
        assert_refused(run, "--guidance_scale")


def _float_flags():
    """(script, flag, nargs) of every `type=float` flag of every script's parser, read from the parser itself."""
    import argparse
    import importlib

    class Stop(Exception):
        pass

    found = []
    for script in SCRIPTS:
        parsers = []

        def capture(self, *args, **kwargs):
            parsers.append(self)
            raise Stop

        saved = argparse.ArgumentParser.parse_known_args
        argparse.ArgumentParser.parse_known_args = capture
        try:
            importlib.import_module(script[:-3]).parse_args([])
        except Stop:
            pass
        finally:
            argparse.ArgumentParser.parse_known_args = saved
        for action in parsers[0]._actions if parsers else []:
            if action.type is float and action.option_strings:
                found.append((script, action.option_strings[0], action.nargs))
    return found


FLOAT_FLAGS = _float_flags()


def minimal_argv(script, tmp_path):
    """A command line that parses: model and data paths that do not exist, an occupied output (scripts that check
    the output at parse time get a fresh one), so a value accepted at parse time fails right after, naming
    something else."""
    missing, occupied, fresh = tmp_path / "missing", tmp_path / "occupied", tmp_path / "fresh"
    occupied.mkdir(exist_ok=True)
    (occupied / "keep").write_text("x")
    model = ["--pretrained_model_name_or_path", missing]
    if script.startswith("train_"):
        return model + ["--dataset_name", missing, "--output_dir", fresh]
    if script.startswith("attack_"):
        return model + ["--member_dataset", missing, "--nonmember_dataset", missing, "--output_dir", occupied]
    return {"make_tiny_victim.py": ["--output_dir", occupied],
            "generate_synthetic.py": model + ["--domain", "zero", "--output_dir", occupied],
            "perturb_antidreambooth.py": model + ["--dataset_name", missing, "--output_dir", occupied],
            "evaluate.py": ["--scores", missing, "--output_dir", occupied],
            "run_experiment.py": ["--output_dir", fresh, "--dry_run"]}[script]


def test_every_script_has_its_float_flags_discovered():
    scripts = {script for script, _, _ in FLOAT_FLAGS}
    # run_experiment.py has no float flag; every other script has at least one.
    assert scripts == set(SCRIPTS) - {"run_experiment.py"}, sorted(set(SCRIPTS) - scripts)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("script, flag, nargs", FLOAT_FLAGS, ids=[f"{s[:-3]}{f}" for s, f, _ in FLOAT_FLAGS])
def test_every_float_flag_of_every_script_refuses_non_finite_values_at_parse_time(script, flag, nargs, value,
                                                                                   tmp_path):
    run = cli(script, *minimal_argv(script, tmp_path), f"{flag}={value}")  # "-inf" would read as an option
    assert_refused(run, flag)
    assert not (tmp_path / "fresh").exists()


def test_clid_weak_caption_refuses_nan_in_one_line(tiny_victim, tmp_path):
    # twin of the float flags: --weak_caption takes fractions (or 'null') through its own type function.
    run = cli("attack_clid.py", *minimal_argv("attack_clid.py", tmp_path), "--weak_caption=nan")
    assert_refused(run, "--weak_caption")


def test_a_member_upscaled_2x_among_the_nonmembers_is_refused(tiny_victim, tmp_path):
    import datasets
    from PIL import Image

    members = datasets.load_from_disk(str(tiny_victim / "members"))
    nonmembers = datasets.load_from_disk(str(tiny_victim / "nonmembers"))
    member = members[0]
    upscaled = dict(member, id="nonmember-upscaled", image=member["image"].resize(
        (2 * member["image"].width, 2 * member["image"].height), Image.BICUBIC))
    columns = {name: list(nonmembers[name]) + [upscaled[name]] for name in nonmembers.column_names}
    datasets.Dataset.from_dict(columns, features=nonmembers.features).save_to_disk(str(tmp_path / "nonmembers"))
    run = cli("attack_loss.py", *attack_argv(tiny_victim, tmp_path / "scores", nonmembers=tmp_path / "nonmembers"))
    assert_refused(run, "--nonmember_dataset", "nonmember-upscaled", str(member["id"]))
    assert_nothing_left(tmp_path / "scores")


TINY_CONFIG = REPO_ROOT / "configs" / "tiny_digits.toml"
CONFIG_EDITS = {
    # (text replaced, replacement, words the one line must contain)
    "misspelled_key": ("build_victim = true", "build_victm = true", ["build_victm", "build_victim"]),
    "misspelled_section": ("[stages.train_dreambooth]", "[stages.train_dreambooht]",
                           ["train_dreambooht", "train_dreambooth"]),
    "training_seeds_as_a_string": ("training_seeds = [0, 1, 2]", 'training_seeds = "42"', ["training_seeds"]),
    "a_setting_that_is_not_a_table": ('clean = { mode = "image", ratio = 0.0 }', 'clean = "image"',
                                      ["settings.clean"]),
    "a_ratio_that_is_not_a_number": ('"aspl-image-0.5" = { mode = "image", ratio = 0.5, noise = "aspl" }',
                                     '"aspl-image-0.5" = { mode = "image", ratio = "half", noise = "aspl" }', ["ratio"]),
    "epoch_levels_as_a_string": ("epochs = [0.4, 5, 15, 50]", 'epochs = "50"', ["epochs"]),
    "a_table_without_its_setting": ('(ratio 0)"\nsetting = "clean"', '(ratio 0)"', ["setting"]),
    "methods_as_a_string": ('methods = ["dreambooth"]', 'methods = "dreambooth"', ["methods"]),
    "a_misspelled_quick_section": ("[quick.stages.train_dreambooth]", "[quick.stages.train_dreambooht]",
                                   ["train_dreambooht", "train_dreambooth"]),
}


@pytest.mark.parametrize("case", list(CONFIG_EDITS))
def test_a_config_error_is_one_line_naming_the_key_and_the_nearest_valid_one(case, tmp_path):
    old, new, words = CONFIG_EDITS[case]
    text = TINY_CONFIG.read_text()
    assert old in text
    (tmp_path / "bad.toml").write_text(text.replace(old, new, 1))
    run = cli("run_experiment.py", "--config", tmp_path / "bad.toml", "--output_dir", tmp_path / "study", "--dry_run")
    assert_refused(run, "--config", *words)
    assert_nothing_left(tmp_path / "study")


# ----------------------------------------------------------------------------------------------
# Tracebacks and half-written outputs
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def mounted_tmpfs(path, size, read_only=False):
    """A tmpfs of `size` at `path` (a full disk when small, EROFS with `read_only`); skipped where mount fails."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _writable_cases():
    return {
        "generate": lambda v, s, scores, out: ("generate_synthetic.py", generate_argv(v, out)),
        "train": lambda v, s, scores, out: ("train_lora_mixsyn.py", lora_argv(v, s, out, checkpointing_steps=1000)),
        "attack": lambda v, s, scores, out: ("attack_loss.py", attack_argv(v, out)),
        "evaluate": lambda v, s, scores, out: ("evaluate.py", argv_of(scores=scores, output_dir=out, bootstrap=10)),
    }


WRITERS = _writable_cases()


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_read_only_output_folder_is_refused_before_any_work(writer, tiny_victim, synthetic_dataset,
                                                              spelled_scores, tmp_path):
    parent = tmp_path / "read_only"
    if os.geteuid() != 0:  # root writes through a mode of 0o555; a read-only mount stops it
        parent.mkdir()
        parent.chmod(0o555)
        context = contextlib.nullcontext(parent)
    else:
        context = mounted_tmpfs(parent, "1m", read_only=True)
    with context:
        script, argv = WRITERS[writer](tiny_victim, synthetic_dataset, spelled_scores["loss_t100"][0], parent / "out")
        run = cli(script, *argv)
        assert_refused(run, "--output_dir")
        assert_nothing_left(parent / "out")


@pytest.mark.parametrize("link", ["dangling", "to_an_empty_folder"])
@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_symlinked_output_folder_is_refused_and_the_link_kept(writer, link, tiny_victim, synthetic_dataset,
                                                                spelled_scores, tmp_path):
    target = tmp_path / "target"
    if link == "to_an_empty_folder":
        target.mkdir()
    (tmp_path / "out").symlink_to(target, target_is_directory=True)
    before = Tree(tmp_path / "out", target)
    script, argv = WRITERS[writer](tiny_victim, synthetic_dataset, spelled_scores["loss_t100"][0], tmp_path / "out")
    run = cli(script, *argv)
    assert_refused(run, "--output_dir", "link")
    before.assert_unchanged()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert not Path(f"{tmp_path / 'out'}.partial").exists()


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_full_disk_is_one_line_leaves_no_staging_and_the_rerun_is_not_refused_as_occupied(
        writer, tiny_victim, synthetic_dataset, spelled_scores, tmp_path):
    # A real ENOSPC: a 16 KiB tmpfs (tmpfs counts 4 KiB pages, so a handful of small files fill it).
    disk = tmp_path / "disk"
    with mounted_tmpfs(disk, "16k"):
        script, argv = WRITERS[writer](tiny_victim, synthetic_dataset, spelled_scores["loss_t100"][0], disk / "out")
        run = cli(script, *argv)
        assert_failed_cleanly(run, "--output_dir", "No space left on device")
        # A `.partial` holding finished units may stay: it is what the rerun resumes from, not staging.
        left = [path for path in leftovers(disk / "out") if not path.endswith(".partial")]
        assert not left, f"left behind: {left}"
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        rerun = cli(script, *argv)
        assert rerun.code == 0, rerun.summary()


def test_save_mixed_dataset_is_not_written_when_the_model_fails_to_load(tiny_victim, synthetic_dataset, tmp_path):
    broken = copy_of(tiny_victim / "pipeline", tmp_path / "broken_pipeline")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()  # model_index.json is there: it loads late
    run = cli("train_lora_mixsyn.py", *lora_argv(tiny_victim, synthetic_dataset, tmp_path / "lora",
                                                 pretrained_model_name_or_path=broken,
                                                 save_mixed_dataset=tmp_path / "mixed"))
    assert_refused(run, "--pretrained_model_name_or_path")
    assert_nothing_left(tmp_path / "mixed", tmp_path / "lora")


def png_claiming(width, height):
    """A valid 1×1 PNG whose header claims `width` × `height` (a decompression bomb's header; CRC recomputed)."""
    import struct
    import zlib

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


def test_a_decompression_bomb_header_is_one_line_naming_the_file(tiny_victim, synthetic_dataset, tmp_path):
    import datasets

    photos = tmp_path / "photos"
    photos.mkdir()
    for index, image in enumerate(datasets.load_from_disk(str(synthetic_dataset))["image"][:2]):
        image.save(photos / f"photo_{index}.png")
    (photos / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    run = cli("train_lora_mixsyn.py", *lora_argv(tiny_victim, None, tmp_path / "lora", instance_data_dir=photos,
                                                 instance_prompt="a photo of sks digit"))
    assert_refused(run, "bomb.png")
    assert_nothing_left(tmp_path / "lora")


class PickleMarker:
    """Unpickling this object creates `path` (what a malicious pickle would do instead)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def textual_inversion_folder(folder, token_map_text, files=()):
    folder.mkdir()
    (folder / "token_map.json").write_text(token_map_text)
    for name, write in files:
        write(folder / name)
    return folder


def _embedding(path):
    import torch
    from safetensors.torch import save_file

    save_file({"<zero>": torch.zeros(1, 64)}, str(path))


TEXTUAL_INVERSION_FOLDERS = {
    "token_map_without_placeholder": (json.dumps({"zero": {"file": "learned_embeds-zero.safetensors",
                                                           "num_vectors": 1}}),
                                      [("learned_embeds-zero.safetensors", _embedding)]),
    "pickled_bin_embedding": (json.dumps({"zero": {"placeholder": "<zero>", "file": "learned_embeds-zero.bin",
                                                   "num_vectors": 1}}), "pickle"),
    "token_map_not_json": ("{zero: <zero>", []),
    # twins
    "token_map_naming_a_missing_file": (json.dumps({"zero": {"placeholder": "<zero>", "file": "nowhere.safetensors",
                                                             "num_vectors": 1}}), []),
    "token_map_a_list": (json.dumps(["<zero>"]), []),
}


@pytest.mark.parametrize("case", list(TEXTUAL_INVERSION_FOLDERS))
def test_a_malformed_textual_inversion_folder_is_one_line_and_nothing_is_unpickled(case, tiny_victim, tmp_path):
    import torch

    token_map, files = TEXTUAL_INVERSION_FOLDERS[case]
    marker = tmp_path / "unpickled"
    if files == "pickle":
        files = [("learned_embeds-zero.bin", lambda path: torch.save(PickleMarker(marker), path))]
    folder = textual_inversion_folder(tmp_path / "ti", token_map, files)
    run = cli("attack_loss.py", *attack_argv(tiny_victim, tmp_path / "scores", textual_inversion=folder))
    assert_refused(run, "--textual_inversion")
    assert not marker.exists(), "a pickle was unpickled"
    assert_nothing_left(tmp_path / "scores")


def test_a_fake_safetensors_r_precision_scorer_is_one_line(tiny_victim, synthetic_dataset, tmp_path):
    scorer = tmp_path / "scorer"
    scorer.mkdir()
    shutil.copy(tiny_victim / "rprecision_model" / "config.json", scorer / "config.json")
    (scorer / "model.safetensors").write_bytes(b"this is not a safetensors file")
    run = cli("evaluate.py", *argv_of(generations=synthetic_dataset, rprecision_model=scorer, no_brisque=True,
                                      output_dir=tmp_path / "eval"))
    assert_refused(run, "--rprecision_model")
    assert_nothing_left(tmp_path / "eval")


def test_a_parquet_folder_with_a_dataset_script_is_one_line_and_the_script_never_runs(tiny_victim, tmp_path):
    import datasets

    folder = tmp_path / "members"
    (folder / "data").mkdir(parents=True)
    datasets.load_from_disk(str(tiny_victim / "members")).to_parquet(str(folder / "data" / "train-00000.parquet"))
    marker = tmp_path / "script_ran"
    (folder / "members.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    run = cli("attack_loss.py", *attack_argv(tiny_victim, tmp_path / "scores", members=folder))
    assert_refused(run, "--member_dataset", "members.py")
    assert not marker.exists(), "the dataset script ran"
    assert_nothing_left(tmp_path / "scores")


@pytest.fixture(scope="module")
def two_process_refusal(tiny_victim, tmp_path_factory):
    """generate_synthetic.py launched on 2 processes into an occupied folder: (result, console lines, Tree)."""
    occupied = tmp_path_factory.mktemp("hostile_launch") / "out"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("user data")
    before = Tree(occupied)
    result = launch("generate_synthetic.py", generate_argv(tiny_victim, occupied), num_processes=2, check=False,
                    timeout=300)
    console = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    return result, console, before


def test_a_two_process_launch_into_an_occupied_folder_prints_the_error_once(two_process_refusal):
    result, console, before = two_process_refusal
    errors = [line for line in console if "error:" in line]
    assert result.returncode != 0 and len(errors) == 1, f"exit {result.returncode}, error lines: {errors}"
    before.assert_unchanged()


def test_a_two_process_launch_refusal_exits_2_on_its_ranks_with_no_traceback_from_the_script(two_process_refusal):
    # `accelerate launch` reports any failed worker with its own ChildFailedError traceback and exits 1: a script
    # cannot suppress that report without hiding its failure status from the callers that check it (README,
    # Reliability). What the script controls: its ranks exit with status 2, and none of its frames is printed.
    result, console, _ = two_process_refusal
    # The launcher's own frames lie in site-packages, which `make test`'s .venv puts inside the repository too.
    script_frames = [line for line in console if line.strip().startswith("File ") and str(REPO_ROOT) in line
                     and "site-packages" not in line]
    assert result.returncode != 0 and re.search(r"exitcode\s*:\s*2\b", result.stderr) and not script_frames, \
        f"exit {result.returncode}, script frames {script_frames[:2]}, ends: " + " | ".join(console[-3:])


TYPO_PATHS = {
    # (script, flag, typo) — every other flag valid; cwd is an empty folder
    "train_pretrained_dot_slash": ("train_lora_mixsyn.py", "--pretrained_model_name_or_path", "./victm/pipeline"),
    "train_pretrained_nested": ("train_lora_mixsyn.py", "--pretrained_model_name_or_path", "outputs/x/pipeline"),
    "train_dataset_name": ("train_lora_mixsyn.py", "--dataset_name", "outputs/x/synthetic"),
    "train_tokenizer_name": ("train_lora_mixsyn.py", "--tokenizer_name", "outputs/x/tokenizer"),
    "attack_member_dataset": ("attack_loss.py", "--member_dataset", "./victm/members"),
    "attack_lora_weights": ("attack_loss.py", "--lora_weights", "outputs/x/lora"),
    "attack_unet_path": ("attack_loss.py", "--unet_path", "outputs/x/unet"),
    "attack_textual_inversion": ("attack_loss.py", "--textual_inversion", "outputs/x/ti"),
    "evaluate_scores": ("evaluate.py", "--scores", "outputs/x/scores"),
    "generate_pretrained": ("generate_synthetic.py", "--pretrained_model_name_or_path", "./victm/pipeline"),
}


@pytest.mark.parametrize("case", list(TYPO_PATHS))
def test_a_typoed_local_path_says_no_such_local_folder_and_not_a_hub_id(case, tiny_victim, synthetic_dataset,
                                                                        tmp_path, monkeypatch):
    script, flag, typo = TYPO_PATHS[case]
    monkeypatch.chdir(tmp_path)
    argv = {"train_lora_mixsyn.py": lora_argv(tiny_victim, synthetic_dataset, tmp_path / "out"),
            "attack_loss.py": attack_argv(tiny_victim, tmp_path / "out"),
            "evaluate.py": argv_of(scores=tmp_path / "placeholder", output_dir=tmp_path / "out"),
            "generate_synthetic.py": generate_argv(tiny_victim, tmp_path / "out")}[script]
    argv = argv[: argv.index(flag)] + argv[argv.index(flag) + 2 :] if flag in argv else argv
    run = cli(script, *argv, flag, typo)
    assert_refused(run, flag, typo, "no such local folder", "not a Hub id")
    assert_nothing_left(tmp_path / "out")


@pytest.fixture(scope="module")
def dreambooth_run(tiny_victim, synthetic_dataset, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("hostile_dreambooth") / "dreambooth"
    run = cli("train_dreambooth_mixsyn.py", *lora_argv(tiny_victim, synthetic_dataset, output_dir))
    assert run.code == 0, run.summary()
    return output_dir


def test_a_dreambooth_checkpoint_with_a_pickled_unet_bin_is_refused_without_unpickling(
        dreambooth_run, tiny_victim, synthetic_dataset, tmp_path):
    import torch

    checkpoint = copy_of(dreambooth_run / "checkpoint-2", tmp_path / "saved" / "checkpoint-2")
    (checkpoint / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    torch.save(PickleMarker(marker), checkpoint / "unet" / "diffusion_pytorch_model.bin")
    run = cli("train_dreambooth_mixsyn.py", *lora_argv(tiny_victim, synthetic_dataset, tmp_path / "resumed",
                                                       resume_from_checkpoint=checkpoint))
    assert not marker.exists(), "the checkpoint's pickle was unpickled"
    assert_refused(run, "--resume_from_checkpoint", "safetensors")
    assert_nothing_left(tmp_path / "resumed")


@pytest.mark.parametrize("script", ["attack_pia.py", "attack_loss.py", "attack_secmi.py", "attack_clid.py",
                                    "attack_pfami.py"])
def test_help_keeps_the_usage_examples_line_breaks(script):
    run = cli(script, "--help")
    assert run.code == 0, run.summary()
    assert re.search(rf"{re.escape(script)}[^\n]* \\\n +--pretrained_model_name_or_path", run.out), \
        [line for line in run.out.splitlines() if script in line]


def test_a_fresh_training_run_does_not_log_resuming_at_step_0(lora_run):
    resuming = [message for message in lora_run[1] if "Resuming" in message]
    assert not resuming, resuming


def test_pia_prints_one_summary_line_not_one_per_timestep(tiny_victim, tmp_path):
    run = cli("attack_pia.py", *argv_of(
        pretrained_model_name_or_path=tiny_victim / "pipeline", member_dataset=tiny_victim / "members",
        nonmember_dataset=tiny_victim / "nonmembers", output_dir=tmp_path / "pia", attack_timesteps=[10, 20, 30],
        guidance_scale=1, batch_size=80))
    assert run.code == 0, run.summary()
    printed = [line for line in run.out.splitlines() if "AUC" in line]
    assert len(printed) == 1, printed


def test_a_jpeg_with_exif_orientation_6_decodes_upright_through_the_shared_decoder(tmp_path):
    import numpy as np
    from PIL import Image

    from mixsyn_utils.images import decode_rgb

    upright = np.zeros((32, 48, 3), dtype=np.uint8)  # 48 wide, 32 high: the left third red, the rest blue
    upright[:, :16] = (255, 0, 0)
    upright[:, 16:] = (0, 0, 255)
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # what a phone in portrait stores
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    stored.save(tmp_path / "photo.jpg", quality=95, exif=exif)
    for source in (tmp_path / "photo.jpg", (tmp_path / "photo.jpg").read_bytes(),
                   {"bytes": None, "path": str(tmp_path / "photo.jpg")}):
        decoded = np.asarray(decode_rgb(source, name="photo.jpg"), dtype=np.int16)
        assert decoded.shape == upright.shape
        assert np.abs(decoded - upright).mean() < 8, "decoded sideways"
