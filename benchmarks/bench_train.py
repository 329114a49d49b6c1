"""Training throughput: the plain diffusers path against our fast path, in one run, on one GPU.

Random-initialised transformers of the real 2B/14B configs (no download), NVIDIA's objective and optimizer, bf16
compute with fp32 master weights (full fine-tune) or a frozen bf16 base with fp32 adapters (LoRA). Each variant
starts from the same seeded weights and inputs, so its first loss must match the plain path's within bf16 noise.

    python benchmarks/bench_train.py --model 2B --out results/train_2b.md
    python benchmarks/bench_train.py --model 14B --lora --out results/train_14b_lora.md
    python benchmarks/bench_train.py --model 14B --lora --variants 13 --card_gib 16  # offloaded fp8 base, 16 GB

The fp8 training variants need `pip install torchao` (not in requirements.txt: they measured slower, BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    Timer, allocator_stats, device_name, free_memory, limit_memory, peak_gib, profile_kernels, reset_peak_memory,
    train_flops_per_sample, write_table,
)
from cosmos_t2i import speed  # noqa: E402
from cosmos_t2i.methods import FullFineTune, LoraFineTune  # noqa: E402
from cosmos_t2i.objective import diffusion_loss  # noqa: E402
from cosmos_t2i.models import PRESETS  # noqa: E402


@dataclasses.dataclass
class Variant:
    name: str
    batch_size: int
    compile: bool = False
    fused_adamw: bool = False
    checkpoint_fraction: float = 0.0  # share of blocks with activation checkpointing
    compile_mode: str | None = None  # torch.compile mode, e.g. "max-autotune-no-cudagraphs"
    activation_memory_budget: float = 1.0  # < 1: the compiler recomputes its cheapest saved activations
    fp8: bool = False  # torchao float8 training, rowwise scales: changes the numbers
    coordinate_descent: bool = False  # inductor tunes its own (elementwise, reduction) kernels' launch configs
    budget_estimator: str = "flops"  # how the partitioner prices a recomputation: "flops" or "profile" (timed)
    expandable_segments: bool = False  # allocator grows segments in place instead of freeing cache and retrying
    multi_kernel: bool = False  # inductor also builds single-pass (persistent) versions of long-row reductions
    clip_in_adamw: bool = False  # speed.clip_grad_norm_in_fused_adamw instead of clip_grad_norm_
    fp8_base: bool = False  # LoRA: the frozen base's block Linear weights stored in fp8 (--fp8_base): changes numbers
    offload_frozen: bool = False  # LoRA: the frozen block weights in pinned host memory, streamed (--offload_frozen)


# PyTorch 2.11 already runs this model's attention on cuDNN's kernel on an H100 (profiled), so the attention
# backend is not a lever here; see BENCHMARKS.md.
FULL_VARIANTS = [
    Variant("plain (eager, SDPA, foreach AdamW)", 2),
    Variant("compiled blocks", 2, compile=True),
    Variant("compiled + fused AdamW", 2, compile=True, fused_adamw=True),
    Variant("compiled + fused AdamW, batch 3", 3, compile=True, fused_adamw=True),
    Variant("compiled + fused AdamW, batch 4", 4, compile=True, fused_adamw=True),
    Variant("compiled (max-autotune) + fused AdamW", 2, compile=True, fused_adamw=True,
            compile_mode="max-autotune-no-cudagraphs"),
    Variant("compiled + fused AdamW, batch 4, activation budget 0.8", 4, compile=True, fused_adamw=True,
            activation_memory_budget=0.8),
    Variant("fp8 (torchao rowwise) + compiled + fused AdamW", 2, compile=True, fused_adamw=True, fp8=True),
    Variant("fp8 (torchao rowwise) + compiled + fused AdamW, batch 4, budget 0.8", 4, compile=True,
            fused_adamw=True, activation_memory_budget=0.8, fp8=True),
    Variant("compiled + fused AdamW, batch 6, activation budget 0.8", 6, compile=True, fused_adamw=True,
            activation_memory_budget=0.8),
    Variant("same, inductor coordinate-descent tuning", 6, compile=True, fused_adamw=True,
            activation_memory_budget=0.8, coordinate_descent=True),
    Variant("compiled + fused AdamW, batch 6, activation budget 0.8, recompute priced by timing", 6, compile=True,
            fused_adamw=True, activation_memory_budget=0.8, budget_estimator="profile"),
    Variant("compiled + fused AdamW, batch 6, activation budget 0.8, expandable segments", 6, compile=True,
            fused_adamw=True, activation_memory_budget=0.8, expandable_segments=True),
    Variant("compiled + fused AdamW, batch 7, activation budget 0.7, expandable segments", 7, compile=True,
            fused_adamw=True, activation_memory_budget=0.7, expandable_segments=True),
    Variant("compiled + fused AdamW, batch 6, activation budget 0.8, inductor multi-kernel", 6, compile=True,
            fused_adamw=True, activation_memory_budget=0.8, multi_kernel=True),
    Variant("compiled + fused AdamW with the clip in its step, batch 6, activation budget 0.8", 6, compile=True,
            fused_adamw=True, activation_memory_budget=0.8, clip_in_adamw=True),
]
LORA_VARIANTS = [
    Variant("plain (eager, SDPA, peft, full ckpt)", 1, checkpoint_fraction=1.0),
    Variant("compiled, full ckpt", 1, compile=True, fused_adamw=True, checkpoint_fraction=1.0),
    Variant("compiled, ckpt 1/2 of blocks", 1, compile=True, fused_adamw=True, checkpoint_fraction=0.5),
    Variant("compiled, ckpt 1/4 of blocks", 1, compile=True, fused_adamw=True, checkpoint_fraction=0.25),
    Variant("compiled, no ckpt", 1, compile=True, fused_adamw=True),
    Variant("eager, full ckpt, fp8 base", 1, fused_adamw=True, checkpoint_fraction=1.0, fp8_base=True),
    Variant("compiled, full ckpt, fp8 base", 1, compile=True, fused_adamw=True, checkpoint_fraction=1.0,
            fp8_base=True),
    Variant("compiled, ckpt 3/4 of blocks, fp8 base", 1, compile=True, fused_adamw=True, checkpoint_fraction=0.75,
            fp8_base=True),
    Variant("compiled, ckpt 1/2 of blocks, fp8 base", 1, compile=True, fused_adamw=True, checkpoint_fraction=0.5,
            fp8_base=True),
    Variant("compiled, no ckpt, fp8 base", 1, compile=True, fused_adamw=True, fp8_base=True),
    # --offload_frozen: the same math as the variant named in each comment, with the frozen block weights streamed.
    Variant("eager, full ckpt, bf16 base offloaded", 1, fused_adamw=True, checkpoint_fraction=1.0,
            offload_frozen=True),  # 0
    Variant("eager, full ckpt, fp8 base offloaded", 1, fused_adamw=True, checkpoint_fraction=1.0, fp8_base=True,
            offload_frozen=True),  # 5
    Variant("compiled, full ckpt, bf16 base offloaded", 1, compile=True, fused_adamw=True, checkpoint_fraction=1.0,
            offload_frozen=True),  # 1
    Variant("compiled, full ckpt, fp8 base offloaded", 1, compile=True, fused_adamw=True, checkpoint_fraction=1.0,
            fp8_base=True, offload_frozen=True),  # 6
    Variant("compiled, ckpt 1/2 of blocks, fp8 base offloaded", 1, compile=True, fused_adamw=True,
            checkpoint_fraction=0.5, fp8_base=True, offload_frozen=True),  # 8
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="2B", choices=["2B", "14B", "tiny"])
    parser.add_argument("--lora", action="store_true", help="LoRA r16 on a frozen bf16 base instead of full FT.")
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--width", type=int, default=1360)
    parser.add_argument("--steps", type=int, default=10, help="Timed optimizer steps per variant.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps first (compilation happens here).")
    parser.add_argument("--variants", default=None,
                        help="Comma-separated indices of the variants to run (variant 0, the plain path, always runs).")
    parser.add_argument("--profile", default=None, help="Write the GPU kernel time table of each variant's last "
                        "timed steps here (one file per variant index).")
    parser.add_argument("--peak_tflops", type=float, default=800.0, help="Measured bf16 matmul rate for MFU.")
    parser.add_argument("--device", default="cuda", help="cpu only for a smoke test of the script itself.")
    parser.add_argument("--card_gib", type=float, default=None, help="Emulate a GPU of this many GiB: once the model "
                        "is built, the process may allocate no more (torch.cuda.set_per_process_memory_fraction). "
                        "A variant that needs more reports OOM.")
    parser.add_argument("--out", default=None, help="Write the markdown table here (and the rows as .json).")
    return parser.parse_args(argv)


def build_transformer(model: str, lora: bool, device, fp8_base: bool = False, offload_frozen: bool = False):
    """The training script's own model builder, with random weights of the real architecture."""
    torch.manual_seed(0)
    method = LoraFineTune(16, 16, torch.bfloat16, fp8_base, offload_frozen) if lora else FullFineTune()
    transformer = method.build(model, PRESETS[model].transformer_config, random_init=True, device=device)
    return transformer, [p for p in transformer.parameters() if p.requires_grad]


