"""Wan 2.1 VAE latents in the normalization Cosmos-Predict2 trains and samples with.

Training target: the posterior mean, normalized per channel, (mu - latents_mean) / latents_std, with sigma_data = 1.
`Cosmos2TextToImagePipeline` undoes exactly this before decoding (latents * std + mean; see sampling.decode_images).
"""

from __future__ import annotations

import torch


def latent_stats(vae, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std from the VAE config, shaped [1, C, 1, 1, 1] for broadcasting over [B, C, T, H, W]."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=device, dtype=torch.float32).view(shape)
    std = torch.tensor(vae.config.latents_std, device=device, dtype=torch.float32).view(shape)
    return mean, std


@torch.no_grad()
def encode_normalized(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels [B, 3, 1, H, W] in [-1, 1] -> normalized latents [B, C, 1, H/8, W/8] in float32."""
    posterior = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    mean, std = latent_stats(vae, device=vae.device)
    return (posterior.mean.float() - mean) / std
