"""Training checkpoints in NVIDIA's layout (README "Checkpoints"), written atomically, resumed exactly (or, on
another number of processes, from the same global batch).

    OUTPUT_DIR/checkpoints/iter_000000500/
        model/      diffusers transformer folder (full FT) or pytorch_lora_weights.safetensors (LoRA); EMA in ema/
        optim/      optimizer state: one file, or sharded per rank under FSDP/DeepSpeed
        scheduler/  lr scheduler state
        trainer/    state.json (iteration, data position), config.json (the run's flags), rng_<rank>.pt
    OUTPUT_DIR/checkpoints/latest_checkpoint.txt   "iter_000000500"

A checkpoint is written under a hidden name and renamed into place once complete; only then does
latest_checkpoint.txt (itself replaced atomically) name it. A crash mid-save leaves the previous one in charge.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .atomic import replace_folder, write_text_atomic

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
    return json.loads((Path(checkpoint) / TRAINER / CONFIG).read_text())


def read_state(checkpoint: str | Path) -> dict:
    return json.loads((Path(checkpoint) / TRAINER / STATE).read_text())


def save_checkpoint(accelerator, output_dir, iteration: int, *, save_model, model, optimizer, scheduler,
                    state: dict, config: dict, total_limit: int | None = None) -> Path:
    """Write checkpoint `iteration`; every process calls this. `save_model(directory)` writes model/."""
    root = checkpoints_dir(output_dir)
    final = root / iter_name(iteration)
    staging = root / f".{final.name}.tmp"
    if accelerator.is_main_process:
        for leftover in root.glob(".iter_*.tmp"):  # from a crash mid-save
            shutil.rmtree(leftover)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()

    save_model(staging / MODEL)
    _save_optimizer(accelerator, model, optimizer, staging / OPTIM)
    (staging / TRAINER).mkdir(exist_ok=True)
    torch.save(_rng_state(), staging / TRAINER / f"rng_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        (staging / SCHEDULER).mkdir()
        torch.save(scheduler.state_dict(), staging / SCHEDULER / "scheduler.pt")
        (staging / TRAINER / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        (staging / TRAINER / STATE).write_text(json.dumps(dict(state, iteration=iteration), indent=2))
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        # The same iteration saved again (a rerun of a finished job): the old copy is moved aside, where
        # latest_checkpoint() finds it after a crash.
        replace_folder(staging, final, aside=_replaced(final))
        write_text_atomic(root / LATEST, final.name + "\n")
        if total_limit:
            _prune(root, keep=total_limit, current=final.name)
    accelerator.wait_for_everyone()
    return final


def _prune(root: Path, keep: int, current: str) -> None:
    complete = sorted(p for p in root.glob("iter_*") if p.is_dir())
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
    scheduler.load_state_dict(torch.load(checkpoint / SCHEDULER / "scheduler.pt", weights_only=True))
    rng = checkpoint / TRAINER / f"rng_{accelerator.process_index}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
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
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True))


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
