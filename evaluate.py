#!/usr/bin/env python
r"""Evaluate membership-inference scores, utility and data extraction; write results.json, report.md and plots.

    python evaluate.py --scores outputs/pia outputs/secmi --output_dir outputs/eval \
      --member_dataset outputs/victim/members --nonmember_dataset outputs/victim/nonmembers \
      --generate --pretrained_model_name_or_path outputs/victim/pipeline \
      --domains_file outputs/victim/domains.json --rprecision_model outputs/victim/rprecision_model

With `--write_card OUTPUT_DIR [--push_to_hub]` the privacy numbers go into that trained folder's model card (and
to the Hub), refused unless every scores dataset attacked exactly its weights (the sha256 the attacks record).

Scores datasets (from attack_*.py) have columns id, domain, is_member, score[, score_t{t}]. Their info says
`member_is_lower: true` (scores are errors), so the membership score is −score; the calibrated attack below
also tries the other direction, because an attacker does not care which way members differ. A dataset may score
a subset of the images of another (CLiD and SimA leave out the images they calibrate on, SecMI-NN those it
trains on); each is measured on its own rows.

The worst case of each attacked model is the score set with the largest calibrated TPR at --target_fpr
(direction and threshold fixed on one half, measured on the other): the privacy figure to publish, since an
audit bounds the attacks it ran and a model is as leaky as its strongest one. Every TPR at a low FPR x comes
with the FPR resolution 1/n (n non-members); when x < 1/n it is "not measurable at this size".

results.json schema (version 1):
    {"schema_version": 1,
     "privacy": {NAME: {                        # one block per --scores dataset; NAME = its folder name
         "attack", "model" (its "weights_sha256": {flag: sha256} of every weight loaded), "scores_path", "score_column", "member_is_lower",
         "num_members", "num_nonmembers",
         "auc", "auc_ci": [lo, hi], "tpr_at_1pct_fpr", "tpr_at_1pct_fpr_ci", "tpr_at_0.1pct_fpr",
         "tpr_at_0.1pct_fpr_ci", "balanced_accuracy", "balanced_accuracy_ci",
         "fpr_resolution": 1/num_nonmembers,     # TPR@x with x below this is TPR at FPR = 0
         "low_fpr_measurable": {"tpr_at_1pct_fpr": 0.01 ≥ fpr_resolution, "tpr_at_0.1pct_fpr": 0.001 ≥ ...},
         "verdict": "leak" | "inverted signal — still a leak" | "no detectable leak[ (AUC < 0.5 ...)]",
         "inverted_signal": auc < 0.5,          # whatever the CI: never read an AUC below 0.5 as protection
         "calibrated": {"direction", "threshold",      # of the raw score column, in its units; null = flag nobody
                        "target_fpr", "calibration_tpr", "test_tpr", "test_fpr", "test_auc",
                        "num_calibration", "num_test", "num_test_members", "num_test_nonmembers",
                        "fpr_resolution": 1/num_test_nonmembers, "target_fpr_measurable"},
         "reference": null | {"scores_path", "auc": {"delta", "delta_ci"}, "tpr_at_1pct_fpr": {...}, ...},
         "per_timestep_auc": {"score_t200": auc, ...}}},
     "worst_case": [{                           # one per attacked model: blocks grouped by the sha256 of every
                                                # weight they attacked (their "model"'s weights_sha256), not paths
         "model", "model_records",              # the picked block's model record; every record of the group
         "scores": NAME,                        # the block an attacker would pick: largest calibrated test TPR
         "attack", "direction", "calibrated_tpr", "calibrated_fpr", "target_fpr", "calibrated_fpr_resolution",
         "target_fpr_measurable",               # of the test half the calibrated TPR is measured on
         "auc", "auc_ci", "tpr_at_1pct_fpr", "tpr_at_1pct_fpr_ci", "tpr_at_0.1pct_fpr", "tpr_at_0.1pct_fpr_ci",
         "num_members", "num_nonmembers", "fpr_resolution", "low_fpr_measurable",
         "ranking": [NAME, ...]}],              # every block of the model, most dangerous first
     "blind_baseline": null | {"auc", "auc_ci", "distribution_shift", "num_folds"},
     "utility": null | {"scorer", "r_precision_top1_x100", "r_precision_per_domain_x100",
                        "pixel_frechet_distance" (to the non-members, with --nonmember_dataset; lower is better),
                        "brisque_mean", "brisque_direction": "lower is better", "brisque_nan_images",
                        "num_images"},
     "extraction": null | {"k", "delta", "num_tiles", "num_generations", "true_positives", "false_positives",
                           "precision", "extracted_per_domain", "excluded_by_k"},
     "bootstrap": B, "seed": S, "confidence": 0.95}
"""

