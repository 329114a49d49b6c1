"""Our sampler against the stock Cosmos2TextToImagePipeline: the wrapper adds no math."""

import numpy as np
import pytest
import torch

from cosmos_t2i.pipeline import load_pipeline
from cosmos_t2i.sampling import _guardrail_frames_to_output, decode_images, sample_latents


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


@pytest.mark.parametrize("output_type", ["np", "pil"])
def test_decode_matches_pipeline_images(pipe_and_embeds, output_type):
    pipe, prompt, negative = pipe_and_embeds
    kwargs = dict(height=48, width=96, num_inference_steps=3, guidance_scale=4.0)
    stock = pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, output_type=output_type,
                 generator=torch.Generator().manual_seed(5), **kwargs).images
    latents = sample_latents(pipe, prompt, negative, generator=torch.Generator().manual_seed(5), batched_cfg=False,
                             **kwargs)
    ours = decode_images(pipe, latents, output_type=output_type)
    stock, ours = [np.asarray(a) for a in stock], [np.asarray(a) for a in ours]
    assert len(ours) == 2 and ours[0].shape == stock[0].shape == (48, 96, 3)
    assert ours[0].dtype == stock[0].dtype
    assert all((a == b).all() for a, b in zip(ours, stock))


def test_guardrail_conversion_table_is_the_pipelines_own_on_every_pixel_value(pipe_and_embeds):
    """decode_images post-processes through a 256-entry table: it must equal the pipeline's float passes on an
    image holding every value (in every channel and position), not only on the values a test image happens to hit."""
    pipe = pipe_and_embeds[0]
    rng = np.random.default_rng(0)
    frames = rng.permutation(np.tile(np.arange(256, dtype=np.uint8), 36)).reshape(1, 1, 32, 96, 3)
    video = torch.from_numpy(frames.astype(np.float32) / 255.0 * 2 - 1).permute(0, 4, 1, 2, 3)
    for output_type in ("np", "pil"):
        stock = np.asarray(pipe.video_processor.postprocess_video(video, output_type=output_type)[0][0])
        ours = _guardrail_frames_to_output(pipe.video_processor, output_type)[frames][0, 0]
        assert ours.dtype == stock.dtype and np.array_equal(ours, stock)
    with pytest.raises(ValueError, match="'pil' or 'np'"):
        _guardrail_frames_to_output(pipe.video_processor, "pt")
