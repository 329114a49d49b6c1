"""Training checkpoints in NVIDIA's layout (README "Checkpoints"), written atomically, resumed exactly (or, on
another number of processes, from the same global batch).

    OUTPUT_DIR/checkpoints/iter_000000500/
        model/      diffusers transformer folder (full FT) or pytorch_lora_weights.safetensors (LoRA); EMA in ema/
        optim/      optimizer state: one file, or sharded per rank under FSDP/DeepSpeed
        scheduler/  lr scheduler state
        trainer/    state.json (iteration, data position), config.json (the run's flags), rng_<rank>.pt
    OUTPUT_DIR/checkpoints/latest_checkpoint.txt   "iter_000000500"

A checkpoint is written under a hidden name and renamed into place once complete, its files and folders flushed to
disk first; only then does latest_checkpoint.txt (itself replaced atomically) name it. A crash mid-save leaves the
previous one in charge. trainer/checksums.json records every file's size and SHA-256, checked on resume
(checkpoint_integrity.py). By default the main process writes in a background thread from host copies while
training goes on (CheckpointSaver).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import logging
import random
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import torch

from .atomic import fsync_dir, fsync_tree, replace_folder, write_text_atomic
from .checkpoint_integrity import CHECKSUMS, reading, record_checksums
from .host_copy import HostCopier
from .user_errors import OutputFailed

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest_checkpoint.txt"
MODEL, OPTIM, SCHEDULER, TRAINER = "model", "optim", "scheduler", "trainer"
EMA = "ema"
CONFIG = "config.json"
STATE = "state.json"


def iter_name(iteration: int) -> str:
    return f"iter_{iteration:09d}"


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The iter dir latest_checkpoint.txt names, or None when there is none yet."""
    root = checkpoints_dir(output_dir)
    if not (root / LATEST).is_file():
        return None
    path = root / (root / LATEST).read_text().strip()
    if not path.exists() and _replaced(path).is_dir():  # a crash while the same iteration was being saved again
        path = _replaced(path)
    if not (path / TRAINER / STATE).is_file():
        raise FileNotFoundError(f"{root / LATEST} names {path.name}, which is missing or incomplete.")
    return path


def _replaced(final: Path) -> Path:
    return final.with_name(f".{final.name}.replaced")


def read_config(checkpoint: str | Path) -> dict:
    return _read_json(checkpoint, Path(checkpoint) / TRAINER / CONFIG)


def read_state(checkpoint: str | Path) -> dict:
    return _read_json(checkpoint, Path(checkpoint) / TRAINER / STATE)


def _read_json(checkpoint, path: Path) -> dict:
    with reading(checkpoint, path):
        return json.loads(path.read_text())


def save_checkpoint(accelerator, output_dir, iteration: int, *, save_model, model, optimizer, scheduler,
                    state: dict, config: dict, total_limit: int | None = None) -> Path:
    """Write checkpoint `iteration` synchronously; `save_model(directory)` writes model/ (main process)."""
    saver = CheckpointSaver(accelerator, output_dir, background=False, total_limit=total_limit)
    return saver.save(iteration, snapshot_model=lambda copier: save_model, model=model, optimizer=optimizer,
                      scheduler=scheduler, state=state, config=config)


