"""Training batches: the embedded dataset (dataset_format.py) or synthetic data, bucketed and resumable.

Every batch holds images of one aspect-ratio bucket, so it stacks without padding. The order of batches is a pure
function of (seed, position): rank r of W takes the global batches r, r + W, r + 2W, ... of an endless stream of
epochs, so a resumed run continues from the saved position with no state beyond one integer; on another number of
processes, from the same global batch (resumed_position).

An item carries its T5 embedding trimmed to its real length; `collate` zero-pads it back to [512, D] as NVIDIA's
training does. With cached latents (embed_captions.py --cache_latents) an item is the latent itself and training
never runs the VAE encoder; otherwise it is the image's pixels at its bucket's resolution, which the training loop
encodes.
"""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import torch
from PIL import Image

from . import dataset_format as fmt
from .buckets import nearest_bucket, resize_and_crop, to_pixels
from .text_encoding import MAX_LENGTH, pad_embedding


class EmbeddedImages(torch.utils.data.Dataset):
    """DATASET_DIR/embedded as training items: {"bucket", "t5", and "latents" or "pixels"}."""

    def __init__(self, dataset_dir, resolutions: dict[str, tuple[int, int]]):
        dataset = fmt.load_embedded_dataset(dataset_dir)
        self.info = fmt.read_info(dataset_dir)
        self.cached_latents = fmt.LATENTS_COLUMN in dataset.column_names
        self.resolutions = resolutions
        self.captions = dataset[fmt.TEXT_COLUMN] if fmt.TEXT_COLUMN in dataset.column_names else []
        if self.cached_latents:
            self.buckets = list(dataset[fmt.BUCKET_COLUMN])
            # Never decode an image we will not use.
            self.rows = dataset.select_columns([fmt.T5_COLUMN, fmt.LATENTS_COLUMN, fmt.LATENTS_SHAPE_COLUMN])
        else:
            self.buckets = [nearest_bucket(*size, resolutions) for size in _image_sizes(dataset)]
            self.rows = dataset.select_columns([fmt.T5_COLUMN, fmt.IMAGE_COLUMN])
        self.embedding_dim = _as_array(self.rows[0][fmt.T5_COLUMN]).shape[-1]

    def __len__(self) -> int:
        return len(self.buckets)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        item = {"bucket": self.buckets[index], "t5": torch.from_numpy(_as_array(row[fmt.T5_COLUMN]))}
        if self.cached_latents:
            latents = np.frombuffer(row[fmt.LATENTS_COLUMN], dtype=np.float16).reshape(row[fmt.LATENTS_SHAPE_COLUMN])
            item["latents"] = torch.from_numpy(latents.copy())
        else:
            image = resize_and_crop(row[fmt.IMAGE_COLUMN], self.resolutions[self.buckets[index]])
            item["pixels"] = to_pixels(image)
        return item

    def instance_prompt(self) -> str | None:
        """The most common caption: for a DreamBooth-style dataset, the one prompt it was made with."""
        return Counter(self.captions).most_common(1)[0][0] if self.captions else None


def _image_sizes(dataset):
    """(width, height) of every image from its header alone: bucketing must not decode the whole dataset."""
    import datasets

    raw = dataset.select_columns([fmt.IMAGE_COLUMN]).cast_column(fmt.IMAGE_COLUMN, datasets.Image(decode=False))
    for row in raw:
        image = row[fmt.IMAGE_COLUMN]
        with Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]) as opened:
            yield opened.size


def _as_array(value) -> np.ndarray:
    return np.asarray(value, dtype=np.float16)


class SyntheticLatents(torch.utils.data.Dataset):
    """Random latents and full-length embeddings at one resolution, for benchmarks: no dataset, VAE or T5.

    Item i is a fixed function of i, so runs are repeatable. Embeddings fill all 512 tokens (the most work).
    """

    def __init__(self, height: int, width: int, embedding_dim: int, size: int = 1024, channels: int = 16):
        self.latent_shape = (channels, 1, height // 8, width // 8)
        self.embedding_dim = embedding_dim
        self.size = size
        self.buckets = [f"{height}x{width}"] * size
        self.cached_latents = True

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(index)
        return {
            "bucket": self.buckets[index],
            "t5": torch.randn(MAX_LENGTH, self.embedding_dim, generator=generator).half(),
            "latents": torch.randn(self.latent_shape, generator=generator).half(),
        }

    def instance_prompt(self) -> None:
        return None


class BucketBatchSampler(torch.utils.data.Sampler):
    """Endless batches of indices, each from one bucket; this rank's `start`-th batch first.

    Per epoch (seeded by seed + epoch): shuffle each bucket, cut it into batches (the last one filled up by
    wrapping around the bucket, so every batch has `batch_size` items and a fixed shape), shuffle the batches.
    """

    def __init__(self, buckets: list[str], batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0,
                 start: int = 0):
        self.members: dict[str, list[int]] = {}
        for index, key in enumerate(buckets):
            self.members.setdefault(key, []).append(index)
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.start = start
        self.batches_per_epoch = sum(-(-len(m) // batch_size) for m in self.members.values())

    def epoch(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        batches = []
        for key in sorted(self.members):
            members = self.members[key]
            order = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
            count = -(-len(order) // self.batch_size)
            wrapped = [order[i % len(order)] for i in range(count * self.batch_size)]
            batches += [wrapped[i:i + self.batch_size] for i in range(0, len(wrapped), self.batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def __iter__(self):
        position, cached_epoch, batches = self.start, None, None
        while True:
            epoch, offset = divmod(global_batch(position, self.num_replicas, self.rank), self.batches_per_epoch)
            if epoch != cached_epoch:
                cached_epoch, batches = epoch, self.epoch(epoch)
            yield batches[offset]
            position += 1


def derived_seed(*entropy: int) -> int:
    """A seed that is a function of `entropy` alone (e.g. the run's seed and a global batch index): the same on any
    number of processes and after a resume, and unrelated for neighbouring inputs (numpy's SeedSequence)."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


def global_batch(position: int, num_replicas: int, rank: int) -> int:
    """The index, in the run's one stream of batches, of the `position`-th batch that rank `rank` of
    `num_replicas` takes."""
    return position * num_replicas + rank


def resumed_position(position: int, saved_replicas: int, num_replicas: int) -> tuple[int, int]:
    """Where each of `num_replicas` processes starts when a run saved at `position` by `saved_replicas` processes
    resumes, and how many global batches that start skips.

    The saving run consumed the first position x saved_replicas global batches. All ranks share one position, so
    the new one is that count rounded up to whole rounds of num_replicas batches: rounding down would train on
    some batches twice, rounding up leaves out at most num_replicas - 1 of them."""
    consumed = position * saved_replicas
    start = -(-consumed // num_replicas)
    return start, start * num_replicas - consumed


def collate(items: list[dict]) -> dict:
    """Stack one bucket's items; T5 embeddings zero-padded to [B, 512, D]."""
    batch = {"text_embeds": torch.stack([pad_embedding(item["t5"]) for item in items])}
    key = "latents" if "latents" in items[0] else "pixels"
    batch[key] = torch.stack([item[key] for item in items])
    return batch


def make_dataloader(data, batch_size: int, seed: int, num_replicas: int, rank: int, start: int, num_workers: int):
    sampler = BucketBatchSampler(data.buckets, batch_size, seed, num_replicas, rank, start)
    return torch.utils.data.DataLoader(
        data, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
