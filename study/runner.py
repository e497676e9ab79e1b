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
import shutil
import subprocess
import sys
import time
from pathlib import Path

# The scripts a study runs; one-process stages call their `main(parse_args(argv))` in this process.
import attack_clid
import attack_loss
import attack_pfami
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
    train_textual_inversion_mixsyn, attack_secmi, attack_pia, attack_loss, attack_clid, attack_pfami, evaluate)}


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


def clear_continued_output(stage):
    """A stage that continues an earlier stage's checkpoint writes into an empty folder: what a killed attempt left
    there is removed (the earlier stage's checkpoint, elsewhere, is what it resumes from)."""
    if stage.continues and Path(stage.output).exists():
        shutil.rmtree(stage.output)


def run_stage(stage, log_dir, env=None):
    """Run one stage: in-process when it uses one process (saves the launcher's start-up), else `accelerate launch`."""
    clear_continued_output(stage)
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
    plan is checked in seconds before anything runs. Flags that name an earlier stage's output (`Stage.continues`)
    are left out here: the script checks them when the stage runs.
    """
    argv = stage.argv()
    for flag in stage.continues:
        position = argv.index(f"--{flag}")
        argv = argv[:position] + argv[position + 2:]
    # Whether the output folder is occupied belongs to the run, not to its flags: a cached stage's folder is full, and
    # a continued stage refuses a full folder without --overwrite. The script checks it when the stage runs.
    if "--output_dir" in argv:
        position = argv.index("--output_dir") + 1
        argv[position] = f"{argv[position]}.flags-check-{os.getpid()}"
    messages = io.StringIO()
    try:
        with contextlib.redirect_stderr(messages):  # argparse prints its error, then exits
            SCRIPTS[stage.script].parse_args([str(value) for value in argv])
    except InputError as error:
        raise InputError(f"stage {stage.name}: {error}") from None
    except SystemExit:
        lines = messages.getvalue().strip().splitlines()
        raise InputError(f"stage {stage.name}: {lines[-1] if lines else 'flags rejected'}") from None


def _record_done(stage, key, seconds, log_dir):
    record = {"key": key, "script": stage.script, "argv": stage.argv(), "seconds": seconds}
    _record_path(stage, log_dir).write_text(json.dumps(record, indent=2))


def _init_worker():
    """A pool worker computes with one thread: two one-thread workers use two cores better than one two-thread
    process on models this small, and a stage's numbers do not depend on which worker ran it."""
    import torch

    torch.set_num_threads(1)


def _run_in_worker(script, argv, log_path):
    """Run one stage in a pool worker, its console output into the stage's log; returns the seconds it took.

    The output is redirected at the file-descriptor level, so loggers and progress bars created by earlier
    stages of this worker write there too.
    """
    start = time.time()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log_path, "w") as log_file:
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
        try:
            run_script_in_process(SCRIPTS[script], argv)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for descriptor in saved:
                os.close(descriptor)
    return round(time.time() - start, 1)


def run_stages(stages, log_dir, dry_run=False, print_fn=print, workers=1):
    """Check every stage's flags, then run the stages whose outputs do not already match their key. Returns
    {name: seconds}.

    workers = 1: in order, in this process. workers > 1: a stage marked `exclusive` (the victim, self-synthesis,
    perturbation: everything waits for them) runs alone here with every core; the others run as soon as the
    stages they depend on are done, each in one of `workers` one-thread worker processes (`_init_worker`).
    """
    for stage in stages:
        check_stage_flags(stage)
    keys = {}
    for stage in stages:
        keys[stage.name] = stage_key(stage, keys)
    if dry_run:
        for number, stage in enumerate(stages, 1):
            print_fn(f"[{number}/{len(stages)}] {stage.name} ({stage.script})\n    {' '.join(stage.argv())}")
        return {}
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    remaining = [stage for stage in stages if not is_cached(stage, keys[stage.name], log_dir)]
    if len(remaining) < len(stages):
        print_fn(f"{len(stages) - len(remaining)} of {len(stages)} stages cached (finished with the same inputs)")
    if workers <= 1 or sum(not stage.exclusive for stage in remaining) <= 1:
        return _run_in_order(remaining, keys, log_dir, print_fn)
    return _run_in_pool(remaining, keys, log_dir, print_fn, workers)


def _run_in_order(stages, keys, log_dir, print_fn):
    timings, start = {}, time.time()
    for number, stage in enumerate(stages, 1):
        print_fn(f"[{number}/{len(stages)}] {stage.name} ({stage.script}): running (elapsed {time.time() - start:.0f} s)")
        stage_start = time.time()
        run_stage(stage, log_dir)
        timings[stage.name] = round(time.time() - stage_start, 1)
        _record_done(stage, keys[stage.name], timings[stage.name], log_dir)
        print_fn(f"[{number}/{len(stages)}] {stage.name}: done in {timings[stage.name]} s")
    return timings


def _run_in_pool(stages, keys, log_dir, print_fn, workers):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    timings, start, total = {}, time.time(), len(stages)
    remaining, running = list(stages), {}
    waiting_for = {stage.name for stage in stages}

    def ready(stage):
        return not any(name in waiting_for for name in stage.depends_on)

    def finished(stage, seconds):
        timings[stage.name] = seconds
        waiting_for.discard(stage.name)
        _record_done(stage, keys[stage.name], seconds, log_dir)
        print_fn(f"[{len(timings)}/{total}] {stage.name}: done in {seconds} s (elapsed {time.time() - start:.0f} s)")

    # One OpenMP thread per worker from its start: several processes spinning two threads each on two cores
    # were measured 30× slower than one (OpenMP's busy waiting). Workers start on demand, so the variable stays
    # set while the pool lives; this process's own thread count was fixed when it started.
    previous_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker) as pool:
            _schedule(pool, remaining, running, ready, finished, log_dir, workers)
    finally:
        if previous_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = previous_threads
    return timings


def _schedule(pool, remaining, running, ready, finished, log_dir, workers):
    """Submit the ready stages to the pool's free workers; an exclusive stage runs here once the pool is idle."""
    from concurrent.futures import FIRST_COMPLETED, wait

    while remaining or running:
        runnable = [stage for stage in remaining if ready(stage)]
        exclusive = [stage for stage in runnable if stage.exclusive or stage.num_processes > 1]
        if exclusive and not running:  # alone, with every core
            stage = exclusive[0]
            remaining.remove(stage)
            stage_start = time.time()
            run_stage(stage, log_dir)
            finished(stage, round(time.time() - stage_start, 1))
            continue
        for stage in runnable:
            if len(running) >= workers or stage in exclusive:
                continue
            remaining.remove(stage)
            clear_continued_output(stage)
            log_path = _record_path(stage, log_dir).with_suffix("").with_suffix(".log")
            running[pool.submit(_run_in_worker, stage.script, stage.argv(), str(log_path))] = stage
        if not running:
            raise RuntimeError(f"stages wait for stages that never run: {[s.name for s in remaining][:3]}")
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in done:
            stage = running.pop(future)
            try:
                seconds = future.result()
            except Exception as error:
                log_path = _record_path(stage, log_dir).with_suffix("").with_suffix(".log")
                raise RuntimeError(f"stage {stage.name} failed ({error}); log {log_path}") from error
            finished(stage, seconds)
