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

import evaluate  # load_scores: a scores dataset as arrays, membership score higher = member

from .plan import (
    ATTACK_TITLES,
    METHOD_TITLES,
    PRETRAINED,
    ModelSpec,
    extraction_models,
    scores_dir,
    table5_modules,
    figure4_points,
)
from .statistics import (
    ModelLeakage,
    difference,
    leakage_values,
    study_split,
    summarize,
    two_level_bootstrap,
    verdict,
)

# Premise of the utility claims and of Shake-to-Leak: the pre-trained model's own samples are recognisably of
# their domain, i.e. its R-precision is at least this multiple of chance (1 / number of domains).
CONDITIONING_MULTIPLE = 2.0


# ----------------------------------------------------------------------------------------------
# Reading what the stages wrote
# ----------------------------------------------------------------------------------------------

def study_rows(output_dir, attacks):
    """(ids, is_member, domains) of the images every attack of the pre-trained model scored (CLiD and SimA leave
    out their own calibration rows), sorted by id: the rows every comparison is made on."""
    loaded = [evaluate.load_scores(scores_dir(output_dir, PRETRAINED, attack), "score") for attack in attacks]
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
            loaded = evaluate.load_scores(scores_dir(output_dir, name, attack), "score")
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

def fmt(summary, digits=3, key="value"):
    if summary is None or summary.get(key) is None or not np.isfinite(summary[key]):
        return "–"
    low, high = summary["ci"]
    return f"{summary[key]:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def fmt_delta(comparison, digits=3):
    return "–" if comparison is None else fmt(comparison, digits, key="delta")


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


def table_cell(config, method, setting, default_strength):
    return f"{method}-{setting}" + (f"-{default_strength}" if method == "dreambooth" else "")


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


def premises(config, numbers):
    """The premises the claims rest on, measured: conditioning (R-precision), membership signal (worst-case AUC)."""
    num_domains = config["experiment"].get("num_domains", 10)
    chance = 100.0 / num_domains
    rprecision = numbers.value(PRETRAINED, "rprecision")
    conditioning_ok = rprecision is not None and rprecision["value"] >= CONDITIONING_MULTIPLE * chance
    leak = numbers.value(PRETRAINED, "auc:worst")
    signal_ok = leak is not None and leak["ci"][0] > 0.5
    return {
        "conditioning": {"r_precision": rprecision, "chance": chance, "required": CONDITIONING_MULTIPLE * chance,
                         "holds": bool(conditioning_ok)},
        "membership_signal": {"worst_case_auc": leak, "holds": bool(signal_ok)},
    }


CLAIMS = [
    # (key, title, setting A, setting B (None: pre-trained), metric, claimed sign of A − B, premise keys)
    ("shake_to_leak", "Clean self-synthesized fine-tuning raises leakage (Shake-to-Leak)", "clean", None,
     "leakage", +1, ("conditioning",)),
    ("perturbed_lowers", "Fully perturbed fine-tuning lowers leakage, against clean fine-tuning", "perturbed",
     "clean", "leakage", -1, ("membership_signal",)),
    ("mixup_i_lowers", "Mixup-I 0.5 lowers leakage, against clean fine-tuning", "image-0.5", "clean", "leakage",
     -1, ("membership_signal",)),
    ("mixup_p_block_lowers", "Mixup-P 0.3 (a contiguous block: Figure 3's reading) lowers leakage, against clean",
     "pixel-0.3-block", "clean", "leakage", -1, ("membership_signal",)),
    ("mixup_p_random_lowers", "Mixup-P 0.3 (scattered pixels: the text's reading) lowers leakage, against clean",
     "pixel-0.3-random", "clean", "leakage", -1, ("membership_signal",)),
    ("perturbed_costs_quality", "Fully perturbed fine-tuning costs quality (R-precision), against clean",
     "perturbed", "clean", "rprecision", -1, ("conditioning",)),
    ("mixup_i_keeps_quality", "Mixup-I 0.5 keeps more quality than full perturbation (R-precision)", "image-0.5",
     "perturbed", "rprecision", +1, ("conditioning",)),
    ("mixup_p_keeps_quality", "Mixup-P 0.3 (block) keeps more quality than full perturbation (R-precision)",
     "pixel-0.3-block", "perturbed", "rprecision", +1, ("conditioning",)),
]


