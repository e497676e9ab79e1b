"""The MixSyn study: which models a config asks for, the stages that make and score them, and the report.

Model names: `pretrained`, and `<method>-<setting>` where setting is `clean` (ratio 0), `perturbed` (ratio 1;
Mixup-I and Mixup-P coincide there) or `<mode>-<ratio>` (e.g. `image-0.5`, `pixel-0.3`). Table 5's component
ablation adds `dreambooth[<modules>]-<setting>`.
"""

import copy
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from mixsyn_utils.cli import InputError

METHOD_SCRIPTS = {
    "dreambooth": "train_dreambooth_mixsyn.py",
    "lora": "train_lora_mixsyn.py",
    "dreambooth_lora": "train_lora_mixsyn.py",
    "textual_inversion": "train_textual_inversion_mixsyn.py",
}
METHOD_TITLES = {"pretrained": "Pre-trained", "dreambooth": "DreamBooth", "textual_inversion": "Textual Inversion",
                 "lora": "LoRA", "dreambooth_lora": "DreamBooth+LoRA"}
ATTACKS = {"secmi": "attack_secmi.py", "pia": "attack_pia.py"}


@dataclass
class Stage:
    """One script call: `script` with `flags` (dict flag -> value; lists expand, True is a bare switch)."""

    name: str
    script: str
    flags: dict
    output: str
    depends_on: list = field(default_factory=list)
    num_processes: int = 1

    def argv(self):
        argv = []
        for flag, value in self.flags.items():
            if value is None or value is False:
                continue
            argv.append(f"--{flag}")
            if value is True:
                continue
            argv.extend(str(v) for v in value) if isinstance(value, (list, tuple)) else argv.append(str(value))
        return argv


