"""Can the input pipeline keep a GPU fed? Samples/s the training dataloader delivers from cached latents.

Builds an embedded dataset in our format (dataset_format.py) with random 2B-sized entries: latents [16, 1, 96, 170]
(768x1360) and a 20-token T5 embedding per row, then times `training_data.make_dataloader` exactly as
train_text2image.py builds it. Runs on the CPU: compare with the GPU's training rate in BENCHMARKS.md.

    python benchmarks/bench_dataloader.py --rows 256 --batch_size 2 --workers 0 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cosmos_t2i import dataset_format as fmt  # noqa: E402
from cosmos_t2i import embedding  # noqa: E402
from cosmos_t2i.models import ASPECT_RATIOS  # noqa: E402
from cosmos_t2i.training_data import EmbeddedImages, make_dataloader  # noqa: E402


def write_dataset(root: Path, rows: int) -> Path:
    import datasets

    rng = np.random.default_rng(0)
    shape = [16, 1, 96, 170]
    # The column types embed_captions.py writes.
    features = datasets.Features({fmt.TEXT_COLUMN: datasets.Value("string"), **embedding.t5_features(1024),
                                  **embedding.latent_features()})
    data = datasets.Dataset.from_generator(lambda: ({
        fmt.TEXT_COLUMN: "An image of sks teal robot.",
        fmt.T5_COLUMN: rng.standard_normal((20, 1024)).astype(np.float16),
        fmt.LATENTS_COLUMN: rng.standard_normal(shape).astype(np.float16).tobytes(),
        fmt.LATENTS_SHAPE_COLUMN: shape,
        fmt.BUCKET_COLUMN: "16:9",
    } for _ in range(rows)), features=features)
    out = fmt.embedded_dir(root)
    data.save_to_disk(str(out))
    embedding.write_info(out, {"model": "2B", "text_embed_dim": 1024})
    return root


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = EmbeddedImages(write_dataset(Path(tmp), args.rows), ASPECT_RATIOS)
        for workers in args.workers:
            loader = iter(make_dataloader(data, args.batch_size, seed=0, num_replicas=1, rank=0, start=0,
                                          num_workers=workers))
            next(loader)  # worker start-up is paid once per run, not per step
            batches = args.rows // args.batch_size - 1
            start = time.perf_counter()
            for _ in range(batches):
                next(loader)
            rate = batches * args.batch_size / (time.perf_counter() - start)
            print(f"| {workers} workers | batch {args.batch_size} | {rate:.0f} samples/s |", flush=True)


if __name__ == "__main__":
    main()
