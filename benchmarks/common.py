"""What the benchmarks share: model FLOPs, timing on the GPU, and the results table.

FLOPs are counted analytically from the transformer config (matmuls only: what tensor cores do), so MFU is
comparable across paths: a faster path does the same FLOPs in less time.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch

TEXT_TOKENS = 512
# Multi-GPU launches on shared hosts keep NVLink multicast off in NCCL, PyTorch and NVSHMEM: a program using it can
# take the host's GPUs out of service. The launched processes read these from their environment.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


# The text encoder of NVIDIA's Cosmos-Predict2 pipelines, built at full size with random weights: google-t5/t5-11b's
# encoder (diffusers' Cosmos2TextToImagePipeline names it; 1024 wide, the transformers' text_embed_dim), 4.9 B
# parameters, 9.1 GiB in bf16. Not T5-v1.1-XXL (4096 wide, gated GELU), which the ninth session's sampling runs used.
T5_11B_ENCODER = dict(d_model=1024, d_kv=128, d_ff=65536, num_layers=24, num_heads=128, feed_forward_proj="relu",
                      relative_attention_num_buckets=32)
T5_VOCAB_SIZE = 32128


def forward_flops_per_sample(config: dict, height: int, width: int) -> float:
    """Matmul FLOPs of one transformer forward on one image of height x width pixels (Wan VAE: 8x down)."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    p = config["patch_size"]
    tokens = (height // 8 // p[1]) * (width // 8 // p[2])
    mlp = int(d * config["mlp_ratio"])
    per_token_linear = 4 * d * d + 2 * d * d + 2 * d * mlp  # self-attn qkvo, cross-attn q+o, MLP
    text_kv = 2 * TEXT_TOKENS * config["text_embed_dim"] * d  # cross-attn k, v on the 512 text tokens
    attention = 2 * tokens * tokens * d + 2 * tokens * TEXT_TOKENS * d  # QK^T and AV, self + cross
    per_block = 2 * (tokens * per_token_linear + text_kv + attention)
    return config["num_layers"] * per_block


def train_flops_per_sample(config: dict, height: int, width: int, lora: bool, recompute: float = 0.0) -> float:
    """Forward + backward (+ the share of the forward recomputed by activation checkpointing).

    Full fine-tune backward = 2x forward (input and weight grads); with frozen base weights (LoRA) the weight
    grads are skipped, so backward ~ 1x forward (the adapters' own FLOPs are negligible).
    """
    forward = forward_flops_per_sample(config, height, width)
    return forward * ((2.0 if lora else 3.0) + recompute)


class Timer:
    """Wall time of a region, synchronised with the GPU at both ends (a CPU run is only a smoke test)."""

    def __enter__(self):
        synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        synchronize()
        self.seconds = time.perf_counter() - self.start


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak_memory():
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def allocator_stats() -> dict:
    """Peak memory the caching allocator held, and how often it had to free its cache and retry an allocation
    (each retry synchronizes the GPU)."""
    if not torch.cuda.is_available():
        return {}
    stats = torch.cuda.memory_stats()
    return dict(reserved_gib=stats["reserved_bytes.all.peak"] / 2**30, alloc_retries=stats["num_alloc_retries"])


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke test, not a measurement)"


def free_memory():
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def limit_memory(card_gib: float | None, device) -> None:
    """Emulate a GPU of `card_gib` GiB from here on: what the build left cached goes back, and the process may
    allocate no more (torch.cuda.set_per_process_memory_fraction). Nothing without `card_gib` or off a GPU."""
    if card_gib and torch.device(device).type == "cuda":
        free_memory()
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, card_gib * 2**30 / total))


def write_table(rows: list[dict], columns: list[str], header: str, path: str | None) -> str:
    """A markdown table of `rows`, printed and (with `path`) written with the raw rows as JSON beside it."""
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    table = "\n".join(lines) + "\n"
    print(table, flush=True)
    if path:
        with open(path, "w") as f:
            f.write(table)
        with open(path.rsplit(".", 1)[0] + ".json", "w") as f:
            json.dump(rows, f, indent=2)
    return table


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


# Kernel families by name, first match wins: inductor names its kernels after the ops it fused (a "triton_..."
# kernel may say "_scaled_mm" or "attention"), and cuDNN's attention kernels go before its other kernels.
KERNEL_FAMILIES = [
    ("compiled fused (triton)", r"^triton"),
    ("attention", r"sdpa|flash|fmha|attention|compute_dot_do_o|convert_dq"),
    ("convolution", r"conv|implicit_gemm|nchwToNhwc|nhwcToNchw"),
    ("matmul", r"gemm|nvjet|cutlass|xmma|scaled_mm"),
    ("optimizer / clip (multi-tensor)", r"multi_tensor_apply|fused_adam"),
]


def profile_kernels(fn, path: str, title: str) -> str:
    """Run `fn` once under the CUDA profiler; write its 30 costliest kernels and the GPU time per kernel family
    against the wall time (the difference is the GPU waiting on the CPU) to `path`. Returns the summary line."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof, Timer() as timer:
        fn()
    events = prof.key_averages()
    families: dict[str, float] = {}
    for event in events:
        family = next((name for name, pattern in KERNEL_FAMILIES if re.search(pattern, event.key, re.I)), "other")
        families[family] = families.get(family, 0.0) + event.self_device_time_total / 1e3
    busy = sum(families.values())
    lines = [f"## {title}", "", f"wall {1e3 * timer.seconds:.1f} ms, GPU kernels {busy:.1f} ms "
             f"({100 * busy / (1e3 * timer.seconds):.1f}% busy)", ""]
    lines += [f"- {name}: {ms:.1f} ms ({100 * ms / busy:.1f}%)" for name, ms in sorted(families.items(),
                                                                                     key=lambda kv: -kv[1])]
    lines += ["", events.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=90)]
    slug = re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")
    Path(f"{path}.{slug}.txt").write_text("\n".join(lines))
    return lines[2]
