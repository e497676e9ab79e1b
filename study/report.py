"""The study's report: the default strength, Tables 1–5, the dose-response figure, Figure 4, extraction, and one
verdict per claim of the paper, each with its paired CI over training seeds and images.

Every number comes from the scores datasets and evaluate.py results the stages wrote; `summary.json` holds each
number the report prints. Verdicts use four words only (`statistics.verdict`): supported, contradicted, no
detectable difference, or not testable here (with the failed premise named). MixSyn's claims are judged against
clean fine-tuning of the same method, Shake-to-Leak's against the pre-trained model.
"""

import json
import math
from pathlib import Path

import numpy as np

from mixsyn_utils.scores import load_scores  # a scores dataset as arrays, membership score higher = member

from .claims import claim_results, claims_markdown, per_attack_markdown, premises
from .figures import dose_response_figure, figure4
from .formatting import fmt
from .plan import (
    ATTACK_TITLES,
    METHOD_TITLES,
    PRETRAINED,
    ModelSpec,
    extraction_models,
    scores_dir,
    table5_modules,
    table_cell,
)
from .statistics import (
    ModelLeakage,
    difference,
    leakage_values,
    study_split,
    summarize,
    two_level_bootstrap,
)



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


def load_utility(output_dir, names):
    """{model name: {"hits": (G,) R-precision hits, "brisque": (G,) scores (NaN undefined)}} in generation order."""
    utility = {}
    for name in names:
        path = Path(output_dir) / "eval" / name / "results.json"
        block = json.loads(path.read_text()).get("utility") if path.is_file() else None
        if not block or block.get("r_precision_hits") is None:
            continue
        brisque = [math.nan if value is None else value for value in block.get("brisque_scores") or []]
        utility[name] = {"hits": np.asarray(block["r_precision_hits"], dtype=float),
                         "brisque": np.asarray(brisque or [math.nan] * len(block["r_precision_hits"]), dtype=float),
                         "ids": block.get("ids")}
    return utility


def utility_values(model, weights):
    """{rprecision ×100, brisque}: weighted means over the generations (BRISQUE over the images it is defined on)."""
    hits, brisque = model["hits"], model["brisque"]
    defined = np.isfinite(brisque)
    values = {"rprecision": 100.0 * weights @ hits / weights.sum(1)}
    with np.errstate(invalid="ignore", divide="ignore"):
        values["brisque"] = (weights * defined) @ np.where(defined, brisque, 0.0) / (weights @ defined)
    return values


def cells_of(specs, names):
    """{cell: [model names, one per seed]} for the specs whose models have results; the pre-trained model alone."""
    cells = {PRETRAINED: [PRETRAINED]} if PRETRAINED in names else {}
    for spec in specs:
        if spec.name in names:
            cells.setdefault(spec.cell, []).append(spec.name)
    return cells


# ----------------------------------------------------------------------------------------------
# The default strength, chosen from utility alone
# ----------------------------------------------------------------------------------------------

def default_strength_rule(config):
    fraction = config["strength"]["utility_fraction"]
    return (f"the largest strength at which clean DreamBooth's R-precision (mean over its training seeds) is at "
            f"least {fraction:.0%} of the pre-trained model's; if none is, the smallest strength. Fixed before any "
            "leakage number was computed, and computed from utility alone.")


def choose_default_strength(config, output_dir, specs, num_resamples=1000):
    """The strength level of Tables 1–5 by `default_strength_rule`, with the R-precision of every level."""
    names = [PRETRAINED] + [spec.name for spec in specs]
    utility = load_utility(output_dir, names)
    clean = [spec for spec in specs if spec.method == "dreambooth" and spec.setting == "clean" and spec.strength]
    cells = cells_of(clean, set(utility))
    counts = [len(next(iter(utility.values()))["hits"])]
    samples = two_level_bootstrap({cell: [utility[n] for n in models] for cell, models in cells.items()},
                                  utility_values, counts, num_resamples, config["experiment"].get("seed", 0))
    pretrained = summarize(samples[PRETRAINED]["rprecision"])
    fraction = config["strength"]["utility_fraction"]
    levels, chosen = [], None
    for level in config["strength"]["levels"]:
        cell = f"dreambooth-clean-{level['name']}"
        value = summarize(samples[cell]["rprecision"]) if cell in samples else None
        levels.append({"level": level["name"], **{k: v for k, v in level.items() if k != "name"},
                       "r_precision": value})
        if value is not None and value["value"] >= fraction * pretrained["value"]:
            chosen = level["name"]
    chosen = chosen or config["strength"]["levels"][0]["name"]
    return {"level": chosen, "rule": default_strength_rule(config), "pretrained_r_precision": pretrained,
            "levels": levels}


# ----------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------

def cell_title(cell, default_strength):
    method = cell.split("-")[0]
    title = METHOD_TITLES.get(method, method)
    return title.replace("DreamBooth", "DreamBooth (Eq. 6)") if method == "dreambooth" else title


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------

