"""LoRAs at inference: they change the output, scales and several LoRAs combine as PEFT defines, fused equals
unfused, and a LoRA that does not fit the model is refused with the reason."""

import numpy as np
import pytest
import torch
from infer_helpers import PROMPT, lora_transformer, make_lora_checkpoint, save_lora
from PIL import Image

import infer_text2image as infer
from cosmos_t2i.checkpoint_paths import resolve_lora
from cosmos_t2i.lora import apply_loras, read_lora
from cosmos_t2i.pipeline import load_pipeline

FAST = ["--model", "tiny", "--num_steps", "2", "--dtype", "float32"]


@pytest.fixture(scope="module")
def lora_runs(tiny_model_dir, tmp_path_factory):
    """Two LoRA runs in the trainer's layout (rank 4, alpha 8: a scale of 2 that a wrong alpha would show)."""
    root = tmp_path_factory.mktemp("lora_runs")
    return [make_lora_checkpoint(root / name, rank=4, alpha=8.0, seed=i + 1) for i, name in enumerate("ab")]


def run(save_path, *extra):
    infer.main(infer.parse_args([*FAST, "--prompt", PROMPT, "--save_path", str(save_path), *extra]))
    return np.asarray(Image.open(save_path)).astype(int)


def latents(loras, scales, fuse=False):
    """Final latents of the tiny pipeline with these LoRAs, from fixed embeddings (no T5, no VAE)."""
    pipe = load_pipeline("tiny", dtype=torch.float32, load_text_encoder=False)
    pipe.set_progress_bar_config(disable=True)
    if loras:
        apply_loras(pipe.transformer, loras, scales, fuse=fuse)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randn(1, 512, 32, generator=generator)
    return pipe(prompt_embeds=prompt, negative_prompt_embeds=torch.zeros_like(prompt), height=48, width=96,
                num_inference_steps=3, guidance_scale=4.0, output_type="latent",
                generator=torch.Generator().manual_seed(1)).images


def test_lora_changes_the_output_and_scale_zero_gives_the_base(lora_runs, tmp_path):
    base = run(tmp_path / "base.png")
    with_lora = run(tmp_path / "lora.png", "--lora", str(lora_runs[0]))
    assert np.abs(with_lora - base).mean() > 0.5  # grey levels
    assert np.array_equal(run(tmp_path / "zero.png", "--lora", str(lora_runs[0]), "--lora_scale", "0"), base)
    # Our LoRA checkpoint is just as well named by its model/ folder, its file, or as --dit_path.
    model_dir = lora_runs[0] / "model"
    assert np.array_equal(run(tmp_path / "m.png", "--lora", str(model_dir)), with_lora)
    assert np.array_equal(run(tmp_path / "f.png", "--lora", str(model_dir / "pytorch_lora_weights.safetensors")),
                          with_lora)
    assert np.array_equal(run(tmp_path / "d.png", "--dit_path", str(lora_runs[0])), with_lora)
    assert not np.array_equal(run(tmp_path / "e.png", "--dit_path", str(lora_runs[0]), "--load_ema"), with_lora)


def test_fused_equals_unfused_and_several_loras_add_up(lora_runs):
    a, b = (read_lora(resolve_lora(str(run_dir)).path) for run_dir in lora_runs)
    unfused = latents([a, b], [0.7, 0.4])
    fused = latents([a, b], [0.7, 0.4], fuse=True)
    # float32; fusing only reorders the arithmetic (x W^T + s x A^T B^T vs x (W + s B A)^T).
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unfused, latents([a], [0.7]), atol=1e-3)
    # A LoRA at scale 0 contributes nothing; the other one alone remains.
    torch.testing.assert_close(latents([a, b], [0.7, 0.0]), latents([a], [0.7]), rtol=1e-6, atol=1e-6)


def test_alpha_from_the_metadata_is_applied(lora_runs, tmp_path):
    """Same tensors saved without the adapter config: diffusers then assumes alpha = r (scale 1, not 2)."""
    from safetensors.torch import load_file, save_file

    original = lora_runs[0] / "model" / "pytorch_lora_weights.safetensors"
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(original), bare)
    with_alpha, without = read_lora(resolve_lora(str(original)).path), read_lora(resolve_lora(str(bare)).path)
    module = with_alpha.modules[0]
    assert (with_alpha.scale(module), without.scale(module)) == (2.0, 1.0)
    # Doubling B with alpha = r is the same adapter as alpha = 2r.
    doubled = dict(without.state_dict)
    doubled.update({k: 2 * v for k, v in doubled.items() if ".lora_B." in k})
    without.state_dict = doubled
    torch.testing.assert_close(latents([without], [1.0]), latents([with_alpha], [1.0]), rtol=1e-5, atol=1e-5)


def test_lora_that_does_not_fit(lora_runs, tmp_path):
    from safetensors.torch import load_file, save_file

    out = ["--prompt", PROMPT, "--save_path", str(tmp_path / "x.png")]

    def main(*argv):
        infer.main(infer.parse_args([*FAST, *out, *argv]))

    # Made for a wider model (head dim 32: hidden 256 instead of 128).
    wider = save_lora(lora_transformer(attention_head_dim=32), tmp_path / "wider")
    with pytest.raises(ValueError, match=r"does not fit the model \(tiny \(2 blocks x 8 heads\)\).*other shapes.*"
                                         r"transformer_blocks\.0\.attn1\.to_k: LoRA \(256, 4\) x \(4, 256\), model "
                                         r"\[128, 128\]"):
        main("--lora", str(wider))

    # Module names of another model (here NVIDIA's own names instead of diffusers').
    state = load_file(lora_runs[0] / "model" / "pytorch_lora_weights.safetensors")
    renamed = {k.replace("attn1.to_q", "self_attn.q_proj"): v for k, v in state.items()}
    save_file(renamed, tmp_path / "renamed.safetensors")
    with pytest.raises(ValueError, match=r"2 of its modules are not Linear layers.*self_attn\.q_proj"):
        main("--lora", str(tmp_path / "renamed.safetensors"))

    with pytest.raises(ValueError, match="2 --lora_scale values for 1 LoRAs"):
        main("--lora", str(lora_runs[0]), "--lora_scale", "1", "2")
    with pytest.raises(FileNotFoundError, match="no-such-lora"):
        main("--lora", str(tmp_path / "no-such-lora"))