def run_variant(args, variant: Variant, device) -> dict:
    if device.type == "cuda":  # before anything is allocated: the setting applies to new segments
        torch.cuda.memory._set_allocator_settings(f"expandable_segments:{variant.expandable_segments}")
        torch.cuda.set_per_process_memory_fraction(1.0)  # the build is not the emulated card's (--card_gib)
    transformer, params = build_transformer(args.model, args.lora, device, variant.fp8_base, variant.offload_frozen)
    transformer.train()
    limit_memory(args.card_gib, device)  # the card's limit applies to training, not to the build
    recompute = 0.0
    if variant.checkpoint_fraction:
        recompute = speed.checkpoint_blocks(transformer, variant.checkpoint_fraction) / len(
            transformer.transformer_blocks
        )
    if variant.fp8:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        convert_to_float8_training(transformer.transformer_blocks, config=Float8LinearConfig.from_recipe_name(
            "rowwise"), module_filter_fn=lambda module, name: ".norm" not in name)  # adaLN stays bf16
    torch._inductor.config.coordinate_descent_tuning = variant.coordinate_descent  # global: set every time
    torch._functorch.config.activation_memory_budget_runtime_estimator = variant.budget_estimator
    if variant.compile:
        speed.compile_transformer_blocks(transformer, variant.compile_mode, variant.activation_memory_budget,
                                         variant.multi_kernel)
    optimizer = torch.optim.AdamW(
        params, lr=1e-5, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1,
        fused=variant.fused_adamw, foreach=None if variant.fused_adamw else True,
    )
    config = PRESETS[args.model].transformer_config
    generator = torch.Generator(device).manual_seed(1)
    shape = (variant.batch_size, 16, 1, args.height // 8, args.width // 8)
    x0 = torch.randn(shape, device=device, generator=generator)
    text_dtype = torch.bfloat16 if args.lora else torch.float32
    text = torch.randn(variant.batch_size, 512, config["text_embed_dim"], device=device, generator=generator)
    text = text.to(text_dtype)

    def step(seed: int) -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = diffusion_loss(transformer, x0, text, generator=torch.Generator(device).manual_seed(seed))
        loss.backward()
        if variant.clip_in_adamw:
            speed.clip_grad_norm_in_fused_adamw(optimizer, params, 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    reset_peak_memory()
    first_loss = step(0).item()  # same weights, inputs and noise in every variant
    for i in range(args.warmup - 1):
        step(i + 1)
    if device.type == "cuda":
        torch.cuda.reset_accumulated_memory_stats()  # count allocator retries in the timed steps only
    with Timer() as timer:
        for i in range(args.steps):
            step(100 + i)
    memory = dict(peak_gib=peak_gib(), **allocator_stats())
    if args.profile:
        print(profile_kernels(lambda: step(1000), args.profile, variant.name), flush=True)
    samples_per_s = args.steps * variant.batch_size / timer.seconds
    flops = train_flops_per_sample(config, args.height, args.width, args.lora, recompute)
    tflops = samples_per_s * flops / 1e12
    row = dict(
        variant=variant.name, batch=variant.batch_size, samples_per_s=samples_per_s,
        step_ms=1000 * timer.seconds / args.steps, tflops=tflops, mfu=f"{100 * tflops / args.peak_tflops:.1f}%",
        first_loss=first_loss, **memory,
    )
    return row  # the model and optimizer go with this frame; main() then frees the cached memory


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    variants = LORA_VARIANTS if args.lora else FULL_VARIANTS
    if args.variants:  # the plain path (variant 0) always runs first: every ratio is against it
        variants = [variants[0]] + [variants[int(i)] for i in args.variants.split(",") if int(i) != 0]
    rows = []
    for variant in variants:
        print(f"--- {variant}", flush=True)
        torch._dynamo.reset()  # compiled graphs are reused across model instances: each variant compiles its own
        try:
            rows.append(run_variant(args, variant, device))
        except torch.OutOfMemoryError:
            rows.append(dict(variant=variant.name, batch=variant.batch_size, samples_per_s="OOM"))
        free_memory()
        print(rows[-1], flush=True)
    plain = rows[0]
    for row in rows:
        if isinstance(row.get("samples_per_s"), float) and isinstance(plain.get("samples_per_s"), float):
            row["speedup"] = f"{row['samples_per_s'] / plain['samples_per_s']:.2f}x"
            same_inputs = row["batch"] == plain["batch"]  # other batch sizes draw other noise
            rel = abs(row["first_loss"] - plain["first_loss"]) / abs(plain["first_loss"])
            row["loss_vs_plain"] = f"{rel:.1e}" if same_inputs else "n/a (other batch)"
    kind = "LoRA r16" if args.lora else "full fine-tune"
    card = f", emulated {args.card_gib:g} GiB card" if args.card_gib else ""
    header = (
        f"### {args.model} {kind}, {args.width}x{args.height}, {device_name()}{card}, "
        f"torch {torch.__version__}"
    )
    columns = ["variant", "batch", "samples_per_s", "speedup", "step_ms", "tflops", "mfu", "peak_gib",
               "reserved_gib", "alloc_retries", "first_loss", "loss_vs_plain"]
    write_table(rows, columns, header, args.out)


if __name__ == "__main__":
    main()
