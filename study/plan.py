"""The MixSyn study's plan: which models a config asks for, and the stages that make, attack and evaluate them.

A model is (method, setting, epochs, seed). A *setting* is one training set, named in the config's [settings]:
the clean self-synthesized set (ratio 0), or a mix of it with a perturbed copy — `noise = "aspl"` (the
Anti-DreamBooth noise MixSyn uses) or `noise = "random"` (±η sign noise of the same budget, the control) — by
Mixup-I (`mode = "image"`, a ratio of the images) or Mixup-P (`mode = "pixel"`, a ratio of each image's pixels).
A *cell* is a model up to its training seed; the claims compare cells.

The dose-response trains one method ([dose_response] `method`: DreamBooth by default; DreamBooth+LoRA on SDXL, which
has no full DreamBooth) at a fixed learning rate for each of [dose_response] `epochs` (passes over the training
images), every setting of its list × every training seed. Each level continues the level below from its
last checkpoint (`--resume_from_checkpoint`, a constant schedule: the same data order and noise as one uninterrupted
run), so the levels are the points of one training trajectory and cost one run. The other settings of [top_level]
train at the last level only.
"""

import copy
import difflib
import json
import math
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
ATTACK_SCRIPTS = {"secmi": "attack_secmi.py", "pia": "attack_pia.py", "loss": "attack_loss.py",
                  "sima": "attack_loss.py", "clid": "attack_clid.py", "pfami": "attack_pfami.py"}
ATTACK_TITLES = {"secmi": "SecMI", "pia": "PIA", "loss": "Loss", "sima": "SimA", "clid": "CLiD", "pfami": "PFAMI"}
NOISES = ("aspl", "random")
PRETRAINED = "pretrained"
DOSE_RESPONSE_METHODS = ("dreambooth", "dreambooth_lora", "lora")  # trained in epochs, continued from checkpoints


@dataclass
class Stage:
    """One script call: `script` with `flags` (dict flag -> value; lists expand, True is a bare switch).

    `exclusive`: the stage runs alone with every core (everything after it waits for it anyway).
    `continues`: the flags that name an earlier stage's output (a checkpoint it resumes from): checked when the stage
    runs, not in the plan's up-front check, and its own output folder is emptied before it runs.
    """

    name: str
    script: str
    flags: dict
    output: str
    depends_on: list = field(default_factory=list)
    num_processes: int = 1
    exclusive: bool = False
    continues: tuple = ()

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


@dataclass(frozen=True)
class ModelSpec:
    """One fine-tuned model of the study."""

    method: str
    setting: str
    seed: int
    epochs: float = None  # the dose-response method: its level; None: the method's own training flags
    trainable_modules: tuple = None  # Table 5's component ablation (DreamBooth only)

    @property
    def cell(self):
        method = self.method if self.trainable_modules is None else f"dreambooth[{'+'.join(self.trainable_modules)}]"
        return f"{method}-{self.setting}" + (f"-e{self.epochs:g}" if self.epochs is not None else "")

    @property
    def name(self):
        return f"{self.cell}-seed{self.seed}"


def cell_name(method, setting, epochs=None):
    """The cell of `method` on `setting` (at `epochs` for the dose-response method), as `ModelSpec.cell` names it."""
    return ModelSpec(method, setting, 0, epochs).cell


def dose_response_method(config):
    """The method the dose-response, the [top_level] settings, the claims and extraction train: [dose_response]
    `method`, DreamBooth (Eq. 6) by default."""
    return config["dose_response"].get("method", "dreambooth")


def dose_response_title(config):
    """The dose-response method's name in the report: "DreamBooth (Eq. 6)", "DreamBooth+LoRA" or "LoRA"."""
    method = dose_response_method(config)
    return METHOD_TITLES[method] + (" (Eq. 6)" if method == "dreambooth" else "")


# ----------------------------------------------------------------------------------------------
# The config and its schema
# ----------------------------------------------------------------------------------------------

def _merge(base, override):
    merged = copy.deepcopy(base)
    for key, value in override.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def setting_of(config, name):
    """(mode, ratio, pattern, noise) of a named setting of [settings]; noise None for the clean set."""
    entry = config["settings"][name]
    return entry["mode"], float(entry["ratio"]), entry.get("pattern", "random"), entry.get("noise")


