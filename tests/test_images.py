"""The one image-decoding rule (images.decode_rgb): every PIL mode against numpy-computed 8-bit RGB."""

import io

import numpy as np
import pytest
from PIL import Image

from mixsyn_utils.cli import InputError
from mixsyn_utils.images import decode_rgb, resize_and_crop

RNG = np.random.default_rng(0)


def png_round_trip(image, **save_options):
    """The image as a PNG file decodes it: what a dataset of files hands to the scripts."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save_options)
    return Image.open(io.BytesIO(buffer.getvalue()))


def over_white(color, alpha):
    """The expected composite: round(a · c + (1 − a) · 255), a = alpha / 255, per channel."""
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.round(a * color.astype(np.float64) + (1.0 - a) * 255.0).astype(np.uint8)


def gray_to_rgb(gray):
    return np.repeat(gray[:, :, None], 3, axis=2)


def decoded(image):
    result = decode_rgb(image)
    assert result.mode == "RGB" and result.size == image.size
    return np.asarray(result)


def test_16_bit_png_is_scaled_not_saturated():
    values = RNG.integers(0, 65536, (6, 5)).astype(np.uint16)
    image = png_round_trip(Image.fromarray(values))
    assert image.mode == "I;16"
    np.testing.assert_array_equal(decoded(image), gray_to_rgb(np.round(values / 257.0).astype(np.uint8)))
    assert (decoded(image) == 255).mean() < 0.05  # convert("RGB") saturates every value above 255


def test_big_endian_16_bit_is_scaled():
    values = RNG.integers(0, 65536, (4, 7)).astype(np.uint16)
    image = Image.frombytes("I;16B", (7, 4), values.astype(">u2").tobytes())
    np.testing.assert_array_equal(decoded(image), gray_to_rgb(np.round(values / 257.0).astype(np.uint8)))


def test_32_bit_integer_is_read_as_16_bit_and_clipped():
    values = np.array([[-5, 0, 257, 65535, 70000]], dtype=np.int32)
    expected = np.round(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(decoded(Image.fromarray(values, mode="I")), gray_to_rgb(expected))


def test_float_is_read_in_unit_range_and_clipped():
    values = np.array([[-0.5, 0.0, 0.25, 0.5, 1.0, 3.0]], dtype=np.float32)
    expected = np.round(np.clip(values.astype(np.float64), 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(decoded(Image.fromarray(values, mode="F")), gray_to_rgb(expected))


def test_grayscale_is_replicated():
    gray = RNG.integers(0, 256, (5, 6)).astype(np.uint8)
    np.testing.assert_array_equal(decoded(png_round_trip(Image.fromarray(gray))), gray_to_rgb(gray))


def test_gray_with_alpha_is_composited_over_white():
    gray, alpha = (RNG.integers(0, 256, (5, 6)).astype(np.uint8) for _ in range(2))
    image = png_round_trip(Image.fromarray(np.stack([gray, alpha], axis=2), mode="LA"))
    np.testing.assert_array_equal(decoded(image), over_white(gray_to_rgb(gray), alpha))


def test_rgba_is_composited_over_white():
    rgba = RNG.integers(0, 256, (5, 6, 4)).astype(np.uint8)
    image = png_round_trip(Image.fromarray(rgba))
    np.testing.assert_array_equal(decoded(image), over_white(rgba[:, :, :3], rgba[:, :, 3]))


def test_palette_is_looked_up():
    palette = RNG.integers(0, 256, (256, 3)).astype(np.uint8)
    indices = RNG.integers(0, 256, (5, 6)).astype(np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette.reshape(-1).tolist())
    np.testing.assert_array_equal(decoded(png_round_trip(image)), palette[indices])


def test_palette_with_transparent_index_is_composited_over_white():
    palette = RNG.integers(0, 256, (256, 3)).astype(np.uint8)
    indices = RNG.integers(0, 4, (5, 6)).astype(np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette.reshape(-1).tolist())
    image = png_round_trip(image, transparency=2)
    alpha = np.where(indices == 2, 0, 255)
    np.testing.assert_array_equal(decoded(image), over_white(palette[indices], alpha))


def test_cmyk_uses_the_subtractive_formula():
    cmyk = RNG.integers(0, 256, (5, 6, 4)).astype(np.uint8)
    ink = cmyk.astype(np.float64) / 255.0
    expected = 255.0 * (1 - ink[:, :, :3]) * (1 - ink[:, :, 3:])
    difference = decoded(Image.fromarray(cmyk, mode="CMYK")).astype(np.float64) - expected
    assert np.abs(difference).max() <= 1.0  # Pillow's integer arithmetic rounds within one level


def test_bilevel_is_black_and_white():
    bits = RNG.integers(0, 2, (5, 6)).astype(bool)
    image = png_round_trip(Image.fromarray(bits))
    assert image.mode == "1"
    np.testing.assert_array_equal(decoded(image), gray_to_rgb(np.where(bits, 255, 0).astype(np.uint8)))


def test_ycbcr_uses_the_jpeg_full_range_formula():
    ycbcr = RNG.integers(0, 256, (5, 6, 3)).astype(np.uint8)
    y, cb, cr = (ycbcr[:, :, i].astype(np.float64) for i in range(3))
    expected = np.clip(np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                                 y + 1.772 * (cb - 128)], axis=2), 0, 255)
    difference = decoded(Image.fromarray(ycbcr, mode="YCbCr")).astype(np.float64) - expected
    assert np.abs(difference).max() <= 1.0


def test_one_pixel_image_is_resized_to_the_resolution():
    pixel = Image.fromarray(np.array([[[10, 20, 30]]], dtype=np.uint8))
    np.testing.assert_array_equal(np.asarray(resize_and_crop(pixel, 8)), np.full((8, 8, 3), [10, 20, 30]))


@pytest.mark.parametrize("content, reason", [
    (b"", "cannot identify image file"),
    (None, "file not found"),
    ("truncated", "truncated"),
])
def test_unreadable_files_name_the_file_and_the_reason(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    if content == "truncated":
        buffer = io.BytesIO()
        Image.fromarray(RNG.integers(0, 256, (64, 64, 3)).astype(np.uint8)).save(buffer, format="PNG")
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=rf"^{path}: cannot decode \(.*{reason}"):
        decode_rgb(str(path), name=str(path))


def sixteen_bit_image():
    values = (np.linspace(0, 65535, 20 * 20).reshape(20, 20)).astype(np.uint16)
    return png_round_trip(Image.fromarray(values))


@pytest.mark.parametrize("consumer", ["resize_and_crop", "blind_features", "brisque_upsampling", "classifier_pixels"])
def test_every_image_consumer_decodes_16_bit_by_the_one_rule(consumer):
    """Each place that reads images sees a 16-bit PNG exactly as `decode_rgb` decodes it (convert("RGB") would
    saturate it to white)."""
    from mixsyn_utils import audit_statistics, utility

    read = {"resize_and_crop": lambda image: np.asarray(resize_and_crop(image, 8)),
            "blind_features": lambda image: audit_statistics.blind_features([image], ["a caption"]),
            "brisque_upsampling": lambda image: np.asarray(utility.upsample_to_min_side(image, 96)),
            "classifier_pixels": lambda image: utility._classifier_pixels([image], 8).numpy()}[consumer]
    image = sixteen_bit_image()
    np.testing.assert_array_equal(read(image), read(decode_rgb(image)))
    assert not np.array_equal(read(image), read(image.convert("RGB")))
