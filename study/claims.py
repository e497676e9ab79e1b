"""The study's claims: one verdict per (claim, fine-tuning level) with its seed-paired interval, gated by the premises
the claim rests on (`premises.py`), and their markdown.

A claim compares cell A with cell B (B: the pre-trained model for Shake-to-Leak) at the same level: Δ = A − B,
paired by training seed and image resample (`statistics.paired_difference`). Leakage claims are read from the
worst-case AUC (the attack chosen on the calibration half), with Δ(calibrated TPR@1%FPR) beside; quality claims from
the pixel Fréchet distance to real images, with ΔR-precision beside. When a premise fails, the verdict is "not testable
here" naming the premise and its measured value, and no other word is printed for it.
"""

from .formatting import fmt_delta
from .plan import ATTACK_TITLES, PRETRAINED, cell_name, dose_response_method, top_level_epochs
from .statistics import EQUIVALENCE_MARGINS, verdict

# (key, title, setting A, setting B (None: the pre-trained model), metric, claimed sign of A − B, premises)
CLAIMS = [
    ("shake_to_leak", "Clean self-synthesized fine-tuning raises leakage, against the pre-trained model "
     "(Shake-to-Leak)", "clean", None, "leakage", +1, ("P1", "P2", "P3")),
    ("aspl_lowers", "Fully perturbed (ASPL) fine-tuning lowers leakage, against clean fine-tuning", "aspl", "clean",
     "leakage", -1, ("P2", "P3", "P4", "P5")),
    ("aspl_beats_random", "ASPL lowers leakage more than random noise of the same ℓ∞ budget", "aspl", "random",
     "leakage", -1, ("P2", "P3", "P4", "P5")),
    ("random_lowers", "Random noise of the same budget lowers leakage, against clean fine-tuning (the control)",
     "random", "clean", "leakage", -1, ("P2", "P3")),
    ("mixup_i_lowers", "Mixup-I 0.5 (ASPL) lowers leakage, against clean fine-tuning", "aspl-image-0.5", "clean",
     "leakage", -1, ("P2", "P3", "P4", "P5")),
    ("mixup_i_beats_random", "Mixup-I 0.5 lowers leakage more with ASPL than with random noise", "aspl-image-0.5",
     "random-image-0.5", "leakage", -1, ("P2", "P3", "P4", "P5")),
    ("mixup_p_lowers", "Mixup-P 0.3 (a contiguous block, ASPL) lowers leakage, against clean fine-tuning",
     "aspl-pixel-0.3-block", "clean", "leakage", -1, ("P2", "P3", "P4", "P5")),
    ("aspl_costs_quality", "Fully perturbed fine-tuning costs quality (a larger Fréchet distance), against clean",
     "aspl", "clean", "fidelity", +1, ("P1", "P3", "P4", "P5", "P6")),
    ("mixup_i_keeps_quality", "Mixup-I 0.5 keeps more quality than full perturbation", "aspl-image-0.5", "aspl",
     "fidelity", -1, ("P1", "P3", "P4", "P5", "P6")),
    ("mixup_p_keeps_quality", "Mixup-P 0.3 (block) keeps more quality than full perturbation",
     "aspl-pixel-0.3-block", "aspl", "fidelity", -1, ("P1", "P3", "P4", "P5", "P6")),
]


def premise_failure(premise, keys, cells, epochs):
    """The first failed premise among `keys` for a comparison of `cells` at `epochs`, as the words the verdict prints,
    or None. P3 is checked for each compared fine-tuned cell, P5 at the level compared."""
    for key in keys:
        if key == "P3":
            for cell in cells:
                entry = premise["P3"]["cells"].get(cell)
                if entry is not None and not entry["holds"]:
                    return f"P3 fails for {cell}: {entry['why']}"
        elif key == "P5":
            entry = premise["P5"]["levels"].get(f"{epochs:g}")
            if entry is None:
                return f"P5 not measured at {epochs:g} epochs (no clean and perturbed models of several seeds there)"
            if not entry["holds"]:
                return f"P5 fails at {epochs:g} epochs: {entry['why']}"
        elif not premise[key]["holds"]:
            return f"{key} fails: {premise[key]['why']}"
    return None


def claim_results(config, numbers, premise):
    """One entry per (claim, level) that has both cells: Δ with its interval, the verdict, the per-attack Δs."""
    epochs_levels = sorted(config["dose_response"]["epochs"], reverse=True)
    top, method = top_level_epochs(config), dose_response_method(config)
    results = []
    for key, title, setting_a, setting_b, metric, sign, premise_keys in CLAIMS:
        for epochs in epochs_levels:
            cell_a = cell_name(method, setting_a, epochs)
            cell_b = PRETRAINED if setting_b is None else cell_name(method, setting_b, epochs)
            if cell_a not in numbers.cells or cell_b not in numbers.cells:
                continue
            fine_tuned = [cell for cell in (cell_a, cell_b) if cell != PRETRAINED]
            failure = premise_failure(premise, premise_keys, fine_tuned, epochs)
            entry = {"claim": key, "title": title, "a": cell_a, "b": cell_b, "epochs": epochs,
                     "top_level": epochs == top, "seeds_a": numbers.seeds(cell_a), "seeds_b": numbers.seeds(cell_b),
                     "premises": list(premise_keys), "failed_premise": failure}
            if metric == "leakage":
                entry["delta_auc"] = numbers.delta(cell_a, cell_b, "auc:worst")
                entry["delta_tpr"] = numbers.delta(cell_a, cell_b, "tpr:worst")
                entry["verdict"] = verdict(entry["delta_auc"]["ci"], sign, EQUIVALENCE_MARGINS["auc"], failure)
                entry["verdict_tpr"] = verdict(entry["delta_tpr"]["ci"], sign, EQUIVALENCE_MARGINS["tpr"], failure)
                entry["per_attack"] = {}
                for attack in numbers.attacks:
                    comparison = numbers.delta(cell_a, cell_b, f"auc:{attack}")
                    flips = numbers.direction_flips([cell_a, cell_b], attack)
                    comparison["verdict"] = verdict(comparison["ci"], sign, EQUIVALENCE_MARGINS["auc"], failure or (
                        "the attack's calibrated direction flips between these models" if flips else None))
                    entry["per_attack"][attack] = comparison
            else:
                entry["delta_fidelity"] = numbers.delta(cell_a, cell_b, "fidelity")
                entry["delta_rprecision"] = numbers.delta(cell_a, cell_b, "rprecision")
                entry["verdict"] = verdict(entry["delta_fidelity"]["ci"], sign, EQUIVALENCE_MARGINS["fidelity"],
                                           failure)
                entry["verdict_rprecision"] = verdict(entry["delta_rprecision"]["ci"], -sign,
                                                      EQUIVALENCE_MARGINS["rprecision"], failure)
            results.append(entry)
    return results


