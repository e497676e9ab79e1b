"""The fine-tuned model's README (base model, method, MixSyn mix, PGD budget, measured privacy) and the Hub upload.

The Hub token is only handed to `huggingface_hub`; it never reaches a model card, a tracker or a log,
and an upload error is reported with the token masked.
"""

import json
import os
import re
from pathlib import Path

from .cli import InputError


def read_privacy_report(path):
    """evaluate.py's results.json (schema 1): its `privacy` blocks hold AUC/TPR and their bootstrap CIs."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"--privacy_report {path} is not a readable JSON file ({error})") from error
    blocks = report.get("privacy") if isinstance(report, dict) else None
    if not isinstance(blocks, dict) or not blocks or not all("auc" in block for block in blocks.values()):
        raise InputError(f"--privacy_report {path} has no 'privacy' blocks with an AUC (expected evaluate.py's "
                         "results.json)")
    return report


def privacy_lines(report):
    """Model-card section of the measured membership-inference risk: the worst case first, then every attack run
    (value [95% CI] per metric, member/non-member counts, FPR resolution), the blind baseline, and what an
    audit can and cannot say."""
    def with_ci(block, key):
        value, interval = block.get(key), block.get(f"{key}_ci")
        if value is None:
            return "n/a"
        return f"{value:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")

    def low_fpr(block, key):
        if "num_nonmembers" not in block:
            return with_ci(block, key)
        resolution = f"FPR resolution 1/{block['num_nonmembers']}"
        if not block.get("low_fpr_measurable", {}).get(key, True):
            return f"not measurable at this size ({resolution})"
        return f"{with_ci(block, key)} ({resolution})"

    def calibrated(block):
        cal = block.get("calibrated") or {}
        if "test_tpr" not in cal:
            return "n/a"
        resolution = f"FPR resolution 1/{cal['num_test_nonmembers']}" if "num_test_nonmembers" in cal else ""
        if not cal.get("target_fpr_measurable", True):
            return f"not measurable at this size ({resolution})"
        return f"{cal['test_tpr']:.3f} at FPR {cal['test_fpr']:.3f}" + (f" ({resolution})" if resolution else "")

    def counts(block):
        if "num_members" not in block or "num_nonmembers" not in block:
            return "n/a"
        return f"{block['num_members']} / {block['num_nonmembers']}"

    privacy = report["privacy"]
    worst = [case["scores"] for case in report.get("worst_case") or [] if case.get("scores") in privacy]
    names = worst + [name for case in report.get("worst_case") or [] for name in case.get("ranking", [])
                     if name in privacy and name not in worst]
    names += [name for name in privacy if name not in names]
    lines = ["## Measured membership-inference risk (evaluate.py)", ""]
    for name in worst:
        block = privacy[name]
        lines += [f"**Worst case over the {len(names)} attack(s) run: {block.get('attack', '')} (`{name}`)**: "
                  f"calibrated TPR@{100 * block['calibrated']['target_fpr']:g}%FPR {calibrated(block)}, threshold and "
                  f"direction fixed on a calibration half and measured on the other; AUC {with_ci(block, 'auc')}; "
                  f"TPR@1%FPR {low_fpr(block, 'tpr_at_1pct_fpr')}; TPR@0.1%FPR {low_fpr(block, 'tpr_at_0.1pct_fpr')}; "
                  f"members / non-members: {counts(block)}.", ""]
    lines += ["| scores | attack | members / non-members | AUC [95% CI] | TPR@1%FPR [95% CI] | TPR@0.1%FPR [95% CI] | "
              "calibrated TPR (held-out half) | verdict |", "|---|---|---|---|---|---|---|---|"]
    for name in names:
        block = privacy[name]
        lines.append(f"| {name}{' (worst case)' if name in worst else ''} | {block.get('attack', '')} | "
                     f"{counts(block)} | {with_ci(block, 'auc')} | "
                     f"{low_fpr(block, 'tpr_at_1pct_fpr')} | {low_fpr(block, 'tpr_at_0.1pct_fpr')} | "
                     f"{calibrated(block)} | {block.get('verdict', '')} |")
    if report.get("blind_baseline"):
        lines += ["", f"Blind baseline (never sees the model): AUC {with_ci(report['blind_baseline'], 'auc')}."]
    lines += ["", "An audit bounds the risk from the attacks it ran, listed above, not from every attack: an attack "
              "not run here, or not yet known, may do better."]
    return lines


def model_card_text(args, method, mix_info, trained, privacy_report=None):
    """README.md of a fine-tuned model: base model, method, MixSyn mix, PGD budget, measured privacy.

    `trained`: what the run actually did, {"steps", "learning_rate", "resolution"} (after --scale_lr and the
    native-resolution default).
    """
    method_tag = re.sub(r"[^a-z0-9]+", "-", method.split(" (")[0].lower()).strip("-")
    pgd = ", ".join(f"{key} = {value}" for key, value in sorted(mix_info["pgd"].items())) or "n/a (no perturbed set)"
    lines = ["---", f"base_model: {args.pretrained_model_name_or_path}", "library_name: diffusers",
             f"tags: [stable-diffusion, text-to-image, diffusers, mixsyn, {method_tag}]",
             "---", "", f"# MixSyn {method} fine-tune of {args.pretrained_model_name_or_path}", "",
             f"- Method: {method}, {trained['steps']} steps, learning rate {trained['learning_rate']}, "
             f"resolution {trained['resolution']}",
             f"- Training data: {args.dataset_name or args.instance_data_dir}",
             f"- MixSyn mixup: mode = {mix_info['mode']}, ratio = {mix_info['ratio']}, seed = {mix_info['seed']}, "
             f"pattern = {mix_info['pattern']}",
             f"- Perturbed set: {mix_info['perturbed_dataset'] or 'none'}; PGD budget: {pgd}", ""]
    if privacy_report:
        lines += privacy_lines(privacy_report)
    return "\n".join(lines) + "\n"


def write_model_card(args, method, mix_info, trained, output_dir):
    report = read_privacy_report(args.privacy_report) if args.privacy_report else None
    (Path(output_dir) / "README.md").write_text(model_card_text(args, method, mix_info, trained, report))


def push_to_hub(args, output_dir):
    """Upload `output_dir` (without checkpoints and logs) to `--hub_model_id`; a failure is one clear error."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = args.hub_model_id or Path(output_dir).name
    try:
        repo_id = create_repo(repo_id, exist_ok=True, token=args.hub_token).repo_id
        upload_folder(repo_id=repo_id, folder_path=str(output_dir), token=args.hub_token,
                      commit_message="MixSyn fine-tune", ignore_patterns=["checkpoint-*", ".*", "logs/*", "step_*"])
    except Exception as error:  # noqa: BLE001 - offline, auth and network errors all end the same way
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        reason = "HF_HUB_OFFLINE is set" if offline else (str(error).strip().splitlines() or [type(error).__name__])[0]
        if args.hub_token:
            reason = reason.replace(args.hub_token, "***")
        raise InputError(f"--push_to_hub to {repo_id} failed ({reason}); the trained model is saved in "
                         f"{output_dir}") from None
    return repo_id


def finish_outputs(accelerator, args, method, mix_info, trained):
    """Main process: model card, then the optional Hub upload (after the trackers are closed)."""
    accelerator.end_training()
    if accelerator.is_main_process:
        write_model_card(args, method, mix_info, trained, args.output_dir)
        if args.push_to_hub:
            push_to_hub(args, args.output_dir)
