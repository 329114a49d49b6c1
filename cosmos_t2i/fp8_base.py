"""`--fp8_base`: the frozen base of a LoRA run stored in float8, half of bf16's memory, with the same adapters.

Stored in fp8: the token-wise nn.Linear weights of the transformer blocks (attention q, k, v, out and the
feed-forward, which hold ~97% of the parameters), as float8 e4m3 with one float32 scale per output channel
(fp8.quantize_rows: each output channel uses the whole e4m3 range). Unscaled e4m3 loses small channels to
underflow; the per-channel scale is what makes e4m3 usable here. Kept in bf16: the adaLN modulation layers (they
scale every activation of the block), the embeddings, norms and the final layer: small, and the output error of
each layer type in fp8 is measured in benchmarks/bench_memory.py (BENCHMARKS.md).

The matmuls themselves stay in the compute dtype: each call dequantises its weight (fp8 x scale, rounded once to
bf16), in the forward and again in the backward. The autograd function below saves the fp8 weight, never the
dequantised one, so a block that is not activation-checkpointed holds no bf16 copy of its weights either.

The adapters are peft's ordinary fp32 LoRA layers around these base layers: what is saved is a LoRA of the bf16
model, and nothing in the file knows about fp8.
"""

from __future__ import annotations

import torch
from torch import nn

from .fp8 import quantize_block_by_block, quantize_rows, replace_token_wise_linears


def dequantize(weight_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8 [N, K] x float32 scale [N, 1] -> [N, K] in `dtype`, computed in float32 and rounded once."""
    return (weight_fp8.float() * scale).to(dtype)


class _LinearOnDequantizedWeight(torch.autograd.Function):
    """x @ dequantize(W)^T + b, with the gradient for x only (the weight and bias are frozen)."""

    @staticmethod
    def forward(ctx, x, weight_fp8, scale, bias):
        ctx.save_for_backward(weight_fp8, scale)
        return nn.functional.linear(x, dequantize(weight_fp8, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        weight_fp8, scale = ctx.saved_tensors
        return grad_out @ dequantize(weight_fp8, scale, grad_out.dtype), None, None, None


class Float8StoredLinear(nn.Module):
    """A frozen nn.Linear whose weight is held in fp8 e4m3 (per output channel scale) and computed in `dtype`."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features, self.dtype = linear.in_features, linear.out_features, dtype
        weight, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight_fp8", weight)
        self.register_buffer("weight_scale", scale)  # [N, 1] float32
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LinearOnDequantizedWeight.apply(x.to(self.dtype), self.weight_fp8, self.weight_scale, self.bias)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize(self.weight_fp8, self.weight_scale, self.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 storage, {self.dtype}"


def store_blocks_in_fp8(transformer, device, dtype: torch.dtype = torch.bfloat16) -> int:
    """Quantize the token-wise Linear layers of every block in place, on their way to `device` one block at a time
    (fp8.quantize_block_by_block: a 14B base loaded on the CPU in bf16 is 28 GB, its blocks in fp8 14 GB). Returns
    how many layers were quantized. Call it after peft's `add_adapter`: the adapters then wrap nn.Linear layers as
    usual, and the base layer under each adapter is the one replaced."""
    return quantize_block_by_block(
        transformer, lambda block: replace_token_wise_linears(block, lambda linear: Float8StoredLinear(linear, dtype)),
        device)
