"""`--offload_frozen`: a LoRA run whose frozen block weights live in (pinned) host memory and reach the GPU one block
at a time, the next block's copy overlapped with the current block's compute. 14B's bf16 blocks are 28 GB, its
fp8 ones (`--fp8_base`) 14 GB; offloaded, the GPU holds two or three blocks of them (0.8 GB each in bf16).

What moves: the token-wise Linear weights of every block (the layers `--fp8_base` stores in fp8, ~97% of the
parameters), in bf16 or, with `--fp8_base`, in fp8 with their scales. What stays on the GPU: the adapters, the
adaLN modulation, norms, embeddings and the final layer (small).

How (all of it here). Each block's frozen tensors are packed into one pinned host buffer, so a block is one
host-to-device copy. `BlockStreamer` keeps at most two blocks on the device (three while the GPU finishes with a
dropped one): the one running and the one it predicts next, copied on a side CUDA stream while the current one
computes (an event orders the compute after the copy). The prediction: forward runs blocks 0..N-1; after the last,
the backward runs N-1..0 (with activation checkpointing its recompute too: the recompute and the backward of a block
share one copy). At the end of each backward all copies are dropped, so between steps nothing is held on the device.
`OffloadedLinear`'s matmul saves no weight for the backward (it saves the layer's number): its input gradient asks
the streamer for the block again. That is what makes offload work with or without activation checkpointing:
autograd never holds a device copy.

Overlapped: every block's copy but the first of each step (block 0, fetched when the step's forward starts, while
nothing else runs on the GPU). Not overlapped either: the dequantisation of fp8 weights (on the compute stream, as
with `--fp8_base` alone). Bandwidth bound (an estimate, not measured): at ~50 GB/s (PCIe 5), 14B's bf16
blocks take ~0.55 s per pass, two passes a step; fp8 half of that.

Why not diffusers' `apply_group_offloading` (used for sampling in pipeline.py): it is built for inference. It swaps
`param.data` of the module's own parameters between host and device, but autograd keeps the tensor F.linear used,
whatever `.data` says later (checked: a backward after the swap still reads the old values), so without activation
checkpointing every block's device copy stays alive until the backward. With checkpointing, its block-level hooks
run on the block's `__call__`, which the non-reentrant recompute bypasses (it calls the inner forward); its
leaf-level hooks would run there, but copy layer by layer and prefetch in the first forward's order only, which the
backward walks the other way. Nor accelerate's `cpu_offload` (synchronous, per module, the same saved tensors).

With torch.compile (speed.compile_transformer_blocks): the layer's matmul and its input gradient are custom ops,
opaque calls inside each block's compiled graph that run the streamer when the graph runs (the streamer itself,
Python with streams and events, cannot be traced). One graph serves every block, as without offload.
"""

from __future__ import annotations

import collections
import itertools
import os
import weakref

import torch
from torch import nn

from .fp8 import quantize_block_by_block, replace_token_wise_linears
from .fp8_base import Float8StoredLinear, dequantize

_ALIGN = 64  # bytes: every packed tensor starts aligned for any dtype view


# Each OffloadedLinear by number, for the custom ops below (weakly: a model that goes frees its host buffers).
_LAYERS: weakref.WeakValueDictionary[int, OffloadedLinear] = weakref.WeakValueDictionary()
_NUMBERS = itertools.count()


# The streamer's work (copies on a side stream, events, dropping blocks) is Python with side effects, which dynamo
# cannot trace into a block's graph; as custom ops, the two matmuls are opaque calls inside the compiled graph, which
# run the streamer eagerly when the graph runs. The layer comes as a number in a CPU tensor, a graph input like the
# activations: as a Python int, dynamo would specialise every block's graph on its layers' numbers and recompile it
# for each block.
@torch.library.custom_op("cosmos_t2i::streamed_linear", mutates_args=())
def _streamed_linear(x: torch.Tensor, number: torch.Tensor, out_features: int, backward_follows: bool) -> torch.Tensor:
    weight, bias = _LAYERS[int(number)].device_weights(x.dtype, backward_follows)
    return nn.functional.linear(x, weight, bias)


@_streamed_linear.register_fake
def _(x, number, out_features, backward_follows):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("cosmos_t2i::streamed_linear_input_grad", mutates_args=())
def _streamed_linear_input_grad(grad_out: torch.Tensor, number: torch.Tensor, in_features: int) -> torch.Tensor:
    """The gradient for x only (W and b are frozen). Nothing of W was saved: it is fetched again through the
    streamer, so autograd holds no device copy."""
    weight, _ = _LAYERS[int(number)].device_weights(grad_out.dtype, backward_follows=False)
    return grad_out @ weight


@_streamed_linear_input_grad.register_fake
def _(grad_out, number, in_features):
    return grad_out.new_empty((*grad_out.shape[:-1], in_features))


