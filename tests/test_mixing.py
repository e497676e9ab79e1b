"""Specification of MixSyn mixing: Mixup-I (whole images) and Mixup-P (pixel masks), on in-memory datasets."""

import numpy as np
import pytest
from datasets import Dataset, Features, Image as ImageFeature, Value
from PIL import Image

from mixsyn_utils.cli import InputError
from mixsyn_utils.mixing import image_selection, mix_datasets, num_selected, pixel_mask

SIZE = 8
DOMAIN_SIZES = {"zero": 10, "one": 7, "two": 3}  # uneven, so stratification has remainders to distribute
RATIOS = [0.0, 0.3, 0.5, 1.0]
FEATURES = Features({"id": Value("string"), "image": ImageFeature(), "prompt": Value("string"),
                     "domain": Value("string")})


def _pair(size=SIZE, perturbed_size=SIZE, clean_mode="RGB"):
    """Clean pixels in [0, 127], perturbed = clean + 128: every mixed pixel tells where it came from."""
    rng = np.random.default_rng(0)
    clean_rows, perturbed_rows = [], []
    for domain, count in DOMAIN_SIZES.items():
        for k in range(count):
            array = rng.integers(0, 128, (perturbed_size, perturbed_size, 3), dtype=np.uint8)
            if size != perturbed_size:  # one colour per image, so resampling cannot blur it across the 128 line
                array[:] = array[0, 0]
            row = {"id": f"{domain}-{k}", "prompt": f"The face of {domain}", "domain": domain}
            clean_image = Image.fromarray(array).resize((size, size), Image.NEAREST).convert(clean_mode)
            clean_rows.append(dict(row, image=clean_image))
            perturbed_rows.append(dict(row, image=Image.fromarray(array + 128)))
    return Dataset.from_list(clean_rows, features=FEATURES), Dataset.from_list(perturbed_rows, features=FEATURES)


@pytest.fixture(scope="module")
def clean_and_perturbed():
    return _pair()


def _perturbed_pixels(mixed):
    """Per row, the boolean (H, W) map of pixels taken from the perturbed image (all channels agree)."""
    maps = []
    for image in mixed["image"]:
        from_perturbed = np.asarray(image) >= 128
        assert (from_perturbed == from_perturbed[:, :, :1]).all(), "a mask must be the same across channels"
        maps.append(from_perturbed[:, :, 0])
    return maps


@pytest.mark.parametrize("ratio", RATIOS)
def test_image_mode_perturbs_exactly_round_ratio_n_images(clean_and_perturbed, ratio):
    mixed = mix_datasets(*clean_and_perturbed, mode="image", ratio=ratio, seed=0)
    whole = [m.all() for m in _perturbed_pixels(mixed)]
    untouched = [not m.any() for m in _perturbed_pixels(mixed)]
    assert all(w or u for w, u in zip(whole, untouched))
    assert sum(whole) == num_selected(ratio, len(mixed)) == int(np.floor(ratio * 20 + 0.5))
    assert mixed["perturbed_fraction"] == [float(w) for w in whole]


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("pattern", ["random", "block"])
def test_pixel_mode_masks_exactly_round_ratio_hw_pixels(clean_and_perturbed, ratio, pattern):
    mixed = mix_datasets(*clean_and_perturbed, mode="pixel", ratio=ratio, seed=0, pattern=pattern)
    expected = int(np.floor(ratio * SIZE * SIZE + 0.5))
    assert [int(m.sum()) for m in _perturbed_pixels(mixed)] == [expected] * len(mixed)
    assert mixed["perturbed_fraction"] == [expected / (SIZE * SIZE)] * len(mixed)


def test_pixel_mode_masks_differ_between_images(clean_and_perturbed):
    maps = _perturbed_pixels(mix_datasets(*clean_and_perturbed, mode="pixel", ratio=0.5, seed=0))
    assert len({m.tobytes() for m in maps}) == len(maps)


def test_block_pattern_half_is_a_half_image_region():
    for seed in range(8):
        mask = pixel_mask(SIZE, SIZE, 0.5, seed, pattern="block")
        half = SIZE // 2
        halves = [mask[:half].all(), mask[half:].all(), mask[:, :half].all(), mask[:, half:].all()]
        assert sum(halves) == 1 and mask.sum() == SIZE * SIZE // 2


def test_image_mode_is_stratified_per_domain(clean_and_perturbed):
    for ratio in (0.3, 0.5):
        mixed = mix_datasets(*clean_and_perturbed, mode="image", ratio=ratio, seed=3)
        for domain, count in DOMAIN_SIZES.items():
            chosen = sum(f for f, d in zip(mixed["perturbed_fraction"], mixed["domain"]) if d == domain)
            assert np.floor(ratio * count) <= chosen <= np.ceil(ratio * count), (domain, ratio, chosen)


def test_image_selection_stratifies_a_rare_domain():
    # 99 images of one domain, 1 of another: unstratified sampling at 0.5 could skip the rare one's quota logic
    domains = ["big"] * 98 + ["small"] * 2
    for seed in range(5):
        selected = image_selection(domains, 0.5, seed)
        assert selected.sum() == 50 and selected[98:].sum() == 1


