"""NVIDIA's .pt format: export then import is lossless with net./net_ema. kept apart, the names are NVIDIA's
module names (as diffusers' conversion script maps them), PEFT LoRA layers merge as W + (alpha/r) B A, and
torch.load's weights_only refusal is explained."""

import io
import re

import pytest
import torch
from infer_helpers import lora_transformer, make_full_checkpoint, make_lora_checkpoint, tiny_transformer
from diffusers import CosmosTransformer3DModel

import export_checkpoint
from cosmos_t2i.checkpoint_paths import resolve_checkpoint
from cosmos_t2i.models import check_same_architecture, resolve_model
from cosmos_t2i.nvidia_format import (diffusers_to_nvidia, diffusers_to_nvidia_module, load_nvidia_checkpoint,
                                      merge_peft_lora, nvidia_dims, nvidia_extra_state,
                                      nvidia_to_diffusers)
from cosmos_t2i.pipeline import load_transformer
from cosmos_t2i.models import PRESETS

# NVIDIA name -> diffusers name, read off TRANSFORMER_KEYS_RENAME_DICT_COSMOS_2_0 in diffusers'
# scripts/convert_cosmos_to_diffusers.py (the renames apply in order, as substring replacements).
FROM_THE_CONVERSION_TABLE = {
    "x_embedder.proj.1.weight": "patch_embed.proj.weight",
    "t_embedder.1.linear_1.weight": "time_embed.t_embedder.linear_1.weight",
    "t_embedding_norm.weight": "time_embed.norm.weight",
    "blocks.0.adaln_modulation_self_attn.1.weight": "transformer_blocks.0.norm1.linear_1.weight",
    "blocks.1.adaln_modulation_cross_attn.2.weight": "transformer_blocks.1.norm2.linear_2.weight",
    "blocks.0.adaln_modulation_mlp.1.weight": "transformer_blocks.0.norm3.linear_1.weight",
    "blocks.0.self_attn.q_proj.weight": "transformer_blocks.0.attn1.to_q.weight",
    "blocks.0.self_attn.k_norm.weight": "transformer_blocks.0.attn1.norm_k.weight",
    "blocks.1.cross_attn.v_proj.weight": "transformer_blocks.1.attn2.to_v.weight",
    "blocks.1.cross_attn.output_proj.weight": "transformer_blocks.1.attn2.to_out.0.weight",
    "blocks.0.mlp.layer1.weight": "transformer_blocks.0.ff.net.0.proj.weight",
    "blocks.1.mlp.layer2.weight": "transformer_blocks.1.ff.net.2.weight",
    "final_layer.adaln_modulation.1.weight": "norm_out.linear_1.weight",
    "final_layer.linear.weight": "proj_out.weight",
}


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, tmp_path_factory):
    return make_full_checkpoint(tmp_path_factory.mktemp("full_run"))


def weights(folder):
    return CosmosTransformer3DModel.from_pretrained(folder).state_dict()


def export(checkpoint, output, *extra):
    export_checkpoint.main(export_checkpoint.parse_args(
        ["nvidia", "--checkpoint", str(checkpoint), "--output", str(output), *extra]))
    return torch.load(output, weights_only=True)


def test_names_are_nvidias_and_every_weight_maps_both_ways():
    state_dict = tiny_transformer().state_dict()
    nvidia = diffusers_to_nvidia(state_dict)
    assert len(nvidia) == len(state_dict) == 47
    for nvidia_name, diffusers_name in FROM_THE_CONVERSION_TABLE.items():
        assert torch.equal(nvidia[nvidia_name], state_dict[diffusers_name])
    assert nvidia_to_diffusers(nvidia).keys() == state_dict.keys()


