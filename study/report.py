"""The study's report: the premises (P1–P7), the dose-response, Tables 1–5, Figure 4, extraction, and one verdict per
claim, each with its seed-paired interval.

Every number comes from the scores datasets, evaluate.py results and generations the stages wrote, and from the
premise measurements made here; `summary.json` holds each number the report prints. Verdicts use four words only
(`statistics.verdict`): supported, contradicted, no detectable difference, or not testable here (the reason named).
"""

import json
import math
from pathlib import Path

import numpy as np

from mixsyn_utils.dataset_io import load_image_dataset
from mixsyn_utils.scores import load_scores  # a scores dataset as arrays, membership score higher = member
from mixsyn_utils.utility import frechet_distance, gaussian_moments, pixel_features

from . import premises as premise_measures
from .claims import claim_results, claims_markdown, per_attack_markdown, premises_markdown
from .figures import dose_response_figure, figure4
from .formatting import fmt
from .plan import (
    ATTACK_TITLES,
    METHOD_TITLES,
    PRETRAINED,
    ModelSpec,
    cell_name,
    dose_response_method,
    dose_response_title,
    extraction_models,
    load_extractions,
    scores_dir,
    setting_of,
    table5_modules,
    top_level_epochs,
)
from .statistics import (
    ModelLeakage,
    image_bootstrap,
    leakage_values,
    paired_difference,
    study_split,
    summarize,
)

UTILITY_METRICS = ("rprecision", "fidelity")
# The range each metric lives in ("auc:sima" -> "auc"): a cell's interval is cut to it.
METRIC_BOUNDS = {"auc": (0.0, 1.0), "tpr": (0.0, 1.0), "rprecision": (0.0, 100.0), "fidelity": (0.0, math.inf)}


# ----------------------------------------------------------------------------------------------
# Reading what the stages wrote
# ----------------------------------------------------------------------------------------------

def study_rows(output_dir, attacks):
    """(ids, is_member, domains) of the images every attack of the pre-trained model scored (CLiD and SimA leave
    out their own calibration rows), sorted by id: the rows every comparison is made on."""
    loaded = [load_scores(scores_dir(output_dir, PRETRAINED, attack), "score") for attack in attacks]
    common = set(loaded[0]["ids"]).intersection(*(set(scores["ids"]) for scores in loaded[1:]))
    first = loaded[0]
    keep = np.isin(first["ids"], sorted(common))
    return first["ids"][keep], first["is_member"][keep], first["domains"][keep]


def load_leakage(output_dir, names, attacks, ids, is_member, calibration):
    """{model name: ModelLeakage} over the study's rows; a model whose scores are missing is left out."""
    leakage = {}
    for name in names:
        if not all(scores_dir(output_dir, name, attack).is_dir() for attack in attacks):
            continue
        scores = {}
        for attack in attacks:
            loaded = load_scores(scores_dir(output_dir, name, attack), "score")
            position = {image_id: i for i, image_id in enumerate(loaded["ids"])}
            scores[attack] = loaded["scores"][[position[image_id] for image_id in ids]]
        leakage[name] = ModelLeakage(scores, is_member, calibration)
    return leakage


def generations_of(output_dir, name):
    """The utility generations evaluate.py sampled for model `name` (ids shared by every model), or None."""
    path = Path(output_dir) / "eval" / name / "generations"
    return load_image_dataset(str(path), required_columns=("id", "image")) if path.is_dir() else None


def load_utility(output_dir, names, reference_moments):
    """{model name: {"hits": (G,) R-precision hits, "features": (G, 64) pixel features}} in generation-id order."""
    utility = {}
    for name in names:
        path = Path(output_dir) / "eval" / name / "results.json"
        block = json.loads(path.read_text()).get("utility") if path.is_file() else None
        generations = generations_of(output_dir, name)
        if not block or block.get("r_precision_hits") is None or generations is None:
            continue
        order = np.argsort(np.asarray(block["ids"]), kind="stable")
        position = {image_id: index for index, image_id in enumerate(generations["id"])}
        ids = np.asarray(block["ids"])[order]
        features = pixel_features(generations.select([position[image_id] for image_id in ids])["image"])
        utility[name] = {"hits": np.asarray(block["r_precision_hits"], dtype=float)[order], "features": features,
                         "reference": reference_moments}
    return utility