class CheckpointSaver:
    """Writes a run's checkpoints; every process calls `save` at the same steps and `finish` at the end.

    Every save goes the same way: the main process makes the hidden staging folder; each process captures its part
    (a collective under FSDP) and writes what is its own and small (its RNG state, its optimizer shard under
    FSDP/DeepSpeed); then the main process writes model/, EMA, the whole optimizer (DDP, one GPU), scheduler and
    trainer/, flushes every file and folder to disk, records the checksums, renames the folder into place, flushes
    that, and only then names it in latest_checkpoint.txt and prunes.

    With `background` that last part runs in a thread of the main process while training goes on, from copies in
    host memory (host_copy.py) made at the save step; the thread makes no collective. The next save, and `finish`,
    wait for it first, and raise its error on every process. A process killed meanwhile leaves the staging folder,
    which the next save clears, and latest_checkpoint.txt naming the previous checkpoint.
    """

    def __init__(self, accelerator, output_dir, background: bool = False, total_limit: int | None = None):
        self.accelerator = accelerator
        self.root = checkpoints_dir(output_dir)
        self.background = background
        self.total_limit = total_limit
        self.copier = HostCopier(reuse=background)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._reported_memory = False
        self.write_seconds: list[float] = []  # per checkpoint, on the main process: writing, flushing, hashing

    def save(self, iteration: int, *, snapshot_model, model, optimizer, scheduler, state: dict, config: dict) -> Path:
        """`snapshot_model(copier)` captures model/ (every process calls it; `copier` makes host copies where they
        are needed) and returns, on the main process, the function that writes it into a directory."""
        accelerator = self.accelerator
        main = accelerator.is_main_process
        self.wait()
        final = self.root / iter_name(iteration)
        staging = self.root / f".{final.name}.tmp"
        if main:
            for leftover in self.root.glob(".iter_*.tmp"):  # from a crash mid-save
                shutil.rmtree(leftover)
            new_root = not self.root.is_dir()
            staging.mkdir(parents=True)
            if new_root:
                fsync_dir(self.root.parent)
        accelerator.wait_for_everyone()

        job = _Job(final, staging, self.root, self.total_limit)
        self.copier.begin(_live_tensors(model, optimizer))
        problem = None
        write_model = snapshot_model(self.copier)
        if main and write_model is not None:
            job.writes.append((MODEL, lambda: write_model(staging / MODEL)))
        if optimizer_layout(str(accelerator.distributed_type)) == "full":
            if main:
                optim_state = self.copier(optimizer.state_dict(), OPTIM)
                job.writes.append((f"{OPTIM}/optimizer.pt",
                                   lambda: _torch_save(optim_state, staging / OPTIM / "optimizer.pt")))
        else:  # sharded: each process writes its own shard now, together (collectives)
            problem = _attempt(job, OPTIM, lambda: _save_optimizer(accelerator, model, optimizer, staging / OPTIM))
        rng = f"{TRAINER}/rng_{accelerator.process_index}.pt"
        problem = problem or _attempt(job, rng, lambda: _torch_save(_rng_state(), staging / rng))
        if main:
            scheduler_state = copy.deepcopy(scheduler.state_dict())
            config_text = json.dumps(config, indent=2, sort_keys=True)
            state_text = json.dumps(dict(state, iteration=iteration), indent=2)
            job.writes += [
                (f"{SCHEDULER}/scheduler.pt",
                 lambda: _torch_save(scheduler_state, staging / SCHEDULER / "scheduler.pt")),
                (f"{TRAINER}/{CONFIG}", lambda: (staging / TRAINER / CONFIG).write_text(config_text)),
                (f"{TRAINER}/{STATE}", lambda: (staging / TRAINER / STATE).write_text(state_text)),
            ]
        elif problem is None:  # this process's own files reach the disk before the main process names them
            problem = _attempt(job, rng, lambda: fsync_tree(staging, dirs=False))
        job.ready = self.copier.end()
        problems = [p for p in _gather(accelerator, problem) if p]
        if problems:
            if main:
                shutil.rmtree(staging, ignore_errors=True)
            raise OutputFailed(problems[0])

        if main:
            if self.background and not self.copier.short:
                self._report_memory()
                self._thread = threading.Thread(target=self._run, args=(job,), name=f"save {final.name}")
                self._thread.start()
            else:
                if self.background:
                    logger.warning("Not enough free host memory to copy checkpoint %s for a background save: it is "
                                   "written now, while training waits.", final.name)
                self._run(job)
        if not self.background:
            accelerator.wait_for_everyone()
            self.wait()
        return final

    def _run(self, job: _Job) -> None:
        start = time.perf_counter()
        try:
            written = job.run()
            self.write_seconds.append(time.perf_counter() - start)
            logger.info("Checkpoint %s written%s: %.2f GB in %.1f s.", job.final.name,
                        " in the background" if threading.current_thread() is not threading.main_thread() else "",
                        written / 1e9, self.write_seconds[-1])
        except BaseException as error:  # raised in the training loop at the next save or at the end
            self._error = error
            if threading.current_thread() is not threading.main_thread():
                logger.error("Background save of %s failed: %s", job.final.name, error)

    def wait(self) -> None:
        """Wait for the background save in flight, if any; its error is raised here, on every process."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        message = None if error is None else str(error) or type(error).__name__
        if getattr(self.accelerator, "num_processes", 1) > 1:
            from accelerate.utils import broadcast_object_list

            message = broadcast_object_list([message])[0]
        if error is not None:
            raise error
        if message:
            raise OutputFailed(f"The main process failed to save a checkpoint: {message}")

    def finish(self) -> None:
        """The end of training: the last save is complete (or its error raised), and its host copies are freed."""
        try:
            self.wait()
        finally:
            self.copier = HostCopier(reuse=self.background)

    def _report_memory(self) -> None:
        if self._reported_memory:
            return
        self._reported_memory = True
        held, kept = self.copier.held_bytes, self.copier.buffer_bytes
        logger.info("Background checkpoint saves: the state being written is held in %.2f GiB of host memory "
                    "(%.2f GiB %s buffers kept for the next saves); --no_async_save writes while training waits.",
                    held / 2**30, kept / 2**30, "pinned" if self.copier.pin else "pageable")


class _Job:
    """What the main process does to finish a checkpoint once every process has captured its part."""

    def __init__(self, final: Path, staging: Path, root: Path, total_limit: int | None):
        self.final, self.staging, self.root, self.total_limit = final, staging, root, total_limit
        self.writes: list[tuple[str, callable]] = []  # (path in the checkpoint, for errors; write)
        self.ready = None  # the host copies' CUDA event

    def run(self) -> int:
        """Returns the bytes written."""
        try:
            if self.ready is not None:
                self.ready.synchronize()
            for what, write in self.writes:
                with _writing(self, what):
                    write()
            with _writing(self, "its files (flushing them to disk)"):
                fsync_tree(self.staging)  # files first, then the folders holding their names
            with _writing(self, f"{TRAINER}/{CHECKSUMS}"):
                written = record_checksums(self.staging)
                fsync_dir(self.staging / TRAINER)
            # The same iteration saved again (a rerun of a finished job): the old copy is moved aside, where
            # latest_checkpoint() finds it after a crash.
            replace_folder(self.staging, self.final, aside=_replaced(self.final))  # and flushes the rename
            write_text_atomic(self.root / LATEST, self.final.name + "\n")
        except BaseException:
            shutil.rmtree(self.staging, ignore_errors=True)  # also frees the space a full disk needs back
            raise
        if self.total_limit:
            _prune(self.root, keep=self.total_limit, current=self.final.name)
        return written


def _live_tensors(model, optimizer) -> list[torch.Tensor]:
    """The tensors training updates in place, apart from the EMA (methods.py declares it)."""
    live = [*model.parameters(), *model.buffers()]
    inner = getattr(optimizer, "optimizer", optimizer)
    for param_state in getattr(inner, "state", {}).values():
        live += [v for v in param_state.values() if isinstance(v, torch.Tensor)]
    return live


def _torch_save(obj, path: Path) -> None:
    """torch.save of CPU tensors: a copy in host memory and the live CUDA state write the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_to_cpu(obj), path)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