def _merge(base, override):
    merged = copy.deepcopy(base)
    for key, value in override.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def load_config(path, quick=False):
    """Read a TOML config; with `quick`, apply its [quick] overrides (fewer methods, tables, steps)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--config {path} does not exist")
    try:
        config = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise InputError(f"--config {path} is not valid TOML ({error})") from error
    for section in ("experiment", "tables", "stages"):
        if section not in config:
            raise InputError(f"--config {path} has no [{section}] table")
    unknown = sorted(set(config["experiment"].get("methods", [])) - set(METHOD_SCRIPTS))
    if unknown:
        raise InputError(f"--config {path}: unknown method {unknown[0]!r} (choose from {', '.join(METHOD_SCRIPTS)})")
    if quick:
        overrides = config.get("quick", {})
        config["stages"] = _merge(config["stages"], overrides.get("stages", {}))
        config["experiment"]["methods"] = overrides.get("methods", config["experiment"]["methods"])
        if "tables" in overrides:
            config["tables"] = {name: config["tables"][name] for name in overrides["tables"]}
        if overrides.get("table5") is False:
            config.pop("table5", None)
        if "figure4" in config:
            config["figure4"]["ratios"] = overrides.get("figure4_ratios", config["figure4"]["ratios"])
            config["figure4"]["modes"] = overrides.get("figure4_modes", config["figure4"]["modes"])
    return config


def setting_name(mode, ratio):
    """Canonical name of a mixup setting; ratio 0 and 1 are the same set whatever the mode."""
    if ratio == 0:
        return "clean", "image", 0.0
    if ratio == 1:
        return "perturbed", "image", 1.0
    return f"{mode}-{ratio:g}", mode, float(ratio)


def planned_models(config):
    """{model name: {method, mixup_mode, mixup_ratio, trainable_modules}} in a stable order, deduplicated."""
    models = {}

    def add(method, mode, ratio, trainable_modules=None):
        setting, mode, ratio = setting_name(mode, ratio)
        name = f"{method}-{setting}" if trainable_modules is None else f"dreambooth[{'+'.join(trainable_modules)}]-{setting}"
        models.setdefault(name, {"method": method, "mixup_mode": mode, "mixup_ratio": ratio,
                                 "trainable_modules": trainable_modules})
        return name

    for table in config["tables"].values():
        for method in config["experiment"]["methods"]:
            add(method, table["mixup_mode"], table["mixup_ratio"])
    if "table5" in config:
        for modules in config["table5"]["rows"].values():
            add("dreambooth", config["table5"]["mixup_mode"], config["table5"]["mixup_ratio"], list(modules))
    if "figure4" in config:
        for mode in config["figure4"]["modes"]:
            for ratio in config["figure4"]["ratios"]:
                add(config["figure4"]["method"], mode, ratio)
    return models


def model_flags(name, spec, experiment, out):
    """The flags that load model `name` in the attack and evaluation scripts."""
    pretrained = {"pretrained_model_name_or_path": str(out / experiment["pretrained_model_name_or_path"])
                  if experiment.get("build_victim") else experiment["pretrained_model_name_or_path"]}
    if spec is None:
        return pretrained
    if spec["method"] == "dreambooth":  # a full pipeline (UNet, text encoder, VAE may all be fine-tuned)
        return {"pretrained_model_name_or_path": str(out / "models" / name)}
    if spec["method"] in ("lora", "dreambooth_lora"):
        return dict(pretrained, lora_weights=str(out / "models" / name))
    return dict(pretrained, textual_inversion=str(out / "models" / name))


def plan_stages(config, output_dir):
    """Every stage of the study, in dependency order."""
    out, experiment, stage_flags = Path(output_dir), config["experiment"], config["stages"]
    local = (lambda key: str(out / experiment[key])) if experiment.get("build_victim") else (lambda key: experiment[key])
    pretrained = model_flags("pretrained", None, experiment, out)
    stages = []
    if experiment.get("build_victim"):
        stages.append(Stage("victim", "make_tiny_victim.py", dict(stage_flags.get("victim", {}),
                            output_dir=str(out / "victim"), overwrite=True), str(out / "victim")))
    base = ["victim"] if experiment.get("build_victim") else []
    stages.append(Stage("synthetic", "generate_synthetic.py", dict(
        stage_flags["synthetic"], **pretrained, domains_file=local("domains_file"),
        output_dir=str(out / "synthetic"), overwrite=True), str(out / "synthetic"), base))
    stages.append(Stage("perturbed", "perturb_antidreambooth.py", dict(
        stage_flags["perturb"], **pretrained, dataset_name=str(out / "synthetic"),
        class_data_dir=str(out / "class_images" / "perturb"), output_dir=str(out / "perturbed"), overwrite=True),
        str(out / "perturbed"), base + ["synthetic"]))

    models = planned_models(config)
    for name, spec in models.items():
        flags = dict(stage_flags.get("train", {}), **stage_flags.get(f"train_{spec['method']}", {}), **pretrained,
                     dataset_name=str(out / "synthetic"), mixup_mode=spec["mixup_mode"],
                     mixup_ratio=spec["mixup_ratio"], mixup_seed=experiment.get("seed", 0),
                     output_dir=str(out / "models" / name), overwrite=True)
        if spec["mixup_ratio"] > 0:
            flags["perturbed_dataset_name"] = str(out / "perturbed")
        if flags.get("with_prior_preservation"):
            flags["class_data_dir"] = str(out / "class_images" / "train")
        if spec["trainable_modules"] is not None:
            flags["trainable_modules"] = spec["trainable_modules"]
        stages.append(Stage(f"train:{name}", METHOD_SCRIPTS[spec["method"]], flags, str(out / "models" / name),
                            base + ["synthetic", "perturbed"]))

    data_flags = {"member_dataset": local("member_dataset"), "nonmember_dataset": local("nonmember_dataset")}
    for name in ["pretrained", *models]:
        spec = models.get(name)
        upstream = base + ([f"train:{name}"] if spec else [])
        for attack, script in ATTACKS.items():
            stages.append(Stage(f"{attack}:{name}", script, dict(
                stage_flags.get(attack, {}), **model_flags(name, spec, experiment, out), **data_flags,
                # Most models share the pretrained VAE encoder: each image is encoded once for all of them.
                latents_cache_dir=str(out / "latents_cache"),
                output_dir=str(out / "scores" / f"{name}-{attack}"), overwrite=True),
                str(out / "scores" / f"{name}-{attack}"), upstream))
        evaluate_flags = dict(stage_flags.get("evaluate", {}), **model_flags(name, spec, experiment, out),
                              **data_flags, scores=[str(out / "scores" / f"{name}-{a}") for a in ATTACKS],
                              generate=True, domains_file=local("domains_file"),
                              output_dir=str(out / "eval" / name), overwrite=True)
        if experiment.get("rprecision_model"):
            evaluate_flags["rprecision_model"] = local("rprecision_model")
        if experiment.get("clip_pretrained"):
            evaluate_flags["clip_pretrained"] = experiment["clip_pretrained"]
        upstream_scores = [f"{a}:{name}" for a in ATTACKS]
        if spec is not None:
            evaluate_flags["reference_scores"] = [str(out / "scores" / f"pretrained-{a}") for a in ATTACKS]
            upstream_scores += [f"{a}:pretrained" for a in ATTACKS]
        stages.append(Stage(f"evaluate:{name}", "evaluate.py", evaluate_flags, str(out / "eval" / name),
                            upstream + upstream_scores))
    return stages, models


def load_results(output_dir, models):
    """{model name: results.json dict} for the pre-trained model and every planned model that was evaluated."""
    results = {}
    for name in ["pretrained", *models]:
        path = Path(output_dir) / "eval" / name / "results.json"
        if path.is_file():
            results[name] = json.loads(path.read_text())
    return results
