"""What the training tests share: small embedded datasets on disk, and running the training script."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def pattern_image(width: int, height: int, seed: int) -> Image.Image:
    """A smooth, structured image (a random image would be noise to the VAE as well)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(2 * np.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y + rng.uniform()))
                for _ in range(3)]
    return Image.fromarray(((np.stack(channels, -1) + 1) * 127.5).astype(np.uint8))


def make_dataset(root: Path, images: list[tuple[Image.Image, str]], cache_latents: bool = False,
                 model: str = "tiny") -> Path:
    """An imagefolder as prepare_dataset.py writes it, embedded by embed_captions.py with `model`'s T5 (and VAE)."""
    import embed_captions

    root = Path(root)
    root.mkdir(parents=True)
    with open(root / "metadata.jsonl", "w") as f:
        for i, (image, caption) in enumerate(images):
            image.save(root / f"{i:04d}.png")
            f.write(json.dumps({"file_name": f"{i:04d}.png", "text": caption}) + "\n")
    embed_captions.main(["--dataset_dir", str(root), "--model", model, "--batch_size", "4"]
                        + (["--cache_latents"] if cache_latents else []))
    return root


def two_bucket_dataset(root: Path) -> Path:
    """Four cached-latent images in two aspect-ratio buckets (three 1:1, one wide): the multi-process tests' data."""
    images = [(pattern_image(64, 64, i), f"caption {i}") for i in range(3)] + [(pattern_image(96, 48, 3), "wide")]
    return make_dataset(root, images, cache_latents=True)


def tiny_transformer_inputs(seed: int = 0, text_tokens: int = 512) -> dict:
    """Keyword arguments for one call of the tiny transformer: two 8x8 latents at two noise levels, random text."""
    generator = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 16, 1, 8, 8, generator=generator), timestep=torch.tensor([0.3, 0.8]),
                encoder_hidden_states=torch.randn(2, text_tokens, 32, generator=generator),
                padding_mask=torch.zeros(1, 1, 8, 8), return_dict=False)


def train(*argv: str):
    """Run train_text2image.py in this process; returns the last checkpoint's path."""
    from accelerate.state import AcceleratorState

    import train_text2image

    AcceleratorState._reset_state(reset_partial_state=True)  # each run sets its own mixed precision
    return train_text2image.main(train_text2image.parse_args([str(a) for a in argv]))


def weights(checkpoint: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    from cosmos_t2i.methods import read_transformer_weights

    return read_transformer_weights(Path(checkpoint) / "model" / ("ema" if ema else ""))


def assert_same_training(checkpoint: Path, reference: Path, ema: bool = True, rtol: float = 1e-4,
                         atol: float = 1e-5) -> None:
    """`checkpoint`'s weights (and EMA) equal `reference`'s to float rounding: the same training, summed in another
    order."""
    for from_ema in (False, True) if ema else (False,):
        got = weights(checkpoint, from_ema)
        for name, tensor in weights(reference, from_ema).items():
            torch.testing.assert_close(got[name], tensor, rtol=rtol, atol=atol, msg=f"{name} (EMA: {from_ema})")