def _setup_context(ctx, inputs, output):
    x, number, _, _ = inputs
    ctx.save_for_backward(number)
    ctx.in_features = x.shape[-1]


def _backward(ctx, grad_out):
    (number,) = ctx.saved_tensors
    return _streamed_linear_input_grad(grad_out, number, ctx.in_features), None, None, None


_streamed_linear.register_autograd(_backward, setup_context=_setup_context)


class OffloadedLinear(nn.Module):
    """A frozen block Linear (nn.Linear, or fp8_base's Float8StoredLinear) whose tensors the streamer holds on the
    host; it has no parameters or buffers, so `.to(device)` and `state_dict()` pass it by (the saved LoRA is the
    adapters' only, as always)."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.dtype = layer.in_features, layer.out_features, dtype
        self.fp8 = isinstance(layer, Float8StoredLinear)
        self.streamer, self.block, self.slot = None, None, None  # set by BlockStreamer
        number = next(_NUMBERS)
        _LAYERS[number] = self
        # A plain attribute, not a buffer: `.to(device)` leaves it on the CPU, where reading it costs no sync.
        self.number = torch.tensor(number)

    @staticmethod
    def host_tensors(layer: nn.Module) -> list[torch.Tensor | None]:
        """What goes to the host for `layer`: weight (fp8 or `dtype`), scale (fp8 only), bias."""
        if isinstance(layer, Float8StoredLinear):
            return [layer.weight_fp8, layer.weight_scale, layer.bias]
        return [layer.weight.detach(), None, None if layer.bias is None else layer.bias.detach()]

    def device_weights(self, dtype: torch.dtype, backward_follows: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight, scale, bias = self.streamer.tensors(self, backward_follows)
        weight = dequantize(weight, scale, dtype) if self.fp8 else weight.to(dtype)
        return weight, None if bias is None else bias.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Inside the op autograd is off; whether a backward will come is the caller's grad mode.
        return _streamed_linear(x.to(self.dtype), self.number, self.out_features, torch.is_grad_enabled())

    def extra_repr(self) -> str:
        storage = "fp8 e4m3" if self.fp8 else str(self.dtype)
        return f"in_features={self.in_features}, out_features={self.out_features}, {storage} offloaded to the host"


class _Packed:
    """One block's frozen tensors in one host buffer (pinned for asynchronous copies when the device is a GPU)."""

    def __init__(self, tensor_lists: list[list[torch.Tensor | None]], pin: bool):
        self.layout, size = [], 0
        for tensors in tensor_lists:
            entries = []
            for t in tensors:
                if t is None:
                    entries.append(None)
                    continue
                entries.append((size, t.numel() * t.element_size(), t.dtype, t.shape))
                size += -(-entries[-1][1] // _ALIGN) * _ALIGN
            self.layout.append(entries)
        self.host = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
        for tensors, entries in zip(tensor_lists, self.layout):
            for t, entry in zip(tensors, entries):
                if t is not None:
                    self.view(self.host, entry).copy_(t)

    @staticmethod
    def view(buffer: torch.Tensor, entry) -> torch.Tensor | None:
        if entry is None:
            return None
        offset, count, dtype, shape = entry
        return buffer[offset:offset + count].view(dtype).view(shape)

    def unpack(self, buffer: torch.Tensor) -> list[list[torch.Tensor | None]]:
        return [[self.view(buffer, entry) for entry in entries] for entries in self.layout]


class BlockStreamer:
    """Keeps the device copies of at most two blocks: the running one and the predicted next (module docstring).

    On a CPU run the "device copy" is the host buffer itself (nothing to move); `copy_on_cpu` makes a real copy
    there, so that tests can watch copies come and go."""

    def __init__(self, packed: list[_Packed], device, copy_on_cpu: bool = False):
        self.packed, self.device = packed, torch.device(device)
        self.copies = self.device.type != "cpu" or copy_on_cpu
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.resident: dict[int, tuple[list, torch.cuda.Event | None]] = {}
        self.current: int | None = None
        self._release_queued = False
        self._dropped: collections.deque[torch.cuda.Event] = collections.deque()
        self.fetches = 0  # copies made (tests)

    def tensors(self, layer: OffloadedLinear, backward_follows: bool) -> list[torch.Tensor | None]:
        # Inside a backward (the engine's graph task id is set, also for a checkpoint's recompute): run `release`
        # once this backward has finished, as FSDP does, so that nothing stays on the device between steps.
        in_backward = torch._C._current_graph_task_id() != -1
        if in_backward and not self._release_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self.release)
            self._release_queued = True
        if layer.block != self.current:
            self._enter(layer.block, in_backward, backward_follows)
        return self.resident[layer.block][0][layer.slot]

    def _enter(self, index: int, in_backward: bool, backward_follows: bool) -> None:
        if index not in self.resident:
            self.resident[index] = self._fetch(index)
        tensors, event = self.resident[index]
        if event is not None:  # the compute waits for this block's copy (once: later work is ordered after it)
            torch.cuda.current_stream(self.device).wait_event(event)
            self.resident[index] = (tensors, None)
        self.current = index
        last = len(self.packed) - 1
        if in_backward:
            following = index - 1 if index > 0 else None
        elif index < last:
            following = index + 1
        else:  # the forward's last block: the backward comes next, from the end (none without grad)
            following = index - 1 if backward_follows and index > 0 else None
        self._drop([i for i in self.resident if i not in (index, following)])
        if following is not None and following not in self.resident:
            self.resident[following] = self._fetch(following)

    def _fetch(self, index: int):
        packed = self.packed[index]
        if not self.copies:
            return packed.unpack(packed.host), None
        self.fetches += 1
        if self.stream is None:
            return packed.unpack(packed.host.to(self.device, copy=True)), None
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            buffer = packed.host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        # Allocated on the side stream, used on the compute stream: the allocator must not reuse the memory before
        # the compute stream is done with it, however early our last reference goes.
        buffer.record_stream(compute)
        return packed.unpack(buffer), event

    def _drop(self, indices: list[int]) -> None:
        for index in indices:
            del self.resident[index]  # its memory is reused once the compute stream is past it (record_stream)
        if self.stream is None or not indices:
            return
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        self._dropped.append(done)
        # The CPU runs ahead of the GPU. Unchecked, it would copy block after block into fresh memory while the GPU
        # still computes on the dropped ones; waiting for the drop before last keeps three blocks' copies at most,
        # and the CPU still a block ahead.
        while len(self._dropped) > 1:
            self._dropped.popleft().synchronize()

    def release(self) -> None:
        """Drop every device copy (the end of each backward; callable any time)."""
        self._drop(list(self.resident))
        self.current = None
        self._release_queued = False

    def device_bytes(self) -> int:
        """Bytes of the device copies held now (0 on a CPU run without `copy_on_cpu`)."""
        return sum(self.packed[i].host.numel() for i in self.resident) if self.copies else 0


