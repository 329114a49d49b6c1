"""The CUDA-graphed sampler call (infer_text2image.py's default on a GPU): the same latents as the plain call.

The graph itself needs a GPU; on the CPU machines only the refusal runs. On the device machine:
    python -m pytest tests/test_cuda_graphs.py
"""

import pytest
import torch

from cosmos_t2i.cuda_graphs import GraphedTransformer
from cosmos_t2i.pipeline import load_pipeline
from cosmos_t2i.sampling import SAMPLERS, sample_latents

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def test_a_model_on_the_cpu_is_refused(tiny_model_dir):
    pipe = load_pipeline("tiny", dtype=torch.float32, load_text_encoder=False)
    with pytest.raises(ValueError, match="CUDA GPU"):
        GraphedTransformer(pipe.transformer)


@needs_cuda
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("batched_cfg", [True, False])
def test_graphed_sampling_gives_the_plain_samplers_latents_bit_for_bit(tiny_model_dir, batched_cfg, sampler):
    pipe = load_pipeline("tiny", device=torch.device("cuda"), dtype=torch.bfloat16, load_text_encoder=False)
    torch.manual_seed(0)
    dim = pipe.transformer.config.text_embed_dim
    prompt, negative = torch.randn(1, 512, dim), torch.zeros(1, 512, dim)
    graphed = GraphedTransformer(pipe.transformer)
    for height, width in [(48, 96), (64, 64), (48, 96)]:  # a second shape records a second graph; the first is reused
        kwargs = dict(height=height, width=width, num_inference_steps=4, guidance_scale=4.0, batched_cfg=batched_cfg,
                      sampler=sampler)
        plain = sample_latents(pipe, prompt, negative, generator=torch.Generator("cuda").manual_seed(1), **kwargs)
        ours = sample_latents(pipe, prompt, negative, generator=torch.Generator("cuda").manual_seed(1),
                              denoiser=graphed, **kwargs)
        assert torch.equal(ours, plain)
    assert len(graphed._graphs) == 2


@needs_cuda
def test_a_shape_whose_graph_does_not_fit_in_memory_is_sampled_without_one(tiny_model_dir, monkeypatch, caplog):
    pipe = load_pipeline("tiny", device=torch.device("cuda"), dtype=torch.bfloat16, load_text_encoder=False)
    dim = pipe.transformer.config.text_embed_dim
    prompt, negative = torch.randn(1, 512, dim), torch.zeros(1, 512, dim)
    graphed = GraphedTransformer(pipe.transformer)

    def out_of_memory(inputs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(graphed, "_record", out_of_memory)
    kwargs = dict(height=48, width=96, num_inference_steps=3, guidance_scale=4.0)
    plain = sample_latents(pipe, prompt, negative, generator=torch.Generator("cuda").manual_seed(1), **kwargs)
    ours = sample_latents(pipe, prompt, negative, generator=torch.Generator("cuda").manual_seed(1), denoiser=graphed,
                          **kwargs)
    assert torch.equal(ours, plain)
    assert list(graphed._graphs.values()) == [None]  # tried once for the shape, not at every step
    assert "Not enough GPU memory to record a CUDA graph" in caplog.text
