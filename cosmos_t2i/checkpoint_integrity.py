"""Damaged checkpoints are found before they are used, and named (README "Checkpoints").

When a checkpoint is saved, the main process records the size and SHA-256 of every file in it in
`trainer/checksums.json`, the last file written before the checkpoint is renamed into place. A resume checks it, on
the main process only, in three passes from cheap to thorough:

1. sizes: every recorded file is there, with its recorded size (a truncated file, a missing shard); reads nothing;
2. structure: JSON files parse, each safetensors header describes exactly the bytes of its file, each torch.save
   archive has its zip directory (a file zeroed or cut short); a few KB per file. A checkpoint of an older version,
   saved without checksums, gets this pass only, with a warning;
3. content: every file's SHA-256 against the record (any other change, e.g. tensor data overwritten with zeros under
   an intact header). This reads the whole checkpoint once, with a progress bar, in 4 threads: SHA-256 runs at
   ~1.7 GB/s per core with SHA-NI, so the disk sets the pace. A 2B full fine-tune's checkpoint (fp32 weights, EMA,
   AdamW) is ~32 GB: ~1 minute at 500 MB/s, seconds from the page cache; a LoRA's is megabytes.
   `--no_verify_checksums` skips this pass.

Passes 1-2 run on the main process; with several processes pass 3 is shared out by bytes, each process hashing its
share of the files. The verdict is shared, so that every process stops with the same one-line error
(user_errors.UnreadableInput) naming the checkpoint, the file, and the previous complete checkpoint to resume from.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import pickle
import struct
import zipfile
from pathlib import Path

from safetensors import SafetensorError

from .atomic import fsync_file
from .user_errors import UnreadableInput

logger = logging.getLogger(__name__)

CHECKSUMS = "checksums.json"  # in the checkpoint's trainer/
ALGORITHM = "sha256"
_CHUNK = 8 << 20
_THREADS = 4


# Recording, at save time.

def record_checksums(checkpoint: Path, trainer_dir: str = "trainer") -> int:
    """Hash every file under `checkpoint` into trainer/checksums.json (flushed to disk); returns the bytes hashed."""
    record_name = f"{trainer_dir}/{CHECKSUMS}"
    files = sorted(p for p in _files(checkpoint) if p.relative_to(checkpoint).as_posix() != record_name)
    digests = _hash_all(files, progress=None)
    record = {"algorithm": ALGORITHM,
              "files": {p.relative_to(checkpoint).as_posix(): {"size": p.stat().st_size, ALGORITHM: d}
                        for p, d in zip(files, digests)}}
    path = checkpoint / trainer_dir / CHECKSUMS
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(record, indent=1, sort_keys=True))
    fsync_file(path)
    return sum(f["size"] for f in record["files"].values())


# Checking, at resume time.

def damage(checkpoint: Path, hashes: bool = True, trainer_dir: str = "trainer", within: str = "") -> str | None:
    """What is wrong with `checkpoint` ("FILE is ..."), or None when it is whole; with `within` (a subfolder, e.g.
    "model"), only with the files there. Logs a warning for a checkpoint saved without checksums (only its
    structure can be checked)."""
    checkpoint = Path(checkpoint)
    record_path = checkpoint / trainer_dir / CHECKSUMS
    record = None
    if record_path.is_file():
        try:
            record = _inside(json.loads(record_path.read_text())["files"], within)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return f"{record_path} (the checksums recorded at save time) is not valid JSON"
    else:
        logger.warning("%s was saved without checksums (by an older version): only the sizes and headers of its files "
                       "are checked, not their content.", checkpoint)
    if record is not None:
        problem = _size_damage(checkpoint, record)
        if problem:
            return problem
    for path in sorted(_files(checkpoint / within)):
        problem = structure_damage(path)
        if problem:
            return problem
    if record is not None and hashes:
        return content_damage(checkpoint, record, sorted(record))
    return None


def read_record(checkpoint: Path, trainer_dir: str = "trainer", within: str = "") -> dict | None:
    """The checksums recorded when `checkpoint` was saved, by file (of `within` only, when given); None when there
    are none (readable ones: damage() checks that first)."""
    path = Path(checkpoint) / trainer_dir / CHECKSUMS
    return _inside(json.loads(path.read_text())["files"], within) if path.is_file() else None


def _inside(record: dict, within: str) -> dict:
    """The entries of `record` under the subfolder `within` ("": all of them)."""
    return {name: entry for name, entry in record.items() if not within or name.startswith(within.rstrip("/") + "/")}


def content_damage(checkpoint: Path, record: dict, names: list[str], progress: bool = True) -> str | None:
    """The first of `names` whose content differs from its recorded checksum."""
    from tqdm.auto import tqdm

    files = [Path(checkpoint) / name for name in names]
    total = sum(record[name]["size"] for name in names)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"Verifying {Path(checkpoint).name}",
              disable=not progress) as bar:
        digests = _hash_all(files, bar)
    for name, digest in zip(names, digests):
        if digest != record[name][ALGORITHM]:
            return (f"{Path(checkpoint) / name} has changed since it was saved (its {ALGORITHM} differs from the one "
                    "recorded)")
    return None


def _size_damage(checkpoint: Path, record: dict) -> str | None:
    for name, entry in sorted(record.items()):
        path = checkpoint / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            change = "truncated" if size < entry["size"] else "grown"
            return f"{path} is {size} bytes, {entry['size']} when it was saved ({change})"
    return None


def structure_damage(path: Path) -> str | None:
    """What is wrong with the structure of one checkpoint file, read from its first and last few KB; None if fine
    or of a kind not checked (.distcp shards: their sizes and checksums only)."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            return _safetensors_damage(path)
        elif path.suffix in (".pt", ".bin") and path.stat().st_size and not _is_legacy_pickle(path):
            with zipfile.ZipFile(path) as archive:
                archive.namelist()
    except (ValueError, UnicodeDecodeError) as error:
        return f"{path} is not valid JSON ({_short(error)})"
    except zipfile.BadZipFile as error:
        return f"{path} is not a complete torch.save file ({_short(error)})"
    if path.suffix in (".pt", ".bin", ".json") and path.stat().st_size == 0:
        return f"{path} is empty"
    return None


