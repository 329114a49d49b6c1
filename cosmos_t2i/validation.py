"""Validation images during training: the stock pipeline around the transformer being trained.

The prompts are T5-encoded once, before training, and the encoder freed: training itself never holds T5. The
pipeline (VAE decoder, scheduler) is built at the first validation and reused. Sampling follows NVIDIA's
inference: padded prompt embedding, zero negative embedding, 35 steps, guidance 4 (each a flag).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .checkpoint import iter_name
from .models import Model

METRIC_REFERENCE_IMAGES = 8  # training images (spread over the set) the validation images are compared with


class Validator:
    def __init__(self, model: Model, prompts: list[str], prompt_embeds: torch.Tensor, size: tuple[int, int],
                 num_inference_steps: int, guidance_scale: float, seed: int, output_dir: str | Path):
        self.model = model
        self.prompts = prompts
        self.prompt_embeds = prompt_embeds
        self.width, self.height = size
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.output_dir = Path(output_dir) / "validation"
        self.pipe = None
        self.metrics: ValidationMetrics | None = None  # --validation_metrics

    @torch.no_grad()
    def images(self, transformer, device, vae_dtype, text_dtype) -> list:
        """One PIL image per prompt from `transformer` (the live, possibly sharded, module)."""
        if self.pipe is None:
            from .pipeline import load_pipeline

            # NVIDIA's training samples its validation images without the guardrail; inference runs it.
            self.pipe = load_pipeline(self.model, device, dtype=vae_dtype, transformer=transformer,
                                      disable_guardrail=True, load_text_encoder=False)
            self.pipe.set_progress_bar_config(disable=True)
        images = []
        for i, prompt_embeds in enumerate(self.prompt_embeds):
            prompt_embeds = prompt_embeds[None].to(device, text_dtype)
            images += self.pipe(
                prompt_embeds=prompt_embeds, negative_prompt_embeds=torch.zeros_like(prompt_embeds),
                height=self.height, width=self.width, num_inference_steps=self.num_inference_steps,
                guidance_scale=self.guidance_scale, generator=torch.Generator(device).manual_seed(self.seed + i),
            ).images
        return images

    def save(self, images, iteration: int, trackers) -> list[Path]:
        """Write iter_<N>_<k>.jpg beside the checkpoints and log the images to TensorBoard or wandb."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for k, image in enumerate(images):
            paths.append(self.output_dir / f"{iter_name(iteration)}_{k}.jpg")
            image.save(paths[-1])
        for tracker in trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images("validation", np.stack([np.asarray(im) for im in images]), iteration,
                                          dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation": [wandb.Image(im, caption=p) for im, p in zip(images, self.prompts)]},
                            step=iteration)
        return paths


class ValidationMetrics:
    """--validation_metrics: CLIP-T of each validation image with its prompt, and DINO / CLIP-I against the first
    few training images (cosmos_t2i/fidelity.py), logged beside the images.

    The metric models are loaded at the first validation and wait on the CPU between validations, so training
    never holds them on the GPU. The reference images are embedded once.
    """

    def __init__(self, dataset_dir, dino_model: str, clip_model: str, num_references: int = METRIC_REFERENCE_IMAGES):
        from .dataset_format import IMAGE_COLUMN, load_embedded_dataset
        from .evaluation import spread

        dataset = load_embedded_dataset(dataset_dir)
        self.references = [dataset[i][IMAGE_COLUMN].convert("RGB") for i in spread(len(dataset), num_references)]
        self.dino_model, self.clip_model = dino_model, clip_model
        self.models = None
        self.reference = None

    def compute(self, images: list, prompts: list[str], device) -> dict[str, float]:
        """{"validation/dino", "validation/clip_i", "validation/clip_t"} of one validation's images."""
        from .fidelity import MetricModels, subject_metrics

        if self.models is None:
            self.models = MetricModels.load(self.dino_model, self.clip_model, device)
            self.reference = self.models.embed(self.references)
        else:
            self.models.to(device)
        try:
            scores = subject_metrics(self.models, images, prompts, self.reference)
        finally:
            self.models.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return {f"validation/{name}": value for name, value in scores.items()}
