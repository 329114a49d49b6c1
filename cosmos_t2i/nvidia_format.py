"""NVIDIA's own checkpoint format for Cosmos-Predict2 text2image, to and from diffusers' names.

NVIDIA's trainer saves `checkpoints/model/iter_N.pt`: one flat dict with the DiT (`MiniTrainDIT`) under `net.` and its
EMA copy under `net_ema.`, in NVIDIA's module names. A LoRA run saves PEFT's wrapped names in the same file
(`...q_proj.base_layer.weight`, `...q_proj.lora_A.default.weight`), with the base weights included.

The renaming is the one diffusers' `scripts/convert_cosmos_to_diffusers.py` applies for Cosmos 2.0
(`TRANSFORMER_KEYS_RENAME_DICT_COSMOS_2_0`), written here as an exact per-module table so that it inverts: the script
renames by substring replacement, which does not run backwards.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from .user_errors import BadValue, unreadable_file

NET, NET_EMA = "net.", "net_ema."

# NVIDIA module -> diffusers module, outside the blocks.
_TOP_LEVEL = {
    "x_embedder.proj.1": "patch_embed.proj",  # proj.0 is a Rearrange, no weights
    "t_embedder.1.linear_1": "time_embed.t_embedder.linear_1",  # t_embedder.0 is the sinusoidal Timesteps
    "t_embedder.1.linear_2": "time_embed.t_embedder.linear_2",
    "t_embedding_norm": "time_embed.norm",
    "final_layer.adaln_modulation.1": "norm_out.linear_1",  # adaln_modulation.0 is a SiLU
    "final_layer.adaln_modulation.2": "norm_out.linear_2",
    "final_layer.linear": "proj_out",
}

# NVIDIA module -> diffusers module, inside `blocks.N` / `transformer_blocks.N`.
_IN_BLOCK = {
    "adaln_modulation_self_attn.1": "norm1.linear_1",
    "adaln_modulation_self_attn.2": "norm1.linear_2",
    "adaln_modulation_cross_attn.1": "norm2.linear_1",
    "adaln_modulation_cross_attn.2": "norm2.linear_2",
    "adaln_modulation_mlp.1": "norm3.linear_1",
    "adaln_modulation_mlp.2": "norm3.linear_2",
    "mlp.layer1": "ff.net.0.proj",
    "mlp.layer2": "ff.net.2",
}
for _nv_attn, _df_attn in (("self_attn", "attn1"), ("cross_attn", "attn2")):
    for _nv, _df in (("q_proj", "to_q"), ("k_proj", "to_k"), ("v_proj", "to_v"), ("output_proj", "to_out.0"),
                     ("q_norm", "norm_q"), ("k_norm", "norm_k")):
        _IN_BLOCK[f"{_nv_attn}.{_nv}"] = f"{_df_attn}.{_df}"

_TOP_LEVEL_INV = {v: k for k, v in _TOP_LEVEL.items()}
_IN_BLOCK_INV = {v: k for k, v in _IN_BLOCK.items()}

# State NVIDIA's model carries that diffusers recomputes or never had: RoPE tables, Transformer Engine's
# `_extra_state`, training counters. Dropped on import; export writes them back (nvidia_extra_state).
_NVIDIA_ONLY = re.compile(r"^(pos_embedder\.|accum_|logvar\.)|_extra_state$")


def nvidia_to_diffusers_module(name: str) -> str | None:
    """`blocks.3.self_attn.q_proj` -> `transformer_blocks.3.attn1.to_q`; None for a name NVIDIA's DiT does not have."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if match:
        inner = _IN_BLOCK.get(match[2])
        return f"transformer_blocks.{match[1]}.{inner}" if inner else None
    return _TOP_LEVEL.get(name)


def diffusers_to_nvidia_module(name: str) -> str | None:
    """`transformer_blocks.3.attn1.to_q` -> `blocks.3.self_attn.q_proj`; None for a name outside the table."""
    match = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", name)
    if match:
        inner = _IN_BLOCK_INV.get(match[2])
        return f"blocks.{match[1]}.{inner}" if inner else None
    return _TOP_LEVEL_INV.get(name)


def _rename(state_dict: dict, convert, direction: str) -> dict:
    out, unknown = {}, []
    for key, value in state_dict.items():
        module, _, leaf = key.rpartition(".")
        new_module = convert(module)
        if new_module is None:
            unknown.append(key)
        else:
            out[f"{new_module}.{leaf}"] = value
    if unknown:
        raise BadValue(f"{len(unknown)} keys have no {direction} name, e.g. {', '.join(unknown[:5])}. This is not a "
                       "Cosmos-Predict2 text2image DiT (Video2World and Cosmos 2.5 have other modules).")
    return out


