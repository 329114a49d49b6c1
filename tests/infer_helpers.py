"""What the inference and export tests share.

Checkpoints in the trainer's layout (README "Checkpoints"), built directly from the tiny model with chosen weights and
LoRA settings: OUTPUT_DIR/checkpoints/iter_N/{model,trainer}/ and latest_checkpoint.txt, only what inference reads
(test_infer_from_trainer.py runs the real trainer too). And the reference: the same image straight from diffusers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from cosmos_t2i.lora import TARGET_MODULES

PROMPT = "An image of sks teal robot."


def stock_image(model_dir, transformer=None, seed=0, negative_prompt=None, aspect_ratio="16:9", steps=2):
    """The image diffusers' Cosmos2TextToImagePipeline makes itself, with the inputs infer_text2image.py passes."""
    from diffusers import Cosmos2TextToImagePipeline

    from cosmos_t2i.pipeline import NoGuardrail
    from cosmos_t2i.models import PRESETS

    extra = {"transformer": transformer} if transformer is not None else {}
    pipe = Cosmos2TextToImagePipeline.from_pretrained(model_dir, safety_checker=NoGuardrail(), dtype=torch.float32,
                                                      **extra)
    width, height = PRESETS["tiny"].resolutions[aspect_ratio]
    negative = {"negative_prompt": negative_prompt} if negative_prompt else \
        {"negative_prompt_embeds": torch.zeros(1, 512, pipe.transformer.config.text_embed_dim)}
    image = pipe(prompt=PROMPT, height=height, width=width, num_inference_steps=steps, guidance_scale=4.0,
                 generator=torch.Generator().manual_seed(seed), **negative).images[0]
    return np.asarray(image)



def tiny_transformer(**overrides):
    from diffusers import CosmosTransformer3DModel

    from cosmos_t2i.models import PRESETS

    torch.manual_seed(0)
    return CosmosTransformer3DModel(**dict(PRESETS["tiny"].transformer_config, **overrides))


def _iteration_dir(output_dir: Path, iteration: int, model: str) -> Path:
    name = f"iter_{iteration:09d}"
    iter_dir = Path(output_dir) / "checkpoints" / name
    (iter_dir / "trainer").mkdir(parents=True)
    (iter_dir / "trainer" / "config.json").write_text(json.dumps({"model": model}))
    (iter_dir / "trainer" / "state.json").write_text(json.dumps({"iteration": iteration, "data_position": iteration}))
    (Path(output_dir) / "checkpoints" / "latest_checkpoint.txt").write_text(name)
    return iter_dir


def perturbed_transformer(seed: int, amount: float = 0.5, **overrides):
    """The tiny transformer (the tiny pipeline's own weights) moved by seeded noise: a stand-in for a fine-tune."""
    transformer = tiny_transformer(**overrides)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in transformer.parameters():
            param.add_(amount * param.abs().mean() * torch.randn(param.shape, generator=generator))
    return transformer


def make_full_checkpoint(output_dir, ema: bool = True, iteration: int = 500, model: str = "tiny", **overrides):
    """A full fine-tune: model/ (and model/ema/) as diffusers transformer folders, different from the base."""
    iter_dir = _iteration_dir(output_dir, iteration, model)
    perturbed_transformer(seed=1, **overrides).save_pretrained(iter_dir / "model")
    if ema:
        perturbed_transformer(seed=2, **overrides).save_pretrained(iter_dir / "model" / "ema")
    return iter_dir


def lora_transformer(rank: int = 4, alpha: float = 8.0, seed: int = 0, **overrides):
    """The tiny transformer with a PEFT LoRA whose B is not zero (so it changes the output)."""
    from peft import LoraConfig

    transformer = tiny_transformer(**overrides)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGET_MODULES, init_lora_weights=False)
    torch.manual_seed(seed)
    transformer.add_adapter(config)
    return transformer


def save_lora(transformer, folder: Path) -> Path:
    """diffusers' format, the way a diffusers training script saves it (config in the safetensors metadata)."""
    from diffusers.loaders.lora_pipeline import CosmosLoraLoaderMixin
    from peft.utils import get_peft_model_state_dict

    CosmosLoraLoaderMixin.save_lora_weights(
        folder, transformer_lora_layers=get_peft_model_state_dict(transformer),
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
    )
    return folder


def make_lora_checkpoint(output_dir, ema: bool = True, iteration: int = 500, model: str = "tiny", seed: int = 1,
                         **lora_kwargs):
    """A LoRA run: model/pytorch_lora_weights.safetensors (and model/ema/), adapters drawn from `seed`."""
    iter_dir = _iteration_dir(output_dir, iteration, model)
    save_lora(lora_transformer(seed=seed, **lora_kwargs), iter_dir / "model")
    if ema:
        save_lora(lora_transformer(seed=seed + 1000, **lora_kwargs), iter_dir / "model" / "ema")
    return iter_dir
