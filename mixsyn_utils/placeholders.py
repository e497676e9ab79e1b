"""Textual-inversion placeholders: their names, the token map a trained folder carries, and captions that use them.

`train_textual_inversion_mixsyn.py` writes `token_map.json` ({domain: {"placeholder", "file", "num_vectors"}});
the attacks and evaluate.py rewrite each image's caption with the same function the trainer used.

A placeholder must read back as itself through the CLIP tokenizer: the tokenizer lower-cases a prompt before it
matches added tokens, so `<Ada Lovelace>` would be read as `<ada lovelace>`, which diffusers'
`maybe_convert_prompt` does not expand to `<Ada Lovelace> <Ada Lovelace>_1 …`, and every vector but the first
would silently go unused at inference. Domain names are therefore turned into lower-case slugs (`<ada-lovelace>`).
"""

import json
import re
from pathlib import Path

from .cli import InputError

TOKEN_MAP_FILE = "token_map.json"
# Captions of textual inversion's folder-of-images mode (--train_data_dir without captions), per
# --learnable_property: the prompt lists of Gal et al. 2022 (arXiv:2208.01618), which diffusers' example uses too.
OBJECT_TEMPLATES = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
]
STYLE_TEMPLATES = [
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a cropped painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}", "a large painting in the style of {}",
]


def load_token_map(textual_inversion_dir, flag="--textual_inversion"):
    """{domain: {"placeholder": "<zero>", "file": "learned_embeds-zero.safetensors", "num_vectors": 1}}, checked.

    `token_map.json` must be valid JSON holding an object of domains; each entry an object with a non-empty
    string "placeholder" (distinct across domains), a "file" named as a `.safetensors` file of the folder itself
    (a pickled `.bin`/`.pt` embedding is never loaded) and an optional integer "num_vectors" ≥ 1 (default 1,
    filled in). Anything else is one `InputError` naming `flag`, before any model loads. Captions need only the
    map; whoever loads the embeddings checks the files exist (`token_map_files`).
    """
    folder = Path(textual_inversion_dir)
    path = folder / TOKEN_MAP_FILE
    where = f"{flag} {textual_inversion_dir}"
    if not path.is_file():
        raise InputError(f"{where} has no {TOKEN_MAP_FILE}")
    try:
        token_map = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{where}: {TOKEN_MAP_FILE} is not valid JSON ({getattr(error, 'msg', error)})") from None
    if not isinstance(token_map, dict) or not token_map:
        raise InputError(f"{where}: {TOKEN_MAP_FILE} must be a non-empty object {{domain: {{placeholder, file, "
                         f"num_vectors}}}}, got {type(token_map).__name__}")
    checked, placeholders = {}, {}
    for domain, entry in token_map.items():
        if not isinstance(entry, dict):
            raise InputError(f"{where}: {TOKEN_MAP_FILE} entry {domain!r} must be an object, got {json.dumps(entry)}")
        placeholder, file, num_vectors = entry.get("placeholder"), entry.get("file"), entry.get("num_vectors", 1)
        if not isinstance(placeholder, str) or not placeholder.strip():
            raise InputError(f"{where}: {TOKEN_MAP_FILE} entry {domain!r} has no \"placeholder\" string")
        if placeholder in placeholders:
            raise InputError(f"{where}: {TOKEN_MAP_FILE} gives domains {placeholders[placeholder]!r} and {domain!r} "
                             f"the same placeholder {placeholder!r}")
        placeholders[placeholder] = domain
        if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
            raise InputError(f"{where}: {TOKEN_MAP_FILE} entry {domain!r} needs a \"file\" name inside the folder, "
                             f"got {json.dumps(file)}")
        if not file.endswith(".safetensors"):
            raise InputError(f"{where}: {TOKEN_MAP_FILE} entry {domain!r} names {file}, not a .safetensors file "
                             "(pickled embeddings are never loaded)")
        if isinstance(num_vectors, bool) or not isinstance(num_vectors, int) or num_vectors < 1:
            raise InputError(f"{where}: {TOKEN_MAP_FILE} entry {domain!r} \"num_vectors\" must be an integer >= 1, "
                             f"got {json.dumps(num_vectors)}")
        checked[domain] = dict(entry, num_vectors=num_vectors)
    return checked


def token_map_files(textual_inversion_dir, token_map, flag="--textual_inversion"):
    """{domain: path} of the embedding files a checked token map names; `InputError` naming `flag` for a missing one
    (diffusers' loader would take the missing name for a Hub id and fail with a network error)."""
    files = {domain: Path(textual_inversion_dir) / entry["file"] for domain, entry in token_map.items()}
    second_files = {domain: Path(textual_inversion_dir) / entry["file_2"]  # SDXL: the second encoder's embedding
                    for domain, entry in token_map.items() if "file_2" in entry}
    for domain, path in [*files.items(), *second_files.items()]:
        if not path.is_file():
            raise InputError(f"{flag} {textual_inversion_dir}: {TOKEN_MAP_FILE} entry {domain!r} names {path.name}, "
                             "which is not in the folder")
    return files


def domain_slug(domain):
    """A domain name as a placeholder or file name: lower case, every run of non-word characters one '-'."""
    return re.sub(r"\W+", "-", domain.strip().lower()).strip("-")


def placeholder_tokens(placeholder, num_vectors):
    """The tokens of a multi-vector placeholder, named as diffusers names them: `<p>`, `<p>_1`, …"""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def placeholder_text(placeholder, num_vectors):
    """The prompt text of a multi-vector token, as diffusers' `maybe_convert_prompt` expands it: `<p> <p>_1 …`."""
    return " ".join(placeholder_tokens(placeholder, num_vectors))


def check_tokens_read_back(tokenizer, tokens, flag):
    """Each added token must tokenize to itself (see the module doc); an error naming `flag` otherwise."""
    for token in tokens:
        if tokenizer.tokenize(token) != [token]:
            raise InputError(f"{flag}: the tokenizer reads {token!r} as {tokenizer.tokenize(token)}, so "
                             f"diffusers' pipelines would not use its vectors; use lower case without spaces, "
                             f"e.g. {domain_slug(token.strip('<>')).join('<>')!r}")


def domain_name_pattern(domain):
    """The regex of a domain name as a whole word (not inside a longer word) in a caption."""
    return re.compile(rf"(?<!\w){re.escape(domain)}(?!\w)")


def rewrite_caption(caption, domain, token_map, for_pipeline=False):
    """Replace the domain name (whole words only) in a caption by its learned placeholder.

    For direct tokenization (training, attacks) a multi-vector placeholder is spelled out as
    `<p> <p>_1 …`; a diffusers pipeline expands `<p>` itself (`maybe_convert_prompt`), so with
    `for_pipeline=True` only the bare placeholder is written, unless it has capitals or spaces (maps written
    before placeholders were slugs), which the pipeline cannot expand.
    """
    entry = token_map.get(domain)
    if entry is None:
        return caption
    placeholder, num_vectors = entry["placeholder"], entry.get("num_vectors", 1)
    expands_itself = placeholder == placeholder.lower() and not re.search(r"\s", placeholder)
    text = placeholder if for_pipeline and expands_itself else placeholder_text(placeholder, num_vectors)
    return domain_name_pattern(domain).sub(lambda _: text, caption)
