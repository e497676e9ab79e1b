"""The MixSyn study's plan: which models a config asks for, and the stages that make, attack and evaluate them.

A model is (method, setting, strength, seed). A *setting* is one training set the paper compares, named in the
config's [settings]: `clean` (ratio 0), `perturbed` (ratio 1), `image-0.5` (Mixup-I) and the two readings of
Mixup-P (`pixel-0.3-block`, `pixel-0.3-random`). A *strength* is a level of DreamBooth's fine-tuning strength
(updates × learning rate, the dose-response axis); the other methods train at their configured strength. A
*cell* is a model up to its training seed; the paper's comparisons are between cells.

The study runs in two phases, because the default strength of Tables 1–5 is chosen from measured utility by the
config's rule (written before any leakage was looked at):
1. the victim, self-synthesis, perturbation, the pre-trained model, DreamBooth at every strength × dose setting ×
   training seed, and the other methods' table cells × training seeds;
2. at the chosen strength: Figure 4's other ratios, Table 5's components, and the extraction runs.
"""

import copy
import difflib
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
ATTACK_SCRIPTS = {"secmi": "attack_secmi.py", "pia": "attack_pia.py", "loss": "attack_loss.py",
                  "sima": "attack_loss.py", "clid": "attack_clid.py", "pfami": "attack_pfami.py"}
ATTACK_TITLES = {"secmi": "SecMI", "pia": "PIA", "loss": "Loss", "sima": "SimA", "clid": "CLiD", "pfami": "PFAMI"}
PRETRAINED = "pretrained"


@dataclass
class Stage:
    """One script call: `script` with `flags` (dict flag -> value; lists expand, True is a bare switch).

    `exclusive`: the stage runs alone with every core (everything after it waits for it anyway).
    """

    name: str
    script: str
    flags: dict
    output: str
    depends_on: list = field(default_factory=list)
    num_processes: int = 1
    exclusive: bool = False

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
    mode: str
    ratio: float
    pattern: str
    seed: int
    strength: str = None  # a level of [strength] (DreamBooth), None for the other methods' own strength
    trainable_modules: tuple = None  # Table 5's component ablation (DreamBooth only)

    @property
    def cell(self):
        method = self.method if self.trainable_modules is None else f"dreambooth[{'+'.join(self.trainable_modules)}]"
        return f"{method}-{self.setting}" + (f"-{self.strength}" if self.strength else "")

    @property
    def name(self):
        return f"{self.cell}-seed{self.seed}"


# ----------------------------------------------------------------------------------------------
# The config
# ----------------------------------------------------------------------------------------------

def _merge(base, override):
    merged = copy.deepcopy(base)
    for key, value in override.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def setting_of(config, name):
    """(mode, ratio, pattern) of a named setting of [settings]."""
    entry = config["settings"][name]
    return entry["mode"], float(entry["ratio"]), entry.get("pattern", "random")


