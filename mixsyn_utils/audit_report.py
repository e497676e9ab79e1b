"""evaluate.py's privacy results (results.json, schema 1) as markdown cells, and a model card's privacy section.

One formatter for every "value [95% CI]" the project prints (`format_with_ci`), and one rendering of each cell
(used by the card here and by evaluate.py's report.md, `evaluation_report.py`): a TPR at a low FPR always carries
the FPR resolution 1/n it was measured at, and reads "not measurable at this size" where the FPR asked for is
below it. Blocks of an older report that lack a field print "n/a".
"""

import math


def format_with_ci(value, interval=None, digits=3, missing="n/a"):
    """"0.812 [0.771, 0.850]": a value with its confidence interval (or the value alone); `missing` for None/NaN."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    text = f"{value:.{digits}f}"
    return text if interval is None else f"{text} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def fpr_resolution_text(num_nonmembers):
    """"FPR resolution 1/200 = 0.0050": the smallest non-zero FPR n non-members can measure."""
    return f"FPR resolution 1/{num_nonmembers} = {1.0 / num_nonmembers:.4f}"


def low_fpr_cell(block, key):
    """A TPR at a low FPR (`key`) with its CI and the FPR resolution it was measured at, or why it cannot be."""
    value = format_with_ci(block.get(key), block.get(f"{key}_ci"))
    if "num_nonmembers" not in block:
        return value
    resolution = fpr_resolution_text(block["num_nonmembers"])
    if not block.get("low_fpr_measurable", {}).get(key, True):
        return f"not measurable at this size ({resolution})"
    return f"{value} ({resolution})"


def calibrated_cell(calibrated):
    """The calibrated attack's test-half TPR / FPR (a block's "calibrated" record) with that half's resolution."""
    if not calibrated or "test_tpr" not in calibrated:
        return "n/a"
    resolution = (fpr_resolution_text(calibrated["num_test_nonmembers"])
                  if "num_test_nonmembers" in calibrated else None)
    if not calibrated.get("target_fpr_measurable", True):
        return f"not measurable at this size (target FPR {calibrated['target_fpr']:g}, {resolution})"
    measured = f"{format_with_ci(calibrated['test_tpr'])} at FPR {format_with_ci(calibrated['test_fpr'])}"
    return measured if resolution is None else f"{measured} ({resolution})"


def counts_cell(block):
    if "num_members" not in block or "num_nonmembers" not in block:
        return "n/a"
    return f"{block['num_members']} / {block['num_nonmembers']}"


def privacy_lines(report):
    """Model-card section of the measured membership-inference risk: the worst case first, then every attack run
    (value [95% CI] per metric, member/non-member counts, FPR resolution), the blind baseline, and what an
    audit can and cannot say."""
    privacy = report["privacy"]
    worst = [case["scores"] for case in report.get("worst_case") or [] if case.get("scores") in privacy]
    names = worst + [name for case in report.get("worst_case") or [] for name in case.get("ranking", [])
                     if name in privacy and name not in worst]
    names += [name for name in privacy if name not in names]
    lines = ["## Measured membership-inference risk (evaluate.py)", ""]
    for name in worst:
        block = privacy[name]
        lines += [f"**Worst case over the {len(names)} attack(s) run: {block.get('attack', '')} (`{name}`)**: "
                  f"calibrated TPR@{100 * block['calibrated']['target_fpr']:g}%FPR "
                  f"{calibrated_cell(block.get('calibrated'))}, threshold and direction fixed on a calibration half "
                  f"and measured on the other; AUC {format_with_ci(block.get('auc'), block.get('auc_ci'))}; "
                  f"TPR@1%FPR {low_fpr_cell(block, 'tpr_at_1pct_fpr')}; "
                  f"TPR@0.1%FPR {low_fpr_cell(block, 'tpr_at_0.1pct_fpr')}; members / non-members: "
                  f"{counts_cell(block)}.", ""]
    lines += ["| scores | attack | members / non-members | AUC [95% CI] | TPR@1%FPR [95% CI] | TPR@0.1%FPR [95% CI] | "
              "calibrated TPR (held-out half) | verdict |", "|---|---|---|---|---|---|---|---|"]
    for name in names:
        block = privacy[name]
        lines.append(f"| {name}{' (worst case)' if name in worst else ''} | {block.get('attack', '')} | "
                     f"{counts_cell(block)} | {format_with_ci(block.get('auc'), block.get('auc_ci'))} | "
                     f"{low_fpr_cell(block, 'tpr_at_1pct_fpr')} | {low_fpr_cell(block, 'tpr_at_0.1pct_fpr')} | "
                     f"{calibrated_cell(block.get('calibrated'))} | {block.get('verdict', '')} |")
    if report.get("blind_baseline"):
        blind = report["blind_baseline"]
        lines += ["", f"Blind baseline (never sees the model): AUC {format_with_ci(blind['auc'], blind.get('auc_ci'))}."]
    lines += ["", "An audit bounds the risk from the attacks it ran, listed above, not from every attack: an attack "
              "not run here, or not yet known, may do better."]
    return lines
