"""The transformer being trained: loaded (or randomly initialised), given LoRA adapters, saved and restored.

Precision: trained parameters are fp32 master weights (autocast does the bf16 compute). With LoRA the frozen base
is stored in the compute dtype: it is never updated, and 14B in fp32 would not leave room to train on one GPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint as ckpt
from .ema import PowerEMA
from .lora import lora_config, read_lora, save_lora
from .models import load_base_transformer


def build_transformer(model, config: dict, *, random_init: bool, lora: bool, rank: int | None,
                      alpha: int | None, frozen_dtype: torch.dtype, device, checkpoint: Path | None = None,
                      weights_arrive_later: bool = False):
    """The model to train, with resumed weights when `checkpoint` is given. Randomly initialised models are built
    directly on `device` (2B/14B take minutes to initialise on a CPU).

    `weights_arrive_later` (full fine-tune): build the structure only, in CPU memory that is allocated but never
    touched, because FSDP's cpu_ram_efficient_loading will send the main process's weights; 8 processes would
    otherwise each hold the whole fp32 model in host memory (14B: 8 x 56 GB). Not on `meta`: accelerate maps the
    optimizer's parameters to the sharded ones by their data pointers, which are all 0 there.
    """
    from diffusers import CosmosTransformer3DModel

    if weights_arrive_later and not lora:
        from accelerate import init_empty_weights

        with init_empty_weights():
            transformer = CosmosTransformer3DModel.from_config(config)
        return transformer.to_empty(device="cpu")
    dtype = frozen_dtype if lora else torch.float32
    if checkpoint is not None and not lora:
        transformer = CosmosTransformer3DModel.from_pretrained(checkpoint / ckpt.MODEL, dtype=dtype)
    elif random_init:
        with torch.device(device):
            transformer = CosmosTransformer3DModel.from_config(config).to(dtype)
    else:
        transformer = load_base_transformer(model, dtype)
    if lora:
        transformer.requires_grad_(False)
        transformer.add_adapter(lora_config(rank, alpha))
        for p in transformer.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        if checkpoint is not None:
            _load_trainable(transformer, read_lora(checkpoint / ckpt.MODEL).parameters())
    return transformer


@torch.no_grad()
def _load_trainable(transformer, tensors: dict[str, torch.Tensor]) -> None:
    params = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
    if params.keys() != tensors.keys():
        raise KeyError(f"Saved adapter does not match the model's: {sorted(params.keys() ^ tensors.keys())[:3]}")
    for name, p in params.items():
        p.copy_(tensors[name])


def save_weights(accelerator, transformer, ema: PowerEMA | None, lora: bool, directory: Path) -> None:
    """model/ (and model/ema/) of a checkpoint; every process calls this, the main process writes."""
    state_dict = accelerator.get_state_dict(transformer)  # gathered to the main process under FSDP / ZeRO-3
    ema_state = ema.full_state_dict(keep=accelerator.is_main_process) if ema is not None else None
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(transformer)
    write = save_lora if lora else ckpt.save_transformer
    write(directory, unwrapped, state_dict)
    if ema_state is not None:
        write(directory / ckpt.EMA, unwrapped, {**state_dict, **ema_state})


def load_ema(ema: PowerEMA, checkpoint: Path, lora: bool) -> None:
    directory = checkpoint / ckpt.MODEL / ckpt.EMA
    ema.load_full_state_dict(read_lora(directory).parameters() if lora else ckpt.read_transformer_weights(directory))
