"""NVIDIA's own sampler (`--sampler nvidia`): its step, its order of accuracy, and what it feeds the transformer."""

import math

import numpy as np
import pytest
import torch

import infer_text2image as infer
from cosmos_t2i.pipeline import load_pipeline
from cosmos_t2i.sampling import _nvidia_ab2, ab2_step, call_transformer, nvidia_noise, nvidia_sigmas, sample_latents


def test_step_integrates_the_flow_with_x0_linear_in_log_sigma():
    """The step's closed form against numerical quadrature of x_next = e^-h x + int e^-(lam_next - l) x0(l) dl."""
    sigma_prev, sigma, sigma_next = 3.5, 2.0, 1.2
    x, x0, x0_prev = torch.tensor([0.7, -1.1]), torch.tensor([0.3, 0.9]), torch.tensor([-0.4, 0.2])
    lam_prev, lam, lam_next = (-math.log(v) for v in (sigma_prev, sigma, sigma_next))
    grid = torch.linspace(lam, lam_next, 200_001, dtype=torch.float64)[:, None]

    def quadrature(x0_of_lambda):
        return math.exp(lam - lam_next) * x.double() + torch.trapezoid(
            torch.exp(grid - lam_next) * x0_of_lambda, grid, dim=0)

    linear = x0.double() + (x0_prev.double() - x0.double()) * (grid - lam) / (lam_prev - lam)
    torch.testing.assert_close(ab2_step(x, sigma, sigma_next, x0, sigma_prev, x0_prev), quadrature(linear),
                               rtol=1e-9, atol=1e-10)
    # The first step has no previous prediction: x0 held constant.
    torch.testing.assert_close(ab2_step(x, sigma, sigma_next, x0), quadrature(x0.double().expand_as(linear)),
                               rtol=1e-9, atol=1e-10)


def test_sampler_is_second_order_on_gaussian_data():
    """For data N(m, s^2) the ideal denoiser and the flow's endpoint are known in closed form: the sampler's error
    must fall 4x per halving of the step (second order), where Euler steps on the same sigmas fall 2x."""
    m, s = 0.3, 0.5
    noise = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 80

    def ideal_x0(x, sigma):
        return (m + (x.double() - m) * s**2 / (s**2 + sigma.double() ** 2)).float()

    sigma_min = nvidia_sigmas(1)[-1].item()
    x_end = m + (noise.double() - m) * math.sqrt(s**2 + sigma_min**2) / math.sqrt(s**2 + 80.0**2)
    exact = m + (x_end - m) * s**2 / (s**2 + sigma_min**2)

    def ab2_error(num_steps):
        out = _nvidia_ab2(lambda x, sigma: (ideal_x0(x, sigma), None), noise, num_steps, 4.0, lambda steps: steps)
        return (out.double() - exact).abs().max().item()

    def euler_error(num_steps):
        sigmas, x = nvidia_sigmas(num_steps).tolist(), noise
        for i in range(num_steps):
            x = ab2_step(x, sigmas[i], sigmas[i + 1], ideal_x0(x, torch.tensor(sigmas[i]))).float()
        return (ideal_x0(x, torch.tensor(sigmas[-1])).double() - exact).abs().max().item()

    assert ab2_error(70) / ab2_error(140) > 3.5
    assert euler_error(70) / euler_error(140) < 2.5  # the measure tells the orders apart
    assert ab2_error(35) < euler_error(35) / 3


@pytest.fixture(scope="module")
def tiny_pipe(tiny_model_dir):
    return load_pipeline("tiny", dtype=torch.float32, load_text_encoder=False)


def test_transformer_sees_nvidias_noise_and_sigmas(tiny_pipe):
    pipe, steps, seed = tiny_pipe, 3, 5
    calls = []
    plain = call_transformer(pipe.transformer)

    def recording(hidden_states, timestep, embeds, padding_mask):
        calls.append((hidden_states.clone(), timestep.clone()))
        return plain(hidden_states, timestep, embeds, padding_mask)

    dim = pipe.transformer.config.text_embed_dim
    prompt, negative = torch.randn(1, 512, dim, generator=torch.Generator().manual_seed(0)), torch.zeros(1, 512, dim)
    noise = nvidia_noise(pipe, 1, 48, 96, seed)
    # cosmos-predict2's arch_invariant_rand: numpy's legacy generator, whatever the device.
    assert np.array_equal(noise.numpy(), np.random.RandomState(seed).standard_normal((1, 16, 1, 6, 12)).astype("f4"))
    kwargs = dict(height=48, width=96, num_inference_steps=steps, guidance_scale=4.0, sampler="nvidia", latents=noise)
    latents = sample_latents(pipe, prompt, negative, batched_cfg=False, denoiser=recording, **kwargs)

    assert len(calls) == 2 * (steps + 1)  # conditional and unconditional, at each sigma and at the last one again
    sigmas = nvidia_sigmas(steps).float()
    torch.testing.assert_close(torch.stack([t for _, t in calls[::2]]).flatten(), sigmas / (sigmas + 1),
                               rtol=0, atol=0)
    assert sigmas[0].item() == 80.0 and sigmas[-1].item() == pytest.approx(0.002, rel=1e-6)
    first_input = noise * 80.0 * (1 - sigmas[0] / (sigmas[0] + 1))
    assert torch.equal(calls[0][0], first_input)
    # The conditional and unconditional branches in one batch change only rounding.
    batched = sample_latents(pipe, prompt, negative, batched_cfg=True, **kwargs)
    torch.testing.assert_close(batched, latents, rtol=1e-4, atol=1e-4)
    # Not the pipeline's sampler: the same weights and prompt give another result.
    diffusers_latents = sample_latents(pipe, prompt, negative, batched_cfg=False, **dict(kwargs, sampler="diffusers"))
    assert (diffusers_latents - latents).abs().max() > 1e-2


def test_guidance_up_to_one_keeps_the_unconditional_pass(tiny_pipe):
    """NVIDIA's x0 = c + g (c - u) needs u for any g but 0; the pipeline's sampler skips it for g <= 1."""
    dim = tiny_pipe.transformer.config.text_embed_dim
    plain = call_transformer(tiny_pipe.transformer)
    for guidance, calls_expected in [(1.0, 2 * 3), (0.0, 3)]:
        calls = []

        def counting(*inputs):
            calls.append(inputs[0].shape[0])
            return plain(*inputs)

        sample_latents(tiny_pipe, torch.randn(1, 512, dim), torch.zeros(1, 512, dim), 48, 96, num_inference_steps=2,
                       guidance_scale=guidance, batched_cfg=False, denoiser=counting, sampler="nvidia")
        assert len(calls) == calls_expected, guidance
    args = ["--model", "tiny", "--prompt", "a robot", "--guidance", "1.0"]
    assert infer.parse_args([*args, "--sampler", "nvidia"]).guidance == 1.0
    with pytest.raises(SystemExit):
        infer.parse_args(args)


def test_unknown_sampler_is_refused(tiny_pipe):
    dim = tiny_pipe.transformer.config.text_embed_dim
    with pytest.raises(ValueError, match="sampler must be one of"):
        sample_latents(tiny_pipe, torch.zeros(1, 512, dim), torch.zeros(1, 512, dim), 48, 96, sampler="euler")
