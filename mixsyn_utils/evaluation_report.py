"""evaluate.py's report.md: the worst case over the attacks run, every attack's figures, the blind baseline, utility
and extraction, each number with its 95% CI where it has one (cells from `audit_report.py`)."""

import json

from .audit_report import calibrated_cell, counts_cell, format_with_ci, low_fpr_cell


def worst_case_lines(results):
    """report.md's first section: per attacked model, the strongest attack run and every figure of it."""
    lines = ["## Worst case over the attacks run", ""]
    for case in results["worst_case"]:
        block = results["privacy"][case["scores"]]
        lines += [f"**{case['attack']}** (`{case['scores']}`), the strongest of {len(case['ranking'])} attack(s) on "
                  f"model `{json.dumps(case['model'], sort_keys=True)}`:", "",
                  f"- calibrated TPR@{100 * case['target_fpr']:g}%FPR ({case['direction']}; threshold and direction "
                  "fixed on a calibration half, measured on the other): " + calibrated_cell(block["calibrated"]),
                  f"- AUC {format_with_ci(case['auc'], case['auc_ci'])}",
                  f"- TPR@1%FPR {low_fpr_cell(case, 'tpr_at_1pct_fpr')}",
                  f"- TPR@0.1%FPR {low_fpr_cell(case, 'tpr_at_0.1pct_fpr')}",
                  f"- {case['num_members']} members, {case['num_nonmembers']} non-members",
                  "- ranking by calibrated TPR: " + " > ".join(case["ranking"]), ""]
    lines += ["An audit bounds the risk from the attacks it ran, not from every attack: a stronger one may exist.", ""]
    return lines


def render_markdown(results):
    """report.md: one table per section; every number with its 95% CI where it has one."""
    lines = ["# MixSyn evaluation", "", f"Bootstrap resamples: {results['bootstrap']}, seed {results['seed']}; "
             "intervals are 95% percentile CIs (members and non-members resampled separately).", ""]
    if results["privacy"]:
        lines += worst_case_lines(results)
        lines += ["## Membership inference", "", "| scores | attack | members / non-members | AUC | TPR@1%FPR | "
                  "TPR@0.1%FPR | balanced acc. | calibrated TPR (test half) | verdict |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, block in results["privacy"].items():
            lines.append(f"| {name} | {block['attack']} | {counts_cell(block)} | "
                         f"{format_with_ci(block['auc'], block['auc_ci'])} | {low_fpr_cell(block, 'tpr_at_1pct_fpr')} | "
                         f"{low_fpr_cell(block, 'tpr_at_0.1pct_fpr')} | "
                         f"{format_with_ci(block['balanced_accuracy'], block['balanced_accuracy_ci'])} | "
                         f"{calibrated_cell(block['calibrated'])} ({block['calibrated']['direction']}) | "
                         f"{block['verdict']} |")
        lines += ["", "An AUC below 0.5 is an *inverted signal*: the attacker flips the sign and still separates "
                  "members — it is a leak, not protection. The calibrated column chooses direction and threshold "
                  "(FPR ≤ target) on one half, stratified by domain, and measures on the other half. A TPR at FPR "
                  "x below the FPR resolution 1/n (n non-members) would be the TPR at FPR = 0.", ""]
        for name, block in results["privacy"].items():
            if block["reference"]:
                ref = block["reference"]
                lines.append(f"- {name} vs reference {ref['scores_path']}: "
                             f"ΔAUC {format_with_ci(ref['auc']['delta'], ref['auc']['delta_ci'])}, ΔTPR@1%FPR "
                             f"{format_with_ci(ref['tpr_at_1pct_fpr']['delta'], ref['tpr_at_1pct_fpr']['delta_ci'])}")
        lines += ["", "![ROC](roc_loglog.png)", ""]
    if results["blind_baseline"]:
        blind = results["blind_baseline"]
        lines += ["## Blind baseline", "", "Logistic regression on 8×8 pixels + caption words, "
                  f"{blind['num_folds']}-fold CV, never sees the model: AUC "
                  f"{format_with_ci(blind['auc'], blind['auc_ci'])}.", ""]
        lines.append("**The member and non-member sets differ in distribution: the attack numbers are not "
                     "trustworthy.**" if blind["distribution_shift"] else "Its CI does not lie above 0.5: no "
                     "detectable distribution shift (a CV AUC below 0.5 is the known small-sample bias, not a shift).")
        lines.append("")
    if results["utility"]:
        util = results["utility"]
        lines += ["## Utility", "", f"Images: {util['num_images']}. R-precision scorer: {util['scorer'] or 'none'}.",
                  "", f"- R-precision (top-1 × 100): {format_with_ci(util['r_precision_top1_x100'])}"]
        if util.get("pixel_frechet_distance") is not None:
            lines.append(f"- pixel Fréchet distance to the {util['pixel_frechet_reference_images']} non-members "
                         f"(8×8 grey features): {format_with_ci(util['pixel_frechet_distance'])} — lower is better")
        if "brisque_mean" in util:
            lines.append(f"- BRISQUE: {format_with_ci(util['brisque_mean'])} — {util['brisque_direction']}; "
                         f"{util['brisque_nan_images']} image(s) without spatial variance excluded")
        lines.append("")
    if results["extraction"]:
        ext = results["extraction"]
        lines += ["## Data extraction", "", f"(k={ext['k']}, ℓ2, δ={ext['delta']})-eidetic memorization, tiled ℓ2 "
                  f"({ext['num_tiles']}×{ext['num_tiles']} tiles, RMS on [0, 1] pixels), {ext['num_generations']} "
                  "generations.", "",
                  f"- extracted members (true positives): {ext['true_positives']} of {ext['num_members']}",
                  f"- non-members matched (false positives, control): {ext['false_positives']}",
                  f"- precision: {format_with_ci(ext['precision'])}; matched but excluded by k: {ext['excluded_by_k']}",
                  "- per domain: " + ", ".join(f"{d} {n}" for d, n in ext["extracted_per_domain"].items()), ""]
    return "\n".join(lines) + "\n"
