"""The scores dataset every attack writes and evaluate.py reads: columns `id, domain, is_member, score[, ...]`.

Every `score` is an error, members LOWER (`member_is_lower: true` in the dataset's provenance record): an attack
whose natural score is "higher = member" stores its negative. The record also holds the attack, its flags, the
attacked model (with the sha256 of its weights) and library versions.
"""

from pathlib import Path

import numpy as np
import torch

from .cli import InputError
from .dataset_io import dataset_provenance, load_image_dataset, read_provenance, save_dataset, with_provenance
from .audit_report import low_fpr_cell
from .metrics import low_fpr_measurable, roc_metrics


def scores_to_dataset(rows, scores):
    """Rows (id, domain, is_member) with their score columns: (B,) float64, or a flat float32 map per row."""
    from datasets import Dataset, Features, Sequence, Value

    columns = {"id": [row["id"] for row in rows], "domain": [row["domain"] for row in rows],
               "is_member": [row["is_member"] for row in rows]}
    features = {"id": Value("string"), "domain": Value("string"), "is_member": Value("bool")}
    for name, values in scores.items():
        values = np.asarray(values.cpu() if torch.is_tensor(values) else values)
        if values.ndim == 1:
            columns[name], features[name] = values.astype(np.float64), Value("float64")
        else:  # a per-image map (SecMI-NN's error map), stored flat
            columns[name] = list(values.reshape(len(rows), -1).astype(np.float32))
            features[name] = Sequence(Value("float32"))
    return Dataset.from_dict(columns, features=Features(features))


def scores_summary(dataset, attack):
    """The one line an attack prints: `score`'s AUC and TPR@1%FPR, the latter with the FPR resolution 1/n of its n
    non-members, or "not measurable at this size" when 1% < 1/n (`audit_report.low_fpr_cell`, the rule every
    report follows); with per-timestep columns, the range of their AUCs."""
    is_member = np.asarray(dataset["is_member"], dtype=bool)

    def membership_metrics(column):
        values = np.asarray(dataset[column], dtype=np.float64)
        # Scores are errors (members lower); roc_metrics wants "higher = member", hence the minus sign.
        return roc_metrics(-values[is_member], -values[~is_member])

    metrics, num_nonmembers = membership_metrics("score"), int((~is_member).sum())
    block = {"tpr_at_1pct_fpr": metrics["tpr_at_1pct_fpr"], "num_nonmembers": num_nonmembers,
             "low_fpr_measurable": {"tpr_at_1pct_fpr": low_fpr_measurable(0.01, num_nonmembers)}}
    line = f"{attack} score: AUC {metrics['auc']:.4f}  TPR@1%FPR {low_fpr_cell(block, 'tpr_at_1pct_fpr')}"
    per_timestep = [membership_metrics(name)["auc"] for name in dataset.column_names if name.startswith("score_t")]
    if per_timestep:
        line += (f"; per-timestep AUC {min(per_timestep):.3f}–{max(per_timestep):.3f} over {len(per_timestep)} "
                 "timesteps (columns score_t{t})")
    return line


def write_scores(dataset, output_dir, *, script, attack, flags, model, extra=None, push_to_hub=False,
                 hub_dataset_id=None, hub_token=None):
    """Attach the provenance (`script`, `attack`, `flags` = `flags.flag_values(args)`, the attacked `model` record,
    `extra`) to the assembled scores, save them atomically; print their one-line summary (`scores_summary`).

    Main process only. Returns the saved dataset.
    """
    record = {"attack": attack, "model": model, "member_is_lower": True, **(extra or {})}
    with_provenance(dataset, dataset_provenance(script, flags, extra=record))
    save_dataset(dataset, output_dir, push_to_hub, hub_dataset_id, hub_token=hub_token)
    print(scores_summary(dataset, attack))
    return dataset


def load_scores(path, score_column="score", flag="--scores"):
    """A scores dataset as arrays, rows sorted by id; membership score = −score when the info says member_is_lower
    (the default), so `scores` is higher for members. Errors name `flag` and the path."""
    dataset = load_image_dataset(path, required_columns=("id", "domain", "is_member", score_column), flag=flag)
    info = read_provenance(dataset)
    raw = np.asarray(dataset[score_column], dtype=np.float64)
    is_member = np.asarray(dataset["is_member"], dtype=bool)
    if not np.isfinite(raw).all():
        raise InputError(f"{flag} {path}: column {score_column} has {int((~np.isfinite(raw)).sum())} NaN/inf values")
    if is_member.all() or not is_member.any():
        raise InputError(f"{flag} {path} has only {'members' if is_member.all() else 'non-members'}; need both")
    if len(set(dataset["id"])) != len(dataset):
        raise InputError(f"{flag} {path}: ids are not unique, so rows cannot be paired across datasets")
    member_is_lower = bool(info.get("member_is_lower", True))
    order = np.argsort(np.asarray(dataset["id"]), kind="stable")  # rows aligned by id across datasets
    per_timestep = {column: np.asarray(dataset[column], dtype=np.float64)[order] * (-1 if member_is_lower else 1)
                    for column in dataset.column_names if column.startswith("score_t")}
    return {"path": str(path), "name": Path(path).name, "attack": info.get("attack", "unknown"),
            "model": info.get("model"), "member_is_lower": member_is_lower,
            "ids": np.asarray(dataset["id"])[order], "domains": np.asarray(dataset["domain"]).astype(str)[order],
            "is_member": is_member[order], "scores": (-raw if member_is_lower else raw)[order],
            "per_timestep": per_timestep}