def top_level_epochs(config):
    """The last level of the dose-response: where the other settings, the tables and the claims' default sit."""
    return max(config["dose_response"]["epochs"])


NUMBER = "number"  # an int or a float (not a bool)
FLAG_VALUE = "flag value"  # a script flag's value: checked later by that script's own parse_args


@dataclass(frozen=True)
class Table:
    """A TOML table: `fields` {key: spec}, the `required` keys, and `any_key` (the spec of every other key;
    None: no other key is allowed). `doc` says what the table is for in error messages."""

    fields: dict
    required: tuple = ()
    any_key: object = None
    doc: str = "a table"


@dataclass(frozen=True)
class ListOf:
    """A TOML array whose items all match `item`; `non_empty` refuses []."""

    item: object
    non_empty: bool = False


@dataclass(frozen=True)
class Choice:
    """A string from `choices`, called a `what` in error messages (an unknown one gets the nearest valid one)."""

    choices: tuple
    what: str


def _partial(spec):
    """The spec of a [quick] override of `spec`: the same keys and types, none required (lists replace whole)."""
    if not isinstance(spec, Table):
        return spec
    return Table({key: _partial(value) for key, value in spec.fields.items()}, (), _partial(spec.any_key), spec.doc)


SETTING = Table({"mode": Choice(("image", "pixel"), "mixup mode"), "ratio": NUMBER, "pattern": str,
                 "noise": Choice(NOISES, "noise")}, ("mode", "ratio"),
                doc="a table {mode, ratio[, pattern, noise]}")
TABLE = Table({"title": str, "setting": str, "note": str}, ("title", "setting"), doc="a table {title, setting[, note]}")
CURVE = Table({"label": str, "settings": ListOf(str, True)}, ("label", "settings"), doc="a table {label, settings}")
STAGE_FLAGS = Table({}, (), FLAG_VALUE, doc="a table of the script's flags")
STAGE_NAMES = ("victim", "synthetic", "perturb", "perturb_random", "train",
               *(f"train_{method}" for method in METHOD_SCRIPTS), *ATTACK_SCRIPTS, "evaluate")
CONFIG_SCHEMA = Table({
    "experiment": Table({
        "name": str, "seed": int, "build_victim": bool, "pretrained_model_name_or_path": str, "member_dataset": str,
        "nonmember_dataset": str, "domains_file": str, "rprecision_model": str, "clip_pretrained": str,
        "num_domains": int, "num_member_images": int, "methods": ListOf(Choice(tuple(METHOD_SCRIPTS), "method"), True),
        "training_seeds": ListOf(int, True), "attacks": ListOf(Choice(tuple(ATTACK_SCRIPTS), "attack"), True),
        "workers": int, "architecture": Choice(("sd", "sdxl"), "architecture"),
    }, ("name", "pretrained_model_name_or_path", "member_dataset", "nonmember_dataset", "domains_file", "methods",
        "training_seeds", "attacks")),
    "premises": Table({
        "min_r_precision": NUMBER, "min_auc_lower_bound": NUMBER, "min_epochs": NUMBER, "max_own_loss_ratio": NUMBER,
        "min_utility_fraction": NUMBER, "min_perturbation_ratio": NUMBER, "random_multiple": NUMBER,
        "damage_levels": ListOf(NUMBER, True), "positive_control_sigma": NUMBER, "min_control_detected": NUMBER,
        "loss_timesteps": ListOf(int, True), "loss_noise_draws": int,
    }, ("min_r_precision", "min_auc_lower_bound", "min_epochs", "max_own_loss_ratio", "min_utility_fraction",
        "min_perturbation_ratio", "random_multiple", "damage_levels", "positive_control_sigma",
        "min_control_detected")),
    "settings": Table({}, (), SETTING),
    "dose_response": Table({"method": Choice(DOSE_RESPONSE_METHODS, "dose-response method"),
                            "settings": ListOf(str, True), "epochs": ListOf(NUMBER, True)}, ("settings", "epochs")),
    "top_level": Table({"settings": ListOf(str)}, ("settings",)),
    "tables": Table({}, (), TABLE),
    "table5": Table({"title": str, "setting": str, "training_seeds": ListOf(int, True), "note": str,
                     "rows": Table({}, (), ListOf(str, True))}, ("title", "setting", "training_seeds", "rows")),
    "figure4": Table({"curves": ListOf(CURVE, True)}, ("curves",)),
    "extraction": Table({"settings": ListOf(str), "generations_per_prompt": int, "num_inference_steps": int, "k": int,
                         "delta": NUMBER}, ("settings", "generations_per_prompt")),
    "stages": Table({name: STAGE_FLAGS for name in STAGE_NAMES}, ("synthetic", "perturb", "evaluate")),
}, ("experiment", "premises", "settings", "dose_response", "top_level", "tables", "stages"))
QUICK_SCHEMA = Table(dict(_partial(CONFIG_SCHEMA).fields, drop=ListOf(str)))


