"""LoRA for `CosmosTransformer3DModel`, in one place: NVIDIA's training setup, our file format (diffusers'), the one
reader, checks against a model, applying (several, scaled, fused), and the ComfyUI export.

Training: in every transformer block, self- and cross-attention q, k, v, out and both MLP linears (NVIDIA's
`q_proj,k_proj,v_proj,output_proj,mlp.layer1,mlp.layer2`, in diffusers' names). B starts at zero, so the adapted
model starts exactly at the base model.

Our format is diffusers': `pytorch_lora_weights.safetensors` with keys
`transformer.transformer_blocks.N.attn1.to_q.lora_A.weight` ([r, in]) / `lora_B.weight` ([out, r]) and PEFT's
LoraConfig (r, lora_alpha, rank/alpha patterns) as JSON in the safetensors metadata (`lora_adapter_metadata`), so
that a fresh transformer loads it with `transformer.load_lora_adapter(folder, weight_name=WEIGHT_NAME,
prefix="transformer")` and gets the same scaling. Without metadata, diffusers takes alpha = r, and so do we.

ComfyUI's format (its Cosmos-Predict2 model is NVIDIA's `MiniTrainDIT`, so NVIDIA's module names): keys
`diffusion_model.blocks.N.self_attn.q_proj.lora_A.weight` / `lora_B.weight` plus a scalar `....alpha`. ComfyUI maps
every `diffusion_model.<module>` of its model to that module's weight (its "generic lora format"), reads lora_A/lora_B
as PEFT does, and scales by alpha / r; writing alpha makes that scale equal PEFT's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path

import torch
from diffusers.loaders.lora_pipeline import CosmosLoraLoaderMixin
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError, safe_open

from .models import describe_architecture
from .nvidia_format import diffusers_to_nvidia_module
from .user_errors import BadValue, unreadable_file

TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PREFIX = "transformer"  # the pipeline component the LoRA belongs to; its keys start with "transformer."
ADAPTER_NAME = "default"  # what `transformer.add_adapter(config)` calls it
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
COMFYUI_PREFIX = "diffusion_model."


def lora_config(rank: int = 16, alpha: int = 16) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=TARGET_MODULES)


def lora_layers(transformer, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors of `state_dict`, under the names our file uses: a checkpoint save takes these at the save
    step and writes them (write_lora_layers) then or, in the background, later."""
    return get_peft_model_state_dict(transformer, state_dict=state_dict, adapter_name=ADAPTER_NAME)


def lora_metadata(transformer) -> dict:
    return transformer.peft_config[ADAPTER_NAME].to_dict()


def write_lora_layers(directory: str | Path, layers: dict[str, torch.Tensor], metadata: dict) -> None:
    CosmosLoraLoaderMixin.save_lora_weights(
        directory,
        transformer_lora_layers={k: v.contiguous() for k, v in layers.items()},
        weight_name=WEIGHT_NAME,
        transformer_lora_adapter_metadata=metadata,
    )


@dataclasses.dataclass
class Lora:
    state_dict: dict  # "<diffusers module>.lora_A.weight" / ".lora_B.weight", no "transformer." prefix
    config: dict  # LoraConfig kwargs
    source: str

    @property
    def modules(self) -> list[str]:
        return sorted({k.rsplit(".lora_", 1)[0] for k in self.state_dict})

    def down(self, module: str) -> torch.Tensor:
        return self.state_dict[f"{module}.lora_A.weight"]

    def up(self, module: str) -> torch.Tensor:
        return self.state_dict[f"{module}.lora_B.weight"]

    def scale(self, module: str) -> float:
        """PEFT's scaling of this module: alpha / r (alpha / sqrt(r) with rsLoRA), patterns resolved as PEFT does."""
        rank = self.down(module).shape[0]
        alpha_pattern = self.config.get("alpha_pattern") or {}
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), self.config.get("lora_alpha", rank))
        return alpha / (math.sqrt(rank) if self.config.get("use_rslora") else rank)

    def parameters(self, adapter_name: str = ADAPTER_NAME) -> dict[str, torch.Tensor]:
        """The tensors under the names of a transformer's parameters once it holds the adapter `adapter_name`."""
        return {name.replace(".lora_A.", f".lora_A.{adapter_name}.").replace(".lora_B.", f".lora_B.{adapter_name}."):
                tensor for name, tensor in self.state_dict.items()}


