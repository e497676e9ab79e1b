"""How the study prints its numbers: a summary {value, ci} or a difference {delta, ci} as "value [low, high]"."""

from mixsyn_utils.audit_report import format_with_ci


def fmt(summary, digits=3, key="value"):
    """A study summary {key, "ci"} as "value [low, high]" (`audit_report.format_with_ci`), "–" when missing."""
    if summary is None:
        return "–"
    return format_with_ci(summary.get(key), summary["ci"], digits, missing="–")


def fmt_delta(comparison, digits=3):
    return "–" if comparison is None else fmt(comparison, digits, key="delta")
