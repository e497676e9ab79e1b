"""The study's claims: the premises they rest on, one verdict per (claim, method, strength) with its paired CI
over training seeds and images, and their markdown."""

from .formatting import fmt, fmt_delta
from .plan import ATTACK_TITLES, METHOD_TITLES, PRETRAINED, table_cell
from .statistics import verdict

# Premise of the utility claims and of Shake-to-Leak: the pre-trained model's own samples are recognisably of
# their domain, i.e. its R-precision is at least this multiple of chance (1 / number of domains).
CONDITIONING_MULTIPLE = 2.0


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