def claim_results(config, numbers, premise, default_strength):
    """One verdict per (claim, method): paired Δ of the worst case (AUC and calibrated TPR) or of R-precision."""
    failed = {"conditioning": (f"the pre-trained model's R-precision {fmt(premise['conditioning']['r_precision'], 1)} "
                               f"is below {premise['conditioning']['required']:.0f}%: its samples are not of their "
                               "domain"),
              "membership_signal": (f"the pre-trained model's worst-case AUC {fmt(premise['membership_signal']['worst_case_auc'])} "
                                    "does not exclude 0.5: there is no leakage to lower")}
    results = []
    # DreamBooth's claims at the default strength first (the tables' verdict), then at every other strength of
    # the dose-response (where fine-tuning moves the model more, the claims get their strongest test).
    levels = [default_strength] + [level["name"] for level in config["strength"]["levels"]
                                   if level["name"] != default_strength]
    for key, title, setting_a, setting_b, metric, sign, premise_keys in CLAIMS:
        for method, strength in [(m, level) for m in config["experiment"]["methods"]
                                 for level in (levels if m == "dreambooth" else [None])]:
            cell_a = table_cell(config, method, setting_a, strength)
            cell_b = PRETRAINED if setting_b is None else table_cell(config, method, setting_b, strength)
            if cell_a not in numbers.cells or cell_b not in numbers.cells:
                continue
            failure = next((failed[p] for p in premise_keys if not premise[p]["holds"]), None)
            entry = {"claim": key, "title": title, "method": method, "a": cell_a, "b": cell_b,
                     "strength": strength, "default_strength": strength in (None, default_strength),
                     "seeds_a": numbers.seeds(cell_a), "seeds_b": numbers.seeds(cell_b)}
            if metric == "leakage":
                entry["delta_auc"] = numbers.delta(cell_a, cell_b, "auc:worst")
                entry["delta_tpr"] = numbers.delta(cell_a, cell_b, "tpr:worst")
                entry["verdict"] = verdict(entry["delta_auc"]["ci"], sign, failure)
                entry["verdict_tpr"] = verdict(entry["delta_tpr"]["ci"], sign, failure)
                entry["per_attack"] = {}
                for attack in numbers.attacks:
                    comparison = numbers.delta(cell_a, cell_b, f"auc:{attack}")
                    flips = numbers.direction_flips([cell_a, cell_b], attack)
                    comparison["verdict"] = verdict(comparison["ci"], sign, failure or (
                        "the attack's direction flips between these models" if flips else None))
                    entry["per_attack"][attack] = comparison
            else:
                entry["delta_rprecision"] = numbers.delta(cell_a, cell_b, "rprecision")
                entry["verdict"] = verdict(entry["delta_rprecision"]["ci"], sign, failure)
            results.append(entry)
    return results


def claims_markdown(claims):
    lines = ["## The paper's claims, one verdict each", "",
             "Δ = A − B, paired on the same images, 95% CI over training seeds and images (two-level bootstrap). "
             "Leakage = the worst case over the attacks run (`statistics.py`: direction and threshold fixed on a "
             "calibration half, measured on the other half). The verdict is read from ΔAUC; Δ(calibrated "
             "TPR@1%FPR) has its own verdict beside it. Words: supported, contradicted, no detectable difference "
             "(the CI includes 0), not testable here (premise named). The first row of each method is the tables' "
             "(default) strength; DreamBooth's other rows are the same claim at the dose-response's other "
             "strengths.", ""]
    current = None
    for entry in claims:
        if entry["claim"] != current:
            current = entry["claim"]
            lines += ["", f"**{entry['title']}**", ""]
            if "delta_auc" in entry:
                lines += ["| Method | A vs B (seeds) | ΔAUC (worst case) | verdict | ΔTPR@1%FPR (worst case) | verdict |",
                          "|---|---|---|---|---|---|"]
            else:
                lines += ["| Method | A vs B (seeds) | ΔR-precision (points) | verdict |", "|---|---|---|---|"]
        pair = f"{entry['a']} ({entry['seeds_a']}) vs {entry['b']} ({entry['seeds_b']})"
        method = METHOD_TITLES[entry["method"]] + ("" if entry["default_strength"] else
                                                    f", strength {entry['strength']} (dose-response)")
        if "delta_auc" in entry:
            lines.append(f"| {method} | {pair} | {fmt_delta(entry['delta_auc'])} | "
                         f"{entry['verdict']} | {fmt_delta(entry['delta_tpr'])} | {entry['verdict_tpr']} |")
        else:
            lines.append(f"| {method} | {pair} | {fmt_delta(entry['delta_rprecision'], 1)} | "
                         f"{entry['verdict']} |")
    return "\n".join(lines)