@contextlib.contextmanager
def _writing(job: _Job, what: str):
    """An OSError while writing `what` (a full disk, a quota) becomes one line naming the file and the checkpoint,
    and saying which checkpoint is still the latest."""
    try:
        yield
    except OutputFailed:
        raise
    except OSError as error:
        raise OutputFailed(_write_failure(job, what, error)) from error


def _attempt(job: _Job, what: str, write) -> str | None:
    """Run `write` on this process; its failure as a message, to be raised on every process together."""
    try:
        with _writing(job, what):
            write()
    except OutputFailed as error:
        return str(error)
    return None


def _write_failure(job: _Job, what: str, error: OSError) -> str:
    where = what
    if error.filename:
        try:
            where = Path(error.filename).absolute().relative_to(job.staging.absolute()).as_posix()
        except ValueError:
            where = str(error.filename)
    latest = job.root / LATEST
    previous = latest.read_text().strip() if latest.is_file() else None
    kept = f"{latest} still names {previous}" if previous else "no checkpoint is named latest yet"
    hint = " Free space there (or lower --checkpoints_total_limit) and run the same command again to resume." \
        if error.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return (f"Could not save checkpoint {job.final}: writing {where} failed ({error.strerror or error}); nothing "
            f"of it was kept, and {kept}.{hint}")


