"""The study's report: Tables 1-5, Figure 4, extraction tables and the claim-by-claim comparison with the paper.

Reads the `results.json` that evaluate.py wrote for every model; writes `REPORT.md`, `figure4.png` and
`summary.json` (the numbers behind every table row). Leakage is |AUC − 0.5|: an AUC below 0.5 is an
inverted signal and still a leak, never read as protection.
"""

import json
import math
from pathlib import Path

from .plan import ATTACKS, METHOD_TITLES, setting_name

# The MixSyn paper's SecMI AUCs quoted in the issue (SD-1.4, 40 celebrity domains).
PAPER_SECMI_AUC = {"pretrained": 0.715, "dreambooth-clean": 0.752, "dreambooth-perturbed": 0.451,
                   "dreambooth-image-0.5": 0.552, "dreambooth-pixel-0.3": 0.498}


def _privacy(result, name, attack):
    return result["privacy"].get(f"{name}-{attack}") if result else None


def _fmt(value, ci=None, digits=3):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    text = f"{value:.{digits}f}"
    return f"{text} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else text


def model_row(name, result):
    """The numbers of one table row: per attack AUC, TPR@1%FPR (CIs), calibrated test TPR; utility."""
    row = {"model": name}
    for attack in ATTACKS:
        block = _privacy(result, name, attack) or {}
        row[f"{attack}_auc"], row[f"{attack}_auc_ci"] = block.get("auc"), block.get("auc_ci")
        row[f"{attack}_tpr1"], row[f"{attack}_tpr1_ci"] = block.get("tpr_at_1pct_fpr"), block.get("tpr_at_1pct_fpr_ci")
        row[f"{attack}_calibrated_tpr"] = (block.get("calibrated") or {}).get("test_tpr")
        row[f"{attack}_verdict"] = block.get("verdict")
        reference = block.get("reference") or {}
        row[f"{attack}_delta_auc"] = (reference.get("auc") or {}).get("delta")
        row[f"{attack}_delta_auc_ci"] = (reference.get("auc") or {}).get("delta_ci")
    utility = (result or {}).get("utility") or {}
    row["r_precision"], row["brisque"] = utility.get("r_precision_top1_x100"), utility.get("brisque_mean")
    row["extraction"] = (result or {}).get("extraction")
    return row


def table_markdown(title, rows, blind):
    header = ("| Model | SecMI AUC | SecMI TPR@1%FPR | SecMI calibrated TPR | PIA AUC | PIA TPR@1%FPR | "
              "PIA calibrated TPR | R-precision ↑ | BRISQUE (lower is better) |")
    lines = [f"### {title}", "", header, "|" + "---|" * 9]
    for label, row in rows:
        lines.append(f"| {label} | " + " | ".join([
            _fmt(row["secmi_auc"], row["secmi_auc_ci"]), _fmt(row["secmi_tpr1"], row["secmi_tpr1_ci"]),
            _fmt(row["secmi_calibrated_tpr"]), _fmt(row["pia_auc"], row["pia_auc_ci"]),
            _fmt(row["pia_tpr1"], row["pia_tpr1_ci"]), _fmt(row["pia_calibrated_tpr"]),
            _fmt(row["r_precision"], digits=1), _fmt(row["brisque"], digits=1)]) + " |")
    if blind:
        shift = "the member/non-member sets differ in distribution: attack numbers are NOT trustworthy" \
            if blind.get("distribution_shift") else "no distribution shift detected"
        lines += ["", f"Blind baseline (never sees the model): AUC {_fmt(blind['auc'], blind['auc_ci'])} — {shift}."]
    return "\n".join(lines)


def extraction_markdown(title, rows):
    lines = [f"### Data extraction — {title}", "", "| Model | generations | extracted (true positives) | "
             "false positives (non-members) | precision |", "|---|---|---|---|---|"]
    for label, row in rows:
        extraction = row["extraction"]
        if extraction:
            lines.append(f"| {label} | {extraction['num_generations']} | {extraction['true_positives']} | "
                         f"{extraction['false_positives']} | {_fmt(extraction['precision'])} |")
    return "\n".join(lines)


