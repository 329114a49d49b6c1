"""Every mode Pillow opens becomes 8-bit RGB with the right pixel values (a 16-bit PNG is not white).

Modes that a file format stores go through the file and `frames.extract`, the function prepare_dataset.py's workers
run; the rest (Pillow reads no file as HSV, RGBa, La, RGBX, I;16L, I;16N) through `image_modes.to_rgb8` itself.
Expected values are written out by hand, or computed here from the mode's definition.
"""

import numpy as np
import pytest
from PIL import Image

from cosmos_t2i import frames

SIXTEEN = [0, 257, 1000, 32896, 65535]
SIXTEEN_AS_8 = [0, 1, 4, 128, 255]  # v / 257, rounded


def _row(values, dtype):
    return np.array([values], dtype=dtype)


def _grey(values):
    return np.repeat(np.array([values], dtype=np.uint8)[..., None], 3, axis=2)


def _over_white(colour, alpha):
    """Straight alpha composited onto white, per channel."""
    colour, alpha = np.asarray(colour, float), np.asarray(alpha, float)[..., None] / 255
    return colour * alpha + 255 * (1 - alpha)


def _extracted(tmp_path, image, file_format, **save):
    """`image` saved as `file_format`, read back through frames.extract: the RGB array it wrote."""
    work = tmp_path / f"{image.mode}-{file_format}-{len(list(tmp_path.iterdir()))}".replace(";", "")
    work.mkdir()
    path = work / f"input.{file_format.lower()}"
    image.save(path, file_format, **save)
    with Image.open(path) as reread:
        assert reread.mode == image.mode  # the file really holds this mode
    out = work / "out"
    out.mkdir()
    result = frames.extract((str(path), "converted"), frames.Options(str(out)))
    assert result.error is None and len(result.files) == 1
    with Image.open(out / result.files[0]) as converted:
        assert converted.mode == "RGB"
        return np.asarray(converted).astype(int)


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    image = Image.fromarray(_row(SIXTEEN, np.uint16))
    assert image.mode == "I;16"
    assert np.array_equal(_extracted(tmp_path, image, "PNG"), _grey(SIXTEEN_AS_8))


def test_16_bit_big_endian_tiff(tmp_path):
    image = Image.frombytes("I;16B", (len(SIXTEEN), 1), np.array(SIXTEEN, dtype=">u2").tobytes())
    assert np.array_equal(_extracted(tmp_path, image, "TIFF"), _grey(SIXTEEN_AS_8))


def test_32_bit_integer_tiff_uses_its_sample_range(tmp_path):
    image = Image.fromarray(_row([0, 2**30, 2**31 - 1, -5], np.int32))
    assert image.mode == "I"
    assert np.array_equal(_extracted(tmp_path, image, "TIFF"), _grey([0, 128, 255, 0]))


def test_16_bit_pgm_read_as_I_is_16_bit(tmp_path):
    image = Image.fromarray(_row(SIXTEEN, np.int32))
    assert image.mode == "I"
    assert np.array_equal(_extracted(tmp_path, image, "PPM"), _grey(SIXTEEN_AS_8))


def test_float_tiff_is_zero_to_one(tmp_path):
    image = Image.fromarray(_row([0.0, 0.25, 0.5, 1.0, 2.0, -1.0], np.float32))
    assert image.mode == "F"
    assert np.array_equal(_extracted(tmp_path, image, "TIFF"), _grey([0, 64, 128, 255, 255, 0]))


def test_one_bit_and_8_bit_grey(tmp_path):
    bits = Image.fromarray(_row([False, True, True, False], bool))
    assert bits.mode == "1"
    assert np.array_equal(_extracted(tmp_path, bits, "PNG"), _grey([0, 255, 255, 0]))
    grey = Image.fromarray(_row([0, 7, 128, 255], np.uint8))
    assert np.array_equal(_extracted(tmp_path, grey, "TIFF"), _grey([0, 7, 128, 255]))


def test_alpha_modes_are_composited_onto_white(tmp_path):
    colours = np.array([[[200, 10, 30], [0, 0, 0], [40, 80, 120]]], np.uint8)
    alphas = np.array([[255, 0, 128]], np.uint8)
    rgba = Image.fromarray(np.dstack([colours, alphas]), "RGBA")
    got = _extracted(tmp_path, rgba, "PNG")
    assert np.abs(got - _over_white(colours, alphas)).max() <= 1
    assert got[0, 1].tolist() == [255, 255, 255]  # fully transparent: white, not black

    la = Image.fromarray(np.dstack([colours[..., 0], alphas]), "LA")
    got = _extracted(tmp_path, la, "PNG")
    assert np.abs(got - _over_white(np.repeat(colours[..., :1], 3, 2), alphas)).max() <= 1


