"""Any image Pillow opens -> 8-bit RGB, with its values scaled from its own range (not clipped at 255).

Pillow's `convert("RGB")` clips high-bit-depth modes: a 16-bit grayscale PNG (mode I;16) comes out white. The
ranges used here are the usual conventions for image sample types (as in scikit-image's `img_as_ubyte`):
- I;16, I;16L, I;16B, I;16N: unsigned 16-bit, 0..65535.
- I (32-bit signed integers, what Pillow gives for 16-bit PGM, TIFFs of 16/32-bit integers, ...): the TIFF's
  BitsPerSample and SampleFormat when the file says; otherwise 16-bit when every value fits in 0..65535 (the
  widest integer sample of the other formats Pillow reads as I), else 0..2**31-1. Negative values become 0.
- F (32-bit float): 0..1; values outside it are clipped.
Alpha (RGBA, LA, PA, premultiplied RGBa/La, and palette or grey/RGB images with a transparent colour) is composited
onto white: training reads RGB, and black under transparent pixels is an artefact. Every other mode (1, L, P, RGB,
RGBX, CMYK, YCbCr, LAB, HSV) is converted by Pillow itself.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
TIFF_BITS_PER_SAMPLE, TIFF_SAMPLE_FORMAT, TIFF_SIGNED = 258, 339, 2


def to_rgb8(image: Image.Image, opened: Image.Image | None = None) -> Image.Image:
    """`image` as 8-bit RGB, transparency flattened onto white. `opened`: the image as read from its file, when
    `image` is a copy of it (rotated upright), since only the file's header says a TIFF's sample range."""
    if image.mode == "F" or image.mode == "I" or image.mode.startswith("I;16"):
        return Image.fromarray(_scaled_to_8bit(image, opened or image), "L").convert("RGB")
    if image.mode == "La":  # premultiplied; Pillow converts it to nothing else
        grey, alpha = image.split()
        image = Image.merge("RGBa", (grey, grey, grey, alpha))
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _scaled_to_8bit(image: Image.Image, opened: Image.Image) -> np.ndarray:
    values = np.asarray(image)
    if image.mode == "F":
        return np.floor(np.clip(np.nan_to_num(values), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    top = _integer_top(opened, values)
    scaled = (np.clip(values.astype(np.int64), 0, top) * 255 + top // 2) // top  # rounded to nearest
    return scaled.astype(np.uint8)


def _integer_top(image: Image.Image, values: np.ndarray) -> int:
    """The largest value of the image's integer sample type."""
    if image.mode.startswith("I;16"):
        return 2**16 - 1
    tags = getattr(image, "tag_v2", None)  # TIFF
    if tags is not None and TIFF_BITS_PER_SAMPLE in tags:
        bits = np.atleast_1d(tags[TIFF_BITS_PER_SAMPLE])[0]
        signed = np.atleast_1d(tags.get(TIFF_SAMPLE_FORMAT, 1))[0] == TIFF_SIGNED
        return 2 ** (int(bits) - int(signed)) - 1
    return 2**16 - 1 if values.size == 0 or (values.min() >= 0 and values.max() < 2**16) else 2**31 - 1