def _type_name(spec):
    if isinstance(spec, ListOf):
        plural = {str: "strings", int: "integers", bool: "booleans", NUMBER: "numbers"}.get(spec.item, "tables")
        plural = f"{spec.item.what} names" if isinstance(spec.item, Choice) else plural
        return f"a {'non-empty ' if spec.non_empty else ''}list of {plural}"
    if isinstance(spec, Table):
        return spec.doc
    if isinstance(spec, Choice):
        return f"one of {', '.join(spec.choices)}"
    return {str: "a string", int: "an integer", bool: "true or false", NUMBER: "a number",
            FLAG_VALUE: "a string, number, boolean or a list of them"}[spec]


def _matches(value, spec):
    """Whether a scalar value has the type `spec` (TOML booleans are not numbers)."""
    if isinstance(spec, Choice):
        return isinstance(value, str) and value in spec.choices
    if spec is FLAG_VALUE:
        scalar = (str, int, float, bool)
        return isinstance(value, scalar) or (isinstance(value, list) and all(isinstance(v, scalar) for v in value))
    if spec is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if spec is NUMBER:
        return isinstance(value, (int, float))
    return isinstance(value, spec)


def _where(parts):
    """How an error names a place: [section.sub] for tables, [section] key for a key."""
    return f"[{'.'.join(parts)}]" if parts else "the top level"


def check_config(value, spec, path, *parts):
    """Raise `InputError` at the first place `value` does not match `spec` (see `CONFIG_SCHEMA`): an unknown key or
    section with the nearest valid one, a value of the wrong type, a missing key."""
    prefix = f"--config {path}:"
    if isinstance(spec, Table):
        if not isinstance(value, dict):
            raise InputError(f"{prefix} {_where(parts)} must be {spec.doc}, got {json.dumps(value)}")
        for key, item in value.items():
            if key in spec.fields:
                check_config(item, spec.fields[key], path, *parts, key)
            elif spec.any_key is not None:
                check_config(item, spec.any_key, path, *parts, key)
            else:
                near = difflib.get_close_matches(key, list(spec.fields), n=1, cutoff=0.6)
                kind = "section" if isinstance(item, dict) else "key"
                shown = f"[{'.'.join((*parts, key))}]" if kind == "section" else f"{key!r} in {_where(parts)}"
                hint = (f"did you mean [{'.'.join((*parts, near[0]))}]?" if near and kind == "section" else
                        f"did you mean {near[0]!r}?" if near else f"valid: {', '.join(spec.fields)}")
                raise InputError(f"{prefix} unknown {kind} {shown} ({hint})")
        missing = [key for key in spec.required if key not in value]
        if missing:
            raise InputError(f"{prefix} {_where(parts)} has no {missing[0]!r}"
                             + (f" (a table {spec.doc.removeprefix('a table ')})" if spec.doc != "a table" else ""))
        return
    if isinstance(spec, ListOf):
        if not isinstance(value, list) or (spec.non_empty and not value):
            raise InputError(f"{prefix} {_where(parts[:-1])} {parts[-1]} must be {_type_name(spec)}, "
                             f"got {json.dumps(value)}")
        for index, item in enumerate(value):
            if isinstance(spec.item, Choice) and isinstance(item, str) and item not in spec.item.choices:
                near = difflib.get_close_matches(item, spec.item.choices, n=1, cutoff=0.6)
                hint = f"did you mean {near[0]!r}? " if near else ""
                raise InputError(f"{prefix} unknown {spec.item.what} {item!r} in {_where(parts[:-1])} {parts[-1]} "
                                 f"({hint}choose from {', '.join(spec.item.choices)})")
            if isinstance(spec.item, (Table, ListOf)):
                check_config(item, spec.item, path, *parts[:-1], f"{parts[-1]}[{index}]")
            elif not _matches(item, spec.item):
                raise InputError(f"{prefix} {_where(parts[:-1])} {parts[-1]} must be {_type_name(spec)}, "
                                 f"got {json.dumps(value)}")
        return
    if not _matches(value, spec):
        raise InputError(f"{prefix} {_where(parts[:-1])} {parts[-1]} must be {_type_name(spec)}, "
                         f"got {json.dumps(value)}")


