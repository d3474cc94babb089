"""Specification of image decoding and augmentation."""

import io

import numpy as np
from PIL import Image, ImageEnhance
import pytest

from gmae_jax.data import frames, transforms
from gmae_jax.data.transforms import ImageDecodeError
from gmae_jax.train import steps


def _save(img, path, fmt, **kwargs):
    img.save(path, fmt, **kwargs)
    return str(path)


def _gradient(width=40, height=30):
    """An RGB image whose pixels differ, so crops and flips are visible."""
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=-1), "RGB")


def test_decode_reads_path_and_bytes_alike(tmp_path):
    path = _save(_gradient(), tmp_path / "a.png", "PNG")

    from_path = transforms.decode_rgb(path)
    from_bytes = transforms.decode_rgb(open(path, "rb").read())

    assert from_path.mode == "RGB" and from_path.size == (40, 30)
    np.testing.assert_array_equal(np.asarray(from_path), np.asarray(from_bytes))


def test_decode_converts_cmyk_jpeg_to_rgb(tmp_path):
    path = _save(Image.new("CMYK", (8, 6), (0, 0, 0, 0)), tmp_path / "cmyk.jpg", "JPEG")

    img = transforms.decode_rgb(path)

    assert img.mode == "RGB" and img.size == (8, 6)
    assert np.asarray(img).min() > 240  # No ink is white.


def test_decode_converts_greyscale_to_rgb(tmp_path):
    path = _save(Image.new("L", (8, 6), 77), tmp_path / "grey.png", "PNG")

    pixels = np.asarray(transforms.decode_rgb(path))

    assert pixels.shape == (6, 8, 3)
    assert (pixels == 77).all()


def test_decode_reduces_16_bit_greyscale_to_its_top_8_bits(tmp_path):
    eight_bit = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    path = _save(Image.fromarray(eight_bit.astype(np.uint16) * 257), tmp_path / "grey16.png", "PNG")
    assert Image.open(path).mode in ("I;16", "I")  # what a 16-bit greyscale PNG opens as

    pixels = np.asarray(transforms.decode_rgb(path))

    assert pixels.shape == (6, 8, 3)
    np.testing.assert_array_equal(pixels, np.repeat(eight_bit[..., None], 3, axis=-1))


def test_decode_reads_a_float_greyscale_tiff_of_0_to_1_as_0_to_255(tmp_path):
    eight_bit = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    path = _save(Image.fromarray(eight_bit.astype(np.float32) / 255), tmp_path / "float.tif", "TIFF")
    assert Image.open(path).mode == "F"

    pixels = np.asarray(transforms.decode_rgb(path))

    np.testing.assert_array_equal(pixels, np.repeat(eight_bit[..., None], 3, axis=-1))


def test_decode_converts_palette_to_rgb(tmp_path):
    palette_img = Image.new("P", (8, 6), 1)
    palette_img.putpalette([0, 0, 0, 10, 200, 30])
    path = _save(palette_img, tmp_path / "palette.png", "PNG")

    pixels = np.asarray(transforms.decode_rgb(path))

    assert pixels.shape == (6, 8, 3)
    assert (pixels == [10, 200, 30]).all()


def test_decode_composites_rgba_on_black(tmp_path):
    rgba = Image.new("RGBA", (2, 1), (200, 100, 50, 255))
    rgba.putpixel((1, 0), (200, 100, 50, 0))
    path = _save(rgba, tmp_path / "rgba.png", "PNG")

    pixels = np.asarray(transforms.decode_rgb(path))

    assert pixels[0, 0].tolist() == [200, 100, 50]
    assert pixels[0, 1].tolist() == [0, 0, 0]


@pytest.mark.parametrize("mode, colour", [("L", 200), ("RGB", (200, 200, 200)), ("RGB", (200, 100, 50))])
def test_a_colour_a_png_names_transparent_is_black_in_every_mode(mode, colour, tmp_path):
    """An RGB PNG's transparent colour (its tRNS chunk) kept its colour, a grey one's went black."""
    image = Image.new(mode, (2, 1), colour)
    image.putpixel((1, 0), 0 if mode == "L" else (1, 2, 3))
    path = _save(image, tmp_path / "keyed.png", "PNG", transparency=colour)

    pixels = np.asarray(transforms.decode_rgb(path))

    assert pixels[0, 0].tolist() == [0, 0, 0]
    assert pixels[0, 1].tolist() == ([0, 0, 0] if mode == "L" else [1, 2, 3])


def test_decode_applies_exif_rotation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display.
    path = _save(_gradient(40, 20), tmp_path / "rotated.jpg", "JPEG", exif=exif)

    assert transforms.decode_rgb(path).size == (20, 40)


def test_decode_of_truncated_jpeg_names_the_file(tmp_path):
    buffer = io.BytesIO()
    _gradient(64, 64).save(buffer, "JPEG")
    path = tmp_path / "truncated.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])

    with pytest.raises(ImageDecodeError, match="truncated.jpg"):
        transforms.decode_rgb(str(path))


