"""Building DATASET_DIR/embedded (dataset_format.py): T5 columns, optional VAE-latent cache, NVIDIA-layout import.

Everything large is written through `datasets` into Arrow files in a work folder beside the output (never all in
memory): the unique captions' embeddings, then a row-aligned view of them (an Arrow `take`), then the latents; the
columns are joined and saved once with `save_to_disk`, which also embeds the image bytes, so the result does not
depend on the imagefolder staying where it is.
"""

from __future__ import annotations

import logging
import pickle
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

from . import dataset_format as fmt
from . import memory
from .dataset_format import IMAGE_EXTENSIONS, METADATA_FILE
from .input_files import read_caption
from .text_encoding import MAX_LENGTH, encode_captions, tokens_past_max_length
from .user_errors import BadValue, MissingInput

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Columns


def require_imagefolder(dataset_dir: str | Path) -> None:
    """Fail early, with the command to run, when `dataset_dir` is not an imagefolder with captions."""
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir() or not any(p.name.startswith("metadata.") for p in dataset_dir.iterdir()):
        raise MissingInput(
            f"{dataset_dir} is not an imagefolder with captions (no {METADATA_FILE}). Make it with `python "
            f"prepare_dataset.py --input_dataset_dir VIDEOS --output_dataset_dir {dataset_dir}`, or import NVIDIA's "
            "layout with --from_nvidia_dir."
        )


def load_imagefolder(dataset_dir: str | Path, cache_dir: str | Path, caption_column: str = fmt.TEXT_COLUMN):
    """The imagefolder as a `datasets.Dataset` with `image` and `text`; its cache goes to `cache_dir`."""
    import datasets

    dataset_dir = Path(dataset_dir)
    require_imagefolder(dataset_dir)
    # Checked first: what `datasets` makes of a bad or empty metadata.jsonl is a traceback (or an IndexError).
    if (dataset_dir / METADATA_FILE).is_file() and not fmt.read_metadata(dataset_dir):
        raise BadValue(f"{dataset_dir / METADATA_FILE} lists no image; re-run prepare_dataset.py.")
    dataset = datasets.load_dataset("imagefolder", data_dir=str(dataset_dir), split="train",
                                    cache_dir=str(cache_dir))
    if caption_column not in dataset.column_names:
        raise BadValue(
            f"{dataset_dir} has no {caption_column!r} captions (columns: {', '.join(dataset.column_names)}). "
            f"It needs a {METADATA_FILE} with file_name and {caption_column}, as prepare_dataset.py writes."
        )
    if caption_column != fmt.TEXT_COLUMN:
        dataset = dataset.rename_column(caption_column, fmt.TEXT_COLUMN)
    captions = dataset[fmt.TEXT_COLUMN]
    empty = [i for i, c in enumerate(captions) if not isinstance(c, str)]
    if empty:
        raise BadValue(f"{len(empty)} rows of {dataset_dir} have no caption (rows {empty[:10]}...).")
    return dataset


def image_stems(dataset) -> list[str]:
    """The file stem of every row's image, read from the path without decoding the image."""
    import datasets

    raw = dataset.select_columns([fmt.IMAGE_COLUMN]).cast_column(fmt.IMAGE_COLUMN, datasets.Image(decode=False))
    return [Path(item["path"]).stem for item in raw[fmt.IMAGE_COLUMN]]


def t5_features(dim: int):
    import datasets

    return datasets.Features({fmt.T5_COLUMN: datasets.Array2D(shape=(None, dim), dtype="float16")})


def latent_features():
    import datasets

    return datasets.Features({
        fmt.LATENTS_COLUMN: datasets.Value("binary"),
        fmt.LATENTS_SHAPE_COLUMN: datasets.List(datasets.Value("int32")),
        fmt.BUCKET_COLUMN: datasets.Value("string"),
    })


def _to_float16(embedding: torch.Tensor, what: str) -> np.ndarray:
    array = embedding.to(torch.float16).cpu().numpy()
    if not np.isfinite(array).all():
        raise FloatingPointError(f"The T5 embedding of {what!r} overflows float16 (NVIDIA's storage type).")
    return array


