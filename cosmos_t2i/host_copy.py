"""Copies of training state in host memory, so that a checkpoint can be written while training goes on.

What must be copied: a tensor the training keeps updating in place, i.e. every CUDA tensor, and a CPU tensor whose
storage is one of the live ones (parameters, EMA, optimizer moments of a CPU run). A CPU tensor made for the save
(FSDP's gathered state dict, the EMA gathered from its shards) is already a private copy and is kept as it is.

Background saves (`reuse=True`) copy into buffers kept from one save to the next, pinned on a CUDA machine so that
the device-to-host copies are asynchronous on the training stream: the training thread only enqueues them, and the
writer waits for `ready` (a CUDA event) before reading. Allocating and pinning tens of GB each time would cost
seconds. A copy that would not fit in the memory the system has available is not made: the live tensor is kept and
`short` says so; the caller must then write before training goes on.

Synchronous saves (`reuse=False`) copy nothing: the writers read the live tensors before training goes on, moving
CUDA ones to the CPU as they write, and write the same bytes as from the copies.
"""

from __future__ import annotations

import logging
import weakref

import torch

logger = logging.getLogger(__name__)

HEADROOM = 0.1  # share of the machine's memory a background save leaves free for everything else


class HostCopier:
    def __init__(self, reuse: bool):
        self.reuse = reuse
        self.pin = reuse and torch.cuda.is_available()
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._kept_bytes = 0

    def begin(self, live: list[torch.Tensor]) -> None:
        """Start a snapshot; `live` are the tensors training updates in place (their storages must be copied)."""
        self._live: set[int] = set()
        self.also_live(live)
        self._memo: dict[tuple, torch.Tensor] = {}
        self._used: set[tuple] = set()
        self.held_bytes = 0  # host memory holding this snapshot
        self.short = False
        self._cuda = False

    def also_live(self, tensors) -> None:
        self._live |= {t.untyped_storage().data_ptr() for t in tensors if t.device.type == "cpu"}

    def __call__(self, obj, key: str = ""):
        """`obj` (tensors in dicts, lists and tuples) with its tensors copied where they must be."""
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, key)
        if isinstance(obj, dict):
            return {k: self(v, f"{key}/{k}") for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self(v, f"{key}/{i}") for i, v in enumerate(obj))
        return obj

    def _tensor(self, t: torch.Tensor, key: str) -> torch.Tensor:
        same = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype,
                t.device)
        if same in self._memo:  # one tensor under two names (a buffer in both model/ and ema/): one copy
            return self._memo[same]
        nbytes = t.numel() * t.element_size()
        if t.device.type == "cpu" and same[0] not in self._live:
            copy = t  # made for this save: private already
            self.held_bytes += nbytes
        elif not self.reuse:
            copy = t  # written before training goes on (and moved to the CPU one tensor at a time by the writers)
        else:
            copy = self._into_buffer(t, key, nbytes)
            self.held_bytes += nbytes if copy is not t else 0
        self._memo[same] = copy
        return copy

    def _into_buffer(self, t: torch.Tensor, key: str, nbytes: int) -> torch.Tensor:
        slot = (key, tuple(t.shape), t.dtype)
        buffer = self._buffers.get(slot)
        if buffer is None or slot in self._used:
            if not _room_for(nbytes):
                self.short = True
                return t
            buffer = self._allocate(t)
            self._buffers[slot] = buffer
        self._used.add(slot)
        if t.device.type == "cuda":
            self._cuda = True
            buffer.copy_(t.detach(), non_blocking=self.pin)
        else:
            buffer.copy_(t.detach())
        return buffer

    def _allocate(self, t: torch.Tensor) -> torch.Tensor:
        if self.pin:
            try:
                return self._pinned(t)
            except RuntimeError as error:  # pinned memory is limited (ulimit -l, containers)
                logger.warning("Pinned host memory refused (%s): copying checkpoints to pageable memory.", error)
                self.pin = False
        self._kept_bytes += t.numel() * t.element_size()
        return torch.empty(t.shape, dtype=t.dtype)

    def _pinned(self, t: torch.Tensor) -> torch.Tensor:
        """A pinned tensor like `t` with a storage of its own: ordinary host memory of the exact size, page-locked
        with cudaHostRegister. Not torch's pinned allocator, which rounds each allocation up to a power of two (for
        14B's 5120 x 5120 floats a 28% waste); and not slices of one pinned block either, because safetensors
        refuses to save tensors that share a storage, and torch.save would write the whole block for each."""
        buffer = torch.empty(t.shape, dtype=t.dtype)
        nbytes = buffer.numel() * buffer.element_size()
        if nbytes:
            _register(buffer)
        self._kept_bytes += nbytes
        return buffer

    def end(self):
        """A handle the writer waits on before reading the copies (the device-to-host copies still in flight)."""
        self._memo.clear()
        for slot in set(self._buffers) - self._used:  # a tensor that is gone: its buffer too
            del self._buffers[slot]
        if self._cuda:
            event = torch.cuda.Event()
            event.record()
            return event
        return None

    @property
    def buffer_bytes(self) -> int:
        """Host memory kept for the next save."""
        return self._kept_bytes


def _register(buffer: torch.Tensor) -> None:
    """Page-lock `buffer`'s memory for asynchronous copies; unlocked again when the tensor is freed."""
    cudart = torch.cuda.cudart()
    pointer, nbytes = buffer.data_ptr(), buffer.numel() * buffer.element_size()
    error = cudart.cudaHostRegister(pointer, nbytes, 0)
    if int(error) != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed (CUDA error {int(error)})")
    weakref.finalize(buffer, cudart.cudaHostUnregister, pointer)


def _room_for(nbytes: int) -> bool:
    """Whether `nbytes` more fit in memory the system has available, keeping HEADROOM of it free."""
    available, total = _meminfo()
    if available is None:
        return True
    return available - nbytes > HEADROOM * total


def _meminfo() -> tuple[int | None, int | None]:
    try:
        fields = dict(line.split(":", 1) for line in open("/proc/meminfo"))
        return int(fields["MemAvailable"].split()[0]) * 1024, int(fields["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None, None
