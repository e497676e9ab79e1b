"""Textual-inversion placeholders: the token map a trained folder carries, and captions rewritten to use it.

`train_textual_inversion_mixsyn.py` writes `token_map.json` ({domain: {"placeholder", "file", "num_vectors"}});
the attacks and evaluate.py rewrite each image's caption with the same function the trainer used.
"""

import json
import re
from pathlib import Path

from .cli import InputError

TOKEN_MAP_FILE = "token_map.json"


def load_token_map(textual_inversion_dir):
    """{domain: {"placeholder": "<zero>", "file": "learned_embeds-zero.safetensors", "num_vectors": 1}}."""
    path = Path(textual_inversion_dir) / TOKEN_MAP_FILE
    if not path.is_file():
        raise InputError(f"--textual_inversion {textual_inversion_dir} has no {TOKEN_MAP_FILE}")
    return json.loads(path.read_text())


def placeholder_text(placeholder, num_vectors):
    """The prompt text of a multi-vector token, as diffusers' `maybe_convert_prompt` expands it: `<p> <p>_1 …`."""
    return " ".join([placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)])


def domain_name_pattern(domain):
    """The regex of a domain name as a whole word (not inside a longer word) in a caption."""
    return re.compile(rf"(?<!\w){re.escape(domain)}(?!\w)")


def rewrite_caption(caption, domain, token_map, for_pipeline=False):
    """Replace the domain name (whole words only) in a caption by its learned placeholder.

    For direct tokenization (training, attacks) a multi-vector placeholder is spelled out as
    `<p> <p>_1 …`; a diffusers pipeline expands `<p>` itself (`maybe_convert_prompt`), so with
    `for_pipeline=True` only the bare placeholder is written.
    """
    entry = token_map.get(domain)
    if entry is None:
        return caption
    placeholder = entry["placeholder"] if for_pipeline else placeholder_text(entry["placeholder"], entry.get("num_vectors", 1))
    return domain_name_pattern(domain).sub(lambda _: placeholder, caption)
