"""LoRA exports: ComfyUI's key names with the same tensors (and alpha, so ComfyUI's alpha/r equals PEFT's scale),
and LoRA(s) merged into one diffusers transformer folder that samples like the LoRA itself."""

import numpy as np
import pytest
import torch
from infer_helpers import PROMPT, lora_transformer, make_full_checkpoint, make_lora_checkpoint
from diffusers import CosmosTransformer3DModel
from PIL import Image
from safetensors.torch import load_file

import export_checkpoint
import infer_text2image as infer
from cosmos_t2i.checkpoint_paths import resolve_lora
from cosmos_t2i.lora import apply_loras, read_lora
from cosmos_t2i.models import load_base_transformer


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    return make_lora_checkpoint(tmp_path_factory.mktemp("lora_run"), rank=4, alpha=8.0)


def export(*argv):
    export_checkpoint.main(export_checkpoint.parse_args([str(a) for a in argv]))


def test_comfyui_names_tensors_and_alpha(lora_run, tmp_path):
    export("comfyui", "--lora", lora_run, "--output", tmp_path / "comfy.safetensors", "--dtype", "float32")
    comfy = load_file(tmp_path / "comfy.safetensors")
    ours = load_file(lora_run / "model" / "pytorch_lora_weights.safetensors")
    assert len(comfy) == len(ours) // 2 * 3  # lora_A, lora_B and alpha per module
    pairs = {
        "diffusion_model.blocks.0.self_attn.q_proj": "transformer.transformer_blocks.0.attn1.to_q",
        "diffusion_model.blocks.1.cross_attn.output_proj": "transformer.transformer_blocks.1.attn2.to_out.0",
        "diffusion_model.blocks.0.mlp.layer1": "transformer.transformer_blocks.0.ff.net.0.proj",
        "diffusion_model.blocks.1.mlp.layer2": "transformer.transformer_blocks.1.ff.net.2",
    }
    for comfy_name, our_name in pairs.items():
        for part in ("lora_A", "lora_B"):
            assert torch.equal(comfy[f"{comfy_name}.{part}.weight"], ours[f"{our_name}.{part}.weight"])
        assert comfy[f"{comfy_name}.alpha"].item() == 8.0

    # ComfyUI's arithmetic (W + alpha / rank * up @ down, rank = down.shape[0]) gives PEFT's fused weight.
    fused = lora_transformer(rank=4, alpha=8.0, seed=1)
    base = fused.transformer_blocks[1].attn2.to_out[0].base_layer.weight.detach().clone()
    fused.fuse_lora()
    name = "diffusion_model.blocks.1.cross_attn.output_proj"
    down, up, alpha = comfy[f"{name}.lora_A.weight"], comfy[f"{name}.lora_B.weight"], comfy[f"{name}.alpha"]
    comfy_weight = base + alpha / down.shape[0] * (up @ down)
    torch.testing.assert_close(comfy_weight, fused.transformer_blocks[1].attn2.to_out[0].base_layer.weight)

    # --load_ema exports the EMA adapter; the default dtype is bfloat16.
    export("comfyui", "--lora", lora_run, "--load_ema", "--output", tmp_path / "ema.safetensors")
    ema = load_file(tmp_path / "ema.safetensors")
    ema_ours = load_file(lora_run / "model" / "ema" / "pytorch_lora_weights.safetensors")
    key = "diffusion_model.blocks.0.self_attn.q_proj.lora_B.weight"
    assert ema[key].dtype == torch.bfloat16
    assert torch.equal(ema[key], ema_ours["transformer.transformer_blocks.0.attn1.to_q.lora_B.weight"].bfloat16())


def test_merged_diffusers_folder_samples_like_the_lora(lora_run, tmp_path):
    export("diffusers", "--model", "tiny", "--lora", lora_run, "--lora_scale", "0.8", "--output", tmp_path / "merged",
           "--dtype", "float32")
    merged = CosmosTransformer3DModel.from_pretrained(tmp_path / "merged")
    assert not any("lora" in k for k in merged.state_dict())

    def image(name, *extra):
        infer.main(infer.parse_args(["--model", "tiny", "--num_steps", "2", "--dtype", "float32", "--prompt",
                                     PROMPT, "--save_path", str(tmp_path / name), *extra]))
        return np.asarray(Image.open(tmp_path / name)).astype(int)

    # The merged folder holds the weights --fuse_lora makes, bit for bit...
    fused = load_base_transformer("tiny", torch.float32)
    apply_loras(fused, [read_lora(resolve_lora(str(lora_run)).path)], [0.8], fuse=True)
    expected = fused.state_dict()
    assert merged.state_dict().keys() == expected.keys()
    assert all(torch.equal(merged.state_dict()[k], expected[k]) for k in expected)
    # ...and samples the same image, within one grey level: loaded from a file, the weights sit at another memory
    # alignment than the ones fused in memory, which can change a CPU's float sums (a one-level pixel on CI's AMD
    # EPYC in the same case for the .pt export, tests/test_infer_from_trainer.py).
    with_lora = image("lora.png", "--lora", str(lora_run), "--lora_scale", "0.8")
    fused_image = image("fused.png", "--lora", str(lora_run), "--lora_scale", "0.8", "--fuse_lora")
    assert np.abs(fused_image - image("merged.png", "--dit_path", str(tmp_path / "merged"))).max() <= 1
    # Fused and unfused differ only by float32 rounding: at most one grey level here and there.
    assert np.abs(image("merged.png", "--dit_path", str(tmp_path / "merged")) - with_lora).max() <= 1


def test_full_checkpoint_plus_lora_and_errors(lora_run, tmp_path):
    full = make_full_checkpoint(tmp_path / "full", ema=False)
    export("diffusers", "--checkpoint", full, "--lora", lora_run, "--output", tmp_path / "merged", "--dtype",
           "float32")
    base = CosmosTransformer3DModel.from_pretrained(full / "model")
    merged = CosmosTransformer3DModel.from_pretrained(tmp_path / "merged")
    assert torch.equal(merged.proj_out.weight, base.proj_out.weight)  # not a LoRA target: unchanged
    assert not torch.equal(merged.transformer_blocks[0].attn1.to_q.weight, base.transformer_blocks[0].attn1.to_q.weight)

    with pytest.raises(FileExistsError, match="exists"):
        export("diffusers", "--model", "tiny", "--lora", lora_run, "--output", tmp_path / "merged")
    with pytest.raises(ValueError, match="is a full fine-tune checkpoint, not a LoRA"):
        export("comfyui", "--lora", full, "--output", tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="already an NVIDIA checkpoint"):
        torch.save({}, tmp_path / "x.pt")
        export("nvidia", "--checkpoint", tmp_path / "x.pt", "--output", tmp_path / "y.pt")