def test_round_trip_keeps_net_and_net_ema_apart(full_run, tmp_path):
    exported = export(full_run, tmp_path / "iter_000000500.pt", "--dtype", "float32")
    net = {k: v for k, v in exported.items() if k.startswith("net.")}
    ema = {k: v for k, v in exported.items() if k.startswith("net_ema.")}
    assert len(net) == len(ema) == 47 + len(TINY_NON_WEIGHT_KEYS) and len(exported) == 2 * len(net)
    assert "net.blocks.0.self_attn.q_proj.weight" in net and "net_ema.blocks.1.mlp.layer2.weight" in ema
    regular, averaged = weights(full_run / "model"), weights(full_run / "model" / "ema")
    assert torch.equal(net["net.blocks.0.self_attn.q_proj.weight"], regular["transformer_blocks.0.attn1.to_q.weight"])
    assert torch.equal(ema["net_ema.blocks.0.self_attn.q_proj.weight"],
                       averaged["transformer_blocks.0.attn1.to_q.weight"])

    for load_ema, expected in ((False, regular), (True, averaged)):
        checkpoint = resolve_checkpoint(str(tmp_path / "iter_000000500.pt"), load_ema)
        imported = load_transformer("tiny", checkpoint, dtype=torch.float32).state_dict()
        assert imported.keys() == expected.keys()
        assert all(torch.equal(imported[k], expected[k]) for k in expected)

    # The default export dtype is bfloat16 (NVIDIA's); importing gives exactly the bf16-rounded weights.
    export(full_run, tmp_path / "bf16.pt")
    imported = load_transformer("tiny", resolve_checkpoint(str(tmp_path / "bf16.pt")), dtype=torch.float32)
    assert all(torch.equal(v, regular[k].bfloat16().float()) for k, v in imported.state_dict().items())


# What NVIDIA's MiniTrainDIT holds besides weights, for the tiny config (2 blocks, head_dim 16, default attention
# backend), listed by hand from cosmos-predict2's text2image_dit.py and model_weights_stats.py.
TINY_NON_WEIGHT_KEYS = {
    "accum_video_sample_counter", "accum_image_sample_counter", "accum_iteration", "accum_train_in_hours",
    "pos_embedder.seq", "pos_embedder.dim_spatial_range", "pos_embedder.dim_temporal_range",
    "t_embedding_norm._extra_state",
    *(f"blocks.{b}.{attn}.{m}._extra_state" for b in (0, 1) for attn in ("self_attn", "cross_attn")
      for m in ("q_norm", "k_norm", "attn_op")),
}


def test_export_carries_the_buffers_and_extra_state_nvidias_dit_has(full_run, tmp_path):
    exported = export(full_run, tmp_path / "iter_000000500.pt")  # weights_only=True still loads it
    weight_names = set(diffusers_to_nvidia(weights(full_run / "model")))
    for prefix in ("net.", "net_ema."):
        state = {k.removeprefix(prefix): v for k, v in exported.items() if k.startswith(prefix)}
        assert state.keys() - weight_names == TINY_NON_WEIGHT_KEYS and weight_names <= state.keys()
        for name in ("accum_video_sample_counter", "accum_image_sample_counter", "accum_iteration"):
            assert state[name].dtype == torch.int64 and state[name].shape == () and state[name] == 0
        assert state["accum_train_in_hours"].dtype == torch.float32 and state["accum_train_in_hours"] == 0
        # VideoRopePosition3DEmb for max_size (4, 64, 64) / patch (1, 2, 2) and head_dim 16, by hand: seq runs to
        # max(4, 32, 32); dim_h = 16 // 6 * 2 = 4 -> [0, 2] / 4; dim_t = 16 - 8 = 8 -> [0, 2, 4, 6] / 8.
        assert torch.equal(state["pos_embedder.seq"], torch.arange(32.0))
        assert torch.equal(state["pos_embedder.dim_spatial_range"], torch.tensor([0.0, 0.5]))
        assert torch.equal(state["pos_embedder.dim_temporal_range"], torch.tensor([0.0, 0.25, 0.5, 0.75]))
        # TE's RMSNorm (a fusible op) without FP8 state saves an empty tensor; DotProductAttention gets None, which
        # TE's set_extra_state takes as "no FP8 state".
        assert all(state[k].numel() == 0 for k in TINY_NON_WEIGHT_KEYS if "_norm._extra_state" in k)
        assert all(state[k] is None for k in TINY_NON_WEIGHT_KEYS if k.endswith("attn_op._extra_state"))
    # Our own import skips them again.
    imported = load_transformer("tiny", resolve_checkpoint(str(tmp_path / "iter_000000500.pt")), torch.float32)
    assert imported.state_dict().keys() == weights(full_run / "model").keys()


