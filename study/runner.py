"""The experiment runner's machinery: stages cached by their inputs, run in-process or through `accelerate launch`.

A stage is one script call. Its cache key hashes the script's source, the shared package's source, its flags and
the keys of the stages it reads from, so a changed flag reruns that stage and everything downstream, nothing else.
A finished stage writes `<log_dir>/<stage>.done.json` with its key; a killed run finds the finished stages (whose
outputs still exist) and skips them, and the interrupted stage resumes through the script's own `ResumableWork`.
"""

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# The scripts a study runs; one-process stages call their `main(parse_args(argv))` in this process.
import attack_pia
import attack_secmi
import evaluate
import generate_synthetic
import make_tiny_victim
import perturb_antidreambooth
import train_dreambooth_mixsyn
import train_lora_mixsyn
import train_textual_inversion_mixsyn
from mixsyn_utils.cli import InputError

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {f"{module.__name__}.py": module for module in (
    make_tiny_victim, generate_synthetic, perturb_antidreambooth, train_dreambooth_mixsyn, train_lora_mixsyn,
    train_textual_inversion_mixsyn, attack_secmi, attack_pia, evaluate)}


def _source_digest(script):
    digest = hashlib.sha256((REPO_ROOT / script).read_bytes())
    for path in sorted((REPO_ROOT / "mixsyn_utils").glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def stage_key(stage, upstream_keys):
    """sha256 over script + shared sources, the flags, and the keys of the stages it depends on."""
    payload = json.dumps({"script": _source_digest(stage.script), "argv": stage.argv(),
                          "upstream": [upstream_keys[name] for name in stage.depends_on]}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _record_path(stage, log_dir):
    safe_name = "".join(c if c.isalnum() or c in "-_.[]+" else "_" for c in stage.name)
    return Path(log_dir) / f"{safe_name}.done.json"


def is_cached(stage, key, log_dir):
    record = _record_path(stage, log_dir)
    return (record.is_file() and Path(stage.output).exists()
            and json.loads(record.read_text()).get("key") == key)


def _reset_accelerate_state():
    """accelerate keeps process-global state; in-process stages each need a fresh one."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def run_script_in_process(module, argv):
    """`module.main(module.parse_args(argv))` in this process, with fresh accelerate state before and after."""
    _reset_accelerate_state()
    try:
        return module.main(module.parse_args([str(value) for value in argv]))
    finally:
        _reset_accelerate_state()


def run_stage(stage, log_dir, env=None):
    """Run one stage: in-process when it uses one process (saves the launcher's start-up), else `accelerate launch`."""
    argv = stage.argv()
    log_path = _record_path(stage, log_dir).with_suffix("").with_suffix(".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if stage.num_processes == 1:
        run_script_in_process(SCRIPTS[stage.script], argv)
        return
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
               "--num_processes", str(stage.num_processes), "--mixed_precision", "no", "--dynamo_backend", "no",
               str(REPO_ROOT / stage.script), *argv]
    with open(log_path, "w") as log_file:
        result = subprocess.run(command, cwd=REPO_ROOT, env=dict(os.environ, **(env or {})), stdout=log_file,
                                stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log_path.read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"stage {stage.name} failed ({result.returncode}); log {log_path}:\n" + "\n".join(tail))


def check_stage_flags(stage):
    """Parse a stage's flags with its script's own `parse_args`, validators included; an error names the stage.

    `parse_args` checks values and combinations, not the inputs that earlier stages will write, so a whole
    plan is checked in seconds before anything runs.
    """
    messages = io.StringIO()
    try:
        with contextlib.redirect_stderr(messages):  # argparse prints its error, then exits
            SCRIPTS[stage.script].parse_args([str(value) for value in stage.argv()])
    except InputError as error:
        raise InputError(f"stage {stage.name}: {error}") from None
    except SystemExit:
        lines = messages.getvalue().strip().splitlines()
        raise InputError(f"stage {stage.name}: {lines[-1] if lines else 'flags rejected'}") from None


def run_stages(stages, log_dir, dry_run=False, print_fn=print):
    """Check every stage's flags, then run `stages` in order, skipping those whose outputs already match their key.

    Returns {name: seconds}.
    """
    for stage in stages:
        check_stage_flags(stage)
    keys, timings = {}, {}
    start = time.time()
    for number, stage in enumerate(stages, 1):
        keys[stage.name] = stage_key(stage, keys)
        header = f"[{number}/{len(stages)}] {stage.name} ({stage.script})"
        if dry_run:
            print_fn(f"{header}\n    {' '.join(stage.argv())}")
            continue
        if is_cached(stage, keys[stage.name], log_dir):
            print_fn(f"{header}: cached")
            continue
        print_fn(f"{header}: running (elapsed {time.time() - start:.0f} s)")
        stage_start = time.time()
        run_stage(stage, log_dir)
        timings[stage.name] = round(time.time() - stage_start, 1)
        record = {"key": keys[stage.name], "script": stage.script, "argv": stage.argv(), "seconds": timings[stage.name]}
        _record_path(stage, log_dir).write_text(json.dumps(record, indent=2))
        print_fn(f"{header}: done in {timings[stage.name]} s")
    return timings