def load_config(path, quick=False):
    """Read a TOML config and check it against `CONFIG_SCHEMA`; with `quick`, merge its [quick] overrides into it.

    Every error is one `InputError` naming the key: an unknown key or section with the nearest valid one, a value
    of the wrong type, a missing key, a `drop` entry naming nothing. The config, the [quick] overrides and the
    merged result are each checked, so a typo in [quick] fails without --quick too.
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
    if quick:  # [quick] values replace the config's; its `drop` list removes whole sections (dotted names)
        for section, key, _ in drops:
            section.pop(key, None)
        config = _merge(config, overrides)
        check_config(config, CONFIG_SCHEMA, path)
    experiment = config["experiment"]  # methods and attacks are checked by name in the schema (`Choice`)
    seeds = experiment["training_seeds"]
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise InputError(f"--config {path}: [experiment] training_seeds must be distinct integers >= 0, got {seeds}")
    for name, entry in config["settings"].items():
        if entry["mode"] not in ("image", "pixel") or not 0.0 <= float(entry["ratio"]) <= 1.0:
            raise InputError(f"--config {path}: setting {name!r} needs mode 'image' or 'pixel' and a ratio in [0, 1]")
    named = {table["setting"] for table in config["tables"].values()} | set(config["strength"]["settings"])
    missing = sorted(named - set(config["settings"]))
    if missing:
        raise InputError(f"--config {path}: setting {missing[0]!r} is used but not defined in [settings]")
    levels = config["strength"]["levels"]
    if len({level["name"] for level in levels}) != len(levels) or not levels:
        raise InputError(f"--config {path}: [strength] levels need distinct names")
    return config


# ----------------------------------------------------------------------------------------------
# The config's schema: every section, key and type a study config may hold
# ----------------------------------------------------------------------------------------------

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


SETTING = Table({"mode": str, "ratio": NUMBER, "pattern": str}, ("mode", "ratio"),
                doc="a table {mode, ratio[, pattern]}")
LEVEL = Table({"name": str}, ("name",), FLAG_VALUE, doc="a table {name, training flags...}")
TABLE = Table({"title": str, "setting": str, "note": str}, ("title", "setting"), doc="a table {title, setting[, note]}")
CURVE = Table({"label": str, "mode": str, "pattern": str, "ratios": ListOf(NUMBER, True)}, ("label", "mode"),
              doc="a table {label, mode[, pattern, ratios]}")
STAGE_FLAGS = Table({}, (), FLAG_VALUE, doc="a table of the script's flags")
STAGE_NAMES = ("victim", "synthetic", "perturb", "train", *(f"train_{method}" for method in METHOD_SCRIPTS),
               *ATTACK_SCRIPTS, "evaluate")
CONFIG_SCHEMA = Table({
    "experiment": Table({
        "name": str, "seed": int, "build_victim": bool, "pretrained_model_name_or_path": str, "member_dataset": str,
        "nonmember_dataset": str, "domains_file": str, "rprecision_model": str, "clip_pretrained": str,
        "num_domains": int, "num_member_images": int, "methods": ListOf(Choice(tuple(METHOD_SCRIPTS), "method"), True),
        "training_seeds": ListOf(int, True), "attacks": ListOf(Choice(tuple(ATTACK_SCRIPTS), "attack"), True),
        "workers": int,
    }, ("name", "pretrained_model_name_or_path", "member_dataset", "nonmember_dataset", "domains_file", "methods",
        "training_seeds", "attacks")),
    "settings": Table({}, (), SETTING),
    "strength": Table({"settings": ListOf(str, True), "utility_fraction": NUMBER, "levels": ListOf(LEVEL, True)},
                      ("settings", "utility_fraction", "levels")),
    "tables": Table({}, (), TABLE),
    "table5": Table({"title": str, "setting": str, "training_seeds": ListOf(int, True), "note": str,
                     "rows": Table({}, (), ListOf(str, True))}, ("title", "setting", "training_seeds", "rows")),
    "figure4": Table({"ratios": ListOf(NUMBER, True), "training_seeds": ListOf(int, True),
                      "seeded_settings": ListOf(str), "curves": ListOf(CURVE, True)},
                     ("ratios", "training_seeds", "curves")),
    "extraction": Table({"settings": ListOf(str), "generations_per_prompt": int, "num_inference_steps": int, "k": int,
                         "delta": NUMBER}, ("settings", "generations_per_prompt")),
    "stages": Table({name: STAGE_FLAGS for name in STAGE_NAMES}, ("synthetic", "perturb", "evaluate")),
}, ("experiment", "settings", "strength", "tables", "stages"))
QUICK_SCHEMA = Table(dict(_partial(CONFIG_SCHEMA).fields, drop=ListOf(str)))


def _type_name(spec):
    if isinstance(spec, ListOf):
        plural = {str: "strings", int: "integers", bool: "booleans", NUMBER: "numbers"}.get(spec.item, "tables")
        plural = f"{spec.item.what} names" if isinstance(spec.item, Choice) else plural
        return f"a {'non-empty ' if spec.non_empty else ''}list of {plural}"
    if isinstance(spec, Table):
        return spec.doc
    return {str: "a string", int: "an integer", bool: "true or false", NUMBER: "a number",
            FLAG_VALUE: "a string, number, boolean or a list of them"}[spec]


def _matches(value, spec):
    """Whether a scalar value has the type `spec` (TOML booleans are not numbers)."""
    if isinstance(spec, Choice):
        return isinstance(value, str)
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
    """Raise `InputError` at the first place `value` does not match `spec` (see `CONFIG_SCHEMA`)."""
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
    """(table, key) of a dotted name such as `settings.pixel-0.3-block` (keys may contain dots), or (None, None)."""
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


# ----------------------------------------------------------------------------------------------
# Which models
# ----------------------------------------------------------------------------------------------

def phase1_models(config):
    """The dose-response grid (DreamBooth, every strength × dose setting × seed) and the other methods' table cells."""
    seeds, models = config["experiment"]["training_seeds"], []
    for level in config["strength"]["levels"]:
        for setting in config["strength"]["settings"]:
            models += [ModelSpec("dreambooth", setting, *setting_of(config, setting), seed, strength=level["name"])
                       for seed in seeds]
    table_settings = list(dict.fromkeys(table["setting"] for table in config["tables"].values()))
    for method in config["experiment"]["methods"]:
        if method == "dreambooth":
            continue  # its table cells are the dose grid's cells at the default strength
        for setting in table_settings:
            models += [ModelSpec(method, setting, *setting_of(config, setting), seed) for seed in seeds]
    return models


