#!/usr/bin/env python
"""Add T5 caption embeddings (and optionally cached VAE latents) to an imagefolder -> DATASET_DIR/embedded.

    python embed_captions.py --dataset_dir datasets/robot --model 2B [--cache_latents]
    python embed_captions.py --dataset_dir datasets/robot --from_nvidia_dir datasets/cosmos_nemo_assets_t2i

The embedding is NVIDIA's, exactly (cosmos_t2i/text_encoding.py): padded to 512 tokens, masked forward, zeros past
the real length, stored trimmed as float16 [n, D]. Each distinct caption is encoded once. Only the tokenizer and
the T5 encoder are loaded (and the VAE, after T5 is freed, for --cache_latents). With --cache_latents training
needs neither T5 nor the VAE encoder.

--from_nvidia_dir takes NVIDIA's prepared layout (images/*.jpg, t5_xxl/*.pickle, metas/*.txt) as it is: it creates
DATASET_DIR as an imagefolder from it and DATASET_DIR/embedded from the pickles, without re-encoding.

The output is built beside its final place and renamed in at the end: an interrupted run leaves no half dataset,
and what a killed run leaves (one hidden staging folder, its work files inside) is removed by the next run.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from cosmos_t2i import dataset_format as fmt
from cosmos_t2i import cli, embedding, memory, user_errors
from cosmos_t2i.atomic import require_empty_or_overwrite, staged_folder
from cosmos_t2i.models import resolve_model

logger = logging.getLogger("embed_captions")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Add T5 caption embeddings (and VAE latents) to an imagefolder.",
                                     formatter_class=cli.HelpFormatter)
    parser.add_argument("--dataset_dir", required=True,
                        help="The imagefolder made by prepare_dataset.py; the result goes to DATASET_DIR/embedded. "
                             "With --from_nvidia_dir, the folder to create.")
    parser.add_argument("--model", default=None,
                        help="2B, 14B, tiny, a local pipeline folder or a hub id: whose tokenizer + T5 encoder "
                             "(and VAE) to use. Required unless --from_nvidia_dir without --cache_latents.")
    parser.add_argument("--batch_size", type=int, default=8,
                        help="Captions per T5 forward and images per VAE forward (default: 8).")
    parser.add_argument("--cache_latents", action="store_true",
                        help="Also store each image's normalized VAE posterior mean at its aspect-ratio bucket's "
                             "resolution, so training never runs T5 or the VAE encoder.")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                        help="Compute dtype of T5 and the VAE (default: bf16 on a GPU, fp32 on a CPU). Embeddings "
                             "are stored as float16 either way, as NVIDIA stores them.")
    parser.add_argument("--caption_column", default=fmt.TEXT_COLUMN,
                        help="Caption column of the imagefolder's metadata (stored as `text`).")
    parser.add_argument("--from_nvidia_dir", default=None,
                        help="Import NVIDIA's layout (images/*.jpg + t5_xxl/*.pickle, captions from metas/*.txt) "
                             "into --dataset_dir without re-encoding. Only import pickles you trust; anything but "
                             "numpy arrays in them is refused.")
    parser.add_argument("--overwrite", action="store_true",
                        help="With --from_nvidia_dir: replace a non-empty --dataset_dir. (DATASET_DIR/embedded is "
                             "always replaced: it is derived from the imagefolder.)")
    user_errors.add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.model is None and (args.from_nvidia_dir is None or args.cache_latents):
        parser.error("--model is required (unless importing --from_nvidia_dir without --cache_latents).")
    if args.batch_size < 1:
        parser.error("--batch_size must be >= 1.")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    dataset_dir = Path(args.dataset_dir)
    # Resolve before any work: an unknown --model fails now, not after the import.
    try:
        model = resolve_model(args.model) if args.model else None
    except ValueError as error:  # an unknown --model name
        raise user_errors.BadValue(str(error)) from None
    # A CUDA out-of-memory error ends in one line with the fix; the staged folders are gone by then.
    with memory.explain_out_of_memory(None, memory.batch_size_advice(args.batch_size), "embedding"):
        info = _embed(args, model, dataset_dir)
    logger.info("Wrote %d rows (%d distinct captions, embedding dim %d%s) to %s in %.1f s.", info["num_rows"],
                info["num_unique_captions"], info["text_embed_dim"],
                ", latents cached" if args.cache_latents else "", dataset_dir / fmt.EMBEDDED_SUBDIR,
                time.perf_counter() - start)
    return info


def _embed(args, model, dataset_dir: Path) -> dict:
    """Embed DATASET_DIR's imagefolder (or import --from_nvidia_dir into it); returns embedded/'s info."""
    if args.from_nvidia_dir:
        pairs = embedding.nvidia_pairs(args.from_nvidia_dir)
        require_empty_or_overwrite(dataset_dir, args.overwrite)
        # One staging folder for the imagefolder and its embedded/: both appear together or not at all.
        with staged_folder(dataset_dir, what="the dataset") as staging:
            uncaptioned = embedding.write_nvidia_imagefolder(args.from_nvidia_dir, pairs, staging)
            if uncaptioned:
                logger.warning("%d of %d images have no metas/<stem>.txt caption; their text is empty.",
                               uncaptioned, len(pairs))
            info = embedding.build_embedded(args, model, staging, staging / fmt.EMBEDDED_SUBDIR)
    else:
        embedding.require_imagefolder(dataset_dir)  # before staging, which would create the folder
        with staged_folder(dataset_dir / fmt.EMBEDDED_SUBDIR, what="the embedded dataset") as staging:
            info = embedding.build_embedded(args, model, dataset_dir, staging)
    return info


if __name__ == "__main__":
    user_errors.run(main)