def encoded_t5_rows(captions: list[str], tokenizer, text_encoder, batch_size: int, cache_file: str | Path):
    """A one-column (`t5_xxl`) dataset aligned with `captions`; each distinct caption is encoded once."""
    import datasets

    unique = list(dict.fromkeys(captions))
    position = {caption: i for i, caption in enumerate(unique)}

    def encode(batch):
        embeddings = encode_captions(tokenizer, text_encoder, batch[fmt.TEXT_COLUMN], MAX_LENGTH)
        return {fmt.T5_COLUMN: [_to_float16(e, c) for e, c in zip(embeddings, batch[fmt.TEXT_COLUMN])]}

    # new_fingerprint: without it `datasets` would hash the closure, i.e. pickle the whole T5 encoder.
    table = datasets.Dataset.from_dict({fmt.TEXT_COLUMN: unique}).map(
        encode, batched=True, batch_size=batch_size, remove_columns=[fmt.TEXT_COLUMN],
        features=t5_features(text_encoder.config.d_model), cache_file_name=str(cache_file),
        load_from_cache_file=False, new_fingerprint="t5-unique", desc=f"T5 ({len(unique)} distinct captions)",
    )
    return table.select([position[caption] for caption in captions]), len(unique)


def truncated_captions(captions: list[str], tokenizer, max_length: int = MAX_LENGTH) -> dict[str, int]:
    """{caption: tokens it loses} for every distinct caption longer than T5's `max_length` tokens."""
    unique = list(dict.fromkeys(captions))
    lost = tokens_past_max_length(tokenizer, unique, max_length)
    return {caption: n for caption, n in zip(unique, lost) if n}


def describe_truncated(truncated: dict[str, int], captions: list[str], stems: list[str],
                       max_length: int = MAX_LENGTH) -> str:
    """The warning for `truncated_captions`: each caption (its start), the images that have it (`stems`, aligned
    with `captions`), and how many tokens it loses."""
    rows = {caption: [] for caption in truncated}
    for caption, stem in zip(captions, stems):
        if caption in rows:
            rows[caption].append(stem)
    lines = [f"{len(truncated)} captions are longer than T5's {max_length} tokens and are cut to {max_length}, as "
             "NVIDIA's encoder cuts them: training never sees their ends. Shorten them to keep every word:"]
    for caption, lost in sorted(truncated.items(), key=lambda item: -item[1]):
        start = caption if len(caption) <= 80 else caption[:77] + "..."
        stems = rows[caption]
        images = ", ".join(stems[:3]) + (f" and {len(stems) - 3} more" if len(stems) > 3 else "")
        lines.append(f"  loses {lost} tokens: {start!r} (images {images})")
    return "\n".join(lines)


def latent_rows(dataset, vae, resolutions: dict, batch_size: int, cache_file: str | Path):
    """Columns latents (float16 bytes), latents_shape, bucket for every row: the normalized VAE posterior mean of
    the image resized and center-cropped to its nearest bucket (exactly what training would compute)."""
    from .buckets import bucket_pixels
    from .vae_latents import encode_normalized

    def encode(batch):
        groups, keys = defaultdict(list), []
        for i, image in enumerate(batch[fmt.IMAGE_COLUMN]):
            key, pixels = bucket_pixels(image, resolutions)
            groups[key].append((i, pixels))
            keys.append(key)
        latents = [None] * len(keys)
        for items in groups.values():  # one VAE call per bucket: same shapes stack
            encoded = encode_normalized(vae, torch.stack([pixels for _, pixels in items]))
            for (i, _), latent in zip(items, encoded):
                latents[i] = latent.to(torch.float16).cpu().numpy()
        return {fmt.LATENTS_COLUMN: [a.tobytes() for a in latents],
                fmt.LATENTS_SHAPE_COLUMN: [list(a.shape) for a in latents],
                fmt.BUCKET_COLUMN: keys}

    return dataset.select_columns([fmt.IMAGE_COLUMN]).map(
        encode, batched=True, batch_size=batch_size, remove_columns=[fmt.IMAGE_COLUMN], features=latent_features(),
        cache_file_name=str(cache_file), load_from_cache_file=False, new_fingerprint="vae-latents",
        writer_batch_size=max(batch_size, 64), desc="VAE latents",
    )


