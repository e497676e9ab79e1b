"""Image preprocessing: one rule, shared by every script (attacks, perturbation, mixing, training, extraction)."""

import numpy as np
import torch
from PIL import Image

from .cli import InputError


def check_resolution(resolution, flag="--resolution", multiple=8):
    """A resolution must be None (the model's native size) or a positive multiple of `multiple`."""
    if resolution is None:
        return
    if resolution <= 0 or resolution % multiple != 0:
        raise InputError(f"{flag} must be a positive multiple of {multiple}, got {resolution}")


def resize_and_crop(image, resolution, center_crop=True, rng=None):
    """RGB, shorter side resized to `resolution` (bicubic), then a square crop.

    The crop is centred, or with `center_crop=False` at an offset drawn from `rng` (a numpy Generator: left,
    then top), or at the top-left corner without `rng`. Grayscale, palette and RGBA images are converted to
    RGB (alpha dropped), never rejected.
    """
    image = image.convert("RGB")
    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if new_size != (width, height):
        image = image.resize(new_size, resample=Image.BICUBIC)
    if center_crop:
        left, top = (new_size[0] - resolution) // 2, (new_size[1] - resolution) // 2
    elif rng is not None:
        left = int(rng.integers(0, new_size[0] - resolution + 1))
        top = int(rng.integers(0, new_size[1] - resolution + 1))
    else:
        left = top = 0
    return image.crop((left, top, left + resolution, top + resolution))


def pil_to_tensor(image):
    """RGB PIL image -> float32 tensor (3, H, W) in [-1, 1]: x = u / 127.5 − 1 for uint8 u."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def image_to_tensor(image, resolution, center_crop=True):
    """PIL image -> float32 tensor (3, H, W) in [-1, 1] after `resize_and_crop`."""
    return pil_to_tensor(resize_and_crop(image, resolution, center_crop))


def center_crop_zoom(pixel_values, strength):
    """x_λ = Resize_R(CenterCrop_⌊λR⌋(x)): PFAMI's neighbour of each square image in a (B, 3, R, R) batch.

    The central ⌊λ·R⌋ × ⌊λ·R⌋ pixels (top-left corner at round((R − ⌊λR⌋) / 2), as torchvision's `CenterCrop`)
    resized back to R × R, bilinear with `align_corners=False` (torchvision's `Resize` on tensors; an upscale,
    so antialiasing changes nothing). On a small image ⌊λR⌋ is coarse: the effective strength is ⌊λR⌋ / R.
    """
    size = pixel_values.shape[-1]
    crop = int(size * strength)
    top = int(round((size - crop) / 2.0))
    cropped = pixel_values[..., top : top + crop, top : top + crop]
    return torch.nn.functional.interpolate(cropped, size=(size, size), mode="bilinear", align_corners=False)