def find_dotted(config, dotted):
    """(table, key) of a dotted name such as `settings.aspl-pixel-0.3-block` (keys may contain dots), or
    (None, None)."""
    table, parts = config, dotted.split(".")
    while parts:
        for cut in range(len(parts), 0, -1):
            key = ".".join(parts[:cut])
            if isinstance(table, dict) and key in table:
                if cut == len(parts):
                    return table, key
                table, parts = table[key], parts[cut:]
                break
        else:
            return None, None
    return None, None


def load_config(path, quick=False):
    """Read a TOML config and check it against `CONFIG_SCHEMA`; with `quick`, merge its [quick] overrides into it.

    Every error is one `InputError` naming the key. The config, the [quick] overrides and the merged result are each
    checked, so a typo in [quick] fails without --quick too.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--config {path} does not exist")
    try:
        config = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise InputError(f"--config {path} is not valid TOML ({error})") from error
    overrides = config.pop("quick", {})
    check_config(config, CONFIG_SCHEMA, path)
    check_config(overrides, QUICK_SCHEMA, path, "quick")
    overrides = dict(overrides)
    drops = [find_dotted(config, dotted) + (dotted,) for dotted in overrides.pop("drop", [])]
    for section, _, dotted in drops:
        if section is None:
            raise InputError(f"--config {path}: [quick] drop names {dotted!r}, which is not in the config")
    if quick:  # [quick] values replace the config's; its `drop` list removes whole entries (dotted names)
        for section, key, _ in drops:
            section.pop(key, None)
        config = _merge(config, overrides)
        check_config(config, CONFIG_SCHEMA, path)
    seeds = config["experiment"]["training_seeds"]
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise InputError(f"--config {path}: [experiment] training_seeds must be distinct integers >= 0, got {seeds}")
    for name, entry in config["settings"].items():
        if not 0.0 <= float(entry["ratio"]) <= 1.0:
            raise InputError(f"--config {path}: setting {name!r} needs a ratio in [0, 1], got {entry['ratio']}")
        if (float(entry["ratio"]) > 0) != ("noise" in entry):
            raise InputError(f"--config {path}: setting {name!r} mixes a perturbed set (ratio > 0) exactly when it "
                             "names its noise ('aspl' or 'random')")
    named = (set(config["dose_response"]["settings"]) | set(config["top_level"]["settings"])
             | {table["setting"] for table in config["tables"].values()}
             | {name for curve in config.get("figure4", {}).get("curves", []) for name in curve["settings"]}
             | set(config.get("extraction", {}).get("settings", []))
             | ({config["table5"]["setting"]} if "table5" in config else set()))
    missing = sorted(named - set(config["settings"]))
    if missing:
        raise InputError(f"--config {path}: setting {missing[0]!r} is used but not defined in [settings]")
    epochs = config["dose_response"]["epochs"]
    if len(set(epochs)) != len(epochs) or min(epochs) <= 0:
        raise InputError(f"--config {path}: [dose_response] epochs must be distinct and > 0, got {epochs}")
    if dose_response_method(config) not in config["experiment"]["methods"]:
        raise InputError(f"--config {path}: [dose_response] method {dose_response_method(config)!r} is not in "
                         f"[experiment] methods {config['experiment']['methods']}")
    if "table5" in config and "dreambooth" not in config["experiment"]["methods"]:
        raise InputError(f"--config {path}: [table5] ablates DreamBooth's components; add 'dreambooth' to "
                         "[experiment] methods or drop [table5]")
    return config


# ----------------------------------------------------------------------------------------------
# Which models
# ----------------------------------------------------------------------------------------------

def study_models(config):
    """Every fine-tuned model: the dose-response (`dose_response_method`, every level × its settings × seed), the
    [top_level] settings at the last level, the other methods on every setting × seed, and Table 5's components."""
    seeds, models = config["experiment"]["training_seeds"], []
    top, dose = top_level_epochs(config), dose_response_method(config)
    methods = config["experiment"]["methods"]
    settings = list(dict.fromkeys(config["dose_response"]["settings"] + config["top_level"]["settings"]))
    for epochs in config["dose_response"]["epochs"]:
        models += [ModelSpec(dose, setting, seed, epochs) for setting in config["dose_response"]["settings"]
                   for seed in seeds]
    models += [ModelSpec(dose, setting, seed, top) for setting in config["top_level"]["settings"] for seed in seeds]
    for method in methods:
        if method != dose:
            models += [ModelSpec(method, setting, seed) for setting in settings for seed in seeds]
    if "table5" in config:
        for modules in config["table5"]["rows"].values():
            modules = table5_modules(modules)
            models += [ModelSpec("dreambooth", config["table5"]["setting"], seed, top, modules)
                       for seed in config["table5"]["training_seeds"]]
    return list(dict.fromkeys(models))