def _is_legacy_pickle(path: Path) -> bool:
    """torch.save(_use_new_zipfile_serialization=False) files (DeepSpeed may write them) are not zip archives."""
    with open(path, "rb") as f:
        return f.read(2) == b"\x80\x02"


def _safetensors_damage(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path} is not a complete safetensors file ({size} bytes)"
        (header_len,) = struct.unpack("<Q", head)
        if header_len == 0 or 8 + header_len > size:
            return (f"{path} is not a complete safetensors file (its header says {header_len} bytes of header; the "
                    f"file has {size})")
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, UnicodeDecodeError):
            return f"{path} is not a valid safetensors file (its header is not JSON: the file was overwritten?)"
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    if expected != size:
        change = "truncated" if size < expected else "extra bytes"
        return f"{path} is {size} bytes, its header describes {expected} ({change})"
    return None


def _short(error: Exception) -> str:
    return str(error).splitlines()[0][:120] if str(error) else type(error).__name__


def _files(root: Path):
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            yield Path(dirpath) / name


def _hash_all(files: list[Path], progress) -> list[str]:
    """The digests of `files`, several files at a time (hashlib releases the GIL on large buffers)."""
    with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
        return list(pool.map(lambda p: _hash_file(p, progress), files))


def _hash_file(path: Path, progress) -> str:
    digest = hashlib.new(ALGORITHM)
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
            if progress is not None:
                progress.update(n)
    return digest.hexdigest()


