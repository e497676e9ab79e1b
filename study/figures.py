"""The study's figures: leakage and utility against the number of fine-tuning epochs (the dose-response) and against
the mixup ratio at the last level (the paper's Figure 4), each point a cell's mean over training seeds with its 95%
interval over seeds and images."""

import numpy as np

from .plan import PRETRAINED, cell_name, dose_response_method, dose_response_title, setting_of, top_level_epochs

PANELS = [("auc:worst", "worst-case AUC", (0.3, 1.0), 0.5),
          ("tpr:worst", "worst-case calibrated TPR@1%FPR", (0.0, 1.0), 0.01),
          ("fidelity", "pixel Fréchet distance to real images (lower: closer)", None, None),
          ("rprecision", "R-precision (top-1, %)", (0.0, 100.0), None)]


def _errorbar(axis, xs, summaries, label, offset=1.0):
    points = [(x, s) for x, s in zip(xs, summaries) if s is not None and np.isfinite(s["value"])]
    if not points:
        return
    x = np.array([p[0] for p in points]) * offset
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


def _chance(config, metric):
    if metric == "rprecision":
        return 100.0 / config["experiment"].get("num_domains", 10)
    return {"auc:worst": 0.5, "tpr:worst": 0.01}.get(metric)


def dose_response_figure(config, numbers, path):
    """Four panels (worst-case AUC, worst-case calibrated TPR, pixel Fréchet distance, R-precision) against epochs,
    one curve per [dose_response] setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs, settings = sorted(config["dose_response"]["epochs"]), config["dose_response"]["settings"]
    figure, axes = plt.subplots(1, len(PANELS), figsize=(20, 4.2))
    for axis, (metric, title, limits, _) in zip(axes, PANELS):
        for index, setting in enumerate(settings):
            summaries = [numbers.value(cell_name(dose_response_method(config), setting, level), metric)
                         for level in epochs]
            _errorbar(axis, epochs, summaries, setting, offset=1.0 + 0.04 * (index - len(settings) / 2))
        _reference_lines(axis, numbers.value(PRETRAINED, metric), _chance(config, metric),
                         "FPR (no signal)" if metric == "tpr:worst" else "chance")
        axis.set_xscale("log")
        axis.set(title=title, xlabel="fine-tuning epochs (passes over the training images)")
        if limits:
            axis.set_ylim(limits)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left")
    seeds = len(config["experiment"]["training_seeds"])
    figure.suptitle(f"Dose-response: {dose_response_title(config)} at a fixed learning rate; points: mean of {seeds} "
                    "seeds, bars: 95% interval over seeds and images")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def figure4(config, numbers, path):
    """The paper's Figure 4 at the last level: leakage and utility against the mixup ratio, one curve per
    [figure4] curve (its settings' ratios on the x axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = top_level_epochs(config)
    figure, axes = plt.subplots(1, len(PANELS), figsize=(20, 4.2))
    curves = config["figure4"]["curves"]
    for axis, (metric, title, limits, _) in zip(axes, PANELS):
        for index, curve in enumerate(curves):
            xs = [setting_of(config, setting)[1] for setting in curve["settings"]]
            summaries = [numbers.value(cell_name(dose_response_method(config), setting, top), metric)
                         for setting in curve["settings"]]
            _errorbar(axis, [x + 0.01 * (index - len(curves) / 2) for x in xs], summaries, curve["label"])
        _reference_lines(axis, numbers.value(PRETRAINED, metric), _chance(config, metric))
        axis.set(title=title, xlabel="mixup ratio (fraction perturbed)")
        if limits:
            axis.set_ylim(limits)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left")
    figure.suptitle(f"Figure 4 at {top:g} epochs: points: mean over training seeds, bars: 95% interval over seeds "
                    "and images")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
