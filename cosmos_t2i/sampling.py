"""The sampler of `Cosmos2TextToImagePipeline`, with classifier-free guidance run as one batch.

The stock pipeline calls the transformer twice per step (conditional, then unconditional). Running both as one
batch of 2B halves the kernel launches and fills the GPU better; nothing else changes: same Karras sigmas
(80 -> 0.002, last sigma replaced by sigma_min), same preconditioning, same x0 = c + g (c - u) guidance, same
Euler step, same decode and guardrail. With `batched_cfg=False` this reproduces the pipeline bit for bit
(tests/test_sampling.py); batched, it differs only by rounding in the batched matmuls (none measured on the H100).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from diffusers.pipelines.cosmos.pipeline_cosmos2_text2image import retrieve_timesteps


def call_transformer(transformer):
    """The plain transformer call the sampler makes: (hidden_states, timestep, embeds, padding_mask) -> output."""
    def call(hidden_states, timestep, encoder_hidden_states, padding_mask):
        return transformer(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                           padding_mask=padding_mask, return_dict=False)[0]
    return call


def _x0(denoiser, latents, model_input, timestep, c_skip, c_out, embeds, padding_mask):
    out = denoiser(model_input, timestep, embeds, padding_mask)
    return (c_skip * latents.repeat(out.shape[0] // latents.shape[0], 1, 1, 1, 1) + c_out * out.float())


@torch.no_grad()
def sample_latents(
    pipe,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None,
    height: int,
    width: int,
    num_inference_steps: int = 35,
    guidance_scale: float = 4.0,
    generator: torch.Generator | None = None,
    batched_cfg: bool = True,
    denoiser=None,
) -> torch.Tensor:
    """Denoised normalized latents [B, C, 1, H/8, W/8] (float32) for padded prompt embeddings [B, 512, D].

    `denoiser` replaces the plain transformer call (`call_transformer`), e.g. by a CUDA-graphed one
    (cosmos_t2i/cuda_graphs.py)."""
    denoiser = denoiser or call_transformer(pipe.transformer)
    device = pipe._execution_device
    dtype = pipe.transformer.dtype
    use_cfg = guidance_scale > 1.0
    batch_size = prompt_embeds.shape[0]
    prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
    if use_cfg:
        negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)
        both_embeds = torch.cat([prompt_embeds, negative_prompt_embeds])

    sigmas = torch.linspace(0, 1, num_inference_steps, dtype=torch.float64)
    timesteps, _ = retrieve_timesteps(pipe.scheduler, device=device, sigmas=sigmas)
    if pipe.scheduler.config.get("final_sigmas_type", "zero") == "sigma_min":
        pipe.scheduler.sigmas[-1] = pipe.scheduler.sigmas[-2]
    latents = pipe.prepare_latents(
        batch_size, pipe.transformer.config.in_channels, height, width, 1, torch.float32, device, generator
    )
    padding_mask = latents.new_zeros(1, 1, height, width, dtype=dtype)

    for i, t in enumerate(pipe.progress_bar(timesteps)):
        sigma = pipe.scheduler.sigmas[i]
        current_t = sigma / (sigma + 1)
        c_skip, c_out = 1 - current_t, -current_t
        model_input = (latents * (1 - current_t)).to(dtype)
        timestep = current_t.expand(batch_size).to(dtype)
        if use_cfg and batched_cfg:
            x0 = _x0(denoiser, latents, model_input.repeat(2, 1, 1, 1, 1), timestep.repeat(2), c_skip, c_out,
                     both_embeds, padding_mask).to(dtype)
            cond, uncond = x0.chunk(2)
        else:
            cond = _x0(denoiser, latents, model_input, timestep, c_skip, c_out, prompt_embeds, padding_mask).to(dtype)
            if use_cfg:
                uncond = _x0(denoiser, latents, model_input, timestep, c_skip, c_out, negative_prompt_embeds,
                             padding_mask).to(dtype)
        x0 = cond + guidance_scale * (cond - uncond) if use_cfg else cond
        latents = pipe.scheduler.step((latents - x0) / sigma, t, latents, return_dict=False)[0]
    return latents


@torch.no_grad()
def decode_images(pipe, latents: torch.Tensor, output_type: str = "pil"):
    """Normalized latents -> images ("pil" or "np"), through the pipeline's VAE, guardrail video check and
    post-processing, pixel for pixel what the pipeline returns."""
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(latents)
    # Divided by 1/std, not multiplied by std, exactly as the pipeline does: the roundings differ, and an image
    # pixel can flip by one level.
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(latents)
    raw = latents / inv_std / pipe.scheduler.config.sigma_data + mean
    video = vae.decode(raw.to(vae.dtype), return_dict=False)[0]
    frames = _guardrail_frames(pipe.video_processor, video)
    checker = pipe.safety_checker
    checker.to(pipe._execution_device)
    frames = np.stack([checker.check_video_safety(v) for v in frames])
    checker.to("cpu")
    pixels = _guardrail_frames_to_output(pipe.video_processor, output_type)[frames]
    first_frames = pixels[:, 0]
    return [Image.fromarray(f) for f in first_frames] if output_type == "pil" else list(first_frames)


def _guardrail_frames(video_processor, video: torch.Tensor) -> np.ndarray:
    """The uint8 frames [B, F, H, W, C] the pipeline gives its guardrail, computed on the video's device.

    The pipeline denormalizes on the GPU, then copies float32 frames to the CPU and scales and truncates them there
    with numpy. The same IEEE float32 multiply and truncation on the GPU give the same bytes, and a quarter of
    them cross to the CPU (less work; on the H100 machines the decode time did not move beyond their differences,
    BENCHMARKS.md).
    """
    denormalized = video_processor.postprocess_video(video, output_type="pt")  # [B, F, C, H, W], as the pipeline
    return (denormalized.float() * 255).to(torch.uint8).permute(0, 1, 3, 4, 2).cpu().numpy()


def _guardrail_frames_to_output(video_processor, output_type: str) -> np.ndarray:
    """The pipeline's post-guardrail conversion of a uint8 pixel value, as a 256-entry lookup table.

    That conversion (to float, back to [-1, 1], denormalize, and for PIL round to uint8) is elementwise, so running
    the pipeline's own code once on the 256 possible values gives every output pixel exactly, without the float
    passes over the whole image on the CPU (15-60 ms for a 1360x768 image on a 2-core development machine).
    """
    if output_type not in ("pil", "np"):
        raise ValueError(f"output_type must be 'pil' or 'np', not {output_type!r}.")
    values = np.repeat(np.arange(256, dtype=np.uint8), 3).reshape(1, 1, 1, 256, 3)  # [B, F, H, W, C]: one row
    # The pipeline's own lines, on those values:
    video = values.astype(np.float32) / 255.0 * 2 - 1
    video = torch.from_numpy(video).permute(0, 4, 1, 2, 3)
    out = video_processor.postprocess_video(video, output_type=output_type)
    row = np.asarray(out[0][0])[0]  # [256, 3]: value v in pixel v
    return row[:, 0].copy()


@torch.no_grad()
def generate(
    pipe,
    prompt: str,
    negative_prompt: str = "",
    height: int = 768,
    width: int = 1360,
    num_inference_steps: int = 35,
    guidance_scale: float = 4.0,
    generator: torch.Generator | None = None,
    batched_cfg: bool = True,
    denoiser=None,
):
    """One image for `prompt`, as `pipe(prompt=..., ...)` makes it, NVIDIA's way: an empty negative prompt is
    the zero embedding. The text guardrail runs first, with the pipeline's own error for a refused prompt."""
    device = pipe._execution_device
    pipe.safety_checker.to(device)
    safe = pipe.safety_checker.check_text_safety(prompt)
    pipe.safety_checker.to("cpu")
    if not safe:
        raise ValueError(f"Cosmos Guardrail detected unsafe text in the prompt: {prompt}. Please ensure that the "
                         "prompt abides by the NVIDIA Open Model License Agreement.")
    zero = None
    if not negative_prompt:
        dim = pipe.transformer.config.text_embed_dim
        zero = torch.zeros(1, 512, dim, device=device, dtype=pipe.text_encoder.dtype)
    prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(
        prompt, negative_prompt=negative_prompt or None, do_classifier_free_guidance=guidance_scale > 1.0,
        negative_prompt_embeds=zero, device=device,
    )
    latents = sample_latents(pipe, prompt_embeds, negative_prompt_embeds, height, width, num_inference_steps,
                             guidance_scale, generator, batched_cfg, denoiser)
    return decode_images(pipe, latents)[0]