@pytest.mark.parametrize("mode", ["image", "pixel"])
def test_same_seed_gives_same_mix(clean_and_perturbed, mode):
    first = mix_datasets(*clean_and_perturbed, mode=mode, ratio=0.5, seed=7)
    second = mix_datasets(*clean_and_perturbed, mode=mode, ratio=0.5, seed=7)
    assert [m.tobytes() for m in _perturbed_pixels(first)] == [m.tobytes() for m in _perturbed_pixels(second)]
    assert first["mask_seed"] == second["mask_seed"]


@pytest.mark.parametrize("mode", ["image", "pixel"])
def test_other_seed_gives_other_mix(clean_and_perturbed, mode):
    first = mix_datasets(*clean_and_perturbed, mode=mode, ratio=0.5, seed=7)
    second = mix_datasets(*clean_and_perturbed, mode=mode, ratio=0.5, seed=8)
    assert [m.tobytes() for m in _perturbed_pixels(first)] != [m.tobytes() for m in _perturbed_pixels(second)]
    assert first["mask_seed"] != second["mask_seed"]


def test_mix_does_not_depend_on_row_order(clean_and_perturbed):
    clean, perturbed = clean_and_perturbed
    reference = mix_datasets(clean, perturbed, mode="pixel", ratio=0.3, seed=1)
    shuffled = mix_datasets(clean, perturbed.shuffle(seed=0), mode="pixel", ratio=0.3, seed=1)
    assert [np.asarray(i).tobytes() for i in reference["image"]] == [np.asarray(i).tobytes() for i in shuffled["image"]]


@pytest.mark.parametrize("mode", ["image", "pixel"])
def test_ratio_zero_is_clean_and_one_is_perturbed(clean_and_perturbed, mode):
    clean, perturbed = clean_and_perturbed
    as_clean = mix_datasets(clean, perturbed, mode=mode, ratio=0.0, seed=0)
    as_perturbed = mix_datasets(clean, perturbed, mode=mode, ratio=1.0, seed=0)
    assert all((np.asarray(a) == np.asarray(b)).all() for a, b in zip(as_clean["image"], clean["image"]))
    assert all((np.asarray(a) == np.asarray(b)).all() for a, b in zip(as_perturbed["image"], perturbed["image"]))


def test_result_keeps_clean_columns_and_saves(clean_and_perturbed, tmp_path):
    from datasets import load_from_disk

    mixed = mix_datasets(*clean_and_perturbed, mode="pixel", ratio=0.5, seed=0)
    mixed.save_to_disk(str(tmp_path / "mixed"))
    reloaded = load_from_disk(str(tmp_path / "mixed"))
    assert reloaded.column_names == clean_and_perturbed[0].column_names + ["perturbed_fraction", "mask_seed"]
    assert reloaded["id"] == clean_and_perturbed[0]["id"]
    assert reloaded["mask_seed"] == mixed["mask_seed"] and reloaded["perturbed_fraction"] == [0.5] * len(mixed)
    assert (np.asarray(reloaded[0]["image"]) == np.asarray(mixed[0]["image"])).all()


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_ratio_outside_unit_interval_is_rejected(clean_and_perturbed, ratio):
    with pytest.raises(InputError, match=r"--mixup_ratio must be in \[0, 1\]"):
        mix_datasets(*clean_and_perturbed, mode="image", ratio=ratio, seed=0)


def test_id_missing_from_perturbed_set_is_named(clean_and_perturbed):
    clean, perturbed = clean_and_perturbed
    with pytest.raises(InputError, match="id 'two-2' of the clean dataset has no perturbed version"):
        mix_datasets(clean, perturbed.select(range(len(perturbed) - 1)), mode="image", ratio=0.5, seed=0)


def test_extra_id_in_perturbed_set_is_named(clean_and_perturbed):
    clean, perturbed = clean_and_perturbed
    with pytest.raises(InputError, match="id 'two-2' of the perturbed dataset is not in the clean dataset"):
        mix_datasets(clean.select(range(len(clean) - 1)), perturbed, mode="pixel", ratio=0.5, seed=0)


def test_images_of_different_sizes_are_resized_to_the_perturbed_size():
    clean, perturbed = _pair(size=12, perturbed_size=SIZE)
    mixed = mix_datasets(clean, perturbed, mode="pixel", ratio=0.5, seed=0)
    assert {image.size for image in mixed["image"]} == {(SIZE, SIZE)}
    assert [int(m.sum()) for m in _perturbed_pixels(mixed)] == [SIZE * SIZE // 2] * len(mixed)


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_grayscale_and_rgba_clean_images_are_converted_to_rgb(mode):
    clean, perturbed = _pair(clean_mode=mode)
    mixed = mix_datasets(clean, perturbed, mode="pixel", ratio=0.3, seed=0)
    assert {image.mode for image in mixed["image"]} == {"RGB"}
    assert [int(m.sum()) for m in _perturbed_pixels(mixed)] == [num_selected(0.3, SIZE * SIZE)] * len(mixed)
