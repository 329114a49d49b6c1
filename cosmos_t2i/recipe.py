"""NVIDIA's recipe values per model, filled into the flags the user left unset, and what a resume must keep.

Full fine-tune: lr = preset.learning_rate x a factor going linearly from preset.lr_start_factor to 0 over max_iter
(NVIDIA's LambdaLinearScheduler with no warm-up: peak 5.19e-6 for 2B, 1.73e-5 for 14B).
LoRA: the same linear decay to 0, from preset.lora_learning_rate (1e-4 for 2B/14B) at factor 1. NVIDIA's full
fine-tune peak moves a B=0-initialised adapter so little in 1000 steps that it learns almost nothing.
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import optimizer_layout
from .models import Preset

LORA_RANK = 16
LORA_ALPHA = 16

# Flags that may change between a run and its resume without changing what is computed.
MAY_DIFFER_ON_RESUME = {
    "output_dir", "resume_from_checkpoint", "save_iter", "checkpoints_total_limit", "report_to",
    "validation_prompt", "validation_steps", "validation_num_inference_steps", "validation_guidance_scale",
    "validation_aspect_ratio", "push_to_hub", "hub_model_id", "dataloader_num_workers", "max_nonfinite_steps",
    "compile", "attention_backend", "gradient_checkpointing", "tracker_project_name", "distributed_timeout",
    # Where the frozen base is kept (host or GPU) changes no number: the same weights reach the same matmuls.
    "offload_frozen",
    "validation_metrics", "validation_dino_model", "validation_clip_model",
    "async_save", "verify_checksums", "debug",
    # The data is compared by its content (dataset_fingerprint), not by the text of its path: `ds`, `ds/` and a
    # moved copy are the same dataset.
    "dataset_dir",
    # A longer (or shorter) run continues with the schedule recomputed for the new length (reschedule).
    "max_iter",
    # Only the start of a run reads it; a resume reads the run's own checkpoint.
    "init_from",
}
# How the run is spread over processes may change too (preemptible clusters give back another GPU count): the
# trainer converts the data position to the same global batch and reports a changed effective batch. What the
# optimizer state's layout allows is checked apart (distribution_change_refused).
ADAPTED_ON_RESUME = {"world_size", "distributed_type", "gradient_accumulation_steps"}


def apply_defaults(args, preset: Preset, method) -> None:
    """Fill every recipe flag left at None from the preset and the method (methods.py), in place."""
    if args.learning_rate is None:
        args.learning_rate = method.default_learning_rate(preset)
    if args.lr_start_factor is None:
        args.lr_start_factor = method.default_lr_start_factor(preset)
    if args.weight_decay is None:
        args.weight_decay = preset.weight_decay


def linear_decay(max_iter: int, start_factor: float):
    """The LambdaLR factor at iteration `it`: start_factor at 0, falling linearly to 0 at max_iter."""
    return lambda it: start_factor * max(0.0, 1.0 - it / max_iter)


def reschedule(scheduler, iteration: int) -> None:
    """Set the lr of step `iteration` from the scheduler's current lambda (built from this launch's --max_iter).

    Extending a run: the factor is the one a run launched with the new --max_iter would have at this step,
    start_factor x (1 - iteration / new max_iter), and it falls linearly to 0 at the new end. A run extended from 1000
    to 2000 steps at step 1000 continues at half the peak lr (it had decayed to 0), exactly as a 2000-step run would
    be at step 1000. The loaded optimizer holds the lr the old schedule set, so it is recomputed here."""
    assert scheduler.last_epoch == iteration, (scheduler.last_epoch, iteration)  # stepped once per optimizer step
    groups = scheduler.optimizer.param_groups
    for group, base_lr, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(iteration)  # what LambdaLR.step() computes, without its step-order warning
    scheduler._last_lr = [group["lr"] for group in groups]


def config_differences(saved: dict, current: dict) -> list[str]:
    keys = (saved.keys() | current.keys()) - MAY_DIFFER_ON_RESUME - ADAPTED_ON_RESUME
    if "dataset_fingerprint" not in saved:  # saved before datasets had fingerprints: compare where they are
        keys.discard("dataset_fingerprint")
        if _other_folder(saved.get("dataset_dir"), current.get("dataset_dir")):
            keys.add("dataset_dir")
    return sorted(k for k in keys if saved.get(k) != current.get(k))


def _other_folder(saved: str | None, current: str | None) -> bool:
    return saved is not None and current is not None and Path(saved).resolve() != Path(current).resolve()


def effective_batch(config: dict) -> int:
    """Images per optimizer step."""
    return config["train_batch_size"] * config["gradient_accumulation_steps"] * config["world_size"]


_LAYOUTS = {"full": "the full optimizer state (single process / DDP)", "FSDP": "the optimizer state sharded by FSDP",
            "DEEPSPEED": "the optimizer state in DeepSpeed's ZeRO shards"}
_START_OVER = "start over with a new --output_dir or --resume_from_checkpoint none"


def distribution_change_refused(saved: dict, current: dict) -> str | None:
    """Why the optimizer state saved under `saved`'s distribution cannot be resumed under `current`'s, or None.

    A single process, DDP and MULTI_CPU all write the full optimizer state, which loads on any number of processes.
    FSDP writes it sharded with torch.distributed.checkpoint, which reshards on load: any number of FSDP processes
    (tests/test_multi_gpu.py, on two GPUs). DeepSpeed writes its own per-rank ZeRO shards, which load on the same
    number of processes only."""
    before, now = optimizer_layout(saved["distributed_type"]), optimizer_layout(current["distributed_type"])
    if before != now:
        return (f"distributed_type: {saved['distributed_type']} there, {current['distributed_type']} now. The "
                f"checkpoint holds {_LAYOUTS[before]}, this launch reads {_LAYOUTS[now]}: launch with the same kind of "
                f"accelerate config as the saving run (single process or DDP: any number of processes), or "
                f"{_START_OVER}.")
    if now == "DEEPSPEED" and saved["world_size"] != current["world_size"]:
        return (f"world_size: {saved['world_size']} there, {current['world_size']} now, under DeepSpeed. Its "
                f"optimizer state is sharded per process, and this trainer does not reshard DeepSpeed checkpoints: "
                f"launch {saved['world_size']} processes again, use the FSDP2 config (which reshards), or "
                f"{_START_OVER}.")
    return None