def previous_complete(checkpoint: Path, state_file: str = "trainer/state.json") -> Path | None:
    """The newest checkpoint saved before `checkpoint` beside it that looks whole (its files are there, at their
    recorded sizes: cheap; it is verified in full when resumed)."""
    checkpoint = Path(checkpoint).absolute()
    for other in sorted(checkpoint.parent.glob("iter_*"), reverse=True):
        if other.name >= checkpoint.name or not (other / state_file).is_file():
            continue
        record = other / Path(state_file).parent / CHECKSUMS
        try:
            if record.is_file() and _size_damage(other, json.loads(record.read_text())["files"]):
                continue
        except (ValueError, KeyError, TypeError):
            continue
        return other
    return None


RESUME_FLAG = "--resume_from_checkpoint"


def refusal(checkpoint: Path, problem: str, flag: str = RESUME_FLAG) -> str:
    """The one-line error for a damaged `checkpoint` given to `flag`: what is wrong, and what to pass instead."""
    previous = previous_complete(checkpoint)
    if previous is not None:
        instead = f"{'Resume' if flag == RESUME_FLAG else 'Start'} from the previous complete checkpoint with " \
                  f"{flag} {previous}"
    elif flag == RESUME_FLAG:
        instead = f"There is no earlier complete checkpoint beside it: start over with {flag} none"
    else:
        instead = f"There is no earlier complete checkpoint beside it: pass another {flag}, or drop it"
    return f"Checkpoint {checkpoint} is damaged: {problem}. {instead} (or restore the file from a backup)."


def verify_for_resume(accelerator, checkpoint: Path, hashes: bool = True, within: str = "",
                      flag: str = RESUME_FLAG) -> None:
    """Refuse a damaged `checkpoint` on every process (only its subfolder `within` when given: --init_from reads
    model/ alone; `flag` is the one the error tells to change). The main process checks sizes and structure; the
    hashing is shared out, each process reading its share of the bytes (a node of 8 reads an eighth each; the
    others also wait less long in the collective for the main process)."""
    processes = getattr(accelerator, "num_processes", 1)
    problem = damage(checkpoint, hashes=hashes and processes == 1, within=within) \
        if accelerator.is_main_process else None
    if processes > 1:
        from accelerate.utils import broadcast_object_list, gather_object

        problem = broadcast_object_list([problem])[0]
        record = read_record(checkpoint, within=within) if hashes and problem is None else None
        if record is not None:
            share = _share(record, processes)[accelerator.process_index]
            found = content_damage(checkpoint, record, share, progress=accelerator.is_main_process)
            problem = next((p for p in gather_object([found]) if p), None)
    if problem:
        raise UnreadableInput(refusal(checkpoint, problem, flag))


def _share(record: dict, processes: int) -> list[list[str]]:
    """Files dealt out to `processes`, largest first to the least loaded, for about equal bytes each."""
    shares, loads = [[] for _ in range(processes)], [0] * processes
    for name in sorted(record, key=lambda n: -record[n]["size"]):
        least = loads.index(min(loads))
        shares[least].append(name)
        loads[least] += record[name]["size"]
    return shares


# The loaders' own errors, for what the checks above let through (e.g. --no_verify_checksums).

_DAMAGE_ERRORS = (ValueError, UnicodeDecodeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, SafetensorError,
                  RuntimeError)


@contextlib.contextmanager
def reading(checkpoint: Path, path: Path):
    """A format error while reading `path` of `checkpoint` (a bare JSON, zip or pickle error naming neither)
    becomes a UnreadableInput that names both."""
    try:
        yield
    except UnreadableInput:
        raise
    except _DAMAGE_ERRORS as error:
        if isinstance(error, RuntimeError) and not _looks_like_format_error(error):
            raise
        raise UnreadableInput(refusal(Path(checkpoint), f"{path} cannot be read ({_short(error)})")) from error


def _looks_like_format_error(error: RuntimeError) -> bool:
    text = str(error)
    return any(s in text for s in ("PytorchStreamReader", "zip archive", "central directory", "invalid header",
                                   "unexpected EOF", "Invalid magic number", "corrupted"))
