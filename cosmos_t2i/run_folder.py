"""The training run's output folder before anything is computed: it can be written, a run started over
(--resume_from_checkpoint none) does not mix its checkpoints with the previous run's, and --init_from names a
checkpoint whose weights fit this run."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from . import checkpoint as ckpt
from .user_errors import BadValue, UserError

logger = logging.getLogger("train_text2image")


class UnwritableOutput(UserError, PermissionError):
    pass


def require_writable(folder: Path, flag: str = "--output_dir") -> None:
    """Create `folder` (given as `flag`) and write a file in it, so that a folder that cannot be written stops the
    run before the work whose results go there, not when they are written."""
    probe = Path(folder) / f".write_test.{os.getpid()}"
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UnwritableOutput(f"{flag} {folder} cannot be written ({error.strerror or error}): pass a "
                               "folder you can create and write to.") from None


def set_previous_run_aside(output_dir: Path) -> Path | None:
    """--resume_from_checkpoint none in a folder that holds another run's checkpoints: move them to
    OUTPUT_DIR/checkpoints.previous-<UTC time>, so that latest_checkpoint.txt and --checkpoints_total_limit see only
    the new run's. Nothing is deleted. Returns where they went (None: nothing to move)."""
    root = ckpt.checkpoints_dir(output_dir)
    if not root.is_dir() or not any(root.iterdir()):
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside, n = output_dir / f"{ckpt.CHECKPOINTS}.previous-{stamp}", 1
    while aside.exists():  # two restarts within a second
        n += 1
        aside = output_dir / f"{ckpt.CHECKPOINTS}.previous-{stamp}-{n}"
    root.rename(aside)
    logger.warning("--resume_from_checkpoint none: the previous run's checkpoints in %s were moved to %s; this run "
                   "starts from step 0.", root, aside)
    return aside


def init_checkpoint(source: str, lora: bool, rank: int | None) -> Path:
    """The iteration folder --init_from names (an iter_* folder, or a run's OUTPUT_DIR: its latest), checked to
    hold weights of this run's kind: a full fine-tune's model/ or a LoRA adapter of the same rank."""
    path = Path(source)
    if not path.exists():
        raise BadValue(f"--init_from {source} does not exist: pass a checkpoint folder (OUTPUT_DIR/checkpoints/"
                       "iter_N) or a run's OUTPUT_DIR.")
    if not (path / ckpt.TRAINER / ckpt.CONFIG).is_file():
        path = ckpt.latest_checkpoint(path) or path
    if not (path / ckpt.TRAINER / ckpt.CONFIG).is_file() or not (path / ckpt.MODEL).is_dir():
        raise BadValue(f"--init_from {source}: not a training checkpoint (no trainer/config.json and model/): pass "
                       "OUTPUT_DIR/checkpoints/iter_N or a run's OUTPUT_DIR.")
    saved = ckpt.read_config(path)
    if bool(saved.get("lora")) != lora:
        kind = {True: "a LoRA", False: "a full fine-tune"}
        raise BadValue(f"--init_from {source} holds {kind[bool(saved.get('lora'))]}'s weights and this run is "
                       f"{kind[lora]}: {'add' if saved.get('lora') else 'drop'} --lora.")
    if lora and saved.get("rank") != rank:
        raise BadValue(f"--init_from {source} is a rank-{saved.get('rank')} LoRA: pass --rank {saved.get('rank')}.")
    return path