def test_decode_of_non_image_names_the_file(tmp_path):
    path = tmp_path / "corrupt.jpg"
    path.write_bytes(b"this is not a jpeg")

    with pytest.raises(ImageDecodeError, match="corrupt.jpg"):
        transforms.decode_rgb(str(path))


def test_decode_of_missing_file_names_the_file(tmp_path):
    with pytest.raises(ImageDecodeError, match="absent.jpg"):
        transforms.decode_rgb(str(tmp_path / "absent.jpg"))


def test_draft_decodes_large_jpeg_at_reduced_scale(tmp_path):
    path = _save(_gradient(800, 600), tmp_path / "large.jpg", "JPEG")

    img = transforms.decode_rgb(path, draft_size=100)

    assert img.size == (200, 150)  # libjpeg's 1/4 scale: the smallest with both sides >= 100.


def test_random_resized_crop_has_requested_size():
    rng = np.random.default_rng(0)

    assert transforms.random_resized_crop(_gradient(), 16, rng).size == (16, 16)


def test_random_resized_crop_is_deterministic_for_a_seed():
    def crop(seed):
        rng = np.random.default_rng(seed)
        return np.asarray(transforms.random_resized_crop(_gradient(), 16, rng))

    np.testing.assert_array_equal(crop(1), crop(1))
    assert not np.array_equal(crop(1), crop(2))


def test_random_resized_crop_falls_back_to_centre_crop():
    img = _gradient(100, 10)  # No box with area >= 90 % and aspect <= 4/3 fits.

    out = transforms.random_resized_crop(img, 8, np.random.default_rng(0), scale=(0.9, 1.0))

    # The widest 4/3 box, centred: x from 43 to 56.
    expected = img.crop((43, 0, 56, 10)).resize((8, 8), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


def test_random_resized_crop_reads_nothing_outside_its_box_as_torchvision_does():
    """torchvision's resized_crop cuts the box out, then resizes; PIL's resize(box=...) would blend the
    pixels just outside the box into the border row and column."""
    pixels = np.random.default_rng(0).integers(0, 200, (20, 22, 3), np.uint8)
    pixels[:, [0, 21]] = 255  # outside the box the fallback picks: the centred 20 x 20, columns 1-20
    img = Image.fromarray(pixels)

    out = transforms.random_resized_crop(img, 8, np.random.default_rng(0), scale=(1.0, 1.0), ratio=(1.0, 1.0))

    np.testing.assert_array_equal(np.asarray(out), np.asarray(img.crop((1, 0, 21, 20)).resize((8, 8), Image.BILINEAR)))
    assert not np.array_equal(np.asarray(out), np.asarray(img.resize((8, 8), Image.BILINEAR, box=(1, 0, 21, 20))))


def test_horizontal_flip_mirrors_when_drawn():
    img = _gradient()

    flipped = transforms.horizontal_flip(img, np.random.default_rng(0), p=1.0)
    kept = transforms.horizontal_flip(img, np.random.default_rng(0), p=0.0)

    np.testing.assert_array_equal(np.asarray(flipped), np.asarray(img)[:, ::-1])
    np.testing.assert_array_equal(np.asarray(kept), np.asarray(img))


def test_color_jitter_of_zero_strength_draws_nothing_and_is_identity():
    rng = np.random.default_rng(0)

    jitter = transforms.sample_color_jitter(rng, 0, 0, 0, 0)
    out = transforms.apply_color_jitter(_gradient(), jitter)

    np.testing.assert_array_equal(jitter, transforms.IDENTITY_JITTER)
    assert rng.random() == np.random.default_rng(0).random()  # the stream is where it was
    np.testing.assert_array_equal(np.asarray(out), np.asarray(_gradient()))


def test_color_jitter_is_deterministic_for_a_seed_within_its_ranges_and_changes_pixels():
    def jitter(seed):
        return transforms.sample_color_jitter(np.random.default_rng(seed), 0.4, 0.4, 0.4, 0.1)

    draws = np.stack([jitter(seed) for seed in range(200)])

    np.testing.assert_array_equal(jitter(3), jitter(3))
    assert draws.dtype == np.float32
    assert ((draws[:, :3] >= 0.6) & (draws[:, :3] <= 1.4)).all()
    assert set(np.unique(draws[:, 3])) <= set(range(-25, 26)) and len(np.unique(draws[:, 3])) > 20
    out = transforms.apply_color_jitter(_gradient(), jitter(3))
    assert not np.array_equal(np.asarray(out), np.asarray(_gradient()))


def test_color_jitter_is_drawn_as_torchvisions_color_jitter_draws_it():
    """torchvision's ColorJitter.get_params: a random order of the four first, then the factors; the
    hue shift is np.int32(hue_factor * 255), i.e. truncated toward zero."""
    seeds = range(300)
    draws = np.stack([transforms.sample_color_jitter(np.random.default_rng(s), 0.4, 0.4, 0.4, 0.1) for s in seeds])
    for seed, jitter in zip(seeds, draws):
        rng = np.random.default_rng(seed)
        order = rng.permutation(4)
        factors = rng.uniform(0.6, 1.4, 3)
        hue_factor = rng.uniform(-0.1, 0.1)
        np.testing.assert_array_equal(jitter, np.float32([*factors, np.int32(hue_factor * 255), *order]))
    assert len({tuple(row) for row in draws[:, 4:]}) == 24  # every order turns up


def test_color_jitter_applies_the_four_in_the_drawn_order():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), np.uint8))

    def by_hand(order):
        out = img
        for op in order:
            out = (ImageEnhance.Brightness(out).enhance(1.3) if op == 0 else ImageEnhance.Contrast(out).enhance(0.7)
                   if op == 1 else ImageEnhance.Color(out).enhance(1.4) if op == 2 else _hue_shift(out, 20))
        return np.asarray(out)

    outputs = {}
    for order in ((0, 1, 2, 3), (3, 2, 1, 0), (1, 3, 0, 2)):
        jitter = np.float32([1.3, 0.7, 1.4, 20, *order])
        outputs[order] = np.asarray(transforms.apply_color_jitter(img, jitter))
        np.testing.assert_array_equal(outputs[order], by_hand(order))
    assert not np.array_equal(outputs[(0, 1, 2, 3)], outputs[(3, 2, 1, 0)])  # the order matters


