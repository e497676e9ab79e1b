"""The fine-tuned model's README in diffusers' conventions, the privacy audit it may carry, and the Hub upload.

A training run writes `training_info.json` (what was trained, on what, how; no local path) and the card. The card
follows the diffusers examples (YAML: base_model, license, tags, instance_prompt, widget; validation images; how to
load the weights) and says what the run trained on: whose images (self-synthesized, the user's own, a dataset) and
what MixSyn did to them (nothing at ratio 0, a Mixup-I or Mixup-P ratio with its PGD budget), then, when attached,
the measured membership-inference risk. Privacy numbers are attached only when the scores record the sha256 of
exactly the weights in the folder (`weights_digest`) and, for weights trained on a base model (LoRA, textual
inversion), of that base model (`base_model_sha256`), so a card never shows numbers of other weights.
`evaluate.py --write_card` attaches them to a finished folder without retraining.

The Hub token is only handed to `huggingface_hub`; it never reaches a model card, a tracker or a log,
and an upload error is reported with the token masked.
"""

import json
import os
import re
from pathlib import Path

from .audit_report import privacy_lines
from .cli import InputError
from .resumable import model_weights_digest, weights_digest

TRAINING_INFO_FILE = "training_info.json"
# The licence of the base weights a fine-tune derives from: SD-1.x's, and SDXL's (as diffusers' SDXL DreamBooth-LoRA
# card writes it).
LICENSE = "creativeml-openrail-m"
SDXL_LICENSE = "openrail++"
SDXL_TAGS = ["stable-diffusion-xl", "stable-diffusion-xl-diffusers"]
# Per kind of fine-tune: the title and tags of the matching diffusers example's card, plus "mixsyn".
CARD_KINDS = {
    "dreambooth": ("DreamBooth", ["text-to-image", "dreambooth", "diffusers-training", "stable-diffusion",
                                  "stable-diffusion-diffusers"]),
    "dreambooth_lora": ("LoRA DreamBooth", ["text-to-image", "diffusers", "lora", "diffusers-training",
                                            "stable-diffusion", "stable-diffusion-diffusers"]),
    "text_to_image_lora": ("LoRA text2image fine-tuning", ["stable-diffusion", "stable-diffusion-diffusers",
                                                           "text-to-image", "diffusers", "diffusers-training", "lora"]),
    "textual_inversion": ("Textual inversion text2image fine-tuning", [
        "stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers", "textual_inversion",
        "diffusers-training"]),
}


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


def hub_id_or_none(name_or_path):
    """A Hub id as given; None for a local path, which a published card must not show."""
    if name_or_path is None:
        return None
    text = str(name_or_path)
    if Path(text).exists() or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", text) or text.startswith("."):
        return None
    return text


def training_info(kind, method, *, pretrained_model_name_or_path, dataset_name, mix_info, trained, num_images,
                  source="dataset", revision=None, instance_prompt=None, validation_prompt=None,
                  train_text_encoder=False, trigger_words=(), tokens=None, base_kind="sd", vae_name_or_path=None,
                  use_dora=False):
    """What a training run did, for its card: `CARD_KINDS` kind, method, data, mix, steps; Hub ids only.

    `source`: where the images came from (`training_data.TrainingSet.source`); `trained`: {"steps",
    "learning_rate", "resolution"} as run (after --scale_lr and the native-resolution default); `trigger_words`:
    the domain names its captions use; `tokens`: textual inversion's public token map. `base_model_sha256` names the
    base model's weights (`resumable.model_weights_digest`), which the scores attached to the card must have
    attacked too. `mix.perturbed` is true only when perturbed images were trained on (a perturbed set and a ratio
    above 0). `base_kind`: `models.SD` or `models.SDXL`;
    `vae_name_or_path`: --pretrained_vae_model_name_or_path.
    """
    given = mix_info["perturbed_dataset"] is not None
    return {"kind": kind, "method": method, "base_model": hub_id_or_none(pretrained_model_name_or_path),
            "base_kind": base_kind, "vae": hub_id_or_none(vae_name_or_path), "custom_vae": vae_name_or_path is not None,
            "use_dora": bool(use_dora),
            "base_model_sha256": model_weights_digest(pretrained_model_name_or_path, revision),
            "training_data": hub_id_or_none(dataset_name), "source": source, "num_images": num_images,
            "instance_prompt": instance_prompt, "trigger_words": sorted(trigger_words), "tokens": tokens,
            "train_text_encoder": bool(train_text_encoder), "trained": trained,
            "mix": dict(mix_info, perturbed_dataset=hub_id_or_none(mix_info["perturbed_dataset"]),
                        perturbed_set_given=given, perturbed=given and mix_info["ratio"] > 0),
            "validation_prompt": validation_prompt}