def utility_values(model, weights):
    """{rprecision ×100, fidelity}: the weighted R-precision and the pixel Fréchet distance of the resampled
    generations to the (fixed) real reference, per row of `weights` (B + 1, G)."""
    values = {"rprecision": 100.0 * weights @ model["hits"] / weights.sum(1)}
    values["fidelity"] = np.array([frechet_distance(gaussian_moments(model["features"], row), model["reference"])
                                   for row in weights])
    return values


def cells_of(specs, names):
    """{cell: {training seed: model name}} for the specs whose models have results; the pre-trained model alone."""
    cells = {PRETRAINED: {"pretrained": PRETRAINED}} if PRETRAINED in names else {}
    for spec in specs:
        if spec.name in names:
            cells.setdefault(spec.cell, {})[spec.seed] = spec.name
    return cells


class StudyNumbers:
    """Every model's metrics under shared image resamples, reduced per cell (`statistics.summarize`) and per
    comparison (`statistics.paired_difference`)."""

    def __init__(self, config, output_dir, specs, num_resamples, reference_images):
        self.config, self.attacks = config, config["experiment"]["attacks"]
        seed = config["experiment"].get("seed", 0)
        names = [PRETRAINED] + [spec.name for spec in specs]
        self.ids, self.is_member, domains = study_rows(output_dir, self.attacks)
        self.calibration = study_split(self.is_member, domains, seed)
        test = ~self.calibration
        leakage = load_leakage(output_dir, names, self.attacks, self.ids, self.is_member, self.calibration)
        self.directions = {name: model.directions for name, model in leakage.items()}
        self.worst_attacks = {name: model.worst_attack(self.attacks) for name, model in leakage.items()}
        self.cells = cells_of(specs, set(leakage))
        counts = [int((test & self.is_member).sum()), int((test & ~self.is_member).sum())]
        self.num_test_members, self.num_test_nonmembers = counts
        self.leakage = image_bootstrap(
            {cell: {k: leakage[name] for k, name in models.items()} for cell, models in self.cells.items()},
            lambda model, members, nonmembers: leakage_values(model, members, nonmembers, self.attacks),
            counts, num_resamples, seed)
        utility = load_utility(output_dir, names, gaussian_moments(pixel_features(reference_images)))
        utility_cells = {cell: {k: utility[name] for k, name in models.items() if name in utility}
                         for cell, models in self.cells.items()}
        utility_cells = {cell: models for cell, models in utility_cells.items() if models}
        self.num_generations = len(next(iter(utility.values()))["hits"]) if utility else 0
        self.utility = image_bootstrap(utility_cells, utility_values, [self.num_generations], num_resamples,
                                       seed + 1) if utility else {}

    def _source(self, metric):
        return self.utility if metric in UTILITY_METRICS else self.leakage

    def per_seed(self, cell, metric):
        source = self._source(metric)
        return {k: values[metric] for k, values in source[cell].items()} if cell in source else None

    def value(self, cell, metric):
        per_seed = self.per_seed(cell, metric)
        return summarize(per_seed, bounds=METRIC_BOUNDS.get(metric.split(":")[0], (-math.inf, math.inf))) if per_seed else None

    def delta(self, cell_a, cell_b, metric):
        a, b = self.per_seed(cell_a, metric), self.per_seed(cell_b, metric)
        return None if a is None or b is None else paired_difference(a, b)

    def seeds(self, cell):
        return len(self.cells.get(cell, {}))

    def direction_flips(self, cells, attack):
        """True when the calibration-chosen direction of `attack` differs between models of these cells."""
        directions = {self.directions[name][attack] for cell in cells for name in self.cells.get(cell, {}).values()}
        return len(directions) > 1

    def row(self, cell):
        row = {"cell": cell, "seeds": self.seeds(cell),
               "worst_attacks": sorted({self.worst_attacks[name] for name in self.cells.get(cell, {}).values()})}
        for attack in self.attacks:
            row[f"auc:{attack}"] = self.value(cell, f"auc:{attack}")
        for metric in ("auc:worst", "tpr:worst", *UTILITY_METRICS):
            row[metric] = self.value(cell, metric)
        return row


