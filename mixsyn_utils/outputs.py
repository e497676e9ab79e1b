"""Output folders: refused when occupied, written in a hidden sibling and renamed into place when whole."""

import os
import shutil
import uuid
from pathlib import Path

from .cli import InputError


def check_output_dir(output_dir, overwrite=False, flag="--output_dir", hint="pass --overwrite to replace it"):
    """Refuse an output folder that is a file, or exists and is not empty unless `overwrite`. Call before heavy work."""
    if output_dir is None:
        raise InputError(f"{flag} is required")
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {output_dir} exists and is a file")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise InputError(f"{flag} {output_dir} exists and is not empty ({hint})")


def temp_sibling(final_dir, tag="tmp"):
    """A fresh hidden folder beside `final_dir` (same filesystem, so the final rename is atomic)."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = final_dir.with_name(f".{final_dir.name}.{tag}-{uuid.uuid4().hex[:8]}")
    tmp_dir.mkdir()
    return tmp_dir


def atomic_replace_dir(tmp_dir, final_dir):
    """Move a finished folder into place; a previous `final_dir` is removed only after the new one is whole."""
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    old_dir = None
    if final_dir.exists():
        old_dir = final_dir.with_name(f".{final_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final_dir, old_dir)
    os.replace(tmp_dir, final_dir)
    if old_dir is not None:
        shutil.rmtree(old_dir, ignore_errors=True)


def move_entries_into(staging_dir, output_dir):
    """Move every entry of a finished staging folder into `output_dir` (each replaced whole), then remove it."""
    for entry in Path(staging_dir).iterdir():
        target = Path(output_dir) / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    Path(staging_dir).rmdir()
