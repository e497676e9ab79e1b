#!/usr/bin/env python
"""Acceptance figures of the embedded victim, per build seed, measured in one run.

Builds the victim with `make_tiny_victim.py`'s defaults for each `--seeds` (or reads `--victim_dirs`) and reports,
per victim (AUC convention: > 0.5 means members have the lower error / score):
- build time on this machine (target ≤ 6 min on 2 cores) and, with `--check_determinism`, whether a second
  build with the same seed has bit-identical weights;
- posterior σ / latent std: mean scaled posterior std over the scaled posterior means' std (target ≤ 0.1);
- prompt effect: ‖ε̂(z_t,t,c_a) − ε̂(z_t,t,c_b)‖ / ‖ε̂(z_t,t,c_a)‖ with c_a = "The face of zero", c_b = "The face
  of seven" (and c_b = ""), z_t from the member latents and one seeded noise, t = 100, 500, 900;
- R-precision of the victim's own samples (pipeline defaults: PNDM 25 steps, guidance 7.5), domains × the two
  paper templates × `--num_samples_per_prompt` seeds, scored by the builder's offline classifier and by an
  independent scorer (scikit-learn LogisticRegression fitted on all of `load_digits` at the builder's resize);
  chance is 1 / #domains; target ≥ 0.60 on ≥ 200 samples;
- loss attack (`make_tiny_victim.victim_membership_figures`: mean denoising MSE at t ∈ {50, 100, 200, 300}, fixed
  noise) AUC with 95% bootstrap CI for attack seeds 0/1/2 (target [0.65, 0.85]); the blind baseline;
- per-timestep loss-attack AUC at t = 0, 25, …, 500 (attack seed 0), plotted;
- SecMI and PIA run as the scripts with their defaults, and PIA / PIAN unguided at t = 200: AUC, CI, direction,
  and what they read at t = 0 (‖ε̂(z₀, 0, c)‖ of members vs non-members).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/bench_victim.py --seeds 0 1 2 \\
        --output benchmarks/results/victim.json
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attack_pia  # noqa: E402
import attack_secmi  # noqa: E402
import make_tiny_victim  # noqa: E402
from mixsyn_utils.dataset_io import load_image_dataset  # noqa: E402
from mixsyn_utils.attack_scores import loss_attack_scores  # noqa: E402
from mixsyn_utils.diffusion import NoisePredictor, predicted_noise, q_sample  # noqa: E402
from mixsyn_utils.domains import PAPER_PROMPT_TEMPLATES  # noqa: E402
from mixsyn_utils.images import image_to_tensor  # noqa: E402
from mixsyn_utils.audit_statistics import bootstrap_ci  # noqa: E402
from mixsyn_utils.metrics import roc_metrics  # noqa: E402
from mixsyn_utils.conditioning import encode_prompts  # noqa: E402
from mixsyn_utils.models import load_components, tokenize_prompts  # noqa: E402
from mixsyn_utils.utility import classifier_r_precision_hits  # noqa: E402

EFFECT_TIMESTEPS = (100, 500, 900)
CURVE_TIMESTEPS = tuple(range(0, 501, 25))


def auc_with_ci(member_scores, nonmember_scores):
    """AUC (members higher = member-like) and its 95% bootstrap CI."""
    return {"auc": roc_metrics(member_scores, nonmember_scores)["auc"],
            "auc_ci": bootstrap_ci(member_scores, nonmember_scores)["auc"]}


def weights_equal(dir_a, dir_b):
    for module, file in (("unet", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors"),
                         ("text_encoder", "model.safetensors")):
        a = load_file(str(Path(dir_a) / "pipeline" / module / file))
        b = load_file(str(Path(dir_b) / "pipeline" / module / file))
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            return False
    return True


@torch.no_grad()
def encode(components, dataset):
    pixels = torch.stack([image_to_tensor(image, 16) for image in dataset["image"]])
    posterior = components.vae.encode(pixels).latent_dist
    scale = components.vae.config.scaling_factor
    context = encode_prompts([components.text_encoder],
                             [tokenize_prompts(components.tokenizer, dataset["prompt"])]).hidden_states
    return posterior.mean * scale, posterior.std * scale, context


@torch.no_grad()
def prompt_effect(components, predictor, latents):
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(latents.shape, generator=generator)
    contexts = [encode_prompts([components.text_encoder], [tokenize_prompts(components.tokenizer, [prompt])]).hidden_states.expand(
        len(latents), -1, -1) for prompt in ("The face of zero", "The face of seven", "")]
    figures = {}
    for t in EFFECT_TIMESTEPS:
        z_t = q_sample(latents, noise, torch.full((len(latents),), t), predictor.alpha_bar)
        e_zero, e_seven, e_empty = (predicted_noise(predictor, z_t, t, context) for context in contexts)
        norm = e_zero.flatten(1).norm(dim=1)
        figures[f"t{t}"] = {"zero_vs_seven": float(((e_zero - e_seven).flatten(1).norm(dim=1) / norm).mean()),
                            "zero_vs_empty": float(((e_zero - e_empty).flatten(1).norm(dim=1) / norm).mean())}
    return figures


def independent_digit_scorer():
    """LogisticRegression on all sklearn digits at the builder's 16-px RGB path; and its 80/20 held-out accuracy."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    features = []
    for image in digits.images:
        gray = (image * (255.0 / 16.0)).round().astype(np.uint8)
        rgb = Image.fromarray(gray).resize((16, 16), Image.BICUBIC).convert("RGB")
        features.append(np.asarray(rgb, dtype=np.float64).reshape(-1) / 255.0)
    features = np.stack(features)
    train_x, test_x, train_y, test_y = train_test_split(features, digits.target, test_size=0.2, random_state=0,
                                                        stratify=digits.target)
    heldout = float((LogisticRegression(max_iter=5000).fit(train_x, train_y).predict(test_x) == test_y).mean())
    return LogisticRegression(max_iter=5000).fit(features, digits.target), heldout