# ----------------------------------------------------------------------------------------------
# The premises, measured
# ----------------------------------------------------------------------------------------------

def measure_premises(config, output_dir, specs, numbers):
    """P1–P7 (`premises.py`) on this run's models: {key: {what, criterion, measured, holds, why, …}}."""
    rules, out = config["premises"], Path(output_dir)
    experiment = config["experiment"]
    input_path = (lambda key: str(out / experiment[key])) if experiment.get("build_victim") else experiment.get
    victim_dir = input_path("pretrained_model_name_or_path")
    timesteps, draws, seed = rules.get("loss_timesteps", [100, 300, 500, 700, 900]), rules.get("loss_noise_draws", 1), 0
    result = {}

    pretrained_rp = numbers.value(PRETRAINED, "rprecision")
    result["P1"] = {"what": "the pre-trained model follows its prompts", "criterion":
                    f"R-precision ≥ {rules['min_r_precision']:g}% (chance {100 / experiment.get('num_domains', 10):g}%)",
                    "measured": f"{fmt(pretrained_rp, 1)}%",
                    "holds": pretrained_rp is not None and pretrained_rp["value"] >= rules["min_r_precision"]}
    leak = numbers.value(PRETRAINED, "auc:worst")
    result["P2"] = {"what": "the pre-trained model leaks", "criterion": "worst-case AUC: lower end of its 95% interval "
                    f"> {rules['min_auc_lower_bound']:g}", "measured": fmt(leak),
                    "holds": leak is not None and leak["ci"][0] > rules["min_auc_lower_bound"]}

    victim = premise_measures.load_model(victim_dir)
    clean = load_image_dataset(str(out / "synthetic"), required_columns=("id", "image", "prompt"))
    perturbed = {noise: load_image_dataset(str(out / "perturbed" / noise), required_columns=("id", "image", "prompt"))
                 for noise in ("aspl", "random") if (out / "perturbed" / noise).is_dir()}
    ratios = premise_measures.perturbation_ratios(victim, clean, perturbed, timesteps, seed, draws)
    aspl, random = ratios.get("aspl", math.nan), ratios.get("random", math.nan)
    result["P4"] = {"what": "the perturbation acts on the victim", "criterion":
                    f"loss ratio ASPL/clean ≥ {rules['min_perturbation_ratio']:g} and its excess ≥ "
                    f"{rules['random_multiple']:g}× random noise's (same ℓ∞)",
                    "measured": f"ASPL {aspl:.3f}, random {random:.4f}", "ratios": ratios,
                    "holds": premise_measures.perturbation_acts(ratios, rules["min_perturbation_ratio"],
                                                                rules["random_multiple"])}

    # P3: per fine-tuned cell of the dose-response method, the loss on its own training images and its R-precision.
    pretrained_value = pretrained_rp["value"] if pretrained_rp else math.nan
    baseline, p3, method = {}, {}, dose_response_method(config)
    for spec in [s for s in specs if s.method == method and s.trainable_modules is None and s.epochs]:
        model_dir = out / "models" / spec.name
        if not model_dir.is_dir():
            continue
        # DreamBooth writes a whole pipeline; a LoRA method writes adapters for the pre-trained one.
        model = (premise_measures.load_model(model_dir) if method == "dreambooth"
                 else premise_measures.load_model(victim_dir, lora_weights=str(model_dir)))
        mode, ratio, pattern, noise = setting_of(config, spec.setting)
        images = premise_measures.training_images(clean, perturbed.get(noise), mode, ratio, pattern,
                                                  experiment.get("seed", 0), None)
        if spec.setting not in baseline:
            baseline[spec.setting] = premise_measures.denoising_loss_per_image(victim, images, timesteps, seed,
                                                                               draws).mean()
        loss = premise_measures.denoising_loss_per_image(model, images, timesteps, seed, draws).mean()
        entry = p3.setdefault(spec.cell, {"epochs": spec.epochs, "ratios": []})
        entry["ratios"].append(float(loss / baseline[spec.setting]))
    for cell, entry in p3.items():
        rp = numbers.value(cell, "rprecision")
        entry["own_loss_ratio"] = float(np.mean(entry.pop("ratios")))
        entry["rprecision_ratio"] = (rp["value"] / pretrained_value) if rp else math.nan
        reasons = []
        if entry["epochs"] < rules["min_epochs"]:
            reasons.append(f"{entry['epochs']:g} epochs < {rules['min_epochs']:g}")
        if entry["own_loss_ratio"] > rules["max_own_loss_ratio"]:
            reasons.append(f"own-image loss {entry['own_loss_ratio']:.3f}× the pre-trained model's > "
                           f"{rules['max_own_loss_ratio']:g}")
        if not entry["rprecision_ratio"] >= rules["min_utility_fraction"]:
            reasons.append(f"R-precision {entry['rprecision_ratio']:.3f}× the pre-trained model's < "
                           f"{rules['min_utility_fraction']:g}")
        entry["holds"], entry["why"] = not reasons, "; ".join(reasons)
    result["P3"] = {"what": "a fine-tune fits its data without damage", "criterion":
                    f"≥ {rules['min_epochs']:g} epochs, own-image loss ≤ {rules['max_own_loss_ratio']:g}× the "
                    f"pre-trained model's, R-precision ≥ {rules['min_utility_fraction']:g}× the pre-trained model's",
                    "cells": p3}

    # P5: at each level with clean and ASPL models of the same seeds, generations (same prompts and noise) of the
    # ASPL-trained model against the clean one, beside clean models of different seeds.
    p5 = {}
    seeds = experiment["training_seeds"]
    for epochs in sorted(config["dose_response"]["epochs"]):
        clean_cells = numbers.cells.get(cell_name(method, "clean", epochs), {})
        aspl_cells = numbers.cells.get(cell_name(method, "aspl", epochs), {})
        common = [k for k in seeds if k in clean_cells and k in aspl_cells]
        if len(common) < 2:
            continue
        generations = {k: (generations_of(out, clean_cells[k]), generations_of(out, aspl_cells[k])) for k in common}
        across = np.mean([premise_measures.generation_rms(generations[k][1], generations[k][0]) for k in common])
        pairs = [(a, b) for i, a in enumerate(common) for b in common[i + 1:]]
        within = np.mean([premise_measures.generation_rms(generations[a][0], generations[b][0]) for a, b in pairs])
        p5[f"{epochs:g}"] = {"perturbed_vs_clean": float(across), "seed_to_seed": float(within),
                             "holds": bool(across >= within),
                             "why": f"ASPL vs clean RMS {across:.4f} {'≥' if across >= within else '<'} clean "
                                    f"seed-to-seed {within:.4f}"}
    result["P5"] = {"what": "the perturbation is learned", "criterion": "generation RMS (same prompts and sampler "
                    "noise), ASPL-trained vs clean-trained at the same seed ≥ clean vs clean across seeds",
                    "levels": p5}

    nonmembers = load_image_dataset(input_path("nonmember_dataset"), required_columns=("image",))
    members = load_image_dataset(input_path("member_dataset"), required_columns=("image", "domain"))
    evaluate_flags = config["stages"].get("evaluate", {})
    ladder = premise_measures.damage_ladder(
        victim_dir, rules["damage_levels"], input_path("domains_file"), nonmembers, input_path("rprecision_model"),
        evaluate_flags.get("num_images_per_prompt", 4), evaluate_flags.get("num_inference_steps", 50),
        evaluate_flags.get("guidance_scale", 7.5), evaluate_flags.get("seed", 0))
    distances = [step["pixel_frechet_distance"] for step in ladder]
    result["P6"] = {"what": "the quality metric tracks known damage", "criterion": "pixel Fréchet distance strictly "
                    f"increasing over the weight-noise ladder k = {', '.join(f'{k:g}' for k in rules['damage_levels'])}",
                    "measured": ", ".join(f"k {step['k']:g}: {step['pixel_frechet_distance']:.4f} "
                                          f"(R-precision {step['r_precision']:.1f}%)" for step in ladder),
                    "ladder": ladder, "holds": premise_measures.ranks_in_order(distances)}
    extraction = config.get("extraction", {})
    calibration = premise_measures.extraction_calibration(
        members, nonmembers, extraction.get("delta", 0.1), extraction.get("k", 10), 4,
        rules["positive_control_sigma"])
    result["P7"] = {"what": "extraction is calibrated", "criterion": f"δ < the closest distinct pair of real images, "
                    f"and ≥ {rules['min_control_detected']:.0%} of members + N(0, {rules['positive_control_sigma']:g}²) "
                    "pixel noise extracted",
                    "measured": f"δ {calibration['delta']:g}, closest distinct pair "
                                f"{calibration['nearest_distinct_real_pair']:.4f}, control extracted "
                                f"{calibration['control_detected']:.0%}", **calibration,
                    "holds": bool(calibration["delta"] < calibration["nearest_distinct_real_pair"]
                                  and calibration["control_detected"] >= rules["min_control_detected"])}
    for key in ("P1", "P2", "P4", "P6", "P7"):
        result[key]["why"] = f"{result[key]['measured']} (needs {result[key]['criterion']})"
    return result


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------

