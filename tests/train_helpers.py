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


def make_dataset(root: Path, model_dir: Path, images: list[tuple[Image.Image, str]], cache_latents: bool = False):
    """DATASET_DIR/embedded exactly as dataset_format.py describes it, from the tiny pipeline's T5 (and VAE)."""
    import datasets
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, T5EncoderModel

    from cosmos_t2i import dataset_format as fmt
    from cosmos_t2i.buckets import bucket_pixels
    from cosmos_t2i.presets import PRESETS
    from cosmos_t2i.text_encoding import encode_captions
    from cosmos_t2i.vae_latents import encode_normalized

    tokenizer = AutoTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    encoder = T5EncoderModel.from_pretrained(model_dir, subfolder="text_encoder")
    captions = [caption for _, caption in images]
    embeddings = [e.half().numpy() for e in encode_captions(tokenizer, encoder, captions)]
    dim = embeddings[0].shape[1]
    columns = {fmt.IMAGE_COLUMN: [image for image, _ in images], fmt.TEXT_COLUMN: captions,
               fmt.T5_COLUMN: embeddings}
    features = {fmt.IMAGE_COLUMN: datasets.Image(), fmt.TEXT_COLUMN: datasets.Value("string"),
                fmt.T5_COLUMN: datasets.Array2D(shape=(None, dim), dtype="float16")}
    resolutions = PRESETS["tiny"].resolutions
    if cache_latents:
        vae = AutoencoderKLWan.from_pretrained(model_dir, subfolder="vae")
        keys, latents = [], []
        for image, _ in images:
            key, pixels = bucket_pixels(image, resolutions)
            keys.append(key)
            latents.append(encode_normalized(vae, pixels[None])[0].half().numpy())
        columns.update({fmt.LATENTS_COLUMN: [lat.tobytes() for lat in latents],
                        fmt.LATENTS_SHAPE_COLUMN: [list(lat.shape) for lat in latents], fmt.BUCKET_COLUMN: keys})
        features.update({fmt.LATENTS_COLUMN: datasets.Value("binary"),
                         fmt.LATENTS_SHAPE_COLUMN: datasets.Sequence(datasets.Value("int32")),
                         fmt.BUCKET_COLUMN: datasets.Value("string")})
    dataset = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    out = Path(root) / fmt.EMBEDDED_SUBDIR
    dataset.save_to_disk(str(out))
    (out / fmt.INFO_FILE).write_text(json.dumps({"model": "tiny", "embedding_dim": dim,
                                                 "resolutions": {k: list(v) for k, v in resolutions.items()}}))
    return Path(root)


def train(*argv: str):
    """Run train_text2image.py in this process; returns the last checkpoint's path."""
    from accelerate.state import AcceleratorState

    import train_text2image

    AcceleratorState._reset_state(reset_partial_state=True)  # each run sets its own mixed precision
    return train_text2image.main(train_text2image.parse_args([str(a) for a in argv]))


def weights(checkpoint: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    from cosmos_t2i.checkpoint import read_transformer_weights

    return read_transformer_weights(Path(checkpoint) / "model" / ("ema" if ema else ""))