class StudyNumbers:
    """Every bootstrap of the study: leakage (per attack and worst case) and utility of every cell."""

    def __init__(self, config, output_dir, specs, num_resamples):
        self.config, self.attacks = config, config["experiment"]["attacks"]
        seed = config["experiment"].get("seed", 0)
        names = [PRETRAINED] + [spec.name for spec in specs]
        self.ids, self.is_member, domains = study_rows(output_dir, self.attacks)
        self.calibration = study_split(self.is_member, domains, seed)
        test = ~self.calibration
        leakage = load_leakage(output_dir, names, self.attacks, self.ids, self.is_member, self.calibration)
        self.directions = {name: model.directions for name, model in leakage.items()}
        self.cells = cells_of(specs, set(leakage))
        counts = [int((test & self.is_member).sum()), int((test & ~self.is_member).sum())]
        self.num_test_members, self.num_test_nonmembers = counts
        self.leakage = two_level_bootstrap(
            {cell: [leakage[name] for name in models] for cell, models in self.cells.items()},
            lambda model, members, nonmembers: leakage_values(model, members, nonmembers, self.attacks),
            counts, num_resamples, seed)
        utility = load_utility(output_dir, names)
        utility_cells = {cell: [utility[n] for n in models if n in utility] for cell, models in self.cells.items()}
        utility_cells = {cell: models for cell, models in utility_cells.items() if models}
        self.num_generations = len(next(iter(utility.values()))["hits"]) if utility else 0
        self.utility = two_level_bootstrap(utility_cells, utility_values, [self.num_generations], num_resamples,
                                           seed + 1) if utility else {}

    def value(self, cell, metric):
        source = self.utility if metric in ("rprecision", "brisque") else self.leakage
        return summarize(source[cell][metric]) if cell in source else None

    def delta(self, cell_a, cell_b, metric):
        source = self.utility if metric in ("rprecision", "brisque") else self.leakage
        if cell_a not in source or cell_b not in source:
            return None
        return difference(source[cell_a][metric], source[cell_b][metric])

    def seeds(self, cell):
        return len(self.cells.get(cell, []))

    def direction_flips(self, cells, attack):
        """True when the calibration-chosen direction of `attack` differs between models of these cells."""
        directions = {self.directions[name][attack] for cell in cells for name in self.cells.get(cell, [])}
        return len(directions) > 1

    def row(self, cell):
        row = {"cell": cell, "seeds": self.seeds(cell)}
        for attack in self.attacks:
            row[f"auc:{attack}"] = self.value(cell, f"auc:{attack}")
        for metric in ("auc:worst", "tpr:worst", "rprecision", "brisque"):
            row[metric] = self.value(cell, metric)
        return row


def leakage_table(title, rows, numbers, extra_note=""):
    lines = [f"### {title}", "", "| Model | seeds | worst-case AUC | worst-case calibrated TPR@1%FPR | "
             "R-precision (top-1, %) | BRISQUE (lower is better) |", "|---|---|---|---|---|---|"]
    for label, cell in rows:
        row = numbers.row(cell)
        lines.append(f"| {label} | {row['seeds']} | {fmt(row['auc:worst'])} | {fmt(row['tpr:worst'])} | "
                     f"{fmt(row['rprecision'], 1)} | {fmt(row['brisque'], 1)} |")
    return "\n".join(lines + ([f"\n{extra_note}"] if extra_note else []))


def attack_table(rows, numbers):
    attacks = numbers.attacks
    lines = ["| Model | " + " | ".join(f"{ATTACK_TITLES[a]} AUC" for a in attacks) + " |",
             "|---|" + "---|" * len(attacks)]
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(fmt(numbers.value(cell, f"auc:{a}")) for a in attacks) + " |")
    return "\n".join(lines)


def extraction_markdown(config, extractions):
    extraction = config.get("extraction", {})
    lines = ["## Data extraction", "",
             f"(k = {extraction.get('k', 10)}, tiled ℓ2, δ = {extraction.get('delta', 0.1)})-eidetic memorization "
             "(Carlini et al. 2023): a member is extracted when a generation lies within δ of it and at most k "
             "training images lie within δ of it; non-members are the control (a match there is a false positive).",
             "", "| Model | generations | extracted members | matched non-members (false positives) | precision |",
             "|---|---|---|---|---|"]
    for name, block in extractions.items():
        if block:
            precision = "–" if block["precision"] is None else f"{block['precision']:.3f}"
            lines.append(f"| {name} | {block['num_generations']} | {block['true_positives']} of "
                         f"{block['num_members']} | {block['false_positives']} | {precision} |")
    return "\n".join(lines)


