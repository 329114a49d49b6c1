"""Attention kernels at Cosmos' shapes: forward + backward time of each PyTorch SDPA backend.

Self-attention of one 768x1360 image: 4080 tokens, head dim 128 (2B: 16 heads, 14B: 40 heads), bf16.

    python benchmarks/bench_attention.py --batch 2 --heads 16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import Timer, device_name, write_table  # noqa: E402

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=4080)
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    shape = (args.batch, args.heads, args.tokens, args.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    flops_fwd = 4 * args.batch * args.heads * args.tokens**2 * args.head_dim
    rows, reference = [], None
    for name, backend in BACKENDS.items():
        with sdpa_kernel(backend):
            def fwd():
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)

            def fwd_bwd():
                fwd().backward(grad)

            try:
                out = fwd()
            except RuntimeError as error:
                rows.append(dict(backend=name, fwd_ms=f"unavailable: {error}"[:60]))
                continue
            reference = out.detach() if reference is None else reference
            for _ in range(3):
                fwd_bwd()
            with Timer() as t_fwd:
                for _ in range(args.iters):
                    fwd()
            with Timer() as t_all:
                for _ in range(args.iters):
                    fwd_bwd()
        fwd_ms, all_ms = 1000 * t_fwd.seconds / args.iters, 1000 * t_all.seconds / args.iters
        rows.append(dict(backend=name, fwd_ms=fwd_ms, fwd_tflops=flops_fwd / fwd_ms / 1e9,
                         fwd_bwd_ms=all_ms, fwd_bwd_tflops=3.5 * flops_fwd / all_ms / 1e9,
                         max_abs_diff_vs_first=(out.detach() - reference).abs().max().item()))
    header = f"### SDPA backends, shape {shape} bf16, {device_name()}, torch {torch.__version__}"
    columns = ["backend", "fwd_ms", "fwd_tflops", "fwd_bwd_ms", "fwd_bwd_tflops", "max_abs_diff_vs_first"]
    write_table(rows, columns, header, args.out)


if __name__ == "__main__":
    main()