def read_training_info(output_dir, source="--write_card"):
    """The training_info.json of a folder a MixSyn training script wrote; `InputError` naming `source` without it."""
    info_file = Path(output_dir) / TRAINING_INFO_FILE
    if not info_file.is_file():
        raise InputError(f"{source} {output_dir} has no {TRAINING_INFO_FILE}: not a folder written by a MixSyn "
                         "training script")
    return json.loads(info_file.read_text())


def short_digest(digest):
    """A sha256 cut to 12 characters for a message; a Hub `id@commit` as it is."""
    return digest if "@" in str(digest) else str(digest)[:12]


def check_report_matches_weights(report, output_dir, source):
    """Every privacy block of `report` must have attacked the weights in `output_dir`; returns their digest.

    The folder's `weights_digest` must be among the block's recorded `weights_sha256`, and for weights trained on a
    base model (every kind but a DreamBooth pipeline, which is its own base) the block's pretrained model must be
    that base (training_info.json's `base_model_sha256`): a LoRA measured on another base model is another model.
    """
    info, digest = read_training_info(output_dir, source), weights_digest(output_dir)
    base = info.get("base_model_sha256")
    for name, block in report["privacy"].items():
        attacked = (block.get("model") or {}).get("weights_sha256") or {}
        if digest not in attacked.values():
            found = ", ".join(short_digest(value) for value in attacked.values()) or "no weights hash"
            raise InputError(f"{source}: the scores {name!r} were measured on other weights ({found}) than those in "
                             f"{output_dir} ({digest[:12]}); attack these weights and evaluate again")
        if info.get("kind") == "dreambooth":
            continue
        if base is None:
            raise InputError(f"{source}: {output_dir}/{TRAINING_INFO_FILE} records no base_model_sha256, so the base "
                             f"model the scores {name!r} attacked cannot be checked; retrain to record it")
        attacked_base = attacked.get("pretrained_model_name_or_path")
        if attacked_base != base:
            raise InputError(f"{source}: the scores {name!r} attacked these {info.get('method', '')} weights on "
                             f"another base model (sha {short_digest(attacked_base)}) than the one they were "
                             f"trained on (sha {short_digest(base)}); attack them on their base model")
    return digest


def is_sdxl(info):
    return info.get("base_kind") == "sdxl"


def usage_snippet(info, repo_id):
    """Python that loads the published weights the diffusers way (load_lora_weights / load_textual_inversion; for
    SDXL each placeholder into both text encoders)."""
    base = info["base_model"] or "path/to/the/base/model"  # a local base model is not named in a published card
    tokens = info["tokens"] or {}
    prompt = info["validation_prompt"] or info["instance_prompt"] or (
        f"a photo of {next(iter(tokens.values()))['placeholder']}" if tokens else
        f"a photo of {info['trigger_words'][0]}" if info["trigger_words"] else "a photo")
    pipeline = "StableDiffusionXLPipeline" if is_sdxl(info) else "StableDiffusionPipeline"
    lines = ["```python", "import torch", f"from diffusers import {pipeline}", ""]
    if info["kind"] == "dreambooth":
        lines.append(f'pipe = {pipeline}.from_pretrained("{repo_id}", dtype=torch.float16).to("cuda")')
    else:
        lines.append(f'pipe = {pipeline}.from_pretrained("{base}", dtype=torch.float16).to("cuda")')
    if info["kind"] in ("dreambooth_lora", "text_to_image_lora"):
        lines.append(f'pipe.load_lora_weights("{repo_id}")')
    elif is_sdxl(info) and tokens:
        lines.append("# each placeholder has one file per text encoder (token_map.json lists them)")
        for entry in tokens.values():
            for file, suffix in ((entry["file"], ""), (entry["file_2"], "_2")):
                lines.append(f'pipe.load_textual_inversion("{repo_id}", weight_name="{file}", token="{entry["placeholder"]}", '
                             f"text_encoder=pipe.text_encoder{suffix}, tokenizer=pipe.tokenizer{suffix})")
    elif len(tokens) == 1:
        lines.append(f'pipe.load_textual_inversion("{repo_id}")  # learned_embeds.safetensors')
    elif tokens:
        names = ", ".join(f'"{entry["file"]}"' for entry in tokens.values())
        lines += ["# one file per domain (token_map.json lists them)", f"for weight_name in [{names}]:",
                  f'    pipe.load_textual_inversion("{repo_id}", weight_name=weight_name)']
    return lines + [f'image = pipe("{prompt}").images[0]', "```"]


