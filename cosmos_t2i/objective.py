"""NVIDIA Cosmos-Predict2 text2image training objective (EDM preconditioning in rectified-flow time).

    log(sigma) ~ N(0, 1)                      x_sigma = x0 + sigma * eps
    t = sigma / (1 + sigma)                   c_in = c_skip = 1 - t,  c_out = -t,  transformer timestep = t
    x0_pred = c_skip * x_sigma + c_out * F(c_in * x_sigma, t)
    loss = 10 * mean((x0 - x0_pred)^2 * (1 + sigma)^2 / sigma^2)

Since c_in * x_sigma = (1 - t) x0 + t eps, F sees the rectified-flow interpolant and the loss is a uniformly
weighted MSE of F against the velocity (eps - x0), with t logit-normal(0, 1). `Cosmos2TextToImagePipeline` samples
with this same parametrization, which is what makes a model trained here reproduce what it learned there.
"""

from __future__ import annotations

import torch

LOSS_SCALE = 10.0
TEXT_DROPOUT = 0.2  # share of samples whose whole T5 embedding is zeroed, so CFG has an unconditional model


def sample_sigma(batch_size: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample noise level, log-normal(0, 1), no clamp."""
    return torch.randn(batch_size, device=device, generator=generator, dtype=torch.float32).exp()


def preconditioning(sigma: torch.Tensor):
    """(c_in, c_skip, c_out, t) for noise levels sigma [B]."""
    t = sigma / (1 + sigma)
    return 1 - t, 1 - t, -t, t


def loss_weight(sigma: torch.Tensor) -> torch.Tensor:
    return (1 + sigma) ** 2 / sigma**2


def drop_text(text_embeds: torch.Tensor, p: float = TEXT_DROPOUT, generator: torch.Generator | None = None):
    """Replace each sample's whole embedding [B, L, D] by zeros with probability p."""
    keep = torch.rand(text_embeds.shape[0], device=text_embeds.device, generator=generator) >= p
    return text_embeds * keep.view(-1, 1, 1).to(text_embeds.dtype)


def predict_x0(transformer, x_sigma: torch.Tensor, sigma: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """The denoiser D(x_sigma, sigma) on latents [B, C, T, H, W]; returns float32.

    The padding mask is all zeros (text2image never pads) and goes in as the extra input channel. diffusers repeats
    it over the batch itself, so it must have batch size 1.
    """
    c_in, c_skip, c_out, t = (c.view(-1, 1, 1, 1, 1) for c in preconditioning(sigma))
    padding_mask = x_sigma.new_zeros(1, 1, x_sigma.shape[-2], x_sigma.shape[-1])
    model_dtype = text_embeds.dtype
    out = transformer(
        hidden_states=(c_in * x_sigma).to(model_dtype),
        timestep=t.flatten().to(model_dtype),
        encoder_hidden_states=text_embeds,
        padding_mask=padding_mask.to(model_dtype),
        return_dict=False,
    )[0]
    return c_skip * x_sigma + c_out * out.float()


def diffusion_loss(
    transformer,
    x0: torch.Tensor,
    text_embeds: torch.Tensor,
    generator: torch.Generator | None = None,
    text_dropout: float = TEXT_DROPOUT,
) -> torch.Tensor:
    """The scalar training loss for clean latents x0 [B, C, 1, H, W] and padded T5 embeddings [B, 512, D]."""
    x0, x_sigma, sigma, text_embeds = noised(x0, text_embeds, generator, text_dropout)
    return LOSS_SCALE * _weighted_error(transformer, x0, x_sigma, sigma, text_embeds).mean()


def noised(x0: torch.Tensor, text_embeds: torch.Tensor, generator: torch.Generator | None = None,
           text_dropout: float = TEXT_DROPOUT):
    """The random part of the loss: (x0 in float32, x_sigma, sigma, text embeddings after dropout), drawn from
    `generator` in this order (sigma, eps, dropout), so a batch's draws are a function of the generator alone."""
    x0 = x0.float()
    sigma = sample_sigma(x0.shape[0], x0.device, generator)
    eps = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=torch.float32)
    x_sigma = x0 + sigma.view(-1, 1, 1, 1, 1) * eps
    if text_dropout > 0:
        text_embeds = drop_text(text_embeds, text_dropout, generator)
    return x0, x_sigma, sigma, text_embeds


def per_sample_loss(transformer, x0: torch.Tensor, x_sigma: torch.Tensor, sigma: torch.Tensor,
                    text_embeds: torch.Tensor) -> torch.Tensor:
    """[B] losses of the samples `noised` made, in one transformer call: the mean of a part of them is
    `diffusion_loss` of that part with the same draws (prior preservation weighs two parts of one batch)."""
    return LOSS_SCALE * _weighted_error(transformer, x0, x_sigma, sigma, text_embeds).flatten(1).mean(1)


def _weighted_error(transformer, x0, x_sigma, sigma, text_embeds) -> torch.Tensor:
    x0_pred = predict_x0(transformer, x_sigma, sigma, text_embeds)
    return (x0 - x0_pred) ** 2 * loss_weight(sigma).view(-1, 1, 1, 1, 1)
