"""Every file under prepare_dataset.py's input folder, sorted into what is read and what is skipped (and why), and
output names that no two inputs share.

The folder is walked recursively (`cam1/a.jpg`, `cam2/a.jpg`); symlinked folders are followed once each. A file is
a source (a video or image), a text file (a caption candidate: which ones are used is only known once the captions
are looked up) or skipped with its reason: hidden, unsupported extension, broken symlink, not a regular file (a
FIFO would block the reader forever), an unreadable folder, or the output folder itself (which may lie inside the
input on a rerun).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections import defaultdict
from pathlib import Path, PurePath

from .user_errors import BadValue

CAPTION_SUFFIX = ".txt"
# NVIDIA's layouts keep videos and images in these top-level folders; a file there keeps its bare name.
NVIDIA_FOLDERS = ("videos", "images")
FOLDER_SEPARATOR = "__"  # cam1/a.jpg -> cam1__a.jpg
NAME_MAX = 255  # bytes in one file name (ext4, xfs, btrfs, APFS)
# What is written after a stem: ".png" / ".jpg" for an image, "_f000030.jpg" for a video frame.
IMAGE_TAIL, VIDEO_TAIL = len(".png"), len("_f000000.jpg")
HASH_CHARS = 10  # of a shortened name's sha256: what tells two long names with the same start apart


@dataclasses.dataclass
class Inventory:
    root: Path
    sources: list[Path] = dataclasses.field(default_factory=list)
    texts: list[Path] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path relative to root, why)

    def relative(self, path: Path) -> str:
        return relative_name(path, self.root)


def relative_name(path: str | os.PathLike, root: str | os.PathLike | None) -> str:
    """How a file is named to the user: its path below the input folder (just its name without a root)."""
    path = Path(path)
    if root is None:
        return path.name
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def scan(input_dir: str | os.PathLike, extensions: set[str], exclude: list[Path] = ()) -> Inventory:
    """Every file under `input_dir`: sources (suffix in `extensions`), texts, and the rest with the reason."""
    root = Path(input_dir)
    inventory = Inventory(root)
    excluded = {Path(p).resolve() for p in exclude}
    visited = {root.resolve(): root}
    _scan_folder(root, inventory, extensions, excluded, visited)
    inventory.sources.sort()
    inventory.texts.sort()
    inventory.skipped.sort()
    return inventory


def _scan_folder(folder: Path, inventory: Inventory, extensions, excluded, visited) -> None:
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError as error:
        inventory.skipped.append((inventory.relative(folder) + "/", f"folder cannot be read ({error.strerror})"))
        return
    for entry in entries:
        path = folder / entry.name
        try:
            _sort_entry(entry, path, inventory, extensions, excluded, visited)
        except OSError as error:  # e.g. a symlink loop (ELOOP) or a permission denied on stat
            inventory.skipped.append((inventory.relative(path), f"cannot be read ({error.strerror})"))


def _sort_entry(entry: os.DirEntry, path: Path, inventory: Inventory, extensions, excluded, visited) -> None:
    name = inventory.relative(path)
    if entry.name.startswith("."):  # .git, .DS_Store, staging folders of our own runs
        hidden_folder = entry.is_dir()
        inventory.skipped.append((name + "/", "hidden folder") if hidden_folder else (name, "hidden file"))
    elif entry.is_dir():  # follows symlinks
        real = path.resolve()
        if real in excluded:
            inventory.skipped.append((name + "/", "the output folder"))
        elif real in visited:
            inventory.skipped.append((name + "/", f"same folder as {inventory.relative(visited[real])}/"))
        else:
            visited[real] = path
            _scan_folder(path, inventory, extensions, excluded, visited)
    elif entry.is_symlink() and not path.exists():
        inventory.skipped.append((name, f"broken symlink (-> {os.readlink(path)})"))
    elif not entry.is_file():
        inventory.skipped.append((name, "not a regular file (FIFO, socket or device)"))
    elif path.suffix.lower() in extensions:
        inventory.sources.append(path)
    elif path.suffix.lower() == CAPTION_SUFFIX:
        inventory.texts.append(path)
    else:
        inventory.skipped.append((name, f"unsupported extension ({path.suffix.lower() or 'none'})"))


# ----------------------------------------------------------------------------------------------------------------
# Captions


def caption_candidates(source: Path, input_dir: Path) -> list[Path]:
    """Where `source`'s caption may be, first found wins: `<file>.txt` beside it, then NVIDIA's `metas/` mirroring
    its folders (`metas/cam1/a.txt` for `cam1/a.jpg`), then `metas/<stem>.txt` (the flat layout)."""
    metas = input_dir / "metas"
    mirrored = metas / _short_parts(source.relative_to(input_dir)).with_suffix(CAPTION_SUFFIX)
    return list(dict.fromkeys([source.with_suffix(CAPTION_SUFFIX), mirrored, metas / f"{source.stem}.txt"]))


def read_caption(path: Path) -> str:
    """The text of caption file `path`, stripped. A byte-order mark (Windows Notepad writes one) is not part of it:
    it would reach T5 as a character of the caption."""
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as error:
        raise BadValue(f"Caption {path} is not UTF-8 text ({error.reason} at byte {error.start}); save it as "
                       "UTF-8.") from None


def first_caption(source: Path, input_dir: Path) -> tuple[Path, str] | None:
    """(caption file, its text) of the first candidate with a non-empty text, or None."""
    for candidate in caption_candidates(source, input_dir):
        if candidate.is_file():
            text = read_caption(candidate)
            if text:
                return candidate, text
    return None


def unused_texts(inventory: Inventory, prompt_given: bool) -> list[tuple[str, str]]:
    """(name, why) of every text file found that is no source's caption."""
    if prompt_given:
        return [(inventory.relative(t), "caption not used: --prompt gives every caption") for t in inventory.texts]
    used = {found[0] for source in inventory.sources if (found := first_caption(source, inventory.root))}
    candidates = {c for source in inventory.sources for c in caption_candidates(source, inventory.root)}

    def why(text: Path) -> str:
        if text not in candidates:
            return "no video or image has this caption's name"
        if not text.read_text(encoding="utf-8-sig", errors="replace").strip():
            return "empty caption"
        return "caption not used: one found earlier (beside the file, then metas/) is used"

    return [(inventory.relative(t), why(t)) for t in inventory.texts if t not in used]