def training_data_text(info):
    """Whose images the run trained on: self-synthesized (generate_synthetic.py's), the user's own
    (--instance_data_dir), or a dataset, by its Hub id when it has one."""
    count, source = info["num_images"], info.get("source")
    if source == "instance_data_dir":
        return f"{count} of your own instance images"
    if source == "generate_synthetic.py":
        return f"{count} self-synthesized images" + (f" ({info['training_data']})" if info["training_data"] else "")
    return f"{count} images of {info['training_data'] or 'a local dataset'}"


def mix_text(mix):
    """What MixSyn did to the training images, as the run did it: nothing (ratio 0, or no perturbed set), every
    image perturbed (ratio 1), or a Mixup-I / Mixup-P ratio, with the perturbed set's PGD budget."""
    if not mix["perturbed"]:
        unused = "; the perturbed set given was not used" if mix.get("perturbed_set_given") else ", no perturbed set"
        return f"clean images only (no perturbed image: MixSyn ratio 0{unused})"
    budget = ", ".join(f"{key} = {value}" for key, value in sorted(mix["pgd"].items())) or "not recorded"
    if mix["ratio"] >= 1:
        return f"every image replaced by its adversarially perturbed copy (MixSyn ratio 1; PGD budget: {budget})"
    if mix["mode"] == "pixel":
        done = f"{mix['ratio']:.0%} of every image's pixels taken from its adversarially perturbed copy"
    else:
        done = f"{mix['ratio']:.0%} of the images replaced by their adversarially perturbed copies"
    mode = "Mixup-P" if mix["mode"] == "pixel" else "Mixup-I"
    return f"MixSyn {mode} at ratio {mix['ratio']}, {done} (PGD budget: {budget})"


def card_title_and_tags(info):
    """The matching diffusers example's card title and tags (SDXL: its SDXL scripts'), plus "mixsyn"."""
    title, tags = CARD_KINDS[info["kind"]]
    if info.get("use_dora"):
        tags = ["dora" if tag == "lora" else tag for tag in tags]
    if not is_sdxl(info):
        return title, tags + ["mixsyn"]
    tags = [tag for tag in tags if not tag.startswith("stable-diffusion")]
    if info["kind"] == "dreambooth_lora":
        return f"SDXL {title}", tags + ["template:sd-lora"] + SDXL_TAGS + ["mixsyn"]
    return title, tags + SDXL_TAGS + ["mixsyn"]