def per_attack_markdown(claims, attacks):
    lines = ["### The leakage claims attack by attack (ΔAUC [95% CI] and its verdict)", "",
             "| Claim | Method | " + " | ".join(ATTACK_TITLES[a] for a in attacks) + " |",
             "|---|---|" + "---|" * len(attacks)]
    for entry in claims:
        if "per_attack" not in entry:
            continue
        if not entry["default_strength"]:
            continue
        cells = [f"{fmt_delta(entry['per_attack'][a])} {entry['per_attack'][a]['verdict']}" for a in attacks]
        lines.append(f"| {entry['claim']} | {METHOD_TITLES[entry['method']]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Figures: every point with its CI over seeds and images; chance and the pre-trained model drawn
# ----------------------------------------------------------------------------------------------

def _errorbar(axis, xs, summaries, label, offset=0.0):
    points = [(x, s) for x, s in zip(xs, summaries) if s is not None and np.isfinite(s["value"])]
    if not points:
        return
    x = np.array([p[0] for p in points]) + offset
    value = np.array([p[1]["value"] for p in points])
    low = value - np.array([p[1]["ci"][0] for p in points])
    high = np.array([p[1]["ci"][1] for p in points]) - value
    axis.errorbar(x, value, yerr=[low, high], marker="o", capsize=3, label=label)


def _reference_lines(axis, pretrained, chance, chance_label="chance"):
    if chance is not None:
        axis.axhline(chance, color="gray", linestyle="--", linewidth=1, label=chance_label)
    if pretrained is not None:
        axis.axhline(pretrained["value"], color="black", linewidth=1, label="pre-trained")
        axis.axhspan(pretrained["ci"][0], pretrained["ci"][1], color="black", alpha=0.08)


PANELS = [("auc:worst", "worst-case AUC", (0.3, 1.0), 0.5),
          ("tpr:worst", "worst-case calibrated TPR@1%FPR", (0.0, 1.0), 0.01),
          ("rprecision", "R-precision (top-1, %)", (0.0, 100.0), None)]


def dose_response_figure(config, numbers, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = config["strength"]["levels"]
    settings = config["strength"]["settings"]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    chance_rprecision = 100.0 / config["experiment"].get("num_domains", 10)
    for axis, (metric, title, limits, chance) in zip(axes, PANELS):
        for index, setting in enumerate(settings):
            summaries = [numbers.value(f"dreambooth-{setting}-{level['name']}", metric) for level in levels]
            _errorbar(axis, range(len(levels)), summaries, setting, offset=0.06 * (index - len(settings) / 2))
        _reference_lines(axis, numbers.value(PRETRAINED, metric), chance if metric != "rprecision"
                         else chance_rprecision, "chance" if metric != "tpr:worst" else "FPR (no signal)")
        axis.set_xticks(range(len(levels)), [f"{l['name']}\n{l['max_train_steps']} × {l['learning_rate']:g}"
                                             for l in levels], fontsize=8)
        axis.set(title=title, ylim=limits, xlabel="fine-tuning strength (updates × learning rate)")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left")
    seeds = len(config["experiment"]["training_seeds"])
    figure.suptitle(f"Dose-response: DreamBooth (Eq. 6) fine-tuned on each training set; points: mean of {seeds} "
                    "seeds, bars: 95% CI over seeds and images")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def figure4(config, numbers, default_strength, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = figure4_points(config)
    curves = list(dict.fromkeys(label for label, *_ in points))
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    chance_rprecision = 100.0 / config["experiment"].get("num_domains", 10)
    for axis, (metric, title, limits, chance) in zip(axes, PANELS):
        for index, curve in enumerate(curves):
            xs = [ratio for label, ratio, *_ in points if label == curve]
            summaries = [numbers.value(f"dreambooth-{setting}-{default_strength}", metric)
                         for label, _, setting, *_ in points if label == curve]
            _errorbar(axis, xs, summaries, curve, offset=0.008 * (index - len(curves) / 2))
        _reference_lines(axis, numbers.value(PRETRAINED, metric), chance if metric != "rprecision"
                         else chance_rprecision)
        axis.set(title=title, ylim=limits, xlabel="mixup ratio (fraction perturbed)")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left")
    figure.suptitle(f"Figure 4: DreamBooth (Eq. 6) at strength {default_strength} against the mixup ratio; bars: "
                    "95% CI over seeds and images (seeds per point in REPORT.md)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


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
