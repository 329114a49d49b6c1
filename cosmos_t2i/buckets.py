"""Aspect-ratio buckets: each image goes to the closest of NVIDIA's five resolutions with a minimal crop.

NVIDIA's dataloader resizes every image to 768x1360, distorting anything that is not 16:9. We instead pick the
bucket whose aspect ratio is nearest (in log space, so 2:1 and 1:2 are equally far from 1:1), scale the image
so it covers the bucket, and center-crop the overhang.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


def nearest_bucket(width: int, height: int, resolutions: dict[str, tuple[int, int]]) -> str:
    """Key of the resolution (width, height) whose aspect ratio is closest to width/height."""
    log_ratio = math.log(width / height)
    return min(resolutions, key=lambda k: abs(math.log(resolutions[k][0] / resolutions[k][1]) - log_ratio))


def resize_and_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale `image` to cover `size` = (width, height) keeping its aspect ratio, then center-crop to `size`."""
    target_w, target_h = size
    scale = max(target_w / image.width, target_h / image.height)
    new_w, new_h = max(target_w, round(image.width * scale)), max(target_h, round(image.height * scale))
    image = image.convert("RGB").resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - target_w) // 2, (new_h - target_h) // 2
    return image.crop((left, top, left + target_w, top + target_h))


def to_pixels(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor [3, 1, H, W] in [-1, 1]: one image is a one-frame video for the Wan VAE."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(1) / 127.5 - 1.0


def bucket_pixels(image: Image.Image, resolutions: dict[str, tuple[int, int]]) -> tuple[str, torch.Tensor]:
    """The image's bucket key and its pixels at that bucket's resolution."""
    key = nearest_bucket(image.width, image.height, resolutions)
    return key, to_pixels(resize_and_crop(image, resolutions[key]))