def table5_modules(modules):
    """A Table 5 row's `trainable_modules`; None for UNet + text encoder, which is the study's DreamBooth (Eq. 6),
    so that row is the same model as DreamBooth's cell of the same setting."""
    return None if sorted(modules) == ["text_encoder", "unet"] else tuple(modules)


def extraction_models(config):
    """The pre-trained model and the dose-response method at the last level on each [extraction] setting (first
    training seed)."""
    seed = config["experiment"]["training_seeds"][0]
    return [PRETRAINED] + [ModelSpec(dose_response_method(config), setting, seed, top_level_epochs(config)).name
                           for setting in config.get("extraction", {}).get("settings", [])]


def num_training_images(config):
    """How many images a fine-tune trains on: the self-synthesized set's size."""
    return config["stages"]["synthetic"]["num_images_per_domain"] * config["experiment"].get("num_domains", 10)


def updates_per_epoch(config, method=None):
    """⌈images / batch size⌉ / gradient accumulation steps: the training scripts' updates per epoch (one process);
    `method` default: the dose-response method."""
    method = method or dose_response_method(config)
    flags = dict(config["stages"].get("train", {}), **config["stages"].get(f"train_{method}", {}))
    batches = math.ceil(num_training_images(config) / flags.get("train_batch_size", 4))
    return max(1, math.ceil(batches / flags.get("gradient_accumulation_steps", 1)))


def steps_of_epochs(config, epochs):
    """The number of updates that makes `epochs` passes over the training images (at least one)."""
    return max(1, round(epochs * updates_per_epoch(config)))


# ----------------------------------------------------------------------------------------------
# The stages
# ----------------------------------------------------------------------------------------------

def scores_dir(output_dir, name, attack):
    """Where `attack`'s scores of model `name` are written (and read back by the report)."""
    return Path(output_dir) / "scores" / f"{name}-{attack}"


class Paths:
    """Where every stage of a study under `output_dir` reads and writes."""

    def __init__(self, config, output_dir):
        self.out, self.experiment = Path(output_dir), config["experiment"]

    def input(self, key):
        """A path of [experiment]: inside the output folder when the study builds its own victim."""
        value = self.experiment[key]
        return str(self.out / value) if self.experiment.get("build_victim") else value

    def perturbed(self, noise):
        return self.out / "perturbed" / noise

    def model(self, name):
        return self.out / "models" / name

    def scores(self, name, attack):
        return scores_dir(self.out, name, attack)

    def evaluation(self, name):
        return self.out / "eval" / name

    def extraction(self, name):
        return self.out / "extraction" / name

    def victim_stages(self):
        return ["victim"] if self.experiment.get("build_victim") else []


def model_flags(spec, paths):
    """The flags that load a model in the attack and evaluation scripts (None: the pre-trained model)."""
    pretrained = {"pretrained_model_name_or_path": paths.input("pretrained_model_name_or_path")}
    if spec is None:
        return pretrained
    if spec.method == "dreambooth":  # a full pipeline (UNet, text encoder, VAE may all be fine-tuned)
        return {"pretrained_model_name_or_path": str(paths.model(spec.name))}
    if spec.method in ("lora", "dreambooth_lora"):
        return dict(pretrained, lora_weights=str(paths.model(spec.name)))
    return dict(pretrained, textual_inversion=str(paths.model(spec.name)))