def test_palette_with_and_without_transparency(tmp_path):
    palette = [255, 0, 0, 0, 0, 255, 10, 20, 30] + [0] * (256 * 3 - 9)
    image = Image.fromarray(_row([0, 1, 2], np.uint8), "L").convert("P")
    image.putpalette(palette)
    assert _extracted(tmp_path, image, "PNG").tolist() == [[[255, 0, 0], [0, 0, 255], [10, 20, 30]]]
    got = _extracted(tmp_path, image, "GIF", transparency=1)
    assert got.tolist() == [[[255, 0, 0], [255, 255, 255], [10, 20, 30]]]

    pa = Image.merge("PA", (image, Image.fromarray(_row([255, 128, 0], np.uint8), "L")))
    expected = _over_white([[[255, 0, 0], [0, 0, 255], [10, 20, 30]]], [[255, 128, 0]])
    assert np.abs(_extracted(tmp_path, pa, "TIFF") - expected).max() <= 1


def test_grey_and_rgb_with_a_transparent_colour_png(tmp_path):
    grey = Image.fromarray(_row([0, 50, 200], np.uint8))
    assert _extracted(tmp_path, grey, "PNG", transparency=50).tolist() == _grey([0, 255, 200]).tolist()
    rgb = Image.fromarray(np.array([[[1, 2, 3], [9, 9, 9]]], np.uint8))
    got = _extracted(tmp_path, rgb, "PNG", transparency=(1, 2, 3))
    assert got.tolist() == [[[255, 255, 255], [9, 9, 9]]]


def test_cmyk_ycbcr_and_lab_tiffs(tmp_path):
    cmyk = Image.frombytes("CMYK", (4, 1), bytes([0, 0, 0, 0, 255, 0, 0, 0, 0, 255, 255, 0, 0, 0, 0, 255]))
    assert _extracted(tmp_path, cmyk, "TIFF").tolist() == [
        [[255, 255, 255], [0, 255, 255], [255, 0, 0], [0, 0, 0]]]  # white, cyan, red (magenta + yellow), black

    ycc = np.array([[[128, 128, 128], [81, 90, 240], [145, 54, 34]]], float)
    ycbcr = Image.fromarray(ycc.astype(np.uint8), "YCbCr")
    y, cb, cr = ycc[..., 0], ycc[..., 1] - 128, ycc[..., 2] - 128  # ITU-R BT.601 (JFIF)
    expected = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)
    assert np.abs(_extracted(tmp_path, ycbcr, "TIFF") - np.clip(expected, 0, 255)).max() <= 2

    lab = Image.new("LAB", (2, 1), (255, 128, 128))  # L* 100, a* = b* = 0 (Pillow stores a*, b* + 128) ...
    lab.putpixel((1, 0), (0, 128, 128))  # ... and L* 0
    got = _extracted(tmp_path, lab, "TIFF")
    assert np.abs(got - [[[255] * 3, [0] * 3]]).max() <= 3


@pytest.mark.parametrize("mode", ["I;16L", "I;16N"])
def test_16_bit_modes_no_file_gives(mode):
    from cosmos_t2i import image_modes

    image = Image.frombytes(mode, (len(SIXTEEN), 1), np.array(SIXTEEN, dtype="<u2" if mode == "I;16L" else "=u2")
                            .tobytes())
    assert np.asarray(image_modes.to_rgb8(image)).tolist() == _grey(SIXTEEN_AS_8).tolist()


def test_premultiplied_hsv_and_padded_modes():
    from cosmos_t2i import image_modes

    # Premultiplied alpha over white: colour_stored + 255 * (1 - alpha).
    rgba_premultiplied = Image.frombytes("RGBa", (2, 1), bytes([100, 50, 0, 128, 0, 0, 0, 0]))
    got = np.asarray(image_modes.to_rgb8(rgba_premultiplied)).astype(int)
    assert np.abs(got - [[[100 + 127, 50 + 127, 127], [255, 255, 255]]]).max() <= 1
    la_premultiplied = Image.frombytes("La", (2, 1), bytes([64, 128, 0, 0]))
    got = np.asarray(image_modes.to_rgb8(la_premultiplied)).astype(int)
    assert np.abs(got - [[[64 + 127] * 3, [255] * 3]]).max() <= 1

    hsv = Image.frombytes("HSV", (3, 1), bytes([0, 255, 255, 85, 255, 255, 0, 0, 200]))
    assert np.asarray(image_modes.to_rgb8(hsv)).tolist() == [[[255, 0, 0], [0, 255, 0], [200, 200, 200]]]
    rgbx = Image.frombytes("RGBX", (1, 1), bytes([1, 2, 3, 0]))
    assert np.asarray(image_modes.to_rgb8(rgbx)).tolist() == [[[1, 2, 3]]]
