"""The real trainer's checkpoints (tiny, 2 steps) through inference and every export: the layouts agree."""

import json

import numpy as np
import pytest
import torch
from infer_helpers import PROMPT, stock_image
from PIL import Image
from safetensors.torch import load_file
from train_helpers import train

import export_checkpoint
import infer_text2image as infer
from cosmos_t2i.checkpoint_paths import resolve_checkpoint
from cosmos_t2i.pipeline import load_transformer


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    common = ["--model", "tiny", "--random_init", "--synthetic_data", "48x96", "--max_iter", "2", "--save_iter", "2",
              "--report_to", "none", "--mixed_precision", "no", "--dataloader_num_workers", "0"]
    train(*common, "--output_dir", root / "full")
    # Enough steps and lr for the adapter (B = 0 at the start) to change the images visibly.
    train(*common, "--lora", "--learning_rate", "3e-2", "--max_iter", "10", "--save_iter", "10",
          "--output_dir", root / "lora")
    return root


def generate(tmp_path, name, *argv):
    # No --model: the run's trainer/config.json says tiny. --stock_vae: compared with diffusers' own decode below.
    infer.main(infer.parse_args(["--num_steps", "2", "--dtype", "float32", "--prompt", PROMPT, "--stock_vae",
                                 "--save_path", str(tmp_path / name), *argv]))
    return np.asarray(Image.open(tmp_path / name))


def test_full_fine_tune_with_ema(tiny_model_dir, runs, tmp_path):
    from diffusers import CosmosTransformer3DModel

    ema = generate(tmp_path, "ema.png", "--dit_path", str(runs / "full"), "--load_ema")
    assert json.loads((tmp_path / "ema.json").read_text())["model"] == "tiny"
    iter_dir = runs / "full" / "checkpoints" / "iter_000000002"
    ema_weights = CosmosTransformer3DModel.from_pretrained(iter_dir / "model" / "ema")
    assert np.array_equal(ema, stock_image(tiny_model_dir, ema_weights))

    pt = tmp_path / "iter_000000002.pt"
    export_checkpoint.main(export_checkpoint.parse_args(
        ["nvidia", "--checkpoint", str(iter_dir), "--output", str(pt), "--dtype", "float32"]))
    assert {k.split(".")[0] for k in torch.load(pt, weights_only=True)} == {"net", "net_ema"}
    # The .pt's EMA is the checkpoint's EMA bit for bit; its image may differ by one level on some CPUs (AMD EPYC in
    # CI), since torch.load leaves the weights at another memory alignment than safetensors (see
    # test_nvidia_pt_gives_the_same_images_as_the_checkpoint_it_came_from).
    from_pt = load_transformer("tiny", resolve_checkpoint(str(pt), True), torch.float32).state_dict()
    expected = ema_weights.state_dict()
    assert from_pt.keys() == expected.keys() and all(torch.equal(from_pt[k], expected[k]) for k in expected)
    from_pt_image = generate(tmp_path, "pt.png", "--model", "tiny", "--dit_path", str(pt), "--load_ema")
    assert np.abs(from_pt_image.astype(int) - ema).max() <= 1


def test_lora(tiny_model_dir, runs, tmp_path):
    from diffusers import CosmosTransformer3DModel

    iter_dir = runs / "lora" / "checkpoints" / "iter_000000010"
    ours = {"": generate(tmp_path, "lora.png", "--lora", str(iter_dir), "--model", "tiny"),
            "ema": generate(tmp_path, "lora_ema.png", "--dit_path", str(iter_dir), "--load_ema")}
    for sub, image in ours.items():  # what a user gets loading the adapter with diffusers' own API
        transformer = CosmosTransformer3DModel.from_pretrained(tiny_model_dir / "transformer")
        transformer.load_lora_adapter(str(iter_dir / "model" / sub), weight_name="pytorch_lora_weights.safetensors",
                                      prefix="transformer")
        assert np.abs(image.astype(int) - stock_image(tiny_model_dir, transformer)).max() <= 1, sub
        assert np.abs(image.astype(int) - stock_image(tiny_model_dir)).mean() > 0.5, sub  # the adapter acts
    export_checkpoint.main(export_checkpoint.parse_args(
        ["comfyui", "--lora", str(iter_dir), "--output", str(tmp_path / "comfy.safetensors")]))
    comfy = load_file(tmp_path / "comfy.safetensors")
    assert "diffusion_model.blocks.0.self_attn.q_proj.lora_B.weight" in comfy
    assert comfy["diffusion_model.blocks.0.self_attn.q_proj.alpha"].item() == 16.0  # NVIDIA's rank 16, alpha 16