def r_precision(victim_dir, domains, samples_per_prompt, grid_path):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(str(Path(victim_dir) / "pipeline"), safety_checker=None,
                                                       requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    plan = [(domain, template.format(domain), seed) for domain in domains for template, _ in PAPER_PROMPT_TEMPLATES
            for seed in range(samples_per_prompt)]
    images = []
    for start in range(0, len(plan), 100):
        chunk = plan[start : start + 100]
        images += pipeline([prompt for _, prompt, _ in chunk], num_inference_steps=25, guidance_scale=7.5,
                           generator=[torch.Generator().manual_seed(1000 + seed) for *_, seed in chunk],
                           height=16, width=16).images
    sample_domains = [domain for domain, _, _ in plan]
    hits = classifier_r_precision_hits(Path(victim_dir) / "rprecision_model", images, sample_domains)
    scorer, heldout = independent_digit_scorer()
    features = np.stack([np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1) / 255.0 for image in images])
    independent_hits = scorer.predict(features) == np.array([domains.index(domain) for domain in sample_domains])
    save_grid(images, grid_path, columns=2 * samples_per_prompt)
    return {"num_samples": len(images), "chance": 1 / len(domains), "offline_classifier": float(hits.mean()),
            "independent_logistic_regression": float(independent_hits.mean()),
            "independent_scorer_heldout_accuracy_on_real_digits": heldout}