def leakage_table(title, rows, numbers, extra_note=""):
    lines = [f"### {title}", "", "| Model | seeds | worst-case AUC | worst-case calibrated TPR@1%FPR | "
             "R-precision (top-1, %) | pixel Fréchet distance (lower is closer) |", "|---|---|---|---|---|---|"]
    for label, cell in rows:
        row = numbers.row(cell)
        lines.append(f"| {label} | {row['seeds']} | {fmt(row['auc:worst'])} | {fmt(row['tpr:worst'])} | "
                     f"{fmt(row['rprecision'], 1)} | {fmt(row['fidelity'], 4)} |")
    return "\n".join(lines + ([f"\n{extra_note}"] if extra_note else []))


def attack_table(rows, numbers):
    attacks = numbers.attacks
    lines = ["| Model | " + " | ".join(f"{ATTACK_TITLES[a]} AUC" for a in attacks) + " | chosen on calibration |",
             "|---|" + "---|" * (len(attacks) + 1)]
    for label, cell in rows:
        chosen = ", ".join(ATTACK_TITLES[a] for a in numbers.row(cell)["worst_attacks"])
        lines.append(f"| {label} | " + " | ".join(fmt(numbers.value(cell, f"auc:{a}")) for a in attacks)
                     + f" | {chosen} |")
    return "\n".join(lines)