import json
import shutil
from pathlib import Path

import mixsyn_utils.quiet  # noqa: F401  (first: silences library messages that are emitted at import time)
import numpy as np
from diffusers.utils import check_min_version

# Shared with the other scripts (mixsyn_utils/):
from mixsyn_utils.brisque import is_installed as brisque_is_installed  # offline BRISQUE model present?
from mixsyn_utils.cli import ArgumentParser, InputError, first_line, run_cli  # one-line errors for bad input
from mixsyn_utils.dataset_io import (  # datasets in and out, images and captions checked before any sampling
    check_images_decode,
    check_text_column,
    load_image_dataset,
    save_dataset,
)
from mixsyn_utils.domains import generation_plan, load_domains  # domains, templates, the images to sample
from mixsyn_utils.flags import (  # shared flags and their range checks, written out by flag_values
    add_hub_token_arg,
    add_model_variant_args,
    add_pretrained_model_args,
    check_outputs_apart,
    check_paths_or_hub_ids,
    flag_values,
    require_non_negative,
    require_positive,
    require_range,
)
from mixsyn_utils.audit_statistics import (  # CIs, calibrated attack, paired deltas, blind baseline
    BLIND_BASELINE_FOLDS,
    blind_baseline_auc,
    blind_features,
    bootstrap_ci,
    calibrated_attack,
    paired_bootstrap_deltas,
)
from mixsyn_utils.extraction import extraction_metrics  # (k, ℓ2, δ)-eidetic memorization
from mixsyn_utils.metrics import low_fpr_measurable, roc_metrics  # ROC figures and their FPR resolution
from mixsyn_utils.models import check_pretrained_model  # the sampled model's kind, read before sampling
from mixsyn_utils.evaluation_report import render_markdown  # report.md
from mixsyn_utils.model_card import (  # the card's privacy numbers, tied to the weights they were measured on
    check_report_matches_weights,
    push_to_hub,
    write_model_card,
)
from mixsyn_utils.variants import load_model_variant, model_fingerprints  # the sampled model
from mixsyn_utils.outputs import (  # one run per output folder, written whole or not at all; a full disk in one line
    OutputLock,
    atomic_replace_dir,
    check_output_dir,
    output_write_errors,
    temp_sibling,
)
from mixsyn_utils.placeholders import load_token_map, rewrite_caption  # textual-inversion placeholders in prompts
from mixsyn_utils.resumable import ResumableWork, run_signature  # sampling batches saved; a resume has the same inputs
from mixsyn_utils.scores import load_scores  # a scores dataset as arrays
from mixsyn_utils.utility import utility_metrics  # R-precision, pixel Fréchet distance, BRISQUE

# Fails with a clear message when the installed diffusers is older than the one these scripts are written for.
check_min_version("0.42.0")