def figure4_setting_name(mode, pattern, ratio):
    """The setting name of a Figure 4 point: the named setting when one matches, else `<mode>[-pattern]-<ratio>`."""
    if ratio == 0:
        return "clean"
    if ratio == 1:
        return "perturbed"
    return f"{mode}-{ratio:g}" if mode == "image" else f"pixel-{ratio:g}-{pattern}"


def figure4_points(config):
    """[(curve label, ratio, setting name, mode, pattern)] of Figure 4: every curve × ratio."""
    points = []
    for curve in config["figure4"]["curves"]:
        for ratio in curve.get("ratios", config["figure4"]["ratios"]):
            setting = figure4_setting_name(curve["mode"], curve.get("pattern", "random"), float(ratio))
            points.append((curve["label"], float(ratio), setting, curve["mode"], curve.get("pattern", "random")))
    return points


def phase2_models(config, default_strength):
    """At the chosen strength: Figure 4's settings not in the dose grid, and Table 5's component ablation."""
    dose_settings = set(config["strength"]["settings"])
    models = []
    if "figure4" in config:
        seeded = set(config["figure4"].get("seeded_settings", []))
        for _, ratio, setting, mode, pattern in figure4_points(config):
            if setting not in dose_settings:
                seeds = config["experiment"]["training_seeds"] if setting in seeded else config["figure4"]["training_seeds"]
                models += [ModelSpec("dreambooth", setting, mode, ratio, pattern, seed, strength=default_strength)
                           for seed in seeds]
    if "table5" in config:
        mode, ratio, pattern = setting_of(config, config["table5"]["setting"])
        for modules in config["table5"]["rows"].values():
            models += [ModelSpec("dreambooth", config["table5"]["setting"], mode, ratio, pattern, seed,
                                 strength=default_strength, trainable_modules=table5_modules(modules))
                       for seed in config["table5"]["training_seeds"]]
    return list(dict.fromkeys(models))


def table5_modules(modules):
    """A Table 5 row's `trainable_modules`; None for UNet + text encoder, which is the study's DreamBooth (Eq. 6),
    so that row is the same model as DreamBooth's cell of the same setting."""
    return None if sorted(modules) == ["text_encoder", "unet"] else tuple(modules)


def extraction_models(config, default_strength):
    """The pre-trained model and the DreamBooth cells of [extraction] settings at the chosen strength (first seed)."""
    seed = config["experiment"]["training_seeds"][0]
    names = [PRETRAINED]
    for setting in config.get("extraction", {}).get("settings", []):
        names.append(ModelSpec("dreambooth", setting, *setting_of(config, setting), seed, strength=default_strength).name)
    return names


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

    def model(self, name):
        return self.out / "models" / name

    def scores(self, name, attack):
        return scores_dir(self.out, name, attack)

    def evaluation(self, name):
        return self.out / "eval" / name

    def extraction(self, name):
        return self.out / "extraction" / name


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
    """Victim (when built here), self-synthesis and the Anti-DreamBooth perturbation: every model waits for them."""
    stage_flags, out, stages = config["stages"], paths.out, []
    pretrained = model_flags(None, paths)
    if paths.experiment.get("build_victim"):
        stages.append(Stage("victim", "make_tiny_victim.py", dict(stage_flags.get("victim", {}),
                            output_dir=str(out / "victim"), overwrite=True), str(out / "victim"), exclusive=True))
    base = ["victim"] if paths.experiment.get("build_victim") else []
    stages.append(Stage("synthetic", "generate_synthetic.py", dict(
        stage_flags["synthetic"], **pretrained, domains_file=paths.input("domains_file"),
        output_dir=str(out / "synthetic"), overwrite=True), str(out / "synthetic"), base, exclusive=True))
    stages.append(Stage("perturbed", "perturb_antidreambooth.py", dict(
        stage_flags["perturb"], **pretrained, dataset_name=str(out / "synthetic"),
        class_data_dir=str(out / "class_images"), output_dir=str(out / "perturbed"), overwrite=True),
        str(out / "perturbed"), base + ["synthetic"], exclusive=True))
    return stages