def _pin_without_rounding(threshold_mb: int = 64) -> None:
    """torch's pinned-memory allocator rounds every allocation up to a power of two: a 14B bf16 block (0.78 GB) would
    pin 1 GB, 36 GB for 28 GB of weights. Above `pinned_max_round_threshold_mb` it pins the size asked. The setting
    is process-wide; one the user gave (PYTORCH_ALLOC_CONF) is kept, and a PyTorch without it rounds."""
    if "pinned_max_round_threshold_mb" in os.environ.get("PYTORCH_ALLOC_CONF", "") + \
            os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        return
    # The accelerator-generic call where this PyTorch has it (the CUDA one warns that it is deprecated there).
    setting = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
    try:
        setting(f"pinned_max_round_threshold_mb:{threshold_mb}")
    except (ValueError, RuntimeError):  # an older PyTorch: "Unrecognized key"
        pass


def offload_frozen_blocks(transformer, device, dtype: torch.dtype, fp8: bool = False,
                          copy_on_cpu: bool = False) -> BlockStreamer:
    """Replace every block's token-wise Linear (under its LoRA adapter) by an OffloadedLinear whose tensors are
    packed per block in host memory, then move the rest of `transformer` to `device`. With `fp8`, each block is
    quantized first (on `device`, as `--fp8_base` does: fast on a GPU) and its fp8 weights come back to the host.
    Call it on a transformer built on the CPU, after `add_adapter`. Returns the streamer (also
    `transformer.frozen_streamer`)."""
    device = torch.device(device)
    pin = device.type == "cuda"
    if pin:
        _pin_without_rounding()
    packed, layers_per_block = [], []

    def offload(block) -> int:
        layers = []

        def replace(linear: nn.Linear) -> nn.Module:
            layer = Float8StoredLinear(linear, dtype) if fp8 else linear
            layers.append((OffloadedLinear(layer, dtype), OffloadedLinear.host_tensors(layer)))
            return layers[-1][0]

        count = replace_token_wise_linears(block, replace)
        packed.append(_Packed([tensors for _, tensors in layers], pin))
        layers_per_block.append([layer for layer, _ in layers])
        return count

    # fp8: each block goes to the device to be quantized there; bf16: it stays on the host, nothing to compute.
    quantize_block_by_block(transformer, offload, device if fp8 else None)
    transformer.to(device)
    streamer = BlockStreamer(packed, device, copy_on_cpu)
    for block, layers in enumerate(layers_per_block):
        for slot, layer in enumerate(layers):
            layer.streamer, layer.block, layer.slot = streamer, block, slot
    transformer.frozen_streamer = streamer
    return streamer
