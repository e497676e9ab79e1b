"""Image decoding and preprocessing: one rule each, shared by every script (attacks, perturbation, mixing,
training, extraction, the blind baseline, the utility metrics)."""

import io
import warnings

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .cli import InputError, first_line

# Transparent pixels are shown over white, as an image viewer shows them on a page; dropping alpha instead
# would expose whatever colour the file stores under a transparent pixel (often black, sometimes noise).
ALPHA_BACKGROUND = 255
# Integer modes whose values span 16 bits: 16-bit PNG and TIFF decode to these (mode "I" in older Pillow).
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


def _open(source, name):
    """A loaded PIL image from a PIL image (as is), encoded bytes, a path, or a `datasets` {"bytes", "path"} record."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, dict):
        source = source["bytes"] if source.get("bytes") is not None else source.get("path")
    if source is None:
        raise InputError(f"{name}: cannot decode (no image stored)")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that, then allocates: refuse both the same way.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InputError(f"{name}: cannot decode (a decompression bomb: {first_line(error)})") from None
    except FileNotFoundError:
        raise InputError(f"{name}: cannot decode (file not found)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise InputError(f"{name}: cannot decode ({first_line(error)})") from None
    # Upright as `datasets` decodes it, so a file and its dataset row give the same pixels.
    return ImageOps.exif_transpose(image) if image.getexif().get(ExifTags.Base.Orientation) else image


def decode_rgb(source, name="image"):
    """Any image -> 8-bit RGB PIL image, by one rule per PIL mode (`name` labels errors: a file or row id).

    `source`: a PIL image, encoded bytes, a path, or a `datasets` {"bytes", "path"} record. Modes:
    - RGB as is; L, 1 (0 → 0, 1 → 255), P, CMYK, YCbCr, HSV, LAB: Pillow's conversion to RGB;
    - 16-bit integer (I;16, I;16B, I;16L, I;16N, I): u8 = round(v / 257) with v clipped to [0, 65535]
      (`convert("RGB")` would saturate every v > 255 instead);
    - F (32-bit float, taken in [0, 1]): u8 = round(255 · clip(v, 0, 1));
    - with alpha (LA, PA, RGBA, premultiplied La/RGBa, and P, L or RGB with a transparent colour): composited
      over white, u8 = round(a · c + (1 − a) · 255) with a = alpha / 255.
    A missing, empty, truncated or unknown file raises `InputError("<name>: cannot decode (<reason>)")`, and so
    does a header claiming more than Pillow's `Image.MAX_IMAGE_PIXELS` (a decompression bomb), before any pixel
    is allocated.
    """
    image = _open(source, name)
    mode = image.mode
    try:
        if mode == "RGB" and "transparency" not in image.info:
            return image
        if mode in SIXTEEN_BIT_MODES or mode == "F":
            values = np.asarray(image, dtype=np.float64)
            gray = np.clip(values, 0, 65535) / 257.0 if mode != "F" else np.clip(values, 0.0, 1.0) * 255.0
            return Image.fromarray(np.repeat(np.round(gray).astype(np.uint8)[:, :, None], 3, axis=2))
        if mode in ALPHA_MODES or "transparency" in image.info:
            rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)
            alpha = rgba[:, :, 3:] / 255.0
            return Image.fromarray(np.round(alpha * rgba[:, :, :3] + (1.0 - alpha) * ALPHA_BACKGROUND).astype(np.uint8))
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise InputError(f"{name}: cannot decode (mode {mode}: {first_line(error)})") from None


def check_resolution(resolution, flag="--resolution", multiple=8):
    """A resolution must be None (the model's native size) or a positive multiple of `multiple`."""
    if resolution is None:
        return
    if resolution <= 0 or resolution % multiple != 0:
        raise InputError(f"{flag} must be a positive multiple of {multiple}, got {resolution}")


# `--image_interpolation_mode` names (torchvision's, as the diffusers examples list them) -> PIL filters.
INTERPOLATION_MODES = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "box": Image.BOX,
                       "hamming": Image.HAMMING, "lanczos": Image.LANCZOS, "nearest": Image.NEAREST,
                       "nearest_exact": Image.NEAREST}


def resize_and_crop(image, resolution, center_crop=True, rng=None, interpolation="bicubic"):
    """RGB, shorter side resized to `resolution` (`interpolation`, an `INTERPOLATION_MODES` name), then a square crop.

    The crop is centred, or with `center_crop=False` at an offset drawn from `rng` (a numpy Generator: left,
    then top), or at the top-left corner without `rng`. Any mode is first brought to RGB by `decode_rgb`.
    """
    return resized_square_crop(image, resolution, center_crop, rng, interpolation)[0]


def resized_square_crop(image, resolution, center_crop=True, rng=None, interpolation="bicubic"):
    """`resize_and_crop`, also returning where the crop came from: (crop, (height, width) of the decoded image,
    (top, left) of the crop in the resized image) — SDXL's size and crop conditioning (`conditioning.size_time_ids`).
    """
    image = decode_rgb(image)
    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if new_size != (width, height):
        image = image.resize(new_size, resample=INTERPOLATION_MODES[interpolation])
    if center_crop:
        left, top = (new_size[0] - resolution) // 2, (new_size[1] - resolution) // 2
    elif rng is not None:
        left = int(rng.integers(0, new_size[0] - resolution + 1))
        top = int(rng.integers(0, new_size[1] - resolution + 1))
    else:
        left = top = 0
    return image.crop((left, top, left + resolution, top + resolution)), (height, width), (top, left)


def difference_hash(image):
    """64-bit dHash of an image: grayscale resized to 9 × 8 (bilinear), bit (r, c) = pixel (r, c) brighter than
    pixel (r, c + 1), row-major. Near-identical images (a rescaled copy) share most bits; used only to find
    candidate pairs, which are then compared pixel by pixel."""
    gray = np.asarray(decode_rgb(image).convert("L").resize((9, 8), Image.BILINEAR), dtype=np.int16)
    return int.from_bytes(np.packbits(gray[:, :-1] > gray[:, 1:]).tobytes(), "big")


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