def save_grid(images, path, columns):
    from PIL import Image

    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * 17, rows * 17), "gray")
    for index, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((index % columns) * 17, (index // columns) * 17))
    grid.resize((grid.width * 3, grid.height * 3), Image.NEAREST).save(path)


@torch.no_grad()
def per_timestep_curve(predictor, member, nonmember):
    """{t: AUC [CI]} of −L_t (fixed noise, attack seed 0) per timestep, and the two groups' mean L_t."""
    member_losses = loss_attack_scores(predictor, member[0], member[2], CURVE_TIMESTEPS, seed=0)
    nonmember_losses = loss_attack_scores(predictor, nonmember[0], nonmember[2], CURVE_TIMESTEPS, seed=0)
    return {str(t): {**auc_with_ci(-member_losses[t].numpy(), -nonmember_losses[t].numpy()),
                     "mean_loss_members": float(member_losses[t].mean()),
                     "mean_loss_nonmembers": float(nonmember_losses[t].mean())} for t in CURVE_TIMESTEPS}


def secmi_pia_directions(victim_dir, predictor, member, nonmember, work_dir):
    """SecMI and PIA as scripts (their defaults); AUC in the scores' members-lower convention, and ‖ε̂(z₀, 0)‖."""
    from datasets import load_from_disk

    common = ["--pretrained_model_name_or_path", str(Path(victim_dir) / "pipeline"),
              "--member_dataset", str(Path(victim_dir) / "members"),
              "--nonmember_dataset", str(Path(victim_dir) / "nonmembers")]
    figures = {}
    unguided = ["--attack_timesteps", "200", "--guidance_scale", "1"]
    for name, module, extra in (("secmi", attack_secmi, []), ("pia", attack_pia, []),
                                # what the inversion depends on: PIA's ε₀ = ε̂(z₀, 0) as it is, or normalised (PIAN)
                                ("pia_unguided_t200", attack_pia, unguided),
                                ("pian_unguided_t200", attack_pia, unguided + ["--method", "pian"])):
        output_dir = Path(work_dir) / name
        module.main(module.parse_args(common + extra + ["--output_dir", str(output_dir)]))
        scores = load_from_disk(str(output_dir))
        score = np.asarray(scores["score"], dtype=np.float64)
        is_member = np.asarray(scores["is_member"], dtype=bool)
        figures[name] = {**auc_with_ci(-score[is_member], -score[~is_member]),
                         "mean_score_members": float(score[is_member].mean()),
                         "mean_score_nonmembers": float(score[~is_member].mean())}
        figures[name]["direction"] = "expected" if figures[name]["auc"] > 0.5 else "inverted"
    with torch.no_grad():
        rms = [(predicted_noise(predictor, latents, 0, context).flatten(1).norm(dim=1) / latents[0].numel() ** 0.5)
               .double().numpy() for latents, _, context in (member, nonmember)]
    figures["rms_eps_hat_at_t0"] = {"members": float(rms[0].mean()), "nonmembers": float(rms[1].mean()),
                                    "auc_members_smaller": roc_metrics(-rms[0], -rms[1])["auc"]}
    return figures


def measure(victim_dir, args, output_stem):
    start = time.time()
    components = load_components(str(Path(victim_dir) / "pipeline"))
    for model in (components.unet, components.vae, components.text_encoder):
        model.eval().requires_grad_(False)
    predictor = NoisePredictor.of(components.unet, components.noise_scheduler)
    members = load_image_dataset(str(Path(victim_dir) / "members"), required_columns=("image", "prompt"))
    nonmembers = load_image_dataset(str(Path(victim_dir) / "nonmembers"), required_columns=("image", "prompt"))
    domains = json.loads((Path(victim_dir) / "domains.json").read_text())["domains"]
    member, nonmember = encode(components, members), encode(components, nonmembers)
    figures = {"posterior_std_over_latent_std": float(member[1].mean() / member[0].std()),
               "prompt_effect": prompt_effect(components, predictor, member[0])}
    figures["r_precision"] = r_precision(victim_dir, domains, args.num_samples_per_prompt,
                                         f"{output_stem}.samples.png")
    membership = make_tiny_victim.victim_membership_figures(victim_dir)
    figures["loss_attack"] = {}
    for attack_seed in (0, 1, 2):
        # Same scores as victim_membership_figures, with their CI.
        member_scores = make_tiny_victim.loss_attack_member_scores(components, members, (50, 100, 200, 300),
                                                                   attack_seed)
        nonmember_scores = make_tiny_victim.loss_attack_member_scores(components, nonmembers, (50, 100, 200, 300),
                                                                      attack_seed)
        figures["loss_attack"][f"seed{attack_seed}"] = auc_with_ci(member_scores, nonmember_scores)
        assert abs(figures["loss_attack"][f"seed{attack_seed}"]["auc"]
                   - membership[f"loss_attack_auc_seed{attack_seed}"]) < 1e-12
    figures["blind_baseline"] = {"auc": membership["blind_baseline_auc"], "auc_ci": membership["blind_baseline_auc_ci"]}
    figures["per_timestep_loss_auc"] = per_timestep_curve(predictor, member, nonmember)
    with tempfile.TemporaryDirectory(prefix="bench_victim_") as work_dir:
        figures.update(secmi_pia_directions(victim_dir, predictor, member, nonmember, work_dir))
    figures["measure_seconds"] = round(time.time() - start, 1)
    return figures


def plot_curves(per_seed, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    for seed, figures in per_seed.items():
        curve = figures["per_timestep_loss_auc"]
        timesteps = [int(t) for t in curve]
        axis.fill_between(timesteps, [curve[t]["auc_ci"][0] for t in curve], [curve[t]["auc_ci"][1] for t in curve],
                          alpha=0.15)
        axis.plot(timesteps, [curve[t]["auc"] for t in curve], marker="o", markersize=3, label=f"victim seed {seed}")
    axis.axhline(0.5, color="gray", linestyle="--", linewidth=1, label="chance")
    axis.set_ylim(0.3, 1.0)
    axis.set_xlabel("timestep t")
    axis.set_ylabel("loss-attack AUC (members lower)")
    axis.set_title("Where the membership signal lies (95% bootstrap CI)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="Build one victim per seed (defaults).")
    parser.add_argument("--victim_dirs", nargs="+", default=None,
                        help="Measure these built victims (DIR or SEED=DIR) instead of building.")
    parser.add_argument("--check_determinism", action="store_true", help="Build the first seed twice, compare.")
    parser.add_argument("--num_samples_per_prompt", type=int, default=10,
                        help="Samples per domain and template for R-precision (10 → 200 samples for 10 domains).")
    parser.add_argument("--output", default="benchmarks/results/victim.json", help="JSON path; PNGs beside it.")
    args = parser.parse_args()

    work_dir = Path(tempfile.mkdtemp(prefix="bench_victim_"))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    report = {"torch_threads": torch.get_num_threads(), "victims": {}}
    if args.victim_dirs:
        victims = dict(entry.split("=", 1) if "=" in entry else (Path(entry).name, entry) for entry in args.victim_dirs)
    else:
        victims = {}
        for seed in args.seeds:
            victims[str(seed)] = work_dir / f"victim{seed}"
            make_tiny_victim.main(make_tiny_victim.parse_args(["--output_dir", str(victims[str(seed)]),
                                                               "--seed", str(seed), "--skip_report"]))
    for seed, victim_dir in victims.items():
        info = json.loads((Path(victim_dir) / "victim_info.json").read_text())
        figures = {"build_seconds": info.get("build_seconds"), "unet_seconds": info.get("unet_seconds")}
        figures.update(measure(victim_dir, args, output.with_name(f"{output.stem}_seed{seed}")))
        report["victims"][seed] = figures
        print(json.dumps({seed: figures}, indent=1), flush=True)
    if args.check_determinism:
        seed = next(iter(victims))
        make_tiny_victim.main(make_tiny_victim.parse_args(["--output_dir", str(work_dir / "again"), "--seed", seed,
                                                           "--skip_report"]))
        report["deterministic"] = weights_equal(victims[seed], work_dir / "again")
    plot_curves(report["victims"], output.with_name(f"{output.stem}_per_timestep_auc.png"))
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