def leakage_change(row, attack, reference_auc):
    """Signed change of |AUC − 0.5| relative to a reference AUC, with the paired CI mapped the same way."""
    auc, delta_ci = row[f"{attack}_auc"], row[f"{attack}_delta_auc_ci"]
    if auc is None or reference_auc is None or delta_ci is None:
        return None, None
    sign = 1.0 if reference_auc >= 0.5 else -1.0  # leakage grows in the direction the reference already leaks
    change_ci = sorted(sign * bound for bound in delta_ci)
    return abs(auc - 0.5) - abs(reference_auc - 0.5), change_ci


def figure4(rows_by_model, config, path):
    """AUC (SecMI, PIA) and R-precision against the mixup ratio, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    method, ratios, modes = config["figure4"]["method"], config["figure4"]["ratios"], config["figure4"]["modes"]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for mode in modes:
        names = [f"{method}-{setting_name(mode, ratio)[0]}" for ratio in ratios]
        label = {"image": "Mixup-I", "pixel": "Mixup-P"}.get(mode, mode)
        for axis, key in zip(axes, ("secmi_auc", "pia_auc", "r_precision")):
            values = [rows_by_model.get(name, {}).get(key) for name in names]
            axis.plot(ratios, [math.nan if v is None else v for v in values], marker="o", label=label)
    for axis, title in zip(axes, ("SecMI AUC", "PIA AUC", "R-precision (top-1 × 100)")):
        axis.set_xlabel("mixup ratio (fraction perturbed)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    for axis in axes[:2]:
        axis.axhline(0.5, color="gray", linestyle="--", linewidth=1, label="chance")
        pretrained_key = "secmi_auc" if axis is axes[0] else "pia_auc"
        if rows_by_model.get("pretrained", {}).get(pretrained_key) is not None:
            axis.axhline(rows_by_model["pretrained"][pretrained_key], color="black", linewidth=1, label="pre-trained")
    axes[0].legend(fontsize=8)
    figure.suptitle(f"Figure 4: leakage and utility against the mixup ratio ({METHOD_TITLES.get(method, method)})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _claim_line(label, row, reference_row, want):
    """One method's verdict on a claim: `want` is "up" or "down" for the change in leakage vs the pre-trained model.

    The paired CI is of ΔAUC. It decides a change in |AUC − 0.5| only when both AUCs lie on the same side of
    0.5; an AUC that crosses chance is reported as such, undecided.
    """
    parts = []
    for attack in ATTACKS:
        auc, reference_auc = row[f"{attack}_auc"], reference_row.get(f"{attack}_auc")
        change, change_ci = leakage_change(row, attack, reference_auc)
        if change is None:
            parts.append(f"{attack.upper()}: not measured")
            continue
        delta, delta_ci = row[f"{attack}_delta_auc"], row[f"{attack}_delta_auc_ci"]
        measured = (f"{attack.upper()} AUC {reference_auc:.3f} → {auc:.3f}, ΔAUC {delta:+.3f} "
                    f"[{delta_ci[0]:+.3f}, {delta_ci[1]:+.3f}], leakage change {change:+.3f}")
        if (auc - 0.5) * (reference_auc - 0.5) < 0:
            parts.append(f"{measured} — crosses chance (the direction flips): undecided")
            continue
        decided = change_ci[0] > 0 if want == "up" else change_ci[1] < 0
        parts.append(f"{measured} — {'supports' if decided else 'does not support'}")
    return f"- {label}: " + "; ".join(parts)


def _versus_clean_line(label, row, clean_row):
    """Does the perturbation add anything over clean fine-tuning? AUC CIs that overlap give no evidence."""
    parts = []
    for attack in ATTACKS:
        ci, clean_ci = row.get(f"{attack}_auc_ci"), clean_row.get(f"{attack}_auc_ci")
        if not ci or not clean_ci:
            continue
        overlap = ci[0] <= clean_ci[1] and clean_ci[0] <= ci[1]
        parts.append(f"{attack.upper()} {row[f'{attack}_auc']:.3f} vs clean {clean_row[f'{attack}_auc']:.3f} "
                     f"({'CIs overlap: no evidence of a difference' if overlap else 'CIs disjoint'})")
    return f"  - against clean fine-tuning ({label}): " + "; ".join(parts) if parts else ""


def claims_markdown(rows_by_model, methods):
    """Per claim of the paper, whether this run supports it, decided by the paired-bootstrap CIs."""
    pretrained = rows_by_model.get("pretrained", {})
    lines = ["## Does this run support the paper's claims?", "",
             "Leakage = |AUC − 0.5| (an inverted AUC is still a leak). Changes are against the pre-trained model, "
             "with the paired bootstrap CI of ΔAUC from evaluate.py; a claim is supported only when the CI excludes 0. "
             "MixSyn's own effect is the comparison with *clean* fine-tuning of the same method, shown beneath.", ""]
    sections = [("Clean self-synthesized fine-tuning raises leakage (Shake-to-Leak; paper: 0.715 → 0.752)", "clean", "up"),
                ("Fully perturbed fine-tuning lowers leakage (paper: 0.715 → 0.451)", "perturbed", "down"),
                ("Mixup-I 0.5 lowers leakage (paper: 0.715 → 0.552)", "image-0.5", "down"),
                ("Mixup-P 0.3 lowers leakage (paper: 0.715 → 0.498)", "pixel-0.3", "down")]
    for title, setting, want in sections:
        lines.append(f"**{title}**")
        for method in methods:
            name = f"{method}-{setting}"
            if name in rows_by_model:
                lines.append(_claim_line(METHOD_TITLES[method], rows_by_model[name], pretrained, want))
                clean_row = rows_by_model.get(f"{method}-clean")
                if setting != "clean" and clean_row:
                    lines.append(_versus_clean_line(METHOD_TITLES[method], rows_by_model[name], clean_row))
        lines.append("")
    lines.append("**Quality: perturbed fine-tuning costs quality, mixing keeps it** (R-precision, top-1 × 100; "
                 "point values, no CI)")
    for method in methods:
        values = {s: rows_by_model.get(f"{method}-{s}", {}).get("r_precision")
                  for s in ("clean", "perturbed", "image-0.5", "pixel-0.3")}
        if values["clean"] is None:
            continue
        described = ", ".join(f"{s} {v:.1f}" for s, v in values.items() if v is not None)
        lines.append(f"- {METHOD_TITLES[method]}: {described}")
    return "\n".join(lines)


def write_report(config, models, results, report_dir, elapsed_seconds=None):
    """REPORT.md + figure4.png + summary.json under `report_dir`; returns the summary dict."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    rows_by_model = {name: model_row(name, result) for name, result in results.items()}
    blind = (results.get("pretrained") or {}).get("blind_baseline")
    methods = config["experiment"]["methods"]
    lines = [f"# MixSyn study: {config['experiment']['name']}", ""]
    if elapsed_seconds is not None:
        lines += [f"Run time: {elapsed_seconds / 60:.1f} min. Values: point estimate [95% bootstrap CI]. "
                  "TPR@1%FPR is the largest TPR with FPR ≤ 1%; the calibrated TPR uses a direction and threshold "
                  "chosen on a calibration half and is measured on the other half.", ""]
    lines += ["## Beside the paper (SecMI AUC)", "", "| Model | paper (SD-1.4) | this run |", "|---|---|---|"]
    for name, paper_auc in PAPER_SECMI_AUC.items():
        ours = rows_by_model.get(name, {}).get("secmi_auc")
        lines.append(f"| {name} | {paper_auc:.3f} | {_fmt(ours, rows_by_model.get(name, {}).get('secmi_auc_ci'))} |")
    lines.append("")
    for table in config["tables"].values():
        setting = setting_name(table["mixup_mode"], table["mixup_ratio"])[0]
        rows = [("Pre-trained", rows_by_model.get("pretrained", model_row("pretrained", None)))]
        rows += [(METHOD_TITLES[m], rows_by_model.get(f"{m}-{setting}", model_row(m, None))) for m in methods]
        lines += [table_markdown(table["title"], rows, blind), "", extraction_markdown(table["title"], rows), ""]
    if "table5" in config:
        setting = setting_name(config["table5"]["mixup_mode"], config["table5"]["mixup_ratio"])[0]
        rows = [(label, rows_by_model.get(f"dreambooth[{'+'.join(modules)}]-{setting}", model_row(label, None)))
                for label, modules in config["table5"]["rows"].items()]
        lines += [table_markdown(config["table5"]["title"], rows, blind), ""]
    if "figure4" in config:
        figure4(rows_by_model, config, report_dir / "figure4.png")
        lines += ["## Figure 4", "", "![Figure 4](figure4.png)", ""]
    lines.append(claims_markdown(rows_by_model, methods))
    (report_dir / "REPORT.md").write_text("\n".join(lines) + "\n")
    summary = {"rows": rows_by_model, "blind_baseline": blind, "models": models}
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
