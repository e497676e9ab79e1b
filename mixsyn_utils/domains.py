"""Private domains (the identities MixSyn protects) and the prompt templates their images are drawn with."""

import difflib
import json
import math
import string
from pathlib import Path

import numpy as np

from .cli import InputError
from .seeds import SALT_GENERATION, SALT_PROMPT_TEMPLATE, derive_seed

# MixSyn (Section 4.1): "The face of <name>" with p = 0.7, "A photo of <name>" with p = 0.3, drawn per image.
PAPER_PROMPT_TEMPLATES = (("The face of {}", 0.7), ("A photo of {}", 0.3))
# The keys of a .json domains file that is an object; any other key is a note, unless it is a near miss of these.
DOMAINS_FILE_KEYS = ("domains", "templates")


def domain_id(name):
    """A domain name as image ids spell it (`syn-<domain_id>-00000` in generate_synthetic.py): spaces become '_'.

    Two names with the same `domain_id` would give their images the same ids, so `load_domains` refuses them.
    """
    return name.replace(" ", "_")


def _domain_name(entry, where):
    """A domain entry of a .json file: a non-empty string, or {"name": string}."""
    name = entry.get("name") if isinstance(entry, dict) else entry
    if not isinstance(name, str) or not name.strip():
        shown = json.dumps(entry)
        hint = " (an object needs a 'name')" if isinstance(entry, dict) and "name" not in entry else ""
        raise InputError(f"{where}: a domain must be a non-empty string or {{\"name\": string}}, got {shown}{hint}")
    return name


def check_template(template, where):
    """A prompt template is a string with exactly one `{}` slot (where the domain name goes) and no other field."""
    if not isinstance(template, str):
        raise InputError(f"{where}: a template must be a string, got {json.dumps(template)}")
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as error:
        raise InputError(f"{where}: template {template!r} is not a format string ({error})") from None
    if fields != [""]:
        raise InputError(f"{where}: template {template!r} must contain exactly one '{{}}' where the domain name goes "
                         f"(found {len(fields)} slot(s){', named ' + repr(fields) if any(fields) else ''})")
    return template


def _templates(entries, where):
    """The (template, p) pairs of a .json file's "templates": a non-empty list of {"template": str, "p": number}."""
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{where}: \"templates\" must be a non-empty list of {{\"template\", \"p\"}}, "
                         f"got {json.dumps(entries)}")
    templates = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != {"template", "p"}:
            raise InputError(f"{where}: templates[{index}] must be {{\"template\": string, \"p\": number}}, "
                             f"got {json.dumps(entry)}")
        p = entry["p"]
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p):
            raise InputError(f"{where}: templates[{index}] \"p\" must be a number, got {json.dumps(p)}")
        templates.append((check_template(entry["template"], f"{where}: templates[{index}]"), float(p)))
    return templates


def _read_domains_file(domains_file):
    """(names, templates or None) of a .json or .txt domains file; every malformed part is one `InputError`."""
    where = f"--domains_file {domains_file}"
    path = Path(domains_file)
    if not path.is_file():
        raise InputError(f"{where} does not exist")
    if path.suffix == ".txt":
        return [line.strip() for line in path.read_text().splitlines() if line.strip()], None
    if path.suffix != ".json":
        raise InputError(f"{where}: unknown format {path.suffix!r} (use .json or .txt)")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{where} is not valid JSON ({error.msg})") from error
    if isinstance(content, list):
        return [_domain_name(entry, where) for entry in content], None
    if not isinstance(content, dict):
        raise InputError(f"{where} must hold a list of names or {{\"domains\": [...], \"templates\": [...]}}")
    for key in content:  # other keys are notes (the victim's file has "source"); a near miss is a typo
        near = [] if key in DOMAINS_FILE_KEYS else difflib.get_close_matches(key, DOMAINS_FILE_KEYS, n=1, cutoff=0.6)
        if near:
            raise InputError(f"{where}: unknown key {key!r} (did you mean {near[0]!r}?)")
    listed = content.get("domains", [])
    if not isinstance(listed, list):
        raise InputError(f"{where}: \"domains\" must be a list of names, got {json.dumps(listed)}")
    templates = _templates(content["templates"], where) if "templates" in content else None
    return [_domain_name(entry, where) for entry in listed], templates


def load_domains(domains_file=None, domain_names=None):
    """Domain names and (template, probability) pairs from `--domains_file` and/or repeated `--domain`.

    Accepted files: `.json` ({"domains": [...], "templates": [{"template", "p"}]} or a plain list of
    names) and `.txt` (one name per line). Templates default to the paper's; each has exactly one `{}` slot and
    the probabilities (numbers ≥ 0) sum to 1. Names are non-empty strings without surrounding spaces, listed
    once, and no two give the same image id (`domain_id`). Anything else is one `InputError` naming the flag.
    """
    sources, templates = [], list(PAPER_PROMPT_TEMPLATES)
    for name in domain_names or []:
        if not name.strip() or name != name.strip():
            raise InputError(f"--domain {name!r}: a domain name must be non-empty, without leading or trailing spaces")
        sources.append((name, "--domain"))
    if domains_file is not None:
        names, file_templates = _read_domains_file(domains_file)
        sources += [(name, f"--domains_file {domains_file}") for name in names]
        templates = file_templates or templates
    if not sources:
        raise InputError("no domains given: pass --domains_file or --domain NAME")
    seen = {}
    for name, where in sources:
        if name != name.strip():
            raise InputError(f"{where}: domain {name!r} has leading or trailing spaces")
        if domain_id(name) in seen:
            other = seen[domain_id(name)]
            problem = ("is listed twice" if other == name else
                       f"and {other!r} give the same image id {domain_id(name)!r}")
            raise InputError(f"{where}: domain {name!r} {problem}")
        seen[domain_id(name)] = name
    probabilities = [p for _, p in templates]
    if any(p < 0 for p in probabilities) or abs(sum(probabilities) - 1.0) > 1e-6:
        where = f"--domains_file {domains_file}: " if domains_file is not None else ""
        raise InputError(f"{where}prompt template probabilities must be >= 0 and sum to 1, got {probabilities}")
    return [name for name, _ in sources], templates


def draw_prompt(domain_name, templates, seed, index):
    """The prompt of image `index`: a template drawn with its probability, seeded by (seed, index, salt)."""
    rng = np.random.default_rng(derive_seed(seed, index, SALT_PROMPT_TEMPLATE))
    choice = rng.choice(len(templates), p=[p for _, p in templates])
    return templates[choice][0].format(domain_name)


def generation_plan(domain_names, templates, num_per_prompt, seed):
    """The images a model is sampled for, in a fixed order: `num_per_prompt` per (domain d, template t), image i
    seeded by `derive_seed(seed, d, t, i, SALT_GENERATION)`. The same plan for every model, so two models'
    generation i share prompt and initial noise (comparisons between models are paired)."""
    return [{"id": f"gen-{d}-{t}-{i:05d}", "domain": name, "prompt": template.format(name), "sample_index": i,
             "seed": derive_seed(seed, d, t, i, SALT_GENERATION)}
            for d, name in enumerate(domain_names) for t, (template, _) in enumerate(templates)
            for i in range(num_per_prompt)]

