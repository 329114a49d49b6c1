"""fp8 matmuls for sampling: the transformer blocks' token-wise linear layers run on fp8 tensor cores.

An opt-in speed lever that changes the numbers (unlike cosmos_t2i/speed.py): weights are quantized once to
float8 e4m3 with one scale per output channel, activations on the fly with one scale per token, and
`torch._scaled_mm` multiplies them with the scales applied in its epilogue (bf16 out). That is the "rowwise"
recipe, the more accurate of the two common ones. The adaLN modulation layers (one row per image, negligible
FLOPs, and they scale every activation) and everything outside the blocks stay bf16. How far the result moves
from bf16 is measured in benchmarks/bench_infer.py and stated in BENCHMARKS.md.

torchao's `Float8DynamicActivationFloat8WeightConfig` is the same recipe, but it refuses to run without a CUDA
GPU of compute capability 8.9+, so it could not be tested here; these thirty lines run (and are tested) on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from .user_errors import BadValue, UserError

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
_MIN_AMAX = 1e-12  # an all-zero row would otherwise divide by zero

# Linear layers inside a block that see one row per image, not one per token (adaLN modulation): kept in bf16.
_PER_IMAGE_LAYERS = ("norm1.", "norm2.", "norm3.")


def quantize_rows(x: torch.Tensor, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 [M, K], float32 scale [M, 1]) with x ~ fp8 * scale, each row using the full fp8 range.

    `amax` [M, 1], each row's largest magnitude, when the caller knows it without a pass over x."""
    if amax is None:
        amax = x.abs().amax(dim=-1, keepdim=True)
    amax = amax.float().clamp(min=_MIN_AMAX)
    # Multiplied by FP8_MAX / amax rather than divided by the scale: a float32 division costs several
    # instructions per element, and these kernels took several times their memory traffic's time on the H100.
    fp8 = (x.float() * (FP8_MAX / amax)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return fp8, amax / FP8_MAX


class Float8Linear(nn.Module):
    """Inference-only replacement of an nn.Linear: fp8 weight (per output channel scale), fp8 activations."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = quantize_rows(linear.weight.detach())
        # Frozen parameters, not buffers: diffusers' group offloading (--offload) copies a block's buffers to the GPU
        # but, with CUDA streams, puts back only its parameters, so buffers stayed there (14B: 16.3 GiB, BENCHMARKS.md).
        self.weight_fp8 = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = nn.Parameter(scale.reshape(1, -1).contiguous(), requires_grad=False)  # [1, N]: _scaled_mm
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor, amax: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        x_fp8, x_scale = quantize_rows(rows, None if amax is None else amax.reshape(-1, 1))
        out = torch._scaled_mm(x_fp8, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale,
                               out_dtype=x.dtype, use_fast_accum=True)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 rowwise"


GELU_ARGMIN = -0.7517915246935645  # where GELU(x) = x Phi(x) is smallest: the root of Phi(x) + x phi(x)


def gelu_amax_from_range(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """max |GELU(x)| over a row, from the row's min `lo` and max `hi` alone.

    GELU falls from 0 to its minimum (-0.170) at GELU_ARGMIN and rises after it, so on [lo, hi] its magnitude is
    largest at hi or at the point of [lo, hi] nearest GELU_ARGMIN. Both are samples of the row, and rounding to
    bf16 is monotone, so this is exactly the max over GELU's bf16 outputs, except in a row with lo < GELU_ARGMIN
    and hi < 0.28 (GELU(hi) < 0.17), where it can exceed it by the curve's flatness near its minimum: a scale a
    hair coarser for a row of tiny values.
    """
    nearest_to_min = torch.minimum(torch.maximum(lo, torch.full_like(lo, GELU_ARGMIN)), hi)
    return torch.maximum(nn.functional.gelu(hi).abs(), nn.functional.gelu(nearest_to_min).abs())


class Float8GeluFeedForward(nn.Module):
    """diffusers' FeedForward(activation_fn="gelu") with both matmuls in fp8, the second one's activation scales
    taken from the range of GELU's input.

    Scaling GELU's output per row needs its max first: compiled, that evaluated erf twice per element (once for
    the max, once to quantize) and was the costliest non-matmul kernel of an fp8 step (240 us of a 1.9 ms 2B block
    on the H100). A row's min and max need no erf.
    """

    def __init__(self, feed_forward: nn.Module):
        super().__init__()
        self.fc1 = Float8Linear(feed_forward.net[0].proj)
        self.fc2 = Float8Linear(feed_forward.net[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        lo, hi = torch.aminmax(h, dim=-1, keepdim=True)
        return self.fc2(nn.functional.gelu(h), amax=gelu_amax_from_range(lo, hi))


def _is_exact_gelu_feed_forward(module: nn.Module) -> bool:
    from diffusers.models.activations import GELU
    from diffusers.models.attention import FeedForward

    if not isinstance(module, FeedForward) or len(module.net) != 3:
        return False
    activation, dropout, out = module.net
    return (type(activation) is GELU and activation.approximate == "none" and type(activation.proj) is nn.Linear
            and isinstance(dropout, nn.Dropout) and type(out) is nn.Linear)


def require_fp8_matmuls(device: torch.device, dtype: torch.dtype) -> None:
    """A clear error where fp8 matmuls cannot run (the CPU runs them, slowly: that is what the tests use)."""
    if device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise UserError(f"--fp8 needs fp8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell); "
                           f"{torch.cuda.get_device_name(device)} has {capability}. Run without --fp8.")
    if dtype != torch.bfloat16:  # PyTorch's CUDA rowwise-scaled matmul writes bf16 only
        raise BadValue(f"--fp8 computes in bfloat16 on a GPU: drop --dtype {str(dtype).removeprefix('torch.')}.")


def quantize_transformer_blocks(transformer, device=None) -> int:
    """Swap the token-wise nn.Linear layers of every transformer block for fp8 ones, in place; returns how many.

    Do it after LoRAs are fused (an unfused peft layer is not an nn.Linear and stays bf16) and before
    `speed.compile_transformer_blocks`, which then fuses the activation quantization into the preceding kernels.
    With `device`, the blocks reach it one at a time (`quantize_block_by_block`).
    """
    def quantize(block) -> int:
        count = 0
        if _is_exact_gelu_feed_forward(block.ff):
            block.ff = Float8GeluFeedForward(block.ff)
            count += 2
        return count + replace_token_wise_linears(block, Float8Linear)

    return quantize_block_by_block(transformer, quantize, device)


def quantize_block_by_block(transformer, quantize, device=None) -> int:
    """`quantize(block)` (which returns how many layers it replaced) on every block, each moved to `device` just
    before, and the rest of the model after: a transformer loaded on the CPU reaches the GPU holding only its
    quantized block weights and one block at full size (14B: 14 GB of fp8, not 28 + 14). Returns the total."""
    count = 0
    for block in transformer.transformer_blocks:
        if device is not None:
            block.to(device)
        count += quantize(block)
        if device is not None and torch.device(device).type == "cuda":
            torch.cuda.empty_cache()  # the block's bf16 weights were just freed: keep the allocator's pool small
    if device is not None:
        transformer.to(device)
    return count


def replace_token_wise_linears(block: nn.Module, make) -> int:
    """Replace each plain nn.Linear of `block` outside the adaLN modulation by `make(linear)`; returns how many.

    A LoRA layer's base layer (peft's `lora.Linear.base_layer`) is such a Linear too: it is replaced under the
    adapter, which keeps working on top of it; the adapter's own lora_A / lora_B Linears are left alone."""
    count = 0
    for name, module in list(block.named_modules()):
        if type(module) is not nn.Linear or name.startswith(_PER_IMAGE_LAYERS) or ".lora_" in f".{name}":
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(block.get_submodule(parent_name) if parent_name else block, child, make(module))
        count += 1
    return count


class _DeduplicateComputations:
    """Inductor post-grad pass: common-subexpression elimination, so an input is quantized once, not per layer.

    q, k and v read the same activations, and each Float8Linear quantizes its own input: without this the
    compiled block computes the same amax and fp8 cast three times (and twice for the cross-attention's text
    k, v). Inductor runs CSE on training graphs (the partitioner) and with `freezing`, but not on inference
    graphs of blocks compiled regionally; this is PyTorch's own pass (fx_graph_cse), applied to those graphs.
    """

    def __call__(self, graph) -> None:
        from torch._functorch.compile_utils import fx_graph_cse

        deduplicated = fx_graph_cse(graph)
        for node in reversed(list(graph.nodes)):
            graph.erase_node(node)
        graph.output(graph.graph_copy(deduplicated, {}))

    def uuid(self):
        return "cosmos_t2i.fp8.cse.v1"  # part of inductor's cache key: change it when the pass changes


def deduplicate_compiled_computations(enable: bool = True) -> None:
    """Install (or remove) the pass above for every graph compiled from now on in this process."""
    torch._inductor.config.post_grad_custom_pre_pass = _DeduplicateComputations() if enable else None
