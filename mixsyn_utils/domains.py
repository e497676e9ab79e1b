"""Private domains (the identities MixSyn protects) and the prompt templates their images are drawn with."""

import json
from pathlib import Path

import numpy as np

from .cli import InputError
from .seeds import SALT_GENERATION, SALT_PROMPT_TEMPLATE, derive_seed

# MixSyn (Section 4.1): "The face of <name>" with p = 0.7, "A photo of <name>" with p = 0.3, drawn per image.
PAPER_PROMPT_TEMPLATES = (("The face of {}", 0.7), ("A photo of {}", 0.3))


def load_domains(domains_file=None, domain_names=None):
    """Domain names and (template, probability) pairs from `--domains_file` and/or repeated `--domain`.

    Accepted files: `.json` ({"domains": [...], "templates": [{"template", "p"}]} or a plain list of
    names) and `.txt` (one name per line). Templates default to the paper's; probabilities must sum to 1.
    """
    names, templates = list(domain_names or []), list(PAPER_PROMPT_TEMPLATES)
    if domains_file is not None:
        path = Path(domains_file)
        if not path.is_file():
            raise InputError(f"--domains_file {domains_file} does not exist")
        if path.suffix == ".json":
            try:
                content = json.loads(path.read_text())
            except json.JSONDecodeError as error:
                raise InputError(f"--domains_file {domains_file} is not valid JSON ({error.msg})") from error
            if isinstance(content, dict):
                listed = content.get("domains", [])
                if "templates" in content:
                    templates = [(entry["template"], float(entry["p"])) for entry in content["templates"]]
            else:
                listed = content
            names += [entry["name"] if isinstance(entry, dict) else str(entry) for entry in listed]
        elif path.suffix == ".txt":
            names += [line.strip() for line in path.read_text().splitlines() if line.strip()]
        else:
            raise InputError(f"--domains_file {domains_file}: unknown format {path.suffix!r} (use .json or .txt)")
    if not names:
        raise InputError("no domains given: pass --domains_file or --domain NAME")
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise InputError(f"domain {duplicate!r} is listed twice")
    if any("{}" not in template for template, _ in templates):
        raise InputError("every prompt template must contain '{}' where the domain name goes")
    if abs(sum(p for _, p in templates) - 1.0) > 1e-6 or any(p < 0 for _, p in templates):
        raise InputError(f"prompt template probabilities must be >= 0 and sum to 1, got {[p for _, p in templates]}")
    return names, templates


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

