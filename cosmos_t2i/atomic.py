"""Nothing half-written: every output is written under a hidden sibling name and renamed into place when complete.

Two helpers, one for files and one for folders, used by every script and by the checkpoints:
- `atomic_output(path)`: a file (or a folder that does not exist yet) written aside, then renamed onto `path`;
  `write_text_atomic` is it for a small text file, flushed to disk before the rename.
- `staged_folder(target)`: an empty folder beside `target` that replaces it when the block succeeds (the old one is
  moved aside first and removed after); `replace_folder` is that last step alone, for writers that stage across
  several processes (checkpoints). What a dead run left beside `target` is cleared by the next one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

from .user_errors import ExistingOutput, writing_output


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it onto `path` only when the block succeeds.

    The temporary name keeps the suffix, so writers that pick the format from the extension (PIL) still work. A
    folder output must not exist yet (a rename cannot replace a non-empty folder).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """`path` holds `text` or what it held before, also after a power loss (flushed to disk before the rename, and
    the rename itself flushed with its folder)."""
    with atomic_output(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    fsync_dir(Path(path).parent)


# Durability. A rename is only as durable as the data it names: after a power loss a file renamed before its data
# reached the disk can come back empty (ext4, xfs). So the data goes first (fsync of each file), then the folders
# holding the new names (fsync of the folder), and only then the name that points at them.

def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of folder `path` (names created, renamed or removed in it) durable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # a platform or file system without folder handles (Windows)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):  # no fsync of folders there: nothing to do
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike, files: bool = True, dirs: bool = True) -> None:
    """fsync every file under `root` (`files`), then every folder, deepest first, `root` last (`dirs`)."""
    root = Path(root)
    folders = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        folders += [Path(dirpath) / d for d in dirnames]
        if files:
            for name in filenames:
                fsync_file(Path(dirpath) / name)
    if dirs:
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(folder)


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike, keep_existing: bool = False, what: str = "the folder"):
    """Yield an empty staging folder beside `target`; when the block succeeds, it replaces `target`.

    The old `target` (if any) stays untouched until the new one is complete, so an interrupted run leaves either
    the previous folder or none, never a partial one that loads. Staging folders of dead runs are removed.
    `keep_existing`: a `target` that appeared meanwhile wins (another process built the same thing).
    A disk that refuses a write in the block (full, a quota, ulimit -f, read-only) ends it in one OutputFailed line
    naming `what` and `target` (user_errors.writing_output).
    """
    target = Path(target).absolute()
    if os.path.ismount(target):  # found now, not by the rename at the end (EBUSY), after all the work
        raise ExistingOutput(f"{target} is a mount point: a finished folder cannot be renamed onto it. Write into a "
                             f"new folder inside it instead, e.g. {target / 'dataset'}.")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        with writing_output(f"{what} {target}"):
            yield staging
            if not (keep_existing and target.exists()):
                replace_folder(staging, target, aside=target.with_name(f".{target.name}.old-{os.getpid()}"))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_folder(staging: Path, target: Path, aside: Path) -> None:
    """Rename the complete `staging` onto `target`. An existing `target` is first renamed to `aside`, where a reader
    finds it if this process dies between the two renames, and removed once the new one is in place."""
    if target.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(target, aside)
    os.replace(staging, target)
    fsync_dir(target.parent)  # the new name is durable before anything (latest_checkpoint.txt) points at it
    shutil.rmtree(aside, ignore_errors=True)  # also one a process that died between the renames left


def remove_stale_staging(target: Path) -> None:
    """Clear what a run that died left beside `target`: its staging folder, and the previous `target` it had moved
    aside (put back in place if the run died before its replacement arrived)."""
    for kind in ("partial", "old"):
        for path in target.parent.glob(f".{target.name}.{kind}-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if kind == "old" and not target.exists():
                os.replace(path, target)
            else:
                shutil.rmtree(path, ignore_errors=True)


def remove_stale_temp_files(folder: str | os.PathLike) -> None:
    """Remove the temporary files `atomic_output` calls of dead processes left in `folder` (kill -9 skips their
    `finally`): `.<stem>.tmp-<pid><suffix>`."""
    for path in Path(folder).glob(".*.tmp-*"):
        pid = path.name.rsplit(".tmp-", 1)[-1].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def require_empty_or_overwrite(path: str | os.PathLike, overwrite: bool) -> None:
    """Refuse to replace a non-empty folder unless asked to."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ExistingOutput(f"{path} exists and is not a folder.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ExistingOutput(f"{path} is not empty. Pass --overwrite to replace it, or choose another folder.")


def unwritable_reason(path: str | os.PathLike) -> str | None:
    """Why `atomic_output(path)` would fail, checked before any work is done; None when it can write there.

    Tried for real (a file created and removed in the nearest folder that exists) rather than asked of
    os.access: permissions are not the only obstacle (read-only mounts, quotas), and root passes every access test.
    """
    path = Path(path).absolute()
    if path.is_dir():
        return f"{path} is a folder"
    folder = next(p for p in path.parents if p.exists())
    if not folder.is_dir():
        return f"{folder} is a file, not a folder"
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
    except OSError as error:
        return f"cannot write in {folder} ({error.strerror or error})"
    os.close(fd)
    os.unlink(probe)
    return None
