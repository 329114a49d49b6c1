"""GPU memory: an out-of-memory error becomes one message with the flags that lower memory, cheapest first; and the
peak memory of a phase, measured from the phase's start.

The advice lists only what the run does not use yet, in the order of what each costs: a smaller batch (none, but it
changes the recipe), activation checkpointing (recompute), an fp8 base (LoRA: accuracy, measured), and for sampling
T5 on the CPU, fp8 matmuls and offloading (host-to-GPU copies). BENCHMARKS.md has each one's price.
"""

from __future__ import annotations

import contextlib
import gc
import os

import torch

from .user_errors import UserError


class OutOfMemory(UserError, RuntimeError):
    """A CUDA out-of-memory error, told as what to change."""


def gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.1f} GiB"


def free_memory(device) -> None:
    """Give the memory of models just dropped back (a text encoder, a VAE, a sampling pipeline), so that what runs
    next has it: collect them, and on a GPU empty the allocator's cache."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device) -> None:
    """Start measuring a phase's peak here (e.g. training, once the model is built and moved)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if torch.device(device).type == "cuda" else None


def training_advice(args) -> list[str]:
    """The trainer's flags that would lower its memory, cheapest first, given what `args` already uses."""
    advice = []
    if args.train_batch_size > 1:
        advice.append(f"a smaller --train_batch_size (now {args.train_batch_size}; raise "
                      "--gradient_accumulation_steps to keep the effective batch)")
    if args.gradient_checkpointing < 1.0:
        advice.append("--gradient_checkpointing" + (f" (now {args.gradient_checkpointing:g} of the blocks)"
                                                    if args.gradient_checkpointing else ""))
    if args.lora and not args.fp8_base:
        advice.append("--fp8_base (the frozen base's Linear weights in fp8: about half the weight memory)")
    if args.lora and not args.offload_frozen:
        advice.append("--offload_frozen (the frozen block weights stay in host memory and stream to the GPU block by "
                      "block)")
    # accelerate launch hands the config's FSDP offload to the processes in these variables (checked before the
    # Accelerator exists).
    offloaded = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" \
        and os.environ.get("FSDP_OFFLOAD_PARAMS", "").lower() == "true"
    if not args.lora and not offloaded:
        advice.append("accelerate launch --config_file accelerate_configs/fsdp2_offload.yaml (weights, gradients, "
                      "AdamW state and EMA in host memory: 2B fits a 24 GB card, slower per step)")
        advice.append("--lora --fp8_base (adapters on a frozen fp8 base instead of the whole transformer in fp32 "
                      "with AdamW and EMA), or more GPUs with accelerate_configs/fsdp2_8gpu.yaml")
    return advice


def batch_size_advice(batch_size: int) -> list[str]:
    """The data scripts' one lever (embed_captions.py, caption_dataset.py): fewer items per forward."""
    return [f"a smaller --batch_size (now {batch_size})"] if batch_size > 1 else []


def sampling_advice(args) -> list[str]:
    """infer_text2image.py's flags that would lower its memory, cheapest first."""
    advice = []
    if args.text_encoder_device != "cpu":
        advice.append("--text_encoder_device cpu (T5 encodes the prompts on the CPU)")
    if not args.fp8:
        advice.append("--fp8 (the transformer blocks' weights in fp8)")
    if not args.offload:
        advice.append("--offload (weights stay in host memory and stream to the GPU block by block)")
    return advice


@contextlib.contextmanager
def explain_out_of_memory(device, advice: list[str], what: str):
    """Turn a CUDA out-of-memory error inside the block into OutOfMemory: the peak, the GPU's size, the advice."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        raise OutOfMemory(out_of_memory_message(device, advice, what)) from error


def out_of_memory_message(device, advice: list[str], what: str) -> str:
    """`device` None: the current CUDA device (the error came before the run knew its device)."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        where = f"{gib(torch.cuda.max_memory_allocated(device))} at the peak, on a {gib(total)} " \
                f"{torch.cuda.get_device_name(device)}"
    else:
        where = f"on {device}"
    fix = ("; to lower it, cheapest first: " + "; ".join(advice)) if advice else \
        "; every memory-saving flag is already on: use a GPU with more memory"
    return f"out of GPU memory while {what} ({where}){fix}."
