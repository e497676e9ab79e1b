"""The study's figures: leakage and utility against fine-tuning strength (dose-response) and against the mixup
ratio (the paper's Figure 4), each point a cell's value with its 95% CI."""

import numpy as np

from .plan import PRETRAINED, figure4_points

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