def training_stage(config, spec, paths):
    """The training stage of one model: the method's flags, its strength level, the setting's mix, the seed."""
    stage_flags, out = config["stages"], paths.out
    flags = dict(stage_flags.get("train", {}), **stage_flags.get(f"train_{spec.method}", {}))
    if spec.strength is not None:
        level = next(level for level in config["strength"]["levels"] if level["name"] == spec.strength)
        flags.update({key: value for key, value in level.items() if key != "name"})
    flags.update(model_flags(None, paths), dataset_name=str(out / "synthetic"), mixup_mode=spec.mode,
                 mixup_ratio=spec.ratio, mixup_pattern=spec.pattern, mixup_seed=paths.experiment.get("seed", 0),
                 seed=spec.seed, output_dir=str(paths.model(spec.name)), overwrite=True)
    if spec.ratio > 0:
        flags["perturbed_dataset_name"] = str(out / "perturbed")
    if flags.get("with_prior_preservation"):
        # The perturbation stage (which runs first, alone) made them: training stages that run at the same time
        # only read the folder. Same prompt and model, so the same images (the folder's record checks it).
        flags["class_data_dir"] = str(out / "class_images")
    if spec.trainable_modules is not None:
        flags["trainable_modules"] = list(spec.trainable_modules)
        flags.pop("train_text_encoder", None)  # the row says exactly what trains
    depends = (["victim"] if paths.experiment.get("build_victim") else []) + ["synthetic", "perturbed"]
    return Stage(f"train:{spec.name}", METHOD_SCRIPTS[spec.method], flags, str(paths.model(spec.name)), depends)


def attack_flags(config, attack):
    """The flags of one attack: its stage flags, and `--method sima` for SimA (attack_loss.py's other method)."""
    flags = dict(config["stages"].get(attack, {}))
    if attack in ("loss", "sima"):
        flags["method"] = attack
    return flags


def model_stages(config, spec, paths, with_training=True):
    """Train (unless pre-trained), every attack, and evaluate.py (per-model results.json, utility)."""
    stage_flags, experiment = config["stages"], paths.experiment
    name = PRETRAINED if spec is None else spec.name
    stages = [training_stage(config, spec, paths)] if spec is not None and with_training else []
    upstream = (["victim"] if experiment.get("build_victim") else []) + ([f"train:{name}"] if spec else [])
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
    upstream = (["victim"] if paths.experiment.get("build_victim") else []) + ([f"train:{name}"] if spec else [])
    return Stage(f"extraction:{name}", "evaluate.py", flags, str(paths.extraction(name)), upstream)


def plan_phase1(config, output_dir):
    """(stages, {name: ModelSpec}) of phase 1: preparation, the pre-trained model, the dose grid, the method cells."""
    paths = Paths(config, output_dir)
    models = {spec.name: spec for spec in phase1_models(config)}
    stages = preparation_stages(config, paths) + model_stages(config, None, paths)
    for spec in models.values():
        stages += model_stages(config, spec, paths)
    return stages, models


def plan_phase2(config, output_dir, default_strength):
    """(stages, {name: ModelSpec}) of phase 2 at `default_strength`: Figure 4, Table 5, extraction."""
    paths = Paths(config, output_dir)
    models = {spec.name: spec for spec in phase2_models(config, default_strength)}
    stages = []
    for spec in models.values():
        stages += model_stages(config, spec, paths)
    if "extraction" in config:
        known = {spec.name: spec for spec in phase1_models(config)}
        for name in extraction_models(config, default_strength):
            stages.append(extraction_stage(config, name, known.get(name), paths))
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


def table_cell(config, method, setting, default_strength):
    return f"{method}-{setting}" + (f"-{default_strength}" if method == "dreambooth" else "")
