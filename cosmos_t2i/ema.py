"""NVIDIA's power EMA (Karras et al., EDM2): an fp32 copy of the trained weights, averaged with a decay that grows.

    beta(it) = (1 - 1/(it + 1)) ** (gamma + 1)          ema = beta * ema + (1 - beta) * weights

`it` is the 0-based index of the optimizer step just taken, so the first update copies the weights (beta(0) = 0).
gamma comes from the relative width s of the averaging profile (NVIDIA: s = 0.1, gamma ~ 6.94) as the largest real
root of gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0.

Only the trainable parameters are tracked: the whole transformer for a full fine-tune, the adapters for LoRA. Under
FSDP the parameters are DTensor shards and so is their EMA: each rank averages its own shard.
"""

from __future__ import annotations

import numpy as np
import torch

NVIDIA_SIGMA_REL = 0.1


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    t = sigma_rel**-2
    return float(np.roots([1.0, 7.0, 16.0 - t, 12.0 - t]).real.max())


class PowerEMA:
    def __init__(self, named_parameters, sigma_rel: float = NVIDIA_SIGMA_REL):
        self.gamma = gamma_from_sigma_rel(sigma_rel)
        self.params = {name: p for name, p in named_parameters if p.requires_grad}
        self.shadow = {name: p.detach().float().clone() for name, p in self.params.items()}

    def beta(self, iteration: int) -> float:
        return (1.0 - 1.0 / (iteration + 1)) ** (self.gamma + 1)

    @torch.no_grad()
    def update(self, iteration: int) -> None:
        # ema + (1 - beta) (p - ema) = beta ema + (1 - beta) p, in one pass over memory.
        torch._foreach_lerp_(list(self.shadow.values()), [p.detach().float() for p in self.params.values()],
                             1.0 - self.beta(iteration))

    def full_state_dict(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """Unsharded fp32 tensors where `keep` (the main process); every process must call this. Unsharded, they
        are the live shadow tensors (gather_full): a checkpoint's copier copies them."""
        return gather_full(self.shadow, keep)

    @torch.no_grad()
    def load_full_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        missing = self.shadow.keys() - state_dict.keys()
        if missing:
            raise KeyError(f"EMA checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        for name, t in self.shadow.items():
            t.copy_(shard_like(state_dict[name], t))


def gather_full(tensors: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """Whole tensors of possibly sharded (DTensor) ones, kept only where `keep`.

    A sharded tensor is gathered on its own (one collective per tensor, never the whole model at once, so under FSDP
    every process must call this) and moved to the CPU at once, so the GPU never holds the whole model. An unsharded
    one is returned as it is, live: a checkpoint save copies what it holds (host_copy.py: into pinned buffers,
    asynchronously, for a background save). A `.cpu()` here was a synchronous copy into fresh pageable memory,
    most of a background save's stop on the H200 (2B's EMA: 7.8 GB).
    """
    from torch.distributed.tensor import DTensor

    out = {}
    for name, t in tensors.items():
        if isinstance(t, DTensor):
            full = t.full_tensor()
            if keep:
                out[name] = full.detach().cpu()
        elif keep:
            out[name] = t.detach()
    return out


def shard_like(full: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`full` (unsharded) laid out like `t`: its local shard when `t` is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(t, DTensor):
        return distribute_tensor(full.to(t.device, t.dtype), t.device_mesh, t.placements)
    return full.to(t.device, t.dtype)
