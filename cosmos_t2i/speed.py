"""Speed levers that do not change the math, shared by training, inference and the benchmarks.

Each is measured against the plain path in benchmarks/ (numbers in BENCHMARKS.md), and each can be turned off.
"""

from __future__ import annotations

import torch

# Our short names -> diffusers' attention dispatcher backends (all are PyTorch SDPA kernels: nothing to install).
ATTENTION_BACKENDS = {
    "sdpa": "native",  # PyTorch picks the kernel (flash on H100 for bf16)
    "cudnn": "_native_cudnn",
    "flash": "_native_flash",
    "efficient": "_native_efficient",
}


def compile_transformer_blocks(transformer) -> None:
    """torch.compile each transformer block in place (regional compilation).

    diffusers' `compile_repeated_blocks()` refuses this model (its `_repeated_blocks` is empty), and compiling the
    whole model recompiles on every bucket shape and takes minutes. `Module.compile()` compiles in place, so
    state-dict keys keep their names (no `_orig_mod.`) and checkpoints stay loadable anywhere. The blocks share one
    code object, so dynamo compiles it once per input shape and reuses it for all blocks.
    """
    # Five buckets x (train, eval) shapes fit well inside a larger recompile budget than the default 8.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    for block in transformer.transformer_blocks:
        block.compile()


def set_attention_backend(transformer, backend: str) -> None:
    """Pick the attention kernel ('sdpa', 'cudnn', 'flash', 'efficient'); 'sdpa' leaves PyTorch's choice."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"Unknown attention backend {backend!r}: choose one of {', '.join(ATTENTION_BACKENDS)}.")
    if backend != "sdpa":
        transformer.set_attention_backend(ATTENTION_BACKENDS[backend])



def checkpoint_blocks(transformer, fraction: float) -> int:
    """Activation-checkpoint the first `fraction` of the transformer blocks; returns how many.

    Selective checkpointing trades a share of recomputed forward for memory, instead of diffusers' all-or-nothing
    `enable_gradient_checkpointing()`. The block's `forward` is wrapped in place, so parameter names (and hence
    checkpoints) do not change, and `Module.compile()` traces the wrapper like any other code.
    """
    import functools

    from torch.utils.checkpoint import checkpoint

    blocks = transformer.transformer_blocks
    count = round(fraction * len(blocks))
    for block in list(blocks)[:count]:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return count