def test_real_sizes_rope_and_attention_state():
    for preset, te_attention in (("2B", False), ("14B", True)):
        with torch.device("meta"):
            nvidia = diffusers_to_nvidia(CosmosTransformer3DModel(**PRESETS[preset].transformer_config).state_dict())
        extra = nvidia_extra_state(nvidia, max_size=(128, 240, 240), patch_size=(1, 2, 2))
        # The 2B's config uses the "minimal_a2a" attention (a function, no state); the 14B TE's DotProductAttention.
        assert ("blocks.0.self_attn.attn_op._extra_state" in extra) is te_attention
        assert sum(k.endswith("attn_op._extra_state") for k in extra) == (2 * nvidia_dims(nvidia)["num_layers"]
                                                                          if te_attention else 0)
        # head_dim 128: dim_h = 42 -> 21 frequencies (0, 2, ..) / 42; dim_t = 44 -> 22 of (0, 2, ..) / 44.
        assert torch.equal(extra["pos_embedder.seq"], torch.arange(128.0))
        assert extra["pos_embedder.dim_spatial_range"].shape == (21,)
        assert extra["pos_embedder.dim_spatial_range"][20].item() == pytest.approx(40 / 42)
        assert extra["pos_embedder.dim_temporal_range"].shape == (22,)
        assert extra["pos_embedder.dim_temporal_range"][21].item() == pytest.approx(42 / 44)


def test_lora_checkpoint_exports_merged(tiny_model_dir, tmp_path):
    run = make_lora_checkpoint(tmp_path / "run", ema=False)
    exported = export(run, tmp_path / "lora.pt", "--dtype", "float32")
    assert not any(k.startswith("net_ema.") for k in exported)
    imported = load_transformer("tiny", resolve_checkpoint(str(tmp_path / "lora.pt")), dtype=torch.float32)
    expected = lora_transformer(seed=1)  # the adapter the run saved, on the tiny base
    expected.fuse_lora()
    expected.unload_lora()
    torch.testing.assert_close(imported.state_dict(), expected.state_dict(), rtol=1e-6, atol=1e-6)


def to_nvidia_peft_name(key: str) -> str:
    """PEFT's wrapped diffusers name -> the same in NVIDIA's module names (how NVIDIA's LoRA runs save)."""
    for marker in (".base_layer.", ".lora_A.", ".lora_B."):
        if marker in key:
            module, rest = key.split(marker)
            return f"{diffusers_to_nvidia_module(module)}{marker}{rest}"
    module, leaf = key.rsplit(".", 1)
    return f"{diffusers_to_nvidia_module(module)}.{leaf}"


def test_nvidia_peft_lora_keys_merge_as_w_plus_alpha_over_r_b_a(tiny_model_dir, tmp_path):
    peft_model = lora_transformer(rank=4, alpha=8.0, seed=3)  # adapter "default", scale 8/4 = 2
    peft_weights = peft_model.state_dict()
    assert "transformer_blocks.0.attn1.to_q.lora_A.default.weight" in peft_weights
    nvidia = {to_nvidia_peft_name(k): v for k, v in peft_weights.items()}

    # One module by hand: W + (alpha / r) B A.
    merged = merge_peft_lora(nvidia, alpha=8.0)
    w = nvidia["blocks.0.self_attn.q_proj.base_layer.weight"]
    a, b = nvidia["blocks.0.self_attn.q_proj.lora_A.default.weight"], nvidia["blocks.0.self_attn.q_proj.lora_B.default.weight"]
    torch.testing.assert_close(merged["blocks.0.self_attn.q_proj.weight"], w + 2.0 * b @ a, rtol=0, atol=1e-6)
    assert not any("lora_" in k or "base_layer" in k for k in merged)

    # The whole file, net. and net_ema. as NVIDIA's trainer writes it, loaded for inference: same outputs as PEFT.
    torch.save({**{"net." + k: v for k, v in nvidia.items()}, **{"net_ema." + k: v for k, v in nvidia.items()}},
               tmp_path / "iter_000000100.pt")
    checkpoint = resolve_checkpoint(str(tmp_path / "iter_000000100.pt"))
    plain = load_transformer("tiny", checkpoint, dtype=torch.float32, nvidia_lora_alpha=8.0)
    inputs = dict(hidden_states=torch.randn(1, 16, 1, 6, 12), timestep=torch.tensor([0.5]),
                  encoder_hidden_states=torch.randn(1, 512, 32), padding_mask=torch.zeros(1, 1, 48, 96))
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).sample, peft_model(**inputs).sample, rtol=1e-5, atol=1e-5)


