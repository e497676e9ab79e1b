#!/usr/bin/env python
"""Run every benchmark once and collect its output into benchmarks/RESULTS.md (raw logs in benchmarks/results/).

Each benchmark prints the ratios it measured in one run; this script only runs them in turn (they would
compete for the cores if run together) and records what they printed, with the machine they ran on.

    HF_HUB_OFFLINE=1 python benchmarks/run_all.py [--only victim attacks] [--victim_dir outputs/demo/victim]
"""

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def commands(victim_dir):
    victim = ["--victim_dir", victim_dir] if victim_dir else []
    return {
        "victim": ["bench_victim.py", "--output", str(BENCH_DIR / "results" / "victim.json"), *victim],
        "pgd": ["bench_pgd.py", "--resolution", "64", "--batch_size", "2", "--steps", "2"],
        "training": ["bench_training.py", *victim],
        "attacks": ["bench_attacks.py", *victim],
        "attack_strength": ["bench_attack_strength.py", "--output", str(BENCH_DIR / "results" / "attack_strength.json"),
                            *victim],
        "evaluate": ["bench_evaluate.py"],
        "reliability": ["bench_reliability.py"],
        "aspl_memory": ["bench_aspl_memory.py"],
        "sdxl_victim": ["bench_sdxl_victim.py", "--output", str(BENCH_DIR / "results" / "sdxl_victim.json")],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=None, help="Names of the benchmarks to run (default: all).")
    parser.add_argument("--victim_dir", default=None, help="Reuse a built victim instead of building one.")
    args = parser.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    (BENCH_DIR / "results").mkdir(exist_ok=True)
    sections = [f"# Benchmark results\n\nMachine: {platform.machine()}, {os.cpu_count()} cores, "
                f"Python {platform.python_version()}; run {time.strftime('%Y-%m-%d %H:%M')}.\n"]
    for name, argv in commands(args.victim_dir).items():
        if args.only and name not in args.only:
            continue
        start = time.time()
        result = subprocess.run([sys.executable, str(BENCH_DIR / argv[0]), *argv[1:]], env=env,
                                capture_output=True, text=True)
        output = result.stdout.strip()
        (BENCH_DIR / "results" / f"{name}.txt").write_text(output + "\n" + result.stderr[-4000:])
        sections.append(f"## {name} ({time.time() - start:.0f} s, exit {result.returncode})\n\n"
                        f"`python benchmarks/{' '.join(argv)}`\n\n```\n{output[-6000:]}\n```\n")
        print(sections[-1])
    (BENCH_DIR / "RESULTS.md").write_text("\n".join(sections))


if __name__ == "__main__":
    main()