def nvidia_to_diffusers(state_dict: dict) -> dict:
    """NVIDIA DiT weights (no `net.` prefix, LoRA already merged) -> `CosmosTransformer3DModel` state dict."""
    kept = {k: v for k, v in state_dict.items() if not _NVIDIA_ONLY.search(k)}
    return _rename(kept, nvidia_to_diffusers_module, "diffusers")


def diffusers_to_nvidia(state_dict: dict) -> dict:
    """`CosmosTransformer3DModel` state dict -> NVIDIA DiT names (no `net.` prefix)."""
    return _rename(state_dict, diffusers_to_nvidia_module, "NVIDIA")


def load_nvidia_checkpoint(path: str | Path, trust_checkpoint: bool = False) -> dict:
    """The flat state dict of an NVIDIA .pt (`net.*` / `net_ema.*`, or bare DiT keys), memory-mapped.

    `weights_only=True` first: it cannot run code from the file. NVIDIA's training checkpoints can hold pickled
    objects beyond tensors (Transformer Engine's `_extra_state`), which it refuses; then only an explicit
    `trust_checkpoint` loads them with `weights_only=False`.
    """
    try:
        # RuntimeError: torch's for a truncated or non-zip file ("PytorchStreamReader failed ...", "mmap can only ...").
        with unreadable_file(f"NVIDIA checkpoint {path}", (OSError, RuntimeError, EOFError)):
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        if not trust_checkpoint:
            reason = str(error).strip().splitlines()[0]
            raise BadValue(
                f"{path} holds Python objects besides tensors, which torch.load(weights_only=True) refuses "
                f"({reason}). NVIDIA's training checkpoints can carry such objects (e.g. Transformer Engine's "
                "`_extra_state`). If you trust where the file came from, pass --trust_checkpoint to load it with "
                "weights_only=False (that runs code stored in the file)."
            ) from error
        loaded = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    # Wrappers seen around DiT weights: {"model": ...} (NVIDIA's full training state) or {"state_dict": ...}.
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict) or not loaded:
        raise BadValue(f"{path} does not hold a state dict (found {type(loaded).__name__}).")
    return loaded


def split_net_ema(state_dict: dict) -> tuple[dict, dict]:
    """(regular weights, EMA weights), each without its prefix. Bare keys (a DiT saved on its own) are regular."""
    net, ema = {}, {}
    for key, value in state_dict.items():
        if key.startswith(NET_EMA):
            ema[key[len(NET_EMA):]] = value
        else:
            net[key.removeprefix(NET)] = value
    return net, ema


def merge_peft_lora(state_dict: dict, alpha: float | None = None, dtype: torch.dtype | None = None) -> dict:
    """Fold PEFT LoRA layers into plain weights: W = W_base + (alpha / r) B A, computed in float32.

    PEFT wraps each target as `X.base_layer.weight`, `X.lora_A.<adapter>.weight` [r, in], `X.lora_B.<adapter>.weight`
    [out, r]. The state dict does not store alpha; NVIDIA's LoRA configs all use alpha = rank (scale 1), the default
    here. A merged weight is rounded once, to `dtype` (default: its base weight's): asking for float32 keeps the
    float32 sum rather than rounding it to a bf16 file's dtype first.
    """
    lora_keys = {k for k in state_dict if ".lora_A." in k or ".lora_B." in k}
    merged = {k.replace(".base_layer.", "."): v for k, v in state_dict.items() if k not in lora_keys}
    downs = {k.split(".lora_A.")[0]: k.split(".lora_A.")[1].split(".")[0] for k in lora_keys if ".lora_A." in k}
    if len(set(downs.values())) > 1:
        raise BadValue(f"Found LoRA adapters {sorted(set(downs.values()))}; expected one to merge.")
    for module, adapter in downs.items():
        down = state_dict[f"{module}.lora_A.{adapter}.weight"].float()
        up = state_dict[f"{module}.lora_B.{adapter}.weight"].float()
        base_key = f"{module}.weight"
        if base_key not in merged:
            raise BadValue(f"LoRA layer {module} has no base weight ({module}.base_layer.weight) to merge into.")
        rank = down.shape[0]
        scale = (rank if alpha is None else alpha) / rank
        base = merged[base_key]
        merged[base_key] = (base.float() + scale * (up @ down)).to(dtype or base.dtype)
    return merged