def preparation_stages(config, paths):
    """The victim (when built here), self-synthesis, the random-noise control and the Anti-DreamBooth perturbation.

    The control runs first and alone with prior preservation, so it makes the class images every later stage only
    reads (same prompt and model: the same images); the perturbation then runs beside the clean fine-tunes.
    """
    stage_flags, out, stages = config["stages"], paths.out, []
    pretrained = model_flags(None, paths)
    if paths.experiment.get("build_victim"):
        stages.append(Stage("victim", "make_tiny_victim.py", dict(stage_flags.get("victim", {}),
                            output_dir=str(out / "victim"), overwrite=True), str(out / "victim"), exclusive=True))
    base = paths.victim_stages()
    stages.append(Stage("synthetic", "generate_synthetic.py", dict(
        stage_flags["synthetic"], **pretrained, domains_file=paths.input("domains_file"),
        output_dir=str(out / "synthetic"), overwrite=True), str(out / "synthetic"), base, exclusive=True))
    perturb = {key: value for key, value in stage_flags["perturb"].items() if key != "method"}
    common = dict(**pretrained, dataset_name=str(out / "synthetic"), class_data_dir=str(out / "class_images"),
                  overwrite=True)
    stages.append(Stage("perturbed:random", "perturb_antidreambooth.py", dict(
        perturb, **stage_flags.get("perturb_random", {}), **common, method="random",
        output_dir=str(paths.perturbed("random"))), str(paths.perturbed("random")), base + ["synthetic"],
        exclusive=True))
    stages.append(Stage("perturbed:aspl", "perturb_antidreambooth.py", dict(
        stage_flags["perturb"], **common, output_dir=str(paths.perturbed("aspl"))), str(paths.perturbed("aspl")),
        base + ["synthetic", "perturbed:random"]))
    return stages


def previous_level(config, spec):
    """The dose-response model one level below `spec` (same method, setting, seed), or None at the first level."""
    if spec.method != dose_response_method(config) or spec.trainable_modules is not None or spec.epochs is None \
            or spec.setting not in config["dose_response"]["settings"]:
        return None
    lower = [epochs for epochs in config["dose_response"]["epochs"] if epochs < spec.epochs]
    return ModelSpec(spec.method, spec.setting, spec.seed, max(lower)) if lower else None


def training_stage(config, spec, paths):
    """The training stage of one model: the method's flags, its epochs, the setting's mix, the seed. A dose-response
    level continues the level below from its last checkpoint; every level keeps a checkpoint at its end."""
    stage_flags, out = config["stages"], paths.out
    mode, ratio, pattern, noise = setting_of(config, spec.setting)
    flags = dict(stage_flags.get("train", {}), **stage_flags.get(f"train_{spec.method}", {}))
    if spec.epochs is not None:
        flags["max_train_steps"] = flags["checkpointing_steps"] = steps_of_epochs(config, spec.epochs)
    flags.update(model_flags(None, paths), dataset_name=str(out / "synthetic"), mixup_mode=mode, mixup_ratio=ratio,
                 mixup_pattern=pattern, mixup_seed=paths.experiment.get("seed", 0), seed=spec.seed,
                 output_dir=str(paths.model(spec.name)), overwrite=True)
    depends = paths.victim_stages() + ["synthetic", "perturbed:random"]
    if ratio > 0:
        flags["perturbed_dataset_name"] = str(paths.perturbed(noise))
        depends.append(f"perturbed:{noise}")
    if flags.get("with_prior_preservation"):
        flags["class_data_dir"] = str(out / "class_images")  # made by the first preparation stage, only read here
    if spec.trainable_modules is not None:
        flags["trainable_modules"] = list(spec.trainable_modules)
        flags.pop("train_text_encoder", None)  # the row says exactly what trains
    below, continues = previous_level(config, spec), ()
    if below is not None:
        flags.pop("overwrite")
        flags["resume_from_checkpoint"] = str(paths.model(below.name) / f"checkpoint-{steps_of_epochs(config, below.epochs)}")
        depends.append(f"train:{below.name}")
        continues = ("resume_from_checkpoint",)
    return Stage(f"train:{spec.name}", METHOD_SCRIPTS[spec.method], flags, str(paths.model(spec.name)),
                 list(dict.fromkeys(depends)), continues=continues)


