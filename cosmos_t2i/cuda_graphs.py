"""The sampler's transformer call replayed from a CUDA graph: one launch per step instead of thousands.

A sampling step launches every kernel of 28 (2B) or 36 (14B) blocks. The CPU cost of that (dynamo's guards,
inductor's launchers, the eager code around the blocks) nearly matches the GPU time of a compiled fp8 step, so
the GPU waited on the CPU for part of every image (profiled on the H100, BENCHMARKS.md). A CUDA graph records one
call's kernels once and replays them with their recorded arguments: same kernels, same numbers.

What a graph keeps fixed, and why that holds here: the weights are read through their addresses (nothing replaces
a weight tensor during sampling; LoRAs are applied or fused before the first call), and the inputs are copied into
buffers recorded with the graph. A new input shape (resolution, batch) records a new graph; the graphs share one
memory pool (they never run at the same time, and each call's output is copied out before the next).
"""

from __future__ import annotations

import logging

import torch

from .sampling import call_transformer

logger = logging.getLogger(__name__)


class GraphedTransformer:
    """Callable like `transformer(hidden_states=..., timestep=..., encoder_hidden_states=..., padding_mask=...,
    return_dict=False)[0]`, replaying a CUDA graph per input shape. CUDA only."""

    def __init__(self, transformer, warmup_calls: int = 2):
        if transformer.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the transformer on a CUDA GPU, not {transformer.device}.")
        self._forward = call_transformer(transformer)
        self.warmup_calls = warmup_calls  # compilation, autotuning and cuDNN plans happen here, outside capture
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()

    def __call__(self, hidden_states, timestep, encoder_hidden_states, padding_mask) -> torch.Tensor:
        inputs = (hidden_states, timestep, encoder_hidden_states, padding_mask)
        key = tuple((t.shape, t.dtype, t.device) for t in inputs)
        if key not in self._graphs:
            if any(t.device.type != "cuda" for t in inputs):  # a CPU value would be baked into the graph
                raise ValueError("CUDA graphs need every transformer input on the GPU.")
            self._graphs[key] = self._record_or_none(inputs)
        if self._graphs[key] is None:
            return self._forward(*inputs)
        graph, static_inputs, static_output = self._graphs[key]
        for static, value in zip(static_inputs, inputs):
            static.copy_(value)
        graph.replay()
        return static_output.clone()  # the next replay overwrites static_output

    def _record_or_none(self, inputs):
        """The recorded graph, or None where recording ran out of memory (the graph keeps its own copy of one call's
        working memory): that shape is then sampled without a graph, as it would be with --no_cuda_graph."""
        try:
            return self._record(inputs)
        except (torch.OutOfMemoryError, RuntimeError) as error:
            # An allocation that fails during capture can also invalidate the capture, which then fails to end.
            if not any(isinstance(e, torch.OutOfMemoryError) for e in (error, error.__context__)):
                raise
        torch.cuda.empty_cache()
        logger.warning("Not enough GPU memory to record a CUDA graph for inputs of shape %s: sampling this size "
                       "without one (slower; --no_cuda_graph turns graphs off).", tuple(inputs[0].shape))
        return None

    @torch.no_grad()
    def _record(self, inputs):
        static_inputs = tuple(t.clone() for t in inputs)
        side = torch.cuda.Stream()  # warm-up off the default stream, as capture requires
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup_calls):
                self._forward(*static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_output = self._forward(*static_inputs)
        return graph, static_inputs, static_output
