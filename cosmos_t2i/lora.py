"""LoRA as NVIDIA's Cosmos-Predict2 recipe sets it up, saved in diffusers' format.

Targets: in every transformer block, self- and cross-attention q, k, v, out and both MLP linears (NVIDIA's
`q_proj,k_proj,v_proj,output_proj,mlp.layer1,mlp.layer2`, in diffusers' names). B starts at zero, so the adapted
model starts exactly at the base model.

Saved as `pytorch_lora_weights.safetensors` with keys `transformer.transformer_blocks.N.attn1.to_q.lora_A.weight`
and the adapter config (rank, alpha, targets) in the file's metadata, so that a fresh transformer loads it with
`transformer.load_lora_adapter(folder, weight_name=WEIGHT_NAME, prefix="transformer")` and gets the same scaling.
"""

from __future__ import annotations

from pathlib import Path

import torch

TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PREFIX = "transformer"
ADAPTER_NAME = "default"  # what `transformer.add_adapter(config)` calls it


def lora_config(rank: int = 16, alpha: int = 16):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=TARGET_MODULES)


def save_lora(directory: str | Path, transformer, state_dict: dict[str, torch.Tensor]) -> None:
    """Write the adapter weights found in `state_dict` (named like `transformer`'s own parameters)."""
    from diffusers.loaders.lora_pipeline import CosmosLoraLoaderMixin
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(transformer, state_dict=state_dict, adapter_name=ADAPTER_NAME)
    CosmosLoraLoaderMixin.save_lora_weights(
        directory,
        transformer_lora_layers={k: v.contiguous() for k, v in layers.items()},
        weight_name=WEIGHT_NAME,
        transformer_lora_adapter_metadata=transformer.peft_config[ADAPTER_NAME].to_dict(),
    )


def read_lora(directory: str | Path) -> dict[str, torch.Tensor]:
    """A saved adapter's tensors, renamed to the parameter names of a transformer holding the adapter."""
    from safetensors.torch import load_file

    saved = load_file(str(Path(directory) / WEIGHT_NAME))
    renamed = {}
    for key, tensor in saved.items():
        name = key.removeprefix(PREFIX + ".")
        for part in ("lora_A", "lora_B"):
            name = name.replace(f".{part}.", f".{part}.{ADAPTER_NAME}.")
        renamed[name] = tensor
    return renamed