def write_report(config, output_dir, specs, strength, report_dir, stage_seconds=None, workers=1, num_resamples=1000):
    """REPORT.md, dose_response.png, figure4.png and summary.json under `report_dir`; returns the summary."""
    from .plan import load_extractions

    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    numbers = StudyNumbers(config, output_dir, specs, num_resamples)
    default = strength["level"]
    premise = premises(config, numbers)
    claims = claim_results(config, numbers, premise, default)
    methods = config["experiment"]["methods"]
    victim_info_path = Path(output_dir) / "victim" / "victim_info.json"
    victim = json.loads(victim_info_path.read_text()) if victim_info_path.is_file() else None

    lines = [f"# MixSyn study: {config['experiment']['name']}", ""]
    if stage_seconds is not None:
        lines += [f"Stage run time: {stage_seconds / 60:.1f} min summed over the stages ({workers} at a time). "
                  f"{len(specs)} fine-tuned models, "
                  f"{len(config['experiment']['training_seeds'])} training seeds per compared cell; "
                  f"{numbers.num_test_members} + {numbers.num_test_nonmembers} test images per attack "
                  f"(FPR resolution 1/{numbers.num_test_nonmembers}); {numbers.num_generations} generations per "
                  "model for utility. Values: mean over seeds [95% CI over seeds and images].", ""]
    lines += ["## Premises", "",
              f"- Conditioning: the pre-trained model's R-precision is {fmt(premise['conditioning']['r_precision'], 1)}% "
              f"(chance {premise['conditioning']['chance']:.0f}%, required ≥ {premise['conditioning']['required']:.0f}%): "
              f"{'holds' if premise['conditioning']['holds'] else 'FAILS'}.",
              f"- Membership signal: the pre-trained model's worst-case AUC is "
              f"{fmt(premise['membership_signal']['worst_case_auc'])}: "
              f"{'holds' if premise['membership_signal']['holds'] else 'FAILS'} (its CI must exclude 0.5).", ""]
    lines += ["## Fine-tuning strength", "", f"Rule for the default strength of the tables: {strength['rule']}", "",
              "| level | updates | learning rate | clean DreamBooth R-precision (%) |", "|---|---|---|---|"]
    for level in strength["levels"]:
        lines.append(f"| {level['level']} | {level.get('max_train_steps')} | {level.get('learning_rate')} | "
                     f"{fmt(level['r_precision'], 1)} |")
    lines += ["", f"Pre-trained: {fmt(strength['pretrained_r_precision'], 1)}%. **Chosen: {default}.**", "",
              "![dose-response](dose_response.png)", ""]
    dose_rows = [(f"{setting} @ {level['name']}", f"dreambooth-{setting}-{level['name']}")
                 for level in config["strength"]["levels"] for setting in config["strength"]["settings"]]
    lines += [leakage_table("Dose-response (DreamBooth, Eq. 6)", [("Pre-trained", PRETRAINED)] + dose_rows, numbers),
              ""]
    for table in config["tables"].values():
        rows = [("Pre-trained", PRETRAINED)] + [(cell_title(m, default), table_cell(config, m, table["setting"], default))
                                                for m in methods]
        lines += [leakage_table(table["title"], rows, numbers, table.get("note", "")), "", attack_table(rows, numbers),
                  ""]
    if "table5" in config:
        seed_list = config["table5"]["training_seeds"]
        rows = []
        for label, modules in config["table5"]["rows"].items():
            rows.append((label, ModelSpec("dreambooth", config["table5"]["setting"], "", 0.0, "", 0, strength=default,
                                          trainable_modules=table5_modules(modules)).cell))
            if list(modules) == ["vae_encoder"]:
                # Both encoders: its own (the row above) and the public VAE, through which the attacked model
                # is exactly the pre-trained one (sampling never runs the encoder; UNet and text encoder untouched).
                rows.append((f"{label}, attacked through the public VAE", PRETRAINED))
        lines += [leakage_table(config["table5"]["title"], rows, numbers, config["table5"].get("note", "")),
                  "", attack_table(rows, numbers), "", f"Seeds per row: {len(seed_list)}.", ""]
    if "figure4" in config:
        lines += ["## Figure 4", "", "![Figure 4](figure4.png)", "",
                  f"Seeds per point: {len(config['experiment']['training_seeds'])} at the dose-response settings, "
                  f"{len(config['figure4']['training_seeds'])} at the other ratios.", ""]
    lines += [claims_markdown(claims), "", per_attack_markdown(claims, numbers.attacks), ""]
    extractions = load_extractions(output_dir, extraction_models(config, default)) if "extraction" in config else {}
    if extractions:
        lines += [extraction_markdown(config, extractions), ""]

    dose_response_figure(config, numbers, report_dir / "dose_response.png")
    if "figure4" in config:
        figure4(config, numbers, default, report_dir / "figure4.png")
    (report_dir / "REPORT.md").write_text("\n".join(lines) + "\n")
    summary = {"default_strength": strength, "premises": premise, "claims": claims,
               "cells": {cell: numbers.row(cell) | {"models": models} for cell, models in numbers.cells.items()},
               "attacks": numbers.attacks, "num_test_members": numbers.num_test_members,
               "num_test_nonmembers": numbers.num_test_nonmembers, "num_generations": numbers.num_generations,
               "extraction": extractions, "victim": victim, "stage_seconds": stage_seconds, "workers": workers,
               "attack_flags": {attack: config["stages"].get(attack, {}) for attack in numbers.attacks}}
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return summary