METRIC_KEYS = ("auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "balanced_accuracy")
# The flags naming what evaluate.py reads (--output_dir must stay clear of them), and those of them that may be a
# local path or a Hub id, checked at the start of `main` (the model flags: by `load_model_variant`, before sampling).
INPUT_FLAGS = ("scores", "reference_scores", "member_dataset", "nonmember_dataset", "generations",
               "pretrained_model_name_or_path", "unet_path", "lora_weights", "textual_inversion", "rprecision_model",
               "clip_pretrained", "domains_file", "write_card")
PATHS_OR_HUB_IDS = ("scores", "reference_scores", "member_dataset", "nonmember_dataset", "generations",
                    "rprecision_model", "write_card")
LOW_FPRS = {"tpr_at_1pct_fpr": 0.01, "tpr_at_0.1pct_fpr": 0.001}


def parse_args(input_args=None):
    parser = ArgumentParser(description="Privacy (MIA), utility and extraction metrics with honest CIs.",
                            allow_abbrev=False)
    parser.add_argument("--scores", type=str, nargs="+", default=[], help="Scores datasets written by attack_*.py.")
    parser.add_argument("--reference_scores", type=str, nargs="+", default=None,
                        help="Scores of the pre-fine-tuning model, one per --scores (same order, same images): "
                             "reports the change in AUC/TPR with a paired bootstrap CI.")
    parser.add_argument("--score_column", type=str, default="score", help="The score column to evaluate.")
    parser.add_argument("--bootstrap", type=int, default=1000, help="Bootstrap resamples for every CI.")
    parser.add_argument("--target_fpr", type=float, default=0.01, help="FPR the calibrated threshold is chosen at.")
    parser.add_argument("--member_dataset", type=str, default=None,
                        help="Members (image, prompt, domain), as given to the attacks: blind baseline, extraction.")
    parser.add_argument("--nonmember_dataset", type=str, default=None,
                        help="Non-members: blind baseline, and the extraction control (false positives).")
    parser.add_argument("--caption_column", type=str, default="prompt", help="Caption column of the two datasets.")
    parser.add_argument("--generate", action="store_true", help="Sample images from the model below (seeded).")
    parser.add_argument("--generations", type=str, default=None,
                        help="Instead of --generate: a generations dataset (image, prompt, domain).")
    add_pretrained_model_args(parser, required=False, help="Model to sample (as the attacks load it).")
    add_model_variant_args(parser)
    parser.add_argument("--domains_file", type=str, default=None, help="Domains and prompt templates (.json/.txt).")
    parser.add_argument("--num_images_per_prompt", type=int, default=4, help="Utility images per domain prompt.")
    parser.add_argument("--num_extraction_samples", type=int, default=0,
                        help="Extraction images per domain prompt (Carlini et al. use hundreds; 0 = use the "
                             "utility images when members are given).")
    parser.add_argument("--num_inference_steps", type=int, default=50, help="Sampler steps.")
    parser.add_argument("--guidance_scale", type=float, default=7.5, help="Classifier-free guidance scale.")
    parser.add_argument("--sample_batch_size", type=int, default=8, help="Images per pipeline call.")
    parser.add_argument("--rprecision_model", type=str, default=None,
                        help="Offline R-precision scorer: a domain classifier folder (VICTIM/rprecision_model).")
    parser.add_argument("--clip_model", type=str, default="ViT-B-32", help="open_clip model for CLIP-R-precision.")
    parser.add_argument("--clip_pretrained", type=str, default=None,
                        help="open_clip pretrained tag or local checkpoint; enables CLIP-R-precision.")
    parser.add_argument("--no_brisque", action="store_true", help="Skip BRISQUE.")
    parser.add_argument("--extraction_k", type=int, default=10, help="k of (k, ℓ2, δ)-eidetic memorization.")
    parser.add_argument("--extraction_delta", type=float, default=0.1, help="δ: tiled RMS distance on [0, 1] pixels.")
    parser.add_argument("--extraction_tiles", type=int, default=4, help="Tiles per side for the tiled ℓ2.")
    parser.add_argument("--seed", type=int, default=0, help="Seeds bootstraps, the calibration split and sampling.")
    parser.add_argument("--output_dir", type=str, required=True, help="Where results.json, report.md, PNGs go.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing non-empty --output_dir.")
    publish = parser.add_argument_group("publish (attach the privacy numbers to a trained model's card)")
    publish.add_argument("--write_card", type=str, default=None,
                         help="Output folder of a MixSyn training script: rewrite its README.md with these privacy "
                              "numbers; refused unless every --scores dataset attacked exactly the weights in it "
                              "(the attacks record their sha256).")
    publish.add_argument("--push_to_hub", action="store_true", help="Then upload that folder to the Hub.")
    publish.add_argument("--hub_model_id", type=str, default=None, help="Hub repo id; default: the folder name.")
    add_hub_token_arg(publish)
    args = parser.parse_args(input_args)

    if not args.scores and not (args.generate or args.generations):
        raise InputError("nothing to evaluate: pass --scores and/or --generate / --generations")
    require_positive(args, "bootstrap", "num_images_per_prompt", "sample_batch_size", "extraction_tiles",
                     "extraction_k", "num_inference_steps")
    require_range(args, "extraction_delta", 0, 1, include_low=False)  # an RMS distance of [0, 1] pixels
    require_non_negative(args, "num_extraction_samples", "guidance_scale", "seed")
    require_range(args, "target_fpr", 0, 1, include_low=False, include_high=False)
    if args.reference_scores is not None and len(args.reference_scores) != len(args.scores):
        raise InputError(f"--reference_scores needs one dataset per --scores ({len(args.scores)}), "
                         f"got {len(args.reference_scores)}")
    if args.write_card is not None and not args.scores:
        raise InputError("--write_card attaches privacy numbers: pass the --scores of attacks on its weights")
    if args.push_to_hub and args.write_card is None:
        raise InputError("--push_to_hub uploads the --write_card folder: pass --write_card")
    if (args.member_dataset is None) != (args.nonmember_dataset is None):
        raise InputError("--member_dataset and --nonmember_dataset must be given together")
    if args.generate and args.generations:
        raise InputError("pass either --generate or --generations, not both")
    if args.generate and (args.pretrained_model_name_or_path is None or args.domains_file is None):
        raise InputError("--generate needs --pretrained_model_name_or_path and --domains_file")
    if args.clip_pretrained is not None and Path(args.clip_pretrained).exists() \
            and not args.clip_pretrained.endswith(".safetensors"):
        raise InputError(f"--clip_pretrained {args.clip_pretrained} must be a .safetensors file (pickled "
                         "checkpoints are never loaded)")
    if (args.generate or args.generations) and not args.no_brisque and not brisque_is_installed():
        raise InputError("the BRISQUE model is not installed: run `python -m mixsyn_utils.brisque --install` "
                         "or pass --no_brisque")
    if (args.generate or args.generations) and args.member_dataset is None and args.no_brisque \
            and args.rprecision_model is None and args.clip_pretrained is None:
        raise InputError("--generate/--generations: no metric to compute (give --rprecision_model, "
                         "--clip_pretrained, --member_dataset, or drop --no_brisque)")
    check_outputs_apart(args, ("output_dir",), INPUT_FLAGS)
    return args


def check_same_rows(all_scores, flag="--reference_scores"):
    """Paired datasets must score the same images with the same labels, or their differences are meaningless."""
    first = all_scores[0]
    for other in all_scores[1:]:
        if len(other["ids"]) != len(first["ids"]) or (other["ids"] != first["ids"]).any() \
                or (other["is_member"] != first["is_member"]).any():
            raise InputError(f"{flag} {other['path']} scores other members/non-members than {first['path']}")


def check_rows_within(all_scores, flag="--scores"):
    """Every dataset must score the images of the largest one, or a subset of them, with the same labels."""
    largest = max(all_scores, key=lambda scores: len(scores["ids"]))
    labels = dict(zip(largest["ids"], largest["is_member"]))
    for other in all_scores:
        if any(labels.get(image_id) != is_member for image_id, is_member in zip(other["ids"], other["is_member"])):
            raise InputError(f"{flag} {other['path']} scores other members/non-members than {largest['path']}")


def privacy_block(scores, reference, args):
    member, nonmember = scores["scores"][scores["is_member"]], scores["scores"][~scores["is_member"]]
    point, intervals = roc_metrics(member, nonmember), bootstrap_ci(member, nonmember, args.bootstrap, args.seed)
    block = {"attack": scores["attack"], "model": scores["model"], "scores_path": scores["path"],
             "score_column": args.score_column, "member_is_lower": scores["member_is_lower"],
             "num_members": int(len(member)), "num_nonmembers": int(len(nonmember)),
             "fpr_resolution": 1.0 / len(nonmember),
             "low_fpr_measurable": {key: low_fpr_measurable(fpr, len(nonmember)) for key, fpr in LOW_FPRS.items()}}
    for key in METRIC_KEYS:
        block[key], block[f"{key}_ci"] = point[key], intervals[key]
    # An AUC below 0.5 means members are separable with the sign flipped: a leak, never "protected".
    if intervals["auc"][1] < 0.5:
        block["verdict"] = "inverted signal — still a leak"
    elif intervals["auc"][0] > 0.5:
        block["verdict"] = "leak"
    else:
        block["verdict"] = "no detectable leak" + (" (AUC < 0.5 is not protection)" if point["auc"] < 0.5 else "")
    block["inverted_signal"] = point["auc"] < 0.5
    calibrated = calibrated_attack(scores["scores"], scores["is_member"], scores["domains"], args.target_fpr, args.seed)
    if scores["member_is_lower"]:  # report direction and threshold in the raw score column's own units
        calibrated["threshold"] = None if calibrated["threshold"] is None else -calibrated["threshold"]
        calibrated["direction"] = {"higher_is_member": "lower_is_member",
                                   "lower_is_member": "higher_is_member"}[calibrated["direction"]]
    calibrated["fpr_resolution"] = 1.0 / calibrated["num_test_nonmembers"]
    calibrated["target_fpr_measurable"] = low_fpr_measurable(args.target_fpr, calibrated["num_test_nonmembers"])
    block["calibrated"] = calibrated
    block["reference"] = None
    if reference is not None:
        deltas = paired_bootstrap_deltas(member, nonmember, reference["scores"][reference["is_member"]],
                                         reference["scores"][~reference["is_member"]], args.bootstrap, args.seed)
        block["reference"] = {"scores_path": reference["path"], **deltas}
    block["per_timestep_auc"] = {column: roc_metrics(values[scores["is_member"]], values[~scores["is_member"]])["auc"]
                                 for column, values in scores["per_timestep"].items()}
    return block


def attacked_model_key(model):
    """Which model a scores dataset attacked: the sha256 of every weight it loaded (`weights_sha256`) and the weights
    variant, so `victim/pipeline` and `/abs/victim/pipeline/` are one model and a LoRA on another base is another.
    A record without digests falls back to its paths resolved (a Hub id as it is)."""
    model = model or {}
    if model.get("weights_sha256"):
        return json.dumps([sorted(set(model["weights_sha256"].values())), model.get("variant")])
    resolved = {key: str(Path(value).resolve()) if isinstance(value, str) and Path(value).exists() else value
                for key, value in model.items()}
    return json.dumps(resolved, sort_keys=True)


def worst_case(privacy):
    """Per attacked model (blocks with the same `attacked_model_key`), the block with the largest calibrated test
    TPR at --target_fpr (ties: the larger test AUC in the calibrated direction): what an attacker choosing among
    the attacks run would get."""
    by_model = {}
    for name, block in privacy.items():
        by_model.setdefault(attacked_model_key(block["model"]), []).append(name)
    cases = []
    for names in by_model.values():
        ranking = sorted(names, key=lambda name: (-privacy[name]["calibrated"]["test_tpr"],
                                                  -privacy[name]["calibrated"]["test_auc"]))
        block, calibrated = privacy[ranking[0]], privacy[ranking[0]]["calibrated"]
        records = []
        for name in names:  # every spelling of the model's paths seen among its blocks
            if privacy[name]["model"] not in records:
                records.append(privacy[name]["model"])
        case = {"model": block["model"], "model_records": records, "scores": ranking[0], "attack": block["attack"],
                "direction": calibrated["direction"], "calibrated_tpr": calibrated["test_tpr"],
                "calibrated_fpr": calibrated["test_fpr"], "target_fpr": calibrated["target_fpr"],
                "calibrated_fpr_resolution": calibrated["fpr_resolution"],
                "target_fpr_measurable": calibrated["target_fpr_measurable"]}
        for key in ("auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr"):
            case[key], case[f"{key}_ci"] = block[key], block[f"{key}_ci"]
        for key in ("num_members", "num_nonmembers", "fpr_resolution", "low_fpr_measurable"):
            case[key] = block[key]
        cases.append(dict(case, ranking=ranking))
    return cases


def blind_baseline(args, members, nonmembers, all_scores):
    if all_scores and "id" in members.column_names:
        scored_members = set().union(*(scores["ids"][scores["is_member"]] for scores in all_scores))
        if set(map(str, members["id"])) != scored_members:
            raise InputError(f"--member_dataset {args.member_dataset} is not the member set of --scores")
    features = blind_features(list(members["image"]) + list(nonmembers["image"]),
                              list(members[args.caption_column]) + list(nonmembers[args.caption_column]))
    is_member = np.arange(len(features)) < len(members)
    return blind_baseline_auc(features, is_member, seed=args.seed, num_resamples=args.bootstrap)


def load_member_sets(args):
    """Members and non-members (or None, None), their images decoded and captions checked once, before sampling."""
    if args.member_dataset is None:
        return None, None
    sets = []
    for flag, path in (("--member_dataset", args.member_dataset), ("--nonmember_dataset", args.nonmember_dataset)):
        dataset = load_image_dataset(path, required_columns=("image", args.caption_column, "domain"), flag=flag)
        check_text_column(dataset, args.caption_column, f"{flag} {path}")
        check_images_decode(dataset, "image", f"{flag} {path}")
        sets.append(dataset)
    if min(map(len, sets)) < BLIND_BASELINE_FOLDS:
        raise InputError(f"--member_dataset and --nonmember_dataset need ≥ {BLIND_BASELINE_FOLDS} images each for "
                         f"the blind baseline's {BLIND_BASELINE_FOLDS}-fold CV, got {len(sets[0])} and {len(sets[1])}")
    return sets


def check_safetensors_file(path, flag):
    """`path` must be a safetensors file whose header reads (its tensors are read later, after sampling)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as weights:
            weights.keys()
    except Exception as error:  # noqa: BLE001 - missing, truncated or another format: all end the same way
        raise InputError(f"{flag} {path.parent}: {path.name} is not a readable safetensors file "
                         f"({first_line(error)})") from None


def check_before_sampling(args, members, generations):
    """What would otherwise fail or mislead only after the images are sampled, checked before it.

    The R-precision scorer's weights must be a safetensors file and it must know every sampled domain; extraction
    needs the members' resolution divisible
    by --extraction_tiles, and every member domain among the sampled ones (a domain never sampled would be
    reported as "0 extracted").
    """
    if args.rprecision_model is not None and not (Path(args.rprecision_model) / "config.json").is_file():
        raise InputError(f"--rprecision_model {args.rprecision_model} has no config.json (train_domain_classifier)")
    if args.rprecision_model is not None:
        check_safetensors_file(Path(args.rprecision_model) / "model.safetensors", "--rprecision_model")
    if not (args.generate or args.generations):
        return
    sampled = set(load_domains(args.domains_file)[0]) if args.generate else set(generations["domain"])
    if args.rprecision_model is not None and args.clip_pretrained is None:
        known = set(json.loads((Path(args.rprecision_model) / "config.json").read_text())["domain_names"])
        if sampled - known:
            raise InputError(f"--rprecision_model {args.rprecision_model} does not know domain(s) "
                             f"{sorted(sampled - known)}")
    if members is not None:
        resolution = min(members[0]["image"].size)
        if resolution % args.extraction_tiles:
            raise InputError(f"--extraction_tiles {args.extraction_tiles} must divide the members' resolution "
                             f"{resolution}")
        never_sampled = sorted(set(members["domain"]) - sampled)
        if never_sampled:
            raise InputError(f"--member_dataset {args.member_dataset} has domain(s) {never_sampled} that are never "
                             "sampled, so extraction could not find them; give members of the sampled domains only")


def generate_images(args, num_per_prompt):
    """num_per_prompt images for every (domain, template), seeded per image; batches resumable and sharded.

    Returns (generations on the main process / None elsewhere, the `ResumableWork` to clean up once saved).
    """
    import torch
    from accelerate import Accelerator
    from datasets import Dataset, Features, Image as ImageFeature, Value

    domain_names, templates = load_domains(args.domains_file)
    token_map = load_token_map(args.textual_inversion) if args.textual_inversion else {}
    plan = generation_plan(domain_names, templates, num_per_prompt, args.seed)
    batches = [plan[start:start + args.sample_batch_size] for start in range(0, len(plan), args.sample_batch_size)]
    accelerator = Accelerator()
    signature = run_signature(flag_values(args), inputs={
        "domains": [domain_names, [list(pair) for pair in templates]],
        **model_fingerprints(args.pretrained_model_name_or_path, args.revision, args.unet_path, args.lora_weights,
                             args.textual_inversion)})
    work = ResumableWork(args.output_dir, signature, accelerator, discard_other_settings=args.overwrite)
    pipeline = load_model_variant(args.pretrained_model_name_or_path, args.revision, args.variant, args.unet_path,
                                  args.lora_weights, args.textual_inversion).to(accelerator.device)
    pipeline.set_progress_bar_config(disable=True)
    features = Features({"id": Value("string"), "image": ImageFeature(), "prompt": Value("string"),
                         "domain": Value("string"), "sample_index": Value("int32"), "seed": Value("int64")})

    def generate_unit(unit):
        rows = batches[unit]
        images = pipeline([rewrite_caption(row["prompt"], row["domain"], token_map, for_pipeline=True) for row in rows],
                          num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                          generator=[torch.Generator().manual_seed(row["seed"]) for row in rows]).images
        return Dataset.from_list([dict(row, image=image) for row, image in zip(rows, images)], features=features)

    return work.run(len(batches), generate_unit, desc="Generating"), work


def plot_roc(all_scores, path):
    """Log-log ROC (LiRA convention: the low-FPR regime is what matters), one curve per scores dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    figure, axis = plt.subplots(figsize=(5, 5))
    floor = 1.0 / max(len(s["scores"]) for s in all_scores)
    for scores in all_scores:
        fpr, tpr, _ = roc_curve(scores["is_member"], scores["scores"])
        auc = roc_metrics(scores["scores"][scores["is_member"]], scores["scores"][~scores["is_member"]])["auc"]
        axis.plot(np.maximum(fpr, floor), np.maximum(tpr, floor), label=f"{scores['name']} (AUC {auc:.3f})")
    axis.plot([floor, 1], [floor, 1], "k--", linewidth=1, label="chance")
    axis.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1), xlabel="FPR", ylabel="TPR",
             title="Membership inference ROC (log-log)")
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(args):
    with OutputLock(args.output_dir):  # a second run into this folder is refused
        check_output_dir(args.output_dir, args.overwrite)  # under the lock: the check and the lock are one step
        check_paths_or_hub_ids(args, *PATHS_OR_HUB_IDS)
        all_scores = [load_scores(path, args.score_column) for path in args.scores]
        references = [load_scores(path, args.score_column, "--reference_scores")
                      for path in args.reference_scores or []]
        if all_scores:
            check_rows_within(all_scores)
        for scores, reference in zip(all_scores, references):
            check_same_rows([scores, reference])
        if args.write_card:  # before any heavy work: the scores must have attacked exactly the folder's weights
            check_report_matches_weights({"privacy": {s["name"]: s for s in all_scores}}, args.write_card,
                                         "--write_card")
        members, nonmembers = load_member_sets(args)
        generations = None
        if args.generations:
            generations = load_image_dataset(args.generations, required_columns=("image", "prompt", "domain"),
                                             flag="--generations")
            check_images_decode(generations, "image", f"--generations {args.generations}")
        check_before_sampling(args, members, generations)
        if args.generate:  # the sampled model's kind (SD-1.x/2.x or SDXL; SD3/Flux refused), read before sampling
            check_pretrained_model(args.pretrained_model_name_or_path, args.revision)

        # Sampling is the only heavy step: it alone is sharded over processes; everything else is main-process work.
        work = None
        if args.generate:
            generations, work = generate_images(args, max(args.num_images_per_prompt, args.num_extraction_samples))
            if generations is None:  # not the main process
                return None

        results = {"schema_version": 1, "bootstrap": args.bootstrap, "seed": args.seed, "confidence": 0.95,
                   "privacy": {}, "worst_case": [], "blind_baseline": None, "utility": None, "extraction": None}
        names = [scores["name"] for scores in all_scores]
        for index, (scores, reference) in enumerate(zip(all_scores, references or [None] * len(all_scores))):
            name = scores["name"] if names.count(scores["name"]) == 1 else f"{index}_{scores['name']}"
            print(f"Evaluating {scores['path']} ({scores['attack']}, {len(scores['scores'])} images)")
            results["privacy"][name] = privacy_block(scores, reference, args)
        results["worst_case"] = worst_case(results["privacy"])
        if args.member_dataset is not None:
            results["blind_baseline"] = blind_baseline(args, members, nonmembers, all_scores)
        if generations is not None:
            # Utility uses the first --num_images_per_prompt samples of each prompt; extraction uses them all.
            utility_set = generations.filter(lambda row: row["sample_index"] < args.num_images_per_prompt) \
                if "sample_index" in generations.column_names else generations
            # Fidelity: the pixel Fréchet distance of the generations to the held-out real images (the non-members).
            results["utility"] = utility_metrics(utility_set, args.rprecision_model, args.clip_model,
                                                 args.clip_pretrained, with_brisque=not args.no_brisque,
                                                 fidelity_reference=None if nonmembers is None else nonmembers["image"])
            if members is not None:  # (k, ℓ2, δ)-eidetic extraction; non-members are the false-positive control
                results["extraction"] = extraction_metrics(members, nonmembers, generations, args.extraction_k,
                                                           args.extraction_delta, args.extraction_tiles)

        with output_write_errors(args.output_dir):  # a full disk: one line, nothing partial left
            work_dir = temp_sibling(args.output_dir)
            try:
                if all_scores:
                    plot_roc(all_scores, work_dir / "roc_loglog.png")
                if args.generate:
                    save_dataset(generations, work_dir / "generations")
                (work_dir / "results.json").write_text(json.dumps(results, indent=2, allow_nan=False))
                (work_dir / "report.md").write_text(render_markdown(results))
                atomic_replace_dir(work_dir, args.output_dir)
            finally:
                if work_dir.exists():
                    shutil.rmtree(work_dir, ignore_errors=True)
        if work is not None:
            work.cleanup()
        print(render_markdown(results))
        if args.write_card:  # the folder's card with these numbers (checked against its weights), then the Hub
            with output_write_errors(args.write_card, "--write_card"):
                write_model_card(args.write_card, results, args.hub_model_id, source="--write_card")
            if args.push_to_hub:
                push_to_hub(args.write_card, args.hub_model_id, args.hub_token)
        return results


if __name__ == "__main__":
    run_cli(main, parse_args)