def nvidia_dims(state_dict: dict) -> dict:
    """num_layers / num_attention_heads / attention_head_dim of an NVIDIA DiT state dict (no prefix), from shapes."""
    needed = ("x_embedder.proj.1.weight", "blocks.0.self_attn.q_norm.weight")
    if any(k not in state_dict for k in needed):
        raise BadValue(f"Not a Cosmos-Predict2 DiT: no {' / '.join(needed)} (keys start with "
                         f"{sorted(state_dict)[:3]}).")
    blocks = {int(m[1]) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    hidden = state_dict[needed[0]].shape[0]
    head_dim = state_dict[needed[1]].shape[0]
    return dict(num_layers=len(blocks), num_attention_heads=hidden // head_dim, attention_head_dim=head_dim)


# NVIDIA's DiT state beyond the weights, as its modules define it. Its trainer resumes with
# `load_state_dict(strict=True)`, which refuses a file without these keys. Read off nvidia-cosmos/cosmos-predict2 at
# 661da47 (Transformer Engine at v1.13, the version its pyproject pins):
# - `accum_*`: the training counters `WeightTrainingStat` (MiniTrainDIT's base) registers as buffers, all zero at
#   construction (cosmos_predict2/networks/model_weights_stats.py:43-51).
# - `pos_embedder.{seq,dim_spatial_range,dim_temporal_range}`: VideoRopePosition3DEmb's persistent buffers
#   (cosmos_predict2/models/text2image_dit.py:460-478, recomputed the same way in reset_parameters, :489-500).
# - `_extra_state` of each `te.pytorch.RMSNorm`: q_norm and k_norm of both attentions (text2image_dit.py:290,293) and
#   t_embedding_norm (:1292). TE 1.13 builds that RMSNorm on its fusible ops, whose extra state is `torch.Tensor()`
#   when there is no FP8 state (transformer_engine/pytorch/ops/op.py:506-535).
# - `attn_op._extra_state` of each attention that uses TE's DotProductAttention (text2image_dit.py:302), which is
#   MiniTrainDIT's default backend. Only the 2B's config picks "minimal_a2a" (configs/base/config_text2image.py:213),
#   a plain function with no state (module/a2a_cp.py:206-209). TE 1.13 pickles a BytesIO here, which
#   torch.load(weights_only=True) refuses; None is what every TE version's set_extra_state takes as "no FP8 state"
#   (module/base.py:623 at v1.13, still so in 2.x), and it keeps the file loadable without running pickled code.
_TRAINING_COUNTERS = {
    "accum_video_sample_counter": torch.int64,
    "accum_image_sample_counter": torch.int64,
    "accum_iteration": torch.int64,
    "accum_train_in_hours": torch.float32,
}
_MINIMAL_A2A_DIMS = dict(num_layers=28, num_attention_heads=16, attention_head_dim=128)  # the 2B


def rope_buffers(head_dim: int, max_size, patch_size) -> dict:
    """VideoRopePosition3DEmb's buffers for diffusers' `max_size` (T, H, W) and `patch_size`, as NVIDIA computes them:
    len_t/h/w = max_frames // patch_temporal, max_img_h // patch_spatial, ...; head_dim split h:w:t as 1/3:1/3:rest."""
    lengths = [size // patch for size, patch in zip(max_size, patch_size)]
    dim_h = head_dim // 6 * 2
    dim_t = head_dim - 2 * dim_h
    return {
        "pos_embedder.seq": torch.arange(max(lengths), dtype=torch.float),
        "pos_embedder.dim_spatial_range": torch.arange(0, dim_h, 2)[: dim_h // 2].float() / dim_h,
        "pos_embedder.dim_temporal_range": torch.arange(0, dim_t, 2)[: dim_t // 2].float() / dim_t,
    }


def nvidia_extra_state(weights: dict, max_size, patch_size) -> dict:
    """The non-weight entries NVIDIA's MiniTrainDIT carries (see above), for DiT `weights` in NVIDIA's names."""
    dims = nvidia_dims(weights)
    extra = {name: torch.tensor(0, dtype=dtype) for name, dtype in _TRAINING_COUNTERS.items()}
    extra.update(rope_buffers(dims["attention_head_dim"], max_size, patch_size))
    extra["t_embedding_norm._extra_state"] = torch.Tensor()
    te_attention = dims != _MINIMAL_A2A_DIMS
    for block in range(dims["num_layers"]):
        for attention in ("self_attn", "cross_attn"):
            prefix = f"blocks.{block}.{attention}"
            extra[f"{prefix}.q_norm._extra_state"] = torch.Tensor()
            extra[f"{prefix}.k_norm._extra_state"] = torch.Tensor()
            if te_attention:
                extra[f"{prefix}.attn_op._extra_state"] = None
    return extra


def save_nvidia_checkpoint(path: str | Path, net: dict, ema: dict | None, transformer_config: dict) -> None:
    """Write diffusers-named weights as NVIDIA's flat `net.*` (+ `net_ema.*`) dict with torch.save, each with the
    buffers and extra state NVIDIA's DiT has (`transformer_config`: the diffusers config, for the RoPE sizes)."""
    def as_nvidia(weights: dict) -> dict:
        renamed = {k: v.contiguous() for k, v in diffusers_to_nvidia(weights).items()}
        return renamed | nvidia_extra_state(renamed, transformer_config["max_size"], transformer_config["patch_size"])

    out = {NET + k: v for k, v in as_nvidia(net).items()}
    if ema:
        out.update({NET_EMA + k: v for k, v in as_nvidia(ema).items()})
    torch.save(out, path)