def test_nvidia_lora_merge_keeps_float32_of_a_bf16_file(tiny_model_dir, tmp_path):
    nvidia = {to_nvidia_peft_name(k): v.bfloat16() for k, v in lora_transformer(rank=4, alpha=4.0).state_dict().items()}
    torch.save({"net." + k: v for k, v in nvidia.items()}, tmp_path / "bf16_lora.pt")
    transformer = load_transformer("tiny", resolve_checkpoint(str(tmp_path / "bf16_lora.pt")), torch.float32)
    q = "blocks.0.self_attn.q_proj"
    w, a, b = (nvidia[f"{q}.{n}.weight"].float() for n in ("base_layer", "lora_A.default", "lora_B.default"))
    merged = transformer.transformer_blocks[0].attn1.to_q.weight
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged, w + b @ a, rtol=0, atol=1e-6)  # the float32 sum, not rounded to bf16
    assert not torch.equal(merged, (w + b @ a).bfloat16().float())


def test_weights_only_refusal_is_explained_and_trust_loads(tmp_path):
    state_dict = diffusers_to_nvidia(tiny_transformer().state_dict())
    # Transformer Engine keeps `_extra_state` as a pickled BytesIO: what weights_only=True refuses.
    state_dict["blocks.0.self_attn.q_norm._extra_state"] = io.BytesIO(b"te")
    torch.save({"net." + k: v for k, v in state_dict.items()}, tmp_path / "te.pt")
    with pytest.raises(ValueError, match="weights_only=True.*--trust_checkpoint"):
        load_nvidia_checkpoint(tmp_path / "te.pt")
    loaded = load_nvidia_checkpoint(tmp_path / "te.pt", trust_checkpoint=True)
    assert len(loaded) == 48
    transformer = load_transformer("tiny", resolve_checkpoint(str(tmp_path / "te.pt")), torch.float32,
                                   trust_checkpoint=True)
    assert torch.equal(transformer.proj_out.weight, state_dict["final_layer.linear.weight"])


def test_nvidia_checkpoint_of_another_size_or_model(tmp_path):
    with torch.device("meta"):
        big = CosmosTransformer3DModel(**PRESETS["14B"].transformer_config)
    dims = nvidia_dims(diffusers_to_nvidia(big.state_dict()))
    with pytest.raises(ValueError, match=re.escape(
            "checkpoint is 14B (36 blocks x 40 heads), --model is 2B (28 blocks x 16 heads): pass --model 14B.")):
        check_same_architecture(dims, resolve_model("2B"))

    wider = diffusers_to_nvidia(tiny_transformer(num_attention_heads=4).state_dict())
    torch.save({"net." + k: v for k, v in wider.items()}, tmp_path / "wider.pt")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'wider.pt'} is 2 blocks x 4 heads of 16, --model "
                                                   "is tiny")):
        load_transformer("tiny", resolve_checkpoint(str(tmp_path / "wider.pt")), torch.float32)

    video2world = dict(wider, **{"crossattn_proj.0.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="no diffusers name, e.g. crossattn_proj.0.weight"):
        nvidia_to_diffusers(video2world)
    with pytest.raises(ValueError, match="no EMA weights"):
        load_transformer("tiny", resolve_checkpoint(str(tmp_path / "wider.pt"), load_ema=True), torch.float32)