def _gather(accelerator, problem: str | None) -> list[str | None]:
    if getattr(accelerator, "num_processes", 1) == 1:
        return [problem]
    from accelerate.utils import gather_object

    return gather_object([problem])


def _prune(root: Path, keep: int, current: str) -> None:
    """Remove all but the last `keep` complete checkpoints; a folder without trainer/state.json (a damaged or
    foreign one) is neither counted nor removed."""
    complete = sorted(p for p in root.glob("iter_*") if p.is_dir() and (p / TRAINER / STATE).is_file())
    for old in complete[:-keep]:
        if old.name != current:
            shutil.rmtree(old)


def load_checkpoint(accelerator, checkpoint: str | Path, *, model, optimizer, scheduler, seed: int) -> dict:
    """Restore optimizer, scheduler and this process's RNG from `checkpoint`; return its trainer state.

    A process the saving run did not have (a resume on more processes) has no RNG state there: it seeds one from
    (seed, iteration, rank), so that such a resume is at least repeatable. The model weights and EMA are read by the
    caller (they are needed before the model is prepared)."""
    checkpoint = Path(checkpoint)
    state = read_state(checkpoint)
    _load_optimizer(accelerator, model, optimizer, checkpoint / OPTIM)
    scheduler.load_state_dict(_torch_load(checkpoint, checkpoint / SCHEDULER / "scheduler.pt", weights_only=True))
    rng = checkpoint / TRAINER / f"rng_{accelerator.process_index}.pt"
    if rng.is_file():
        _set_rng_state(_torch_load(checkpoint, rng, weights_only=False))
    else:
        _seed_rng(seed, state["iteration"], accelerator.process_index)
    return state


# Optimizer state. Without sharding the main process writes one file; FSDP writes a sharded
# torch.distributed.checkpoint folder through accelerate, and DeepSpeed its own per-rank shards: no rank ever
# gathers the whole optimizer.

def optimizer_layout(distributed_type: str) -> str:
    """How optim/ is written under `distributed_type` (str of accelerate's DistributedType). Only the "full" layout,
    one file of the whole state that the main process writes and every process reads, loads on any number of
    processes."""
    for sharded in ("FSDP", "DEEPSPEED"):
        if distributed_type.endswith(sharded):
            return sharded
    return "full"


def _save_optimizer(accelerator, model, optimizer, directory: Path) -> None:
    from accelerate.utils import DistributedType, save_fsdp_optimizer

    directory.mkdir(exist_ok=True)
    if accelerator.distributed_type == DistributedType.FSDP:
        save_fsdp_optimizer(accelerator.state.fsdp_plugin, accelerator, optimizer, model, str(directory))
    elif accelerator.distributed_type == DistributedType.DEEPSPEED:
        model.save_checkpoint(str(directory), tag="deepspeed", exclude_frozen_parameters=True)
    elif accelerator.is_main_process:
        torch.save(optimizer.state_dict(), directory / "optimizer.pt")


def _load_optimizer(accelerator, model, optimizer, directory: Path) -> None:
    from accelerate.utils import DistributedType, load_fsdp_optimizer

    if accelerator.distributed_type == DistributedType.FSDP:
        load_fsdp_optimizer(accelerator.state.fsdp_plugin, accelerator, optimizer, model, str(directory))
    elif accelerator.distributed_type == DistributedType.DEEPSPEED:
        model.load_checkpoint(str(directory), tag="deepspeed", load_module_strict=False,
                              load_optimizer_states=True, load_lr_scheduler_states=False)
    else:
        optimizer.load_state_dict(_torch_load(directory.parent, directory / "optimizer.pt", map_location="cpu",
                                              weights_only=True))


def _torch_load(checkpoint: Path, path: Path, **kwargs):
    with reading(checkpoint, path):
        return torch.load(path, **kwargs)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _seed_rng(seed: int, iteration: int, rank: int) -> None:
    seed = int(np.random.SeedSequence([seed, iteration, rank]).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every device's generator too


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
