"""Output folders: refused when occupied, written in a hidden sibling and renamed into place when whole.

Checked before any work (the helpers at the end): an output that is, contains or lies inside an input
(`check_output_outside_inputs`), one that cannot be written (`check_output_writable`), and one another run is
writing (`OutputLock`). A write failing anyway (a full disk) is one line, no staging left (`output_write_errors`).
"""

import contextlib
import errno
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

from .cli import InputError, launch_rank


def check_output_dir(output_dir, overwrite=False, flag="--output_dir", hint="pass --overwrite to replace it"):
    """Refuse an output folder that cannot be written (`unwritable_reason`: a symbolic link, a read-only place), that
    is a file, or that exists and is not empty unless `overwrite`. Call before heavy work, and again under the run's
    `OutputLock`, so the check and the lock are one step."""
    if output_dir is None:
        raise InputError(f"{flag} is required")
    path = Path(output_dir)
    if path.exists() and not path.is_dir() and not path.is_symlink():
        raise InputError(f"{flag} {output_dir} exists and is a file")
    check_output_writable(output_dir, flag)
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise InputError(f"{flag} {output_dir} exists and is not empty ({hint})")


def temp_sibling(final_dir, tag="tmp"):
    """A fresh hidden folder beside `final_dir` (same filesystem, so the final rename is atomic)."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = final_dir.with_name(f".{final_dir.name}.{tag}-{uuid.uuid4().hex[:8]}")
    tmp_dir.mkdir()
    return tmp_dir


@contextlib.contextmanager
def staging_folder(final_path, tag="tmp"):
    """A fresh hidden sibling of `final_path` (`temp_sibling`) to write into, removed on exit whatever happened: a
    finished write has moved its content into place, a failed one (a full disk) leaves no staging behind."""
    folder = temp_sibling(final_path, tag)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


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


# ----------------------------------------------------------------------------------------------
# Checks before any work: an output that is an input, an output that cannot be written, a concurrent run
# ----------------------------------------------------------------------------------------------

def overlapping_input(output, inputs, existing_only=True):
    """The first input that an output would overwrite: (flag, input path, relation) or None.

    `inputs`: {flag: path, a list of paths, or None}; a name that is not a local path (a Hub id) cannot overlap
    and is skipped (with `existing_only=False` every path counts: the other outputs of a run, not written yet).
    Paths are compared resolved (symbolic links, `..`, a trailing slash), so `out/../data` is `data`.
    `relation`: "is" (the same folder or file), "contains" (the input lies inside the output, so `--overwrite`
    would delete it) or "lies inside" (the output is written into the input's folder, which changes it).
    """
    if output is None:
        return None
    target = Path(output).resolve()
    listed = [(flag, path) for flag, paths in inputs.items()
              for path in (paths if isinstance(paths, (list, tuple)) else [paths])]
    for flag, path in listed:
        if path is None or (existing_only and not Path(path).exists()):
            continue
        source = Path(path).resolve()
        if target == source:
            return flag, str(path), "is"
        if target in source.parents:
            return flag, str(path), "contains"
        if source in target.parents:
            return flag, str(path), "lies inside"
    return None


def check_output_outside_inputs(output, inputs, flag="--output_dir", existing_only=True):
    """Raise `InputError` when `output` is, contains or lies inside one of `inputs` (`overlapping_input`)."""
    found = overlapping_input(output, inputs, existing_only)
    if found is not None:
        input_flag, path, relation = found
        raise InputError(f"{flag} {output} {relation} {input_flag} {path}: writing there would change or delete "
                         f"{'an input' if existing_only else input_flag}; pick a folder outside it")


def unwritable_reason(output_dir):
    """Why `output_dir` cannot be created or written (a sentence), or None when it can.

    Refused: a symbolic link, dangling or not (`--overwrite` would replace the link, not its target); a path
    below a file; a nearest existing folder where a hidden probe folder cannot be created (read-only mount,
    permissions; root passes mode bits, as it writes through them). Nothing is left behind by the probe.
    """
    path = Path(output_dir)
    if path.is_symlink():
        return f"is a symbolic link (to {os.readlink(path)}); pass the folder itself"
    existing = path if path.exists() else next((p for p in path.parents if p.exists()), None)
    if existing is None or not existing.is_dir():
        return f"cannot be created: {existing} is not a folder"
    try:
        probe = tempfile.mkdtemp(prefix=f".{path.name}.probe-", dir=existing)
    except OSError as error:
        return f"is not writable ({error.strerror or type(error).__name__}: {existing})"
    os.rmdir(probe)
    return None


def check_output_writable(output_dir, flag="--output_dir"):
    """Raise `InputError` naming `flag` when `output_dir` cannot be written (`unwritable_reason`); None passes."""
    reason = unwritable_reason(output_dir) if output_dir is not None else None
    if reason is not None:
        raise InputError(f"{flag} {output_dir} {reason}")


def lock_path_of(output_dir):
    """Where the lock of an output lives: `.<name>.lock` beside it (`--overwrite` removes the output, not this)."""
    path = Path(output_dir)
    return path.with_name(f".{path.name}.lock")


class OutputLock:
    """An exclusive lock on an output folder for the lifetime of one run; a second run is refused in one line.

    Before the lock file is made, the output must be writable (`check_output_writable`: not a symbolic link, not
    in a read-only place). `output_dir` None locks nothing (an optional output that was not asked for).

    `fcntl.flock` on `lock_path_of(output_dir)`: the kernel releases it when the process ends, however it ends,
    so a killed run never leaves a stale lock (the file may stay; an unlocked file locks nothing). The lock
    belongs to an open file, so a second acquisition fails in the same process too. The file records the pid
    of its holder, which the refusal names. Missing parent folders are created, and removed again on release
    when still empty. Only the launcher's rank 0 takes it (`cli.launch_rank`): the run's other processes write
    under its lock.

        with OutputLock(args.output_dir):
            ...  # the run
    """

    def __init__(self, output_dir, flag="--output_dir"):
        self.output_dir, self.flag = output_dir, flag
        self.path = lock_path_of(output_dir) if output_dir is not None else None
        self.file, self.created = None, []

    def acquire(self):
        import fcntl

        if self.output_dir is None or launch_rank() != 0:
            return self
        check_output_writable(self.output_dir, self.flag)
        for parent in reversed(self.path.parents):
            if not parent.exists():
                parent.mkdir()
                self.created.append(parent)
        while True:
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                handle.close()
                self._remove_created()
                raise InputError(f"{self.flag} {self.output_dir} is in use by another run (pid {holder}, lock "
                                 f"{self.path}); wait for it to finish or pick another folder") from None
            # The holder before us may have removed the file between our open and our lock: lock the live file.
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
            handle.close()
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self.file = handle
        return self

    def release(self):
        if self.file is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.file.close()  # closing releases the flock
        self.file = None
        self._remove_created()

    def _remove_created(self):
        for folder in reversed(self.created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
        self.created = []

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


# ----------------------------------------------------------------------------------------------
# A write that fails (full disk, quota, read-only, I/O error): one line, and no staging folder left
# ----------------------------------------------------------------------------------------------

# errno values that mean "this output cannot be written", whichever library was writing.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG})


def write_errno(error):
    """The errno of a failed write, or None: an `OSError`'s own, or the `(os error N)` / `Os { code: N, ... }` that
    Rust writers (safetensors) and the `[Errno N]` that Arrow put in their message; only `WRITE_ERRNOS` count."""
    code = error.errno if isinstance(error, OSError) else None
    if code is None:
        found = re.search(r"\(os error (\d+)\)|Os \{ code: (\d+)|\[Errno (\d+)\]", str(error))
        code = int(next(group for group in found.groups() if group)) if found else None
    return code if code in WRITE_ERRNOS else None


def remove_staging(final_path):
    """Remove the hidden staging siblings `temp_sibling` made for `final_path` (`.<name>.tmp-*`); returns them.

    The `.old-*` sibling `atomic_replace_dir` makes is left alone: it may hold the previous output."""
    final_path = Path(final_path)
    removed = sorted(final_path.parent.glob(f".{final_path.name}.tmp-*")) if final_path.parent.is_dir() else []
    for path in removed:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return removed


@contextlib.contextmanager
def output_write_errors(final_path, flag="--output_dir"):
    """Around the code that writes `final_path`: a failed write (`write_errno`) becomes one `InputError` naming `flag`
    and the OS reason, after the staging siblings of `final_path` are removed (`remove_staging`), so a rerun once
    space is freed is not refused as an occupied folder. Any other exception passes unchanged."""
    try:
        yield
    except Exception as error:
        code = write_errno(error)
        if code is None:
            raise
        remove_staging(final_path)
        raise InputError(f"{flag} {final_path}: cannot write ({os.strerror(code)}); nothing partial was kept, "
                         "rerun once it can be written") from None