# ----------------------------------------------------------------------------------------------------------------
# Output names


def unique_stems(paths: list[PurePath], is_video) -> dict[PurePath, str]:
    """An output stem per input path (relative to the input folder), such that no two inputs write one file.

    An image writes `<stem>.jpg|.png`, a video `<stem>_f000030.jpg`. Each path starts with its short name (its
    stem, its folders folded in: `cam1/a.jpg` -> `cam1__a`; NVIDIA's top-level videos/ and images/ left out), so the
    flat layouts keep their bare names. Paths whose names clash take longer ones until none does: + extension
    (`a_mp4`), + the full relative path, + the input's index. The last level cannot clash with itself (two names
    ending in `_<index>` with different indices differ; a video frame's ends in `_f<digits>`), so this ends.
    Clashes are checked without case, so the dataset can be copied to a case-insensitive disk. A name longer than a
    file name may be (NAME_MAX bytes, deep folders folded in) keeps its start and a hash of the whole (_fit).
    """
    paths = sorted(paths)
    index = {p: i for i, p in enumerate(paths)}
    levels = dict.fromkeys(paths, 0)
    while True:
        names = {p: _stem_at_level(p, levels[p], index[p], VIDEO_TAIL if is_video(p) else IMAGE_TAIL)
                 for p in paths}
        clashing = _clashing(names, is_video)
        if not clashing:
            return names
        for p in clashing:
            levels[p] = min(levels[p] + 1, 3)


def _short_parts(path: PurePath) -> PurePath:
    parts = path.parts
    return PurePath(*parts[1:]) if len(parts) > 1 and parts[0] in NVIDIA_FOLDERS else path


def _stem_at_level(path: PurePath, level: int, index: int, tail: int) -> str:
    """The stem at `level`, short enough that the file written (`tail` more bytes) fits a file name."""
    folded = FOLDER_SEPARATOR.join((_short_parts(path) if level < 2 else path).with_suffix("").parts)
    extension = path.suffix.lower().lstrip(".")
    ending = ["", f"_{extension}", f"_{extension}", f"_{extension}_{index}"][level]
    return _fit(folded, NAME_MAX - tail - len(ending)) + ending


def _fit(stem: str, limit: int) -> str:
    """`stem` if it has at most `limit` bytes (UTF-8), else its start and a hash of all of it, `limit` bytes in all:
    a long name, or folders folded into one, would otherwise fail to be written."""
    encoded = stem.encode()
    if len(encoded) <= limit:
        return stem
    digest = hashlib.sha256(encoded).hexdigest()[:HASH_CHARS]
    return encoded[:limit - HASH_CHARS - 1].decode(errors="ignore") + "~" + digest


def _clashing(names: dict[PurePath, str], is_video) -> set[PurePath]:
    images, videos = defaultdict(list), defaultdict(list)
    for path, name in names.items():
        (videos if is_video(path) else images)[name.casefold()].append(path)
    clashing = {p for group in (*images.values(), *videos.values()) if len(group) > 1 for p in group}
    for stem, group in images.items():  # a still named like a frame: clip_f000000.jpg vs clip.mp4's frame 0
        frame_of = re.fullmatch(r"(.*)_f\d{6,}", stem)
        if frame_of and frame_of.group(1) in videos:
            clashing.update(group + videos[frame_of.group(1)])
    return clashing
