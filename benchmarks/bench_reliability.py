#!/usr/bin/env python
"""What the input checks cost: decoding every image once before heavy work, and hashing inputs for the run signature.

- `check_images_decode` on N PNG images of S px stored in a saved dataset (as `generate_synthetic.py` writes them);
- `input_fingerprint` of that dataset folder (first call reads every byte, a second call in the process is free);
- sha256 of one large weights-like file (`--hash_gb`), read from disk once, and the process-cache hit after it.

    python benchmarks/bench_reliability.py --num_images 10000 --image_size 512 --hash_gb 4
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def smooth_png_files(num_distinct, size, seed=0):
    """Encoded PNGs of photo-like content (smooth gradients plus mild noise), so file sizes resemble real images."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)
    files = []
    for _ in range(num_distinct):
        pixels = rng.uniform(0, 255, 3) * np.outer(ramp, ramp[::-1])[:, :, None] + rng.normal(0, 6, (size, size, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
        files.append(buffer.getvalue())
    return files


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_images", type=int, default=10000)
    parser.add_argument("--image_size", type=int, default=512)
    parser.add_argument("--hash_gb", type=float, default=4.0, help="Size of the file hashed, in GiB (0 skips it).")
    parser.add_argument("--work_dir", type=str, default=None, help="Where the temporary files go (default /tmp).")
    args = parser.parse_args()

    import datasets

    from mixsyn_utils.dataset_io import check_images_decode, load_image_dataset
    from mixsyn_utils.resumable import input_fingerprint

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work_dir:
        folder = Path(work_dir) / "images"
        features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image()})
        # 100 distinct files stored again and again: each row is still decoded on its own, and encoding 10k
        # PNGs would take longer than what is measured.
        files = smooth_png_files(min(100, args.num_images), args.image_size)

        def rows():
            for i in range(args.num_images):
                yield {"id": f"img-{i:06d}", "image": {"bytes": files[i % len(files)], "path": None}}

        build_seconds, _ = timed(lambda: datasets.Dataset.from_generator(
            rows, features=features, cache_dir=work_dir, fingerprint="bench-reliability").save_to_disk(str(folder)))
        dataset = load_image_dataset(str(folder))
        size_gb = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**30
        decode_seconds, _ = timed(check_images_decode, dataset, "image", "bench")
        os.system("sync")
        hash_seconds, _ = timed(input_fingerprint, folder)
        cached_seconds, _ = timed(input_fingerprint, folder)
        print(f"dataset: {args.num_images} PNG images of {args.image_size} px, {size_gb:.2f} GiB (built in "
              f"{build_seconds:.0f} s)")
        print(f"check_images_decode: {decode_seconds:.1f} s ({1000 * decode_seconds / args.num_images:.2f} ms/image)")
        print(f"input_fingerprint of the folder: {hash_seconds:.1f} s, again in the same process: "
              f"{1000 * cached_seconds:.1f} ms")
        if args.hash_gb > 0:
            weights = Path(work_dir) / "weights.safetensors"
            chunk = np.random.default_rng(0).integers(0, 256, 2**26, dtype=np.uint8).tobytes()
            with open(weights, "wb") as file:
                for _ in range(int(args.hash_gb * 2**30) // len(chunk)):
                    file.write(chunk)
            os.system("sync")
            hash_seconds, _ = timed(input_fingerprint, weights)
            cached_seconds, _ = timed(input_fingerprint, weights)
            gib = weights.stat().st_size / 2**30
            print(f"input_fingerprint of a {gib:.1f} GiB file: {hash_seconds:.1f} s ({gib / hash_seconds:.2f} GiB/s), "
                  f"again in the same process: {1000 * cached_seconds:.2f} ms")


if __name__ == "__main__":
    main()