def extraction_markdown(config, extractions, premise):
    extraction = config.get("extraction", {})
    lines = ["## Data extraction", "",
             f"(k = {extraction.get('k', 10)}, tiled ℓ2, δ = {extraction.get('delta', 0.1)})-eidetic memorization "
             "(Carlini et al. 2023): a member is extracted when a generation lies within δ of it and at most k "
             "training images lie within δ of it; non-members are the control (a match there is a false positive). "
             f"P7 (calibration): {premise['P7']['measured']} — {'holds' if premise['P7']['holds'] else 'FAILS'}.",
             "", "| Model | generations | extracted members | matched non-members (false positives) | precision |",
             "|---|---|---|---|---|"]
    for name, block in extractions.items():
        if not block:
            continue
        if not premise["P7"]["holds"]:
            lines.append(f"| {name} | {block['num_generations']} | not testable here (P7 fails) | – | – |")
            continue
        precision = "–" if block["precision"] is None else f"{block['precision']:.3f}"
        lines.append(f"| {name} | {block['num_generations']} | {block['true_positives']} of "
                     f"{block['num_members']} | {block['false_positives']} | {precision} |")
    return "\n".join(lines)


def write_report(config, output_dir, specs, report_dir, stage_seconds=None, workers=1, num_resamples=1000):
    """REPORT.md, dose_response.png, figure4.png and summary.json under `report_dir`; returns the summary."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    experiment, out = config["experiment"], Path(output_dir)
    nonmember_path = str(out / experiment["nonmember_dataset"]) if experiment.get("build_victim") else \
        experiment["nonmember_dataset"]
    reference = load_image_dataset(nonmember_path, required_columns=("image",))["image"]
    numbers = StudyNumbers(config, output_dir, specs, num_resamples, reference)
    premise = measure_premises(config, output_dir, specs, numbers)
    claims = claim_results(config, numbers, premise)
    top = top_level_epochs(config)
    victim_info_path = out / "victim" / "victim_info.json"
    victim = json.loads(victim_info_path.read_text()) if victim_info_path.is_file() else None

    lines = [f"# MixSyn study: {experiment['name']}", ""]
    if stage_seconds is not None:
        lines += [f"Stage run time: {stage_seconds / 60:.1f} min summed over the stages ({workers} at a time). "
                  f"{len(specs)} fine-tuned models, {len(experiment['training_seeds'])} training seeds per compared "
                  f"cell; {numbers.num_test_members} + {numbers.num_test_nonmembers} test images per attack (FPR "
                  f"resolution 1/{numbers.num_test_nonmembers}); {numbers.num_generations} generations per model for "
                  "utility (the same prompts and sampler noise for every model). Values: mean over seeds [95% interval "
                  "over seeds and images].", ""]
    lines += [premises_markdown(premise), ""]
    lines += ["## Dose-response", "", "![dose-response](dose_response.png)", ""]
    dose = dose_response_method(config)
    dose_rows = [(f"{setting} @ {epochs:g} epochs", cell_name(dose, setting, epochs))
                 for epochs in sorted(config["dose_response"]["epochs"]) for setting in config["dose_response"]["settings"]]
    title = dose_response_title(config).replace(" (Eq. 6)", ", Eq. 6")
    lines += [leakage_table(f"Dose-response ({title})", [("Pre-trained", PRETRAINED)] + dose_rows, numbers), ""]
    for table in config["tables"].values():
        rows = [("Pre-trained", PRETRAINED)]
        for method in experiment["methods"]:
            epochs = top if method == dose else None
            title = METHOD_TITLES[method] + ((f" (Eq. 6, {top:g} epochs)" if method == "dreambooth" else
                                              f" ({top:g} epochs)") if method == dose else "")
            rows.append((title, cell_name(method, table["setting"], epochs)))
        lines += [leakage_table(table["title"], rows, numbers, table.get("note", "")), "", attack_table(rows, numbers),
                  ""]
    if "table5" in config:
        rows = []
        for label, modules in config["table5"]["rows"].items():
            rows.append((label, ModelSpec("dreambooth", config["table5"]["setting"], 0, top,
                                          table5_modules(modules)).cell))
            if list(modules) == ["vae_encoder"]:
                # Both encoders: its own (the row above) and the public VAE, through which the attacked model
                # is exactly the pre-trained one (sampling never runs the encoder; UNet and text encoder untouched).
                rows.append((f"{label}, attacked through the public VAE", PRETRAINED))
        lines += [leakage_table(config["table5"]["title"], rows, numbers, config["table5"].get("note", "")),
                  "", attack_table(rows, numbers), "", f"Seeds per row: {len(config['table5']['training_seeds'])}.", ""]
    if "figure4" in config:
        lines += ["## Figure 4", "", "![Figure 4](figure4.png)", ""]
    lines += [claims_markdown(claims), "", per_attack_markdown(claims, numbers.attacks), ""]
    extractions = load_extractions(output_dir, extraction_models(config)) if "extraction" in config else {}
    if extractions:
        lines += [extraction_markdown(config, extractions, premise), ""]

    dose_response_figure(config, numbers, report_dir / "dose_response.png")
    if "figure4" in config:
        figure4(config, numbers, report_dir / "figure4.png")
    (report_dir / "REPORT.md").write_text("\n".join(lines) + "\n")
    summary = {"premises": premise, "claims": claims,
               "cells": {cell: numbers.row(cell) | {"models": models} for cell, models in numbers.cells.items()},
               "attacks": numbers.attacks, "num_test_members": numbers.num_test_members,
               "num_test_nonmembers": numbers.num_test_nonmembers, "num_generations": numbers.num_generations,
               "extraction": extractions, "victim": victim, "stage_seconds": stage_seconds, "workers": workers,
               "attack_flags": {attack: config["stages"].get(attack, {}) for attack in numbers.attacks}}
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_value) + "\n")
    return summary


def _json_value(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"not JSON: {type(value).__name__}")
