"""Our sampler against the stock Cosmos2TextToImagePipeline: the wrapper adds no math."""

import pytest
import torch

from cosmos_t2i.pipeline import load_pipeline
from cosmos_t2i.sampling import decode_images, sample_latents


@pytest.fixture(scope="module")
def pipe_and_embeds(tiny_model_dir):
    """The tiny pipeline (no T5) and two prompts' padded embeddings with NVIDIA's zero negative."""
    pipe = load_pipeline("tiny", dtype=torch.float32, load_text_encoder=False)
    torch.manual_seed(0)
    dim = pipe.transformer.config.text_embed_dim
    return pipe, torch.randn(2, 512, dim), torch.zeros(2, 512, dim)


def test_unbatched_cfg_reproduces_pipeline_exactly_and_batched_is_close(pipe_and_embeds):
    pipe, prompt, negative = pipe_and_embeds
    kwargs = dict(height=48, width=96, num_inference_steps=4, guidance_scale=4.0)
    stock = pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, output_type="latent",
                 generator=torch.Generator().manual_seed(3), **kwargs).images
    ours = sample_latents(pipe, prompt, negative, generator=torch.Generator().manual_seed(3), batched_cfg=False,
                          **kwargs)
    assert torch.equal(ours[:, :, 0], stock)
    batched = sample_latents(pipe, prompt, negative, generator=torch.Generator().manual_seed(3), **kwargs)
    torch.testing.assert_close(batched[:, :, 0], stock, rtol=1e-4, atol=1e-4)


def test_decode_matches_pipeline_images(pipe_and_embeds):
    pipe, prompt, negative = pipe_and_embeds
    kwargs = dict(height=48, width=96, num_inference_steps=3, guidance_scale=4.0)
    stock = pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, output_type="np",
                 generator=torch.Generator().manual_seed(5), **kwargs).images
    latents = sample_latents(pipe, prompt, negative, generator=torch.Generator().manual_seed(5), batched_cfg=False,
                             **kwargs)
    ours = decode_images(pipe, latents, output_type="np")
    assert len(ours) == 2 and ours[0].shape == stock[0].shape == (48, 96, 3)
    assert all((a == b).all() for a, b in zip(ours, stock))