def read_lora(path: str | Path, source: str | None = None) -> Lora:
    """The LoRA in `path`: a .safetensors file in our format, or a folder holding WEIGHT_NAME (a checkpoint's model/).
    `source` names it in messages (default: the path)."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHT_NAME
    source = source or str(path)
    key_prefix = f"{PREFIX}."
    with unreadable_file(f"LoRA {source}" + (f" ({path})" if str(path) != source else ""),
                         (OSError, SafetensorError)):
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state_dict = {k: f.get_tensor(k) for k in f.keys()}
    if any(k.startswith(key_prefix) for k in state_dict):
        state_dict = {k.removeprefix(key_prefix): v for k, v in state_dict.items() if k.startswith(key_prefix)}
    bad = [k for k in state_dict if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if bad or not state_dict:
        raise BadValue(f"LoRA {source}: not a diffusers LoRA for the transformer (expected keys "
                         f"'transformer.<module>.lora_A.weight' / 'lora_B.weight'; found e.g. {bad[:3]}).")
    config = json.loads(metadata[METADATA_KEY]) if METADATA_KEY in metadata else {}
    # A pipeline-level save prefixes the config's keys with the component name; a model-level save does not.
    if any(k.startswith(key_prefix) for k in config):
        config = {k.removeprefix(key_prefix): v for k, v in config.items() if k.startswith(key_prefix)}
    return Lora(state_dict, config, source)


def check_lora_fits(lora: Lora, transformer) -> None:
    """Every LoRA module must be a Linear of the model with matching shapes; say what does not fit and why."""
    modules = dict(transformer.named_modules())
    missing, wrong_shape = [], []
    for name in lora.modules:
        layer = modules.get(name)
        layer = getattr(layer, "base_layer", layer)  # already wrapped by an earlier adapter
        if not isinstance(layer, torch.nn.Linear):
            missing.append(name)
            continue
        down, up = lora.down(name), lora.up(name)
        if down.shape[1] != layer.in_features or up.shape[0] != layer.out_features or up.shape[1] != down.shape[0]:
            wrong_shape.append(f"{name}: LoRA {tuple(up.shape)} x {tuple(down.shape)}, model "
                               f"[{layer.out_features}, {layer.in_features}]")
    if not (missing or wrong_shape):
        return
    model = describe_architecture(transformer.config)
    message = f"LoRA {lora.source} does not fit the model ({model}):"
    if missing:
        message += (f" {len(missing)} of its modules are not Linear layers of CosmosTransformer3DModel, e.g. "
                    f"{', '.join(missing[:3])} (a LoRA for another model, or in another key format?)")
    if wrong_shape:
        message += f" {len(wrong_shape)} modules have other shapes (made for another model size?), e.g. " + \
                   "; ".join(wrong_shape[:3])
    raise BadValue(message + ".")


def expand_scales(scales: list[float] | None, count: int) -> list[float]:
    """`--lora_scale`: one value per LoRA, or one for all (default 1)."""
    if scales and not count:
        raise BadValue("--lora_scale without a LoRA to scale.")
    scales = list(scales or [1.0])
    if len(scales) == 1:
        scales *= count
    if len(scales) != count:
        raise BadValue(f"{len(scales)} --lora_scale values for {count} LoRAs: give one per LoRA or one for all.")
    return scales


def apply_loras(transformer, loras: list[Lora], scales: list[float], fuse: bool = False) -> list[str]:
    """Load each LoRA as a PEFT adapter, weighted by its scale; with `fuse`, fold them into the weights and drop
    the adapter layers (faster sampling, same result up to rounding). Returns the adapter names."""
    names = []
    for index, lora in enumerate(loras):
        check_lora_fits(lora, transformer)
        name = f"lora_{index}"
        with warnings.catch_warnings():  # PEFT warns that a second adapter is a second adapter: here it is meant
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            transformer.load_lora_adapter(dict(lora.state_dict), prefix=None, adapter_name=name,
                                          metadata=lora.config or None)
        names.append(name)
    transformer.set_adapters(names, weights=list(scales))
    if fuse:
        transformer.fuse_lora(adapter_names=names)
        transformer.unload_lora()
    return names


def to_comfyui(lora: Lora) -> dict:
    """The same tensors under ComfyUI's names for Cosmos-Predict2 (NVIDIA module names), with alpha = scale * r."""
    out = {}
    for module in lora.modules:
        nvidia = diffusers_to_nvidia_module(module)
        if nvidia is None:
            raise BadValue(f"LoRA {lora.source}: module {module} has no NVIDIA/ComfyUI name.")
        down, up = lora.down(module), lora.up(module)
        out[f"{COMFYUI_PREFIX}{nvidia}.lora_A.weight"] = down
        out[f"{COMFYUI_PREFIX}{nvidia}.lora_B.weight"] = up
        out[f"{COMFYUI_PREFIX}{nvidia}.alpha"] = torch.tensor(lora.scale(module) * down.shape[0])
    return out