def attack_flags(config, attack):
    """The flags of one attack: its stage flags, and `--method sima` for SimA (attack_loss.py's other method)."""
    flags = dict(config["stages"].get(attack, {}))
    if attack in ("loss", "sima"):
        flags["method"] = attack
    return flags


def model_stages(config, spec, paths):
    """Train (unless pre-trained), every attack, and evaluate.py (per-model results.json, utility, generations)."""
    stage_flags, experiment = config["stages"], paths.experiment
    name = PRETRAINED if spec is None else spec.name
    stages = [training_stage(config, spec, paths)] if spec is not None else []
    upstream = paths.victim_stages() + ([f"train:{name}"] if spec else [])
    data_flags = {"member_dataset": paths.input("member_dataset"), "nonmember_dataset": paths.input("nonmember_dataset")}
    attacks = experiment["attacks"]
    for attack in attacks:
        stages.append(Stage(f"{attack}:{name}", ATTACK_SCRIPTS[attack], dict(
            attack_flags(config, attack), **model_flags(spec, paths), **data_flags,
            # Most models share the pretrained VAE encoder: each image is encoded once for all of them.
            latents_cache_dir=str(paths.out / "latents_cache"),
            output_dir=str(paths.scores(name, attack)), overwrite=True), str(paths.scores(name, attack)), upstream))
    evaluate_flags = dict(stage_flags.get("evaluate", {}), **model_flags(spec, paths), **data_flags,
                          scores=[str(paths.scores(name, attack)) for attack in attacks], generate=True,
                          domains_file=paths.input("domains_file"), output_dir=str(paths.evaluation(name)),
                          overwrite=True)
    if experiment.get("rprecision_model"):
        evaluate_flags["rprecision_model"] = paths.input("rprecision_model")
    if experiment.get("clip_pretrained"):
        evaluate_flags["clip_pretrained"] = experiment["clip_pretrained"]
    stages.append(Stage(f"evaluate:{name}", "evaluate.py", evaluate_flags, str(paths.evaluation(name)),
                        upstream + [f"{attack}:{name}" for attack in attacks]))
    return stages


def extraction_stage(config, name, spec, paths):
    """evaluate.py --generate with [extraction]'s generations per prompt: (k, ℓ2, δ)-eidetic extraction."""
    extraction = config["extraction"]
    flags = dict(config["stages"].get("evaluate", {}), **model_flags(spec, paths),
                 member_dataset=paths.input("member_dataset"), nonmember_dataset=paths.input("nonmember_dataset"),
                 generate=True, domains_file=paths.input("domains_file"), no_brisque=True,
                 num_images_per_prompt=1, num_extraction_samples=extraction["generations_per_prompt"],
                 num_inference_steps=extraction.get("num_inference_steps",
                                                    config["stages"].get("evaluate", {}).get("num_inference_steps")),
                 extraction_k=extraction.get("k", 10), extraction_delta=extraction.get("delta", 0.1),
                 output_dir=str(paths.extraction(name)), overwrite=True)
    flags.pop("rprecision_model", None)
    upstream = paths.victim_stages() + ([f"train:{name}"] if spec else [])
    return Stage(f"extraction:{name}", "evaluate.py", flags, str(paths.extraction(name)), upstream)


def plan_study(config, output_dir):
    """(stages, {name: ModelSpec}): preparation, the pre-trained model, every fine-tuned model, extraction."""
    paths = Paths(config, output_dir)
    models = {spec.name: spec for spec in study_models(config)}
    stages = preparation_stages(config, paths) + model_stages(config, None, paths)
    for spec in models.values():
        stages += model_stages(config, spec, paths)
    if "extraction" in config:
        for name in extraction_models(config):
            stages.append(extraction_stage(config, name, models.get(name), paths))
    return stages, models


# ----------------------------------------------------------------------------------------------
# Reading back what the stages wrote
# ----------------------------------------------------------------------------------------------

def load_extractions(output_dir, names):
    results = {}
    for name in names:
        path = Path(output_dir) / "extraction" / name / "results.json"
        if path.is_file():
            results[name] = json.loads(path.read_text()).get("extraction")
    return results
