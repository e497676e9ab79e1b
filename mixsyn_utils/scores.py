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
from .metrics import roc_metrics


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


def write_scores(dataset, output_dir, *, script, attack, flags, model, extra=None, push_to_hub=False,
                 hub_dataset_id=None, hub_token=None):
    """Attach the provenance (`script`, `attack`, `flags` = `flags.flag_values(args)`, the attacked `model` record,
    `extra`) to the assembled scores, save them atomically; print AUC and TPR@1%FPR per score column.

    Main process only. Returns the saved dataset.
    """
    record = {"attack": attack, "model": model, "member_is_lower": True, **(extra or {})}
    with_provenance(dataset, dataset_provenance(script, flags, extra=record))
    save_dataset(dataset, output_dir, push_to_hub, hub_dataset_id, hub_token=hub_token)
    is_member = np.asarray(dataset["is_member"], dtype=bool)
    for column in [name for name in dataset.column_names if name.startswith("score")]:
        values = np.asarray(dataset[column], dtype=np.float64)
        # Scores are errors (members lower); roc_metrics wants "higher = member", hence the minus sign.
        metrics = roc_metrics(-values[is_member], -values[~is_member])
        print(f"{attack} {column}: AUC {metrics['auc']:.4f}  TPR@1%FPR {metrics['tpr_at_1pct_fpr']:.4f}")
    return dataset


def load_scores(path, score_column="score"):
    """A scores dataset as arrays, rows sorted by id; membership score = −score when the info says member_is_lower
    (the default), so `scores` is higher for members."""
    dataset = load_image_dataset(path, required_columns=("id", "domain", "is_member", score_column))
    info = read_provenance(dataset)
    raw = np.asarray(dataset[score_column], dtype=np.float64)
    is_member = np.asarray(dataset["is_member"], dtype=bool)
    if not np.isfinite(raw).all():
        raise InputError(f"--scores {path}: column {score_column} has {int((~np.isfinite(raw)).sum())} NaN/inf values")
    if is_member.all() or not is_member.any():
        raise InputError(f"--scores {path} has only {'members' if is_member.all() else 'non-members'}; need both")
    if len(set(dataset["id"])) != len(dataset):
        raise InputError(f"--scores {path}: ids are not unique, so rows cannot be paired across datasets")
    member_is_lower = bool(info.get("member_is_lower", True))
    order = np.argsort(np.asarray(dataset["id"]), kind="stable")  # rows aligned by id across datasets
    per_timestep = {column: np.asarray(dataset[column], dtype=np.float64)[order] * (-1 if member_is_lower else 1)
                    for column in dataset.column_names if column.startswith("score_t")}
    return {"path": str(path), "name": Path(path).name, "attack": info.get("attack", "unknown"),
            "model": info.get("model"), "member_is_lower": member_is_lower,
            "ids": np.asarray(dataset["id"])[order], "domains": np.asarray(dataset["domain"]).astype(str)[order],
            "is_member": is_member[order], "scores": (-raw if member_is_lower else raw)[order],
            "per_timestep": per_timestep}
