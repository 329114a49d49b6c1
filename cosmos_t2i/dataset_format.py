"""The on-disk dataset contract between prepare_dataset.py, embed_captions.py and train_text2image.py.

DATASET_DIR/                 an imagefolder: images + metadata.jsonl (`file_name`, `text`)  <- prepare_dataset.py
DATASET_DIR/embedded/        a `datasets` dataset (save_to_disk)                             <- embed_captions.py
    image        the image (datasets.Image)
    text         the caption
    t5_xxl       float16 [n_tokens, D]: the trimmed T5 embedding (see text_encoding.py)
    and, with --cache_latents:
    latents      float16 bytes of the normalized VAE posterior mean, shape `latents_shape` [C, 1, h, w]
    latents_shape
    bucket       the aspect-ratio key ("16:9", "1:1", ...) whose resolution the latents were computed at
DATASET_DIR/embedded/cosmos_t2i.json   how it was made: text encoder, embedding dim, resolutions of the buckets
"""

from __future__ import annotations

import json
from pathlib import Path

from .user_errors import BadValue, MissingInput

METADATA_FILE = "metadata.jsonl"  # the imagefolder's captions
# What counts as an image of an input folder or an imagefolder.
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
EMBEDDED_SUBDIR = "embedded"
INFO_FILE = "cosmos_t2i.json"
TEXT_COLUMN = "text"
IMAGE_COLUMN = "image"
T5_COLUMN = "t5_xxl"
LATENTS_COLUMN = "latents"
LATENTS_SHAPE_COLUMN = "latents_shape"
BUCKET_COLUMN = "bucket"
FINGERPRINT_KEY = "content_sha256"  # in INFO_FILE: content_fingerprint() of the data, recorded when it was written


def embedded_dir(dataset_dir: str | Path) -> Path:
    """Accept either DATASET_DIR or DATASET_DIR/embedded itself."""
    dataset_dir = Path(dataset_dir)
    if (dataset_dir / INFO_FILE).is_file():
        return dataset_dir
    return dataset_dir / EMBEDDED_SUBDIR


def read_info(dataset_dir: str | Path) -> dict:
    return json.loads((embedded_dir(dataset_dir) / INFO_FILE).read_text())


def read_metadata(dataset_dir: str | Path) -> list[dict]:
    """The rows of DATASET_DIR/metadata.jsonl, checked: a hand-edited file (saved as Latin-1, a line cut short)
    is named with the line at fault. A byte-order mark is accepted, as `datasets` accepts it."""
    path = Path(dataset_dir) / METADATA_FILE
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise BadValue(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8.") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise BadValue(f"{path} line {number} is not JSON ({error}); re-run prepare_dataset.py.") from None
        if not isinstance(row, dict) or "file_name" not in row:
            raise BadValue(f"{path} line {number} has no file_name; re-run prepare_dataset.py.")
        rows.append(row)
    return rows


def load_embedded_dataset(dataset_dir: str | Path):
    """Load the dataset training reads, with errors that say which command to run when it is not there."""
    import datasets

    dataset_dir = Path(dataset_dir)
    if not dataset_dir.exists():
        raise MissingInput(
            f"Dataset folder {dataset_dir} does not exist. Make one with "
            f"`python prepare_dataset.py --input_dataset_dir YOUR_VIDEOS --output_dataset_dir {dataset_dir}`."
        )
    path = embedded_dir(dataset_dir)
    if not (path / INFO_FILE).is_file():
        raise MissingInput(
            f"{dataset_dir} has no T5 embeddings ({path / INFO_FILE} is missing). Run "
            f"`python embed_captions.py --dataset_dir {dataset_dir} --model MODEL` first."
        )
    dataset = datasets.load_from_disk(str(path))
    if T5_COLUMN not in dataset.column_names:
        raise BadValue(f"{path} has no {T5_COLUMN!r} column; re-run embed_captions.py on {dataset_dir}.")
    return dataset


def content_fingerprint(dataset_dir: str | Path) -> str | None:
    """sha256 of the embedded dataset's data (its .arrow files, in name order): what training reads, wherever the
    folder is and however its path is written. None when there is no embedded dataset (the loader says why).

    embed_captions.py records it in the info file as it writes the data (FINGERPRINT_KEY), so a training start reads
    no data for it; a dataset embedded before that is hashed here, once per start."""
    path = embedded_dir(dataset_dir)
    if not (path / INFO_FILE).is_file():
        return None
    try:
        recorded = read_info(path).get(FINGERPRINT_KEY)
    except ValueError:  # an unreadable info file: the loader names it
        recorded = None
    return recorded or hash_data_files(path)


def hash_data_files(embedded: Path) -> str | None:
    """content_fingerprint's hash of the .arrow files in the embedded folder `embedded` (None: there are none)."""
    import hashlib

    files = sorted(Path(embedded).glob("*.arrow"))
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()