def model_card_text(info, output_dir, digest, repo_id, privacy_report=None):
    """README.md of a fine-tuned folder: diffusers' card YAML and sections, the MixSyn mix, the weights' sha256
    and, when given, the privacy table of evaluate.py (`privacy_lines`)."""
    from huggingface_hub import ModelCardData

    title, tags = card_title_and_tags(info)
    images = sorted(Path(output_dir).glob("image_*.png"), key=lambda path: int(path.stem.split("_")[1]))
    widget = ([{"text": info["validation_prompt"], "output": {"url": image.name}} for image in images]
              if images and info["validation_prompt"] else None)
    data = ModelCardData(base_model=info["base_model"], datasets=info["training_data"], library_name="diffusers",
                         license=SDXL_LICENSE if is_sdxl(info) else LICENSE, tags=tags, inference=True,
                         instance_prompt=info["instance_prompt"], widget=widget, weights_sha256=digest)
    trained, mix = info["trained"], info["mix"]
    lines = ["---", data.to_yaml(), "---", "", f"# {title} - {repo_id}", "",
             f"{info['method']} weights for {info['base_model'] or 'a local Stable Diffusion pipeline'}, fine-tuned "
             f"on {training_data_text(info)}: {mix_text(mix)}."]
    if widget:
        lines += ["", "<Gallery />"]
    lines += [""] + [f"![img_{i}](./{image.name})" for i, image in enumerate(images)]
    if info["tokens"]:
        files = "file (text_encoder) | file (text_encoder_2)" if is_sdxl(info) else "file"
        lines += ["", "## Placeholder tokens", "", f"| domain | token | vectors | {files} |",
                  "|---|---|---|---|" + ("---|" if is_sdxl(info) else "")]
        lines += [f"| {domain} | `{entry['placeholder']}` | {entry['num_vectors']} | {entry['file']} |"
                  + (f" {entry['file_2']} |" if is_sdxl(info) else "")
                  for domain, entry in sorted(info["tokens"].items())]
    elif info["instance_prompt"] or info["trigger_words"]:
        lines += ["", "## Trigger words", ""]
        if info["instance_prompt"]:
            lines += [f"You should use `{info['instance_prompt']}` to trigger the image generation."]
        lines += [f"Domains named in the captions: {', '.join(info['trigger_words'])}"] if info["trigger_words"] else []
    if info["kind"] in ("dreambooth", "dreambooth_lora") or is_sdxl(info):
        lines += ["", f"LoRA for the text encoder was enabled: {info['train_text_encoder']}."
                  if info["kind"] != "dreambooth" else f"Text encoder trained: {info['train_text_encoder']}."]
    if is_sdxl(info):
        vae = info.get("vae") or ("a local VAE" if info.get("custom_vae") else "none (the base model's own)")
        lines += ["", f"Special VAE used for training: {vae}."]
    pgd = ", ".join(f"{key} = {value}" for key, value in sorted(mix["pgd"].items())) or "not recorded"
    perturbed_set = (f"{mix['perturbed_dataset'] or 'a local dataset'}; PGD budget: {pgd}" if mix["perturbed"] else
                     "none" + (" (given, not used at ratio 0)" if mix.get("perturbed_set_given") else ""))
    lines += ["", "## How to use", ""] + usage_snippet(info, repo_id) + [
        "", "## Training details", "",
        f"- Method: {info['method']}, {trained['steps']} steps, learning rate {trained['learning_rate']}, "
        f"resolution {trained['resolution']}",
        f"- MixSyn mixup: mode = {mix['mode']}, ratio = {mix['ratio']}, seed = {mix['seed']}, pattern = {mix['pattern']}",
        f"- Perturbed set: {perturbed_set}",
        f"- Weights sha256: `{digest}` (of the weight files in this repository)", ""]
    if privacy_report:
        lines += privacy_lines(privacy_report)
        lines += ["", "Measured on exactly these weights (the attacks record the sha256 above).", ""]
    else:
        lines += ["No privacy audit attached: attack these weights, then attach the numbers with "
                  "`evaluate.py --scores ... --write_card <this folder>`.", ""]
    return "\n".join(lines)


def write_model_card(output_dir, privacy_report=None, repo_id=None, source="--privacy_report"):
    """(Re)write `output_dir/README.md` from its training_info.json, with `privacy_report` checked against the weights.

    Returns the sha256 of the folder's weights (`weights_digest`).
    """
    info = read_training_info(output_dir, source)
    digest = weights_digest(output_dir)
    if privacy_report is not None:
        check_report_matches_weights(privacy_report, output_dir, source)
    text = model_card_text(info, output_dir, digest, repo_id or Path(output_dir).resolve().name, privacy_report)
    (Path(output_dir) / "README.md").write_text(text)
    return digest


def push_to_hub(output_dir, hub_model_id=None, hub_token=None):
    """Upload `output_dir` (without checkpoints and logs) to `hub_model_id`; a failure is one clear error."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = hub_model_id or Path(output_dir).name
    try:
        repo_id = create_repo(repo_id, exist_ok=True, token=hub_token).repo_id
        upload_folder(repo_id=repo_id, folder_path=str(output_dir), token=hub_token,
                      commit_message="MixSyn fine-tune", ignore_patterns=["checkpoint-*", ".*", "logs/*", "step_*"])
    except Exception as error:  # noqa: BLE001 - offline, auth and network errors all end the same way
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        reason = "HF_HUB_OFFLINE is set" if offline else (str(error).strip().splitlines() or [type(error).__name__])[0]
        if hub_token:
            reason = reason.replace(hub_token, "***")
        raise InputError(f"--push_to_hub to {repo_id} failed ({reason}); the trained model is saved in "
                         f"{output_dir}") from None
    return repo_id


def finish_outputs(accelerator, output_dir, info, validation_images, privacy_report=None, push=False,
                   hub_model_id=None, hub_token=None):
    """Main process: validation images (image_i.png), training_info.json, the card, then the optional Hub upload.

    With `privacy_report` (a results.json path) the report's scores must record these weights' sha256
    (`check_report_matches_weights`).
    """
    accelerator.end_training()
    if accelerator.is_main_process:
        for stale in Path(output_dir).glob("image_*.png"):
            stale.unlink()
        for index, image in enumerate(validation_images):
            image.save(Path(output_dir) / f"image_{index}.png")
        (Path(output_dir) / TRAINING_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
        report = read_privacy_report(privacy_report) if privacy_report else None
        write_model_card(output_dir, report, hub_model_id)
        if push:
            push_to_hub(output_dir, hub_model_id, hub_token)
