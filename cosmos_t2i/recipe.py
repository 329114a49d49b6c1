"""NVIDIA's recipe values per model, filled into the flags the user left unset, and what a resume must keep.

Full fine-tune: lr = preset.learning_rate x a factor going linearly from preset.lr_start_factor to 0 over max_iter
(NVIDIA's LambdaLinearScheduler with no warm-up: peak 5.19e-6 for 2B, 1.73e-5 for 14B).
LoRA: the same linear decay to 0, from preset.lora_learning_rate (1e-4) at factor 1. NVIDIA's full fine-tune peak
moves a B=0-initialised adapter so little in 1000 steps that it learns almost nothing.
"""

from __future__ import annotations

from .presets import Preset

LORA_RANK = 16
LORA_ALPHA = 16

# Flags that may change between a run and its resume without changing what is computed.
MAY_DIFFER_ON_RESUME = {
    "output_dir", "resume_from_checkpoint", "save_iter", "checkpoints_total_limit", "report_to",
    "validation_prompt", "validation_steps", "validation_num_inference_steps", "validation_guidance_scale",
    "validation_aspect_ratio", "push_to_hub", "hub_model_id", "dataloader_num_workers", "max_nonfinite_steps",
    "compile", "attention_backend", "gradient_checkpointing", "tracker_project_name",
}


def apply_defaults(args, preset: Preset) -> None:
    """Fill every recipe flag left at None from the preset, in place."""
    if args.learning_rate is None:
        args.learning_rate = preset.lora_learning_rate if args.lora else preset.learning_rate
    if args.lr_start_factor is None:
        args.lr_start_factor = 1.0 if args.lora else preset.lr_start_factor
    if args.weight_decay is None:
        args.weight_decay = preset.weight_decay
    if args.lora:
        args.rank = LORA_RANK if args.rank is None else args.rank
        args.lora_alpha = LORA_ALPHA if args.lora_alpha is None else args.lora_alpha


def linear_decay(max_iter: int, start_factor: float):
    """The LambdaLR factor at iteration `it`: start_factor at 0, falling linearly to 0 at max_iter."""
    return lambda it: start_factor * max(0.0, 1.0 - it / max_iter)


def config_differences(saved: dict, current: dict) -> list[str]:
    keys = (saved.keys() | current.keys()) - MAY_DIFFER_ON_RESUME
    return sorted(k for k in keys if saved.get(k) != current.get(k))