def _hue_shift(img, levels):
    hsv = np.array(img.convert("HSV"))
    hsv[..., 0] = (hsv[..., 0].astype(int) + levels) % 256
    return Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")


def test_a_drawn_hue_shift_of_zero_still_quantises_through_hsv_and_no_hue_draws_none():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), np.uint8))
    drawn = (transforms.sample_color_jitter(np.random.default_rng(s), 0, 0, 0, 0.1) for s in range(500))
    zero_shift = next(j for j in drawn if j[transforms.HUE] == 0)
    no_hue = transforms.sample_color_jitter(np.random.default_rng(0), 0.4, 0, 0, 0)

    out = np.asarray(transforms.apply_color_jitter(img, zero_shift))

    np.testing.assert_array_equal(out, np.asarray(_hue_shift(img, 0)))
    assert not np.array_equal(out, np.asarray(img))
    assert np.isnan(no_hue[transforms.HUE])


def test_hue_jitter_changes_colour_but_leaves_grey_alone():
    red = Image.new("RGB", (4, 4), (200, 30, 30))
    grey = Image.new("RGB", (4, 4), (90, 90, 90))
    half_turn = np.array([1, 1, 1, 128, 0, 1, 2, 3], np.float32)

    red_out = np.asarray(transforms.apply_color_jitter(red, half_turn))
    grey_out = np.asarray(transforms.apply_color_jitter(grey, half_turn))

    assert not np.array_equal(red_out, np.asarray(red))
    np.testing.assert_array_equal(grey_out, np.asarray(grey))


def test_resize_center_crop_keeps_the_centre_only():
    pixels = np.full((100, 200, 3), 128, np.uint8)
    pixels[:, :50] = pixels[:, -50:] = 0  # Outside the central 87.5 % of the shorter side.
    img = Image.fromarray(pixels)

    out = np.asarray(frames.resize_center_crop(img, 16))

    assert out.shape == (16, 16, 3)
    assert (out == 128).all()


def test_normalize_gives_float32_hwc_standardised_with_imagenet_stats():
    mean_pixel = np.round(transforms.IMAGENET_MEAN * 255).astype(np.uint8)
    img = Image.new("RGB", (5, 3), tuple(int(v) for v in mean_pixel))

    out = transforms.normalize(img)

    assert out.shape == (3, 5, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, 0.0, atol=0.01)


def test_the_pipeline_hands_on_uint8_pixels_that_the_step_standardises_like_the_host_would():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (3, 5, 3), dtype=np.uint8))
    pixels = transforms.pixels(img)
    assert pixels.shape == (3, 5, 3) and pixels.dtype == np.uint8

    on_device = steps.standardize(pixels[None])

    assert on_device.dtype == np.float32
    np.testing.assert_allclose(on_device[0], transforms.normalize(img), rtol=1e-6, atol=1e-6)
    standardised = transforms.normalize(img)[None]
    assert steps.standardize(standardised) is standardised  # float batches are taken as standardised


@pytest.mark.parametrize("wide, suffix", [
    (lambda eight_bit: Image.fromarray(eight_bit.astype(np.uint16) * 257), "png"),
    (lambda eight_bit: Image.fromarray(eight_bit.astype(np.float32) / 255), "tif"),
])
def test_the_pytorch_only_decoder_reads_wide_greyscale_as_decode_rgb_does(wide, suffix, tmp_path):
    from gmae_jax.torch_mirror import exported  # the deployment path, which must not import etils

    eight_bit = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    path = str(tmp_path / f"grey.{suffix}")
    wide(eight_bit).save(path)

    np.testing.assert_array_equal(np.asarray(exported._rgb(path, 8)), np.asarray(transforms.decode_rgb(path)))
    np.testing.assert_array_equal(np.asarray(transforms.decode_rgb(path))[..., 0], eight_bit)
