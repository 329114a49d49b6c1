"""Speed levers that do not change the math, shared by training, inference and the benchmarks.

Each is measured against the plain path in benchmarks/ (numbers in BENCHMARKS.md), and each can be turned off,
except the gradient clip inside fused AdamW, which changes only a rounding (a division for a multiplication).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

# The SDPA kernels PyTorch ships (nothing to install). The chosen one goes first; the others stay allowed as
# fallbacks for shapes it does not support (the Wan VAE's single-head attention, for one).
ATTENTION_BACKENDS = ("cudnn", "flash", "efficient", "sdpa")


def compile_transformer_blocks(transformer, mode: str | None = None, activation_memory_budget: float = 1.0,
                               multi_kernel: bool = False) -> None:
    """torch.compile each transformer block in place (regional compilation).

    diffusers' `compile_repeated_blocks()` refuses this model (its `_repeated_blocks` is empty), and compiling the
    whole model recompiles on every bucket shape and takes minutes. `Module.compile()` compiles in place, so
    state-dict keys keep their names (no `_orig_mod.`) and checkpoints stay loadable anywhere. The blocks share one
    code object, so dynamo compiles it once per input shape and reuses it for all blocks.
    """
    # Five buckets x (train, eval) shapes fit well inside a larger recompile budget than the default 8. Without
    # automatic dynamic shapes every bucket gets its own static graph (a second shape would otherwise turn the
    # block's graph into a dynamic-shape one; with static graphs, batch 3 and 4 ran faster than batch 2 on the H100).
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    torch._dynamo.config.automatic_dynamic_shapes = False
    # Below 1, the partitioner keeps only this share of the activations a training graph would save and recomputes
    # the cheapest of the rest in the backward (elementwise ops first): memory for a larger batch at little cost.
    torch._functorch.config.activation_memory_budget = activation_memory_budget
    # Inductor writes a reduction over a long row (layer norm over 2048 channels, the fp8 amax over 8192) as a loop
    # that reads the row twice; multi-kernel also builds a one-pass version and keeps the faster after timing both
    # on first use. 2.3% of an fp8 2B image on the H100, none on a 2B training step (BENCHMARKS.md).
    torch._inductor.config.triton.multi_kernel = int(multi_kernel)
    if multi_kernel:
        # PyTorch 2.11 + Triton 3.6 (the device machine): a multi-kernel graph read back from inductor's FX graph
        # cache fails to load ("'NoneType' object does not support the context manager protocol" in Triton's
        # cache_key), so the second run on a machine crashed where the first had compiled. Without the FX graph
        # cache the graph is lowered again (seconds: Triton's kernel and autotuning caches still apply).
        torch._inductor.config.fx_graph_cache = False
    # Under DDP, dynamo would split every block's graph at DDP's 25 MB gradient-bucket boundaries (a 2B block holds
    # ~280 MB of fp32 weights) so that the all-reduce could start inside it; fusion and the activation budget then
    # apply piece by piece. A block is already a fine enough unit to overlap with: two H200s ran the 2B step at 89%
    # of one GPU's rate per GPU with the split, 95% without it and with DDP's gradients as bucket views (the trainer's
    # DistributedDataParallelKwargs; BENCHMARKS.md).
    torch._dynamo.config.optimize_ddp = False
    for block in transformer.transformer_blocks:
        inner = getattr(block, "_forward_under_checkpoint", None)
        if inner is None:
            block.compile(mode=mode)
        else:
            # The checkpoint stays outside the compiled region; traced inside it, the 14B LoRA step with every
            # block checkpointed ran slower compiled than eager (BENCHMARKS.md).
            block.forward = functools.partial(checkpoint, torch.compile(inner, mode=mode), use_reentrant=False)


def attention_backend(backend: str):
    """Context manager: PyTorch's scaled_dot_product_attention tries `backend` first ('sdpa' = PyTorch's order).

    The Cosmos attention processor calls SDPA, and a kernel is chosen when a compiled graph is traced, so wrap the
    whole training or sampling loop. On an H100 with PyTorch 2.11, 'sdpa' already runs Cosmos' attention (4080
    tokens, head dim 128, bf16) on cuDNN's kernel, 1.8x faster than flash (BENCHMARKS.md); the switch is for
    other GPUs and versions.
    """
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"Unknown attention backend {backend!r}: choose one of {', '.join(ATTENTION_BACKENDS)}.")
    if backend == "sdpa":
        return contextlib.nullcontext()
    order = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}
    first = order.pop(backend)
    return sdpa_kernel([first, *order.values(), SDPBackend.MATH], set_priority=True)


def checkpoint_blocks(transformer, fraction: float) -> int:
    """Activation-checkpoint the first `fraction` of the transformer blocks; returns how many.

    Selective checkpointing trades a share of recomputed forward for memory, instead of diffusers' all-or-nothing
    `enable_gradient_checkpointing()`. The block's `forward` is wrapped in place, so parameter names (and hence
    checkpoints) do not change. Call it before `compile_transformer_blocks`, which then compiles inside it.
    """
    blocks = transformer.transformer_blocks
    count = round(fraction * len(blocks))
    for block in list(blocks)[:count]:
        block._forward_under_checkpoint = block.forward
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return count


def single_frame_vae_convs(vae) -> int:
    """Run the Wan VAE's causal 3D convolutions as 2D ones on single-frame inputs (images); returns how many.

    On the first (here: only) frame a causal conv pads the time axis with kernel_t - 1 frames of zeros, so a
    3x3x3 conv spends two thirds of its work multiplying zeros. Only the kernel's last time slice meets the real
    frame: a 2D conv with that slice gives the same sums without the zero products. Inputs with more frames or a
    feature cache (videos) take the original path. Encoding (embed_captions.py) and decoding both benefit.
    """
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    count = 0
    for module in vae.modules():
        if isinstance(module, WanCausalConv3d):
            module.forward = functools.partial(_causal_conv_single_frame, module, module.forward)
            count += 1
    return count


def _causal_conv_single_frame(conv, conv3d_forward, x, cache_x=None):
    zero_padded_frames = conv._padding[4]
    if cache_x is not None or x.shape[2] != 1 or zero_padded_frames != conv.kernel_size[0] - 1 or conv.stride[0] != 1:
        return conv3d_forward(x, cache_x)
    pad_w, pad_h = conv._padding[0], conv._padding[2]  # symmetric in space
    out = torch.nn.functional.conv2d(x[:, :, 0], conv.weight[:, :, -1], conv.bias, stride=conv.stride[1:],
                                     padding=(pad_h, pad_w), dilation=conv.dilation[1:])
    return out.unsqueeze(2)


def clip_grad_norm_in_fused_adamw(optimizer, params, max_norm: float) -> torch.Tensor:
    """`clip_grad_norm_(params, max_norm)` with the scaling left to fused AdamW's next step; returns the total norm.

    clip_grad_norm_ multiplies every gradient by min(1, max_norm / (norm + 1e-6)) in a pass of its own: a read and
    a write of every fp32 gradient, 5.8 ms of a 706 ms 2B step on the H100. Fused AdamW divides each gradient by
    its `grad_scale` as it loads it (the hook GradScaler uses) and stores the result back, so the inverse factor
    there gives the same update (to a rounding: a division instead of a multiplication) and leaves .grad clipped.
    Only for torch's fused AdamW (the other implementations refuse grad_scale) on gradients that are whole tensors
    (not FSDP or DeepSpeed shards), and not with fp16's GradScaler, which sets grad_scale itself.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    if not (isinstance(inner, torch.optim.AdamW) and inner.defaults.get("fused")):
        raise ValueError("clip_grad_norm_in_fused_adamw needs torch.optim.AdamW(..., fused=True).")
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
    inner.grad_scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0)
    return norm