def join_and_save(columns: list, output_dir: str | Path) -> int:
    """Join row-aligned datasets side by side and save them as one dataset (images embedded). Returns rows."""
    import datasets

    dataset = datasets.concatenate_datasets(columns, axis=1) if len(columns) > 1 else columns[0]
    dataset.save_to_disk(str(output_dir))
    return len(dataset)


def write_info(output_dir: str | Path, info: dict) -> None:
    import json

    (Path(output_dir) / fmt.INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# The whole embedded dataset


def build_embedded(args, model, imagefolder_dir: Path, output_dir: Path) -> dict:
    """Write the embedded dataset of `imagefolder_dir` into the (empty) `output_dir`; return its info.

    `args`: embed_captions.py's options (model, batch_size, cache_latents, dtype, caption_column, from_nvidia_dir);
    prior preservation (prior_preservation.py) embeds its class images with the same call."""
    from .models import device_and_dtype, load_text_encoder, load_vae

    device, dtype = device_and_dtype(args.dtype)
    # Intermediate Arrow files go inside the output's staging folder (same disk, removed at the end), not into
    # ~/.cache: a killed run leaves them in that one folder, which the next run's staged_folder removes.
    work = output_dir / ".work"
    work.mkdir(parents=True)  # output_dir itself is new with --from_nvidia_dir (embedded/ of the staging)
    try:
        dataset = load_imagefolder(imagefolder_dir, work / "hf", args.caption_column)
        captions = dataset[fmt.TEXT_COLUMN]
        info = {"model": args.model, "model_path": model.path if model else None, "max_length": MAX_LENGTH,
                "embedding_dtype": "float16", "num_rows": len(dataset),
                "num_unique_captions": len(set(captions))}
        if args.from_nvidia_dir:
            t5_dir = Path(args.from_nvidia_dir) / "t5_xxl"
            pickles = [t5_dir / f"{stem}.pickle" for stem in image_stems(dataset)]
            t5_rows, dim = nvidia_t5_rows(pickles, work / "t5.arrow")
            info.update(source="nvidia_t5_xxl", from_nvidia_dir=str(Path(args.from_nvidia_dir).resolve()),
                        text_embed_dim=dim, dtype="unknown (imported)")
        else:
            logger.info("Loading the tokenizer and T5 encoder of %s (%s, %s)", model.path, device, dtype)
            tokenizer, text_encoder = load_text_encoder(model, device, dtype)
            truncated = truncated_captions(captions, tokenizer, MAX_LENGTH)
            if truncated:
                logger.warning(describe_truncated(truncated, captions, image_stems(dataset)))
            t5_rows, _ = encoded_t5_rows(captions, tokenizer, text_encoder, args.batch_size, work / "t5.arrow")
            info.update(source="encoded", num_truncated_captions=len(truncated),
                        text_encoder=type(text_encoder).__name__,
                        text_embed_dim=text_encoder.config.d_model, dtype=str(dtype).removeprefix("torch."))
            del text_encoder
            memory.free_memory(device)
        columns = [dataset, t5_rows]
        if args.cache_latents:
            resolutions = model.resolutions  # the buckets training uses
            vae = load_vae(model, device, dtype)
            latents = latent_rows(dataset, vae, resolutions, args.batch_size, work / "latents.arrow")
            del vae
            memory.free_memory(device)
            columns.append(latents)
            info.update(bucket_resolutions={k: list(v) for k, v in resolutions.items()},
                        bucket_counts=dict(Counter(latents[fmt.BUCKET_COLUMN])),
                        vae_dtype=str(dtype).removeprefix("torch."))
        join_and_save(columns, output_dir)
        info[fmt.FINGERPRINT_KEY] = fmt.hash_data_files(output_dir)  # just written: read back from the page cache
        write_info(output_dir, info)  # written last: fmt.load_embedded_dataset requires it
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return info


# ----------------------------------------------------------------------------------------------------------------
# NVIDIA's layout: images/*.jpg + t5_xxl/*.pickle (+ metas/*.txt)


def nvidia_pairs(nvidia_dir: str | Path) -> list[tuple[Path, Path]]:
    """(image, pickle) for every image of NVIDIA's layout; raises naming the images without a pickle."""
    nvidia_dir = Path(nvidia_dir)
    images_dir, t5_dir = nvidia_dir / "images", nvidia_dir / "t5_xxl"
    if not images_dir.is_dir() or not t5_dir.is_dir():
        raise MissingInput(f"--from_nvidia_dir {nvidia_dir} needs images/ and t5_xxl/ (NVIDIA's layout).")
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise MissingInput(f"No images in {images_dir}.")
    missing = [p.name for p in images if not (t5_dir / f"{p.stem}.pickle").is_file()]
    if missing:
        raise MissingInput(f"No t5_xxl/<stem>.pickle for {len(missing)} images: {', '.join(missing[:20])}.")
    return [(p, t5_dir / f"{p.stem}.pickle") for p in images]


def write_nvidia_imagefolder(nvidia_dir: str | Path, pairs: list[tuple[Path, Path]], output_dir: str | Path) -> int:
    """Copy the images (byte for byte) and captions (metas/<stem>.txt, else "") into an imagefolder.

    Returns how many images had no caption file."""
    import json

    metas, output_dir = Path(nvidia_dir) / "metas", Path(output_dir)
    uncaptioned = 0
    # Called on a staging folder (atomic.staged_folder): metadata.jsonl is written after the images.
    records = []
    for image, _ in pairs:
        shutil.copyfile(image, output_dir / image.name)
        meta = metas / f"{image.stem}.txt"
        text = read_caption(meta) if meta.is_file() else ""
        uncaptioned += not text
        records.append({"file_name": image.name, "text": text})
    with open(output_dir / METADATA_FILE, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    return uncaptioned


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Pickles can run arbitrary code; these should hold nothing but numpy arrays, so nothing else is loaded."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED or (module == "numpy.dtypes" and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are expected")


def load_nvidia_embedding(path: str | Path) -> np.ndarray:
    """One NVIDIA t5_xxl pickle (a list holding one float16 array [n_tokens, D]) -> float16 [n_tokens, D]."""
    with open(path, "rb") as f:
        try:
            value = _NumpyOnlyUnpickler(f).load()
        except Exception as error:
            raise BadValue(f"{path} is not a pickled list with one numpy array: {error}") from error
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    array = np.asarray(value)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2 or array.shape[0] > MAX_LENGTH or not np.issubdtype(array.dtype, np.floating):
        raise BadValue(f"{path} holds a {array.dtype} array of shape {array.shape}; expected float [n<=512, D].")
    return array.astype(np.float16, copy=False)


def nvidia_t5_rows(pickles: list[Path], cache_file: str | Path):
    """A one-column (`t5_xxl`) dataset from NVIDIA's pickles, in the given order, values untouched."""
    import datasets

    dim = load_nvidia_embedding(pickles[0]).shape[1]

    def load(batch):
        arrays = [load_nvidia_embedding(p) for p in batch["pickle"]]
        for path, array in zip(batch["pickle"], arrays):
            if array.shape[1] != dim:
                raise BadValue(f"{path} has embedding width {array.shape[1]}; {pickles[0].name} has {dim}.")
        return {fmt.T5_COLUMN: arrays}

    return datasets.Dataset.from_dict({"pickle": [str(p) for p in pickles]}).map(
        load, batched=True, batch_size=64, remove_columns=["pickle"], features=t5_features(dim),
        cache_file_name=str(cache_file), load_from_cache_file=False, new_fingerprint="t5-nvidia",
        desc="Importing t5_xxl pickles",
    ), dim