def claims_markdown(claims):
    lines = ["## The claims, one verdict each", "",
             "Δ = A − B at the same number of epochs, paired by training seed (seed k of A against seed k of B) and on "
             "the same images; 95% interval = value ± t·√(V_images + s²_seeds/S) (`study/statistics.py`). Leakage = "
             "the worst case: the attack with the largest AUC on the calibration half, measured on the test half. "
             "Verdict words: supported, contradicted, no detectable difference (the whole interval inside ±"
             f"{EQUIVALENCE_MARGINS['auc']:g} AUC, ±{EQUIVALENCE_MARGINS['fidelity']:g} Fréchet distance), not testable "
             "here (a failed premise, or an interval around 0 wider than that margin). Rows are the claims at each "
             "level of the dose-response, the last level first.", ""]
    current = None
    for entry in claims:
        if entry["claim"] != current:
            current = entry["claim"]
            leakage = "delta_auc" in entry
            lines += ["", f"### {entry['title']}", "",
                      ("| epochs | A vs B | seeds | ΔAUC [95% CI] | verdict | Δ calibrated TPR@1%FPR [95% CI] | verdict |"
                       if leakage else
                       "| epochs | A vs B | seeds | Δ Fréchet distance [95% CI] | verdict | ΔR-precision [95% CI] | "
                       "verdict |"), "|---|---|---|---|---|---|---|"]
        pair = f"{entry['a']} vs {entry['b']}"
        seeds = f"{entry['seeds_a']} / {entry['seeds_b']}"
        if "delta_auc" in entry:
            lines.append(f"| {entry['epochs']:g} | {pair} | {seeds} | {fmt_delta(entry['delta_auc'])} | "
                         f"{entry['verdict']} | {fmt_delta(entry['delta_tpr'])} | {entry['verdict_tpr']} |")
        else:
            lines.append(f"| {entry['epochs']:g} | {pair} | {seeds} | {fmt_delta(entry['delta_fidelity'])} | "
                         f"{entry['verdict']} | {fmt_delta(entry['delta_rprecision'], 1)} | "
                         f"{entry['verdict_rprecision']} |")
    return "\n".join(lines)


def per_attack_markdown(claims, attacks):
    lines = ["### Every attack on its own (ΔAUC [95% CI] and verdict, leakage claims at the last level)", "",
             "| claim | " + " | ".join(ATTACK_TITLES[a] for a in attacks) + " |", "|---|" + "---|" * len(attacks)]
    for entry in claims:
        if "per_attack" in entry and entry["top_level"]:
            cells = [f"{fmt_delta(entry['per_attack'][a])} {entry['per_attack'][a]['verdict']}" for a in attacks]
            lines.append(f"| {entry['claim']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def premises_markdown(premise):
    """The premise table: what each premise measures, its criterion, the measured value, whether it holds."""
    lines = ["## Premises (measured before any claim is read)", "",
             "| premise | criterion | measured | holds |", "|---|---|---|---|"]
    for key in ("P1", "P2", "P4", "P6", "P7"):
        entry = premise[key]
        lines.append(f"| {key}: {entry['what']} | {entry['criterion']} | {entry['measured']} | "
                     f"{'yes' if entry['holds'] else 'NO'} |")
    lines += ["", f"**P3: {premise['P3']['what']}** ({premise['P3']['criterion']}); per cell, mean over training seeds:",
              "", "| cell | epochs | own-image loss / pre-trained | R-precision / pre-trained | holds |",
              "|---|---|---|---|---|"]
    for cell, entry in premise["P3"]["cells"].items():
        lines.append(f"| {cell} | {entry['epochs']:g} | {entry['own_loss_ratio']:.3f} | {entry['rprecision_ratio']:.3f} | "
                     f"{'yes' if entry['holds'] else 'NO: ' + entry['why']} |")
    lines += ["", f"**P5: {premise['P5']['what']}** ({premise['P5']['criterion']}):", "",
              "| epochs | perturbed (ASPL) vs clean, same seed | clean vs clean, other seeds | holds |", "|---|---|---|---|"]
    for level, entry in premise["P5"]["levels"].items():
        lines.append(f"| {level} | {entry['perturbed_vs_clean']:.4f} | {entry['seed_to_seed']:.4f} | "
                     f"{'yes' if entry['holds'] else 'NO'} |")
    return "\n".join(lines)
