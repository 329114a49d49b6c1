"""Two samplers for Cosmos-Predict2 Text2Image, both with classifier-free guidance run as one batch.

- "diffusers" (default): the sampler of `Cosmos2TextToImagePipeline`. Karras sigmas (80 -> 0.002, last sigma
  replaced by sigma_min), Euler steps, x0 = c + g (c - u) rounded to the transformer's dtype, noise from a torch
  generator. With `batched_cfg=False` this reproduces the pipeline bit for bit (tests/test_sampling.py).
- "nvidia": the sampler of NVIDIA's own `examples/text2image.py` (cosmos-predict2's `Text2ImagePipeline.__call__`
  with its `RectifiedFlowAB2Scheduler`), which is not the pipeline's: noise from numpy's `RandomState(seed)`, the
  same preconditioning, but a second-order multistep (Adams-Bashforth 2 in log sigma, x0 form, float64) over
  steps+1 Karras sigmas ending at 0.002, guidance kept in float32, and a last guided x0 prediction at sigma 0.002
  as the image (so 35 steps are 36 transformer calls). Written from cosmos-predict2's code, for NVIDIA's image
  from the same seed and weights up to the two transformer implementations' rounding; not compared with NVIDIA's
  code running (no weights or NVIDIA install here).

The stock pipeline calls the transformer twice per step (conditional, then unconditional). Running both as one
batch of 2B halves the kernel launches and fills the GPU better; batched, the result differs only by rounding in
the batched matmuls (none measured on the H100).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from diffusers.pipelines.cosmos.pipeline_cosmos2_text2image import retrieve_timesteps

from .objective import preconditioning
from .text_encoding import MAX_LENGTH

SAMPLERS = ("diffusers", "nvidia")
# NVIDIA's text2image sampler settings (cosmos-predict2 SolverTimestampConfig: t_min, t_max, order).
NVIDIA_SIGMA_MIN, NVIDIA_SIGMA_MAX, NVIDIA_RHO = 0.002, 80.0, 7.0


def call_transformer(transformer):
    """The plain transformer call the sampler makes: (hidden_states, timestep, embeds, padding_mask) -> output."""
    def call(hidden_states, timestep, encoder_hidden_states, padding_mask):
        return transformer(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                           padding_mask=padding_mask, return_dict=False)[0]
    return call


def uses_unconditional_pass(guidance_scale: float, sampler: str) -> bool:
    """Whether x0 = c + g (c - u) needs the unconditional branch: the pipeline skips it for g <= 1, NVIDIA's
    sampler only for g = 0 (where the formula gives c)."""
    return guidance_scale > 1.0 if sampler == "diffusers" else guidance_scale != 0


def nvidia_noise(pipe, batch_size: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Unit-normal initial latents [B, C, 1, H/8, W/8] (float32, CPU) for `seed`, drawn as NVIDIA's sampler draws
    them (cosmos-predict2's misc.arch_invariant_rand: numpy's legacy generator, the same on any device)."""
    shape = (batch_size, pipe.transformer.config.in_channels, 1,
             height // pipe.vae_scale_factor_spatial, width // pipe.vae_scale_factor_spatial)
    return torch.from_numpy(np.random.RandomState(seed).standard_normal(shape).astype(np.float32))


class _GuidedX0:
    """x0 predictions of the conditional and unconditional branches at one sigma, in float32, with training's
    preconditioning (objective.py), which both samplers share: input c_in x in the transformer's dtype, timestep
    t, x0 = c_skip x + c_out F."""

    def __init__(self, pipe, denoiser, prompt_embeds, negative_prompt_embeds, height, width, use_cfg, batched_cfg):
        self.denoiser = denoiser or call_transformer(pipe.transformer)
        self.dtype = pipe.transformer.dtype
        device = pipe._execution_device
        self.prompt_embeds = prompt_embeds.to(device=device, dtype=self.dtype)
        self.negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=self.dtype) if use_cfg else None
        self.use_cfg, self.batched_cfg = use_cfg, batched_cfg
        if use_cfg and batched_cfg:
            self.both_embeds = torch.cat([self.prompt_embeds, self.negative_prompt_embeds])
        self.padding_mask = torch.zeros(1, 1, height, width, device=device, dtype=self.dtype)

    def __call__(self, latents: torch.Tensor, sigma: torch.Tensor):
        """(cond, uncond) x0 for `latents` at `sigma` (a float32 scalar tensor); uncond is None without CFG."""
        c_in, c_skip, c_out, t = preconditioning(sigma)
        model_input = (latents * c_in).to(self.dtype)
        timestep = t.expand(latents.shape[0]).to(self.dtype)
        if self.use_cfg and self.batched_cfg:
            both = self._x0(latents, model_input.repeat(2, 1, 1, 1, 1), timestep.repeat(2), c_skip, c_out,
                            self.both_embeds)
            return both.chunk(2)
        cond = self._x0(latents, model_input, timestep, c_skip, c_out, self.prompt_embeds)
        uncond = self._x0(latents, model_input, timestep, c_skip, c_out, self.negative_prompt_embeds) \
            if self.use_cfg else None
        return cond, uncond

    def _x0(self, latents, model_input, timestep, c_skip, c_out, embeds):
        out = self.denoiser(model_input, timestep, embeds, self.padding_mask)
        return c_skip * latents.repeat(out.shape[0] // latents.shape[0], 1, 1, 1, 1) + c_out * out.float()


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
    sampler: str = "diffusers",
    latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Denoised normalized latents [B, C, 1, H/8, W/8] (float32) for padded prompt embeddings [B, 512, D].

    `latents`: unit-normal initial noise (`nvidia_noise`); without it, drawn from `generator` as the pipeline
    does. `denoiser` replaces the plain transformer call (`call_transformer`), e.g. by a CUDA-graphed one
    (cosmos_t2i/cuda_graphs.py)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, not {sampler!r}.")
    device = pipe._execution_device
    use_cfg = uses_unconditional_pass(guidance_scale, sampler)
    guided_x0 = _GuidedX0(pipe, denoiser, prompt_embeds, negative_prompt_embeds, height, width, use_cfg, batched_cfg)
    latents = pipe.prepare_latents(prompt_embeds.shape[0], pipe.transformer.config.in_channels, height, width, 1,
                                   torch.float32, device, generator, latents)
    if sampler == "nvidia":
        return _nvidia_ab2(guided_x0, latents, num_inference_steps, guidance_scale, pipe.progress_bar)

    sigmas = torch.linspace(0, 1, num_inference_steps, dtype=torch.float64)
    timesteps, _ = retrieve_timesteps(pipe.scheduler, device=device, sigmas=sigmas)
    if pipe.scheduler.config.get("final_sigmas_type", "zero") == "sigma_min":
        pipe.scheduler.sigmas[-1] = pipe.scheduler.sigmas[-2]
    dtype = guided_x0.dtype
    for i, t in enumerate(pipe.progress_bar(timesteps)):
        sigma = pipe.scheduler.sigmas[i]
        cond, uncond = guided_x0(latents, sigma)
        cond = cond.to(dtype)  # the pipeline guides in the transformer's dtype
        x0 = cond + guidance_scale * (cond - uncond.to(dtype)) if use_cfg else cond
        latents = pipe.scheduler.step((latents - x0) / sigma, t, latents, return_dict=False)[0]
    return latents


def nvidia_sigmas(num_steps: int) -> torch.Tensor:
    """NVIDIA's num_steps + 1 Karras sigmas (rho 7) from 80 down to 0.002 itself, in float64."""
    i = torch.arange(num_steps + 1, dtype=torch.float64)
    top, bottom = NVIDIA_SIGMA_MAX ** (1 / NVIDIA_RHO), NVIDIA_SIGMA_MIN ** (1 / NVIDIA_RHO)
    return (top + i / num_steps * (bottom - top)) ** NVIDIA_RHO


def ab2_step(x: torch.Tensor, sigma: float, sigma_next: float, x0: torch.Tensor,
             sigma_prev: float | None = None, x0_prev: torch.Tensor | None = None) -> torch.Tensor:
    """One step of NVIDIA's sampler from `sigma` to `sigma_next`, in float64.

    The probability-flow ODE in lambda = -log(sigma) is dx/dlambda = x0(x, lambda) - x, so over a step of length h
    x_next = e^-h x + integral of e^-(lambda_next - l) x0(l) dl. The first step holds x0 constant (Euler in x0 form,
    which is also exact for constant x0); later steps take x0 linear in lambda through this step's and the previous
    step's predictions (Adams-Bashforth 2 on the exponential integrator: the phi1/phi2 weights below).
    """
    x, x0 = x.double(), x0.double()
    if x0_prev is None:
        return (sigma - sigma_next) / sigma * x0 + sigma_next / sigma * x
    lam, lam_next, lam_prev = -math.log(sigma), -math.log(sigma_next), -math.log(sigma_prev)
    h = lam_next - lam
    c2 = (lam_prev - lam) / h  # where the previous prediction sits, in units of this step (negative)
    phi1 = math.expm1(-h) / -h  # (e^-h - 1) / -h
    phi2 = (phi1 - 1.0) / -h
    b_prev = phi2 / c2
    return math.exp(-h) * x + h * ((phi1 - b_prev) * x0 + b_prev * x0_prev.double())


def _nvidia_ab2(guided_x0: _GuidedX0, latents, num_steps: int, guidance_scale: float, progress_bar) -> torch.Tensor:
    step_sigmas = nvidia_sigmas(num_steps)
    # The transformer sees each sigma in float32 (as NVIDIA's denoise does), copied to the GPU once: a copy per
    # step would make the CPU wait for the GPU at every step.
    model_sigmas = step_sigmas.float().to(latents.device)
    step_sigmas = step_sigmas.tolist()

    def x0_at(x, i: int):  # NVIDIA's guidance is applied to float32 predictions
        cond, uncond = guided_x0(x, model_sigmas[i])
        return cond + guidance_scale * (cond - uncond) if uncond is not None else cond

    x0_prev = None
    for i in progress_bar(range(num_steps)):
        x0 = x0_at(latents, i)
        latents = ab2_step(latents, step_sigmas[i], step_sigmas[i + 1], x0, step_sigmas[i - 1] if i else None,
                           x0_prev).float()
        x0_prev = x0
    return x0_at(latents, num_steps)


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
    seed: int = 0,
    batched_cfg: bool = True,
    denoiser=None,
    sampler: str = "diffusers",
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
):
    """One image for `prompt`, as `pipe(prompt=..., generator=torch.Generator("cpu").manual_seed(seed))` makes it
    (or NVIDIA's own sampler does, with `sampler="nvidia"`), with the prompts prepared NVIDIA's way: an empty
    negative prompt is the zero embedding. The text guardrail runs first, with the pipeline's own error for a
    refused prompt.

    `prompt_embeds` / `negative_prompt_embeds` ([1, 512, D], text_encoding.encode_prompts): the prompts encoded
    beforehand, so that the pipeline needs no T5 while it samples; the same numbers as the pipeline's own encoding."""
    device = pipe._execution_device
    pipe.safety_checker.to(device)
    safe = pipe.safety_checker.check_text_safety(prompt)
    pipe.safety_checker.to("cpu")
    if not safe:
        raise ValueError(f"Cosmos Guardrail detected unsafe text in the prompt: {prompt}. Please ensure that the "
                         "prompt abides by the NVIDIA Open Model License Agreement.")
    if prompt_embeds is None:
        zero = None
        if not negative_prompt:
            dim = pipe.transformer.config.text_embed_dim
            zero = torch.zeros(1, MAX_LENGTH, dim, device=device, dtype=pipe.text_encoder.dtype)
        prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(
            prompt, negative_prompt=negative_prompt or None,
            do_classifier_free_guidance=uses_unconditional_pass(guidance_scale, sampler), negative_prompt_embeds=zero,
            device=device,
        )
    elif negative_prompt_embeds is None:
        negative_prompt_embeds = torch.zeros_like(prompt_embeds)
    noise = nvidia_noise(pipe, 1, height, width, seed) if sampler == "nvidia" else None
    latents = sample_latents(pipe, prompt_embeds, negative_prompt_embeds, height, width, num_inference_steps,
                             guidance_scale, torch.Generator("cpu").manual_seed(seed), batched_cfg, denoiser, sampler,
                             latents=noise)
    return decode_images(pipe, latents)[0]
