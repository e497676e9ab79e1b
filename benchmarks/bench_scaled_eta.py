#!/usr/bin/env python
"""P4 at a scaled ℓ∞ budget: the scaled-η ladder of `miniature_selection_rule.md` on a `make demo` run's own images.

For each η the caller made two perturbed sets of the run's self-synthesized images with `perturb_antidreambooth.py`
(the run's [stages.perturb] flags, only `--pgd_eps` changed; `--method aspl` and `--method random`). This script
reads P4 exactly as the study's report does: `study.premises.perturbation_ratios` with the config's [premises]
timesteps and draws, seed 0, the run's own pre-trained victim. It also reads the run's own η = 0.05 sets, which must
give the P4 in the run's `report/summary.json` (a check that the measurement is the study's).

    python benchmarks/bench_scaled_eta.py --run_dir outputs/demo --config configs/tiny_digits.toml \\
        --eta 0.1 work/aspl_0.1 work/random_0.1 --output benchmarks/results/miniature_scaled_eta.json
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixsyn_utils.dataset_io import load_image_dataset  # noqa: E402
from study import premises as premise_measures  # noqa: E402
from study.plan import load_config  # noqa: E402


def linf_of(dataset):
    """The largest ‖δ‖∞ the perturbation script recorded (after its uint8 rounding), in [-1, 1] units."""
    return max(dataset["linf"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", required=True, help="A `make demo` output folder (victim/, synthetic/, perturbed/).")
    parser.add_argument("--config", required=True, help="Its study config ([premises] timesteps and draws).")
    parser.add_argument("--eta", nargs=3, action="append", default=[], metavar=("ETA", "ASPL_DIR", "RANDOM_DIR"),
                        help="A scaled budget and its two perturbed sets; repeat for more.")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()

    run = Path(args.run_dir)
    rules = load_config(args.config)["premises"]
    timesteps, draws, seed = rules["loss_timesteps"], rules["loss_noise_draws"], 0
    victim = premise_measures.load_model(run / "victim" / "pipeline")
    clean = load_image_dataset(str(run / "synthetic"), required_columns=("id", "image", "prompt"))

    sets = {"0.05": (run / "perturbed" / "aspl", run / "perturbed" / "random")}
    sets.update({eta: (Path(aspl), Path(random)) for eta, aspl, random in args.eta})
    report = {"what": "P4 (the victim's loss ratio perturbed / clean) at each η of the scaled-η ladder",
              "images": len(clean), "loss_timesteps": timesteps, "loss_noise_draws": draws, "seed": seed,
              "criterion": {"min_perturbation_ratio": rules["min_perturbation_ratio"],
                            "random_multiple": rules["random_multiple"]},
              "hardware": f"{platform.machine()} CPU", "etas": {}}
    for eta, (aspl_dir, random_dir) in sets.items():
        start = time.perf_counter()
        perturbed = {"aspl": load_image_dataset(str(aspl_dir), required_columns=("id", "image", "prompt")),
                     "random": load_image_dataset(str(random_dir), required_columns=("id", "image", "prompt"))}
        ratios = premise_measures.perturbation_ratios(victim, clean, perturbed, timesteps, seed, draws)
        report["etas"][eta] = {"ratios": ratios, "holds": premise_measures.perturbation_acts(
                                   ratios, rules["min_perturbation_ratio"], rules["random_multiple"]),
                               "linf": {noise: linf_of(data) for noise, data in perturbed.items()},
                               "seconds": round(time.perf_counter() - start, 1)}
        print(f"η {eta}: ASPL {ratios['aspl']:.4f}, random {ratios['random']:.5f}, "
              f"P4 {'holds' if report['etas'][eta]['holds'] else 'fails'}", flush=True)
    summary = run / "report" / "summary.json"
    if summary.is_file():  # the run's own reading at η = 0.05, for the check above
        report["run_summary_p4"] = json.loads(summary.read_text())["premises"]["P4"]["ratios"]
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
