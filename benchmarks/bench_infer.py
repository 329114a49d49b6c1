"""Sampling time per image: the stock pipeline call against our fast path, in one run, on one GPU.

Random-initialised transformer of the real 2B/14B config and a random Wan 2.1 VAE (default config), bf16,
35 steps with CFG (guidance 4), VAE decode included, T5 excluded (random prompt embeddings, zero negative as
NVIDIA). Every variant starts from the same noise; its latents are compared with the stock pipeline's (the
NVIDIA-sampler variant's differ by the sampler, not only by rounding; its MFU counts its one extra call).
`decode_s` is the last image's VAE decode + guardrail-format post-processing, part of `s_per_image`; the stock
call (the plain path) decodes inside, its own way.

    python benchmarks/bench_infer.py --model 2B --out results/infer_2b.md
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    Timer, device_name, forward_flops_per_sample, free_memory, peak_gib, profile_kernels, reset_peak_memory, write_table,
)
from cosmos_t2i import fp8, speed, tiny_pipeline  # noqa: E402
from cosmos_t2i.cuda_graphs import GraphedTransformer  # noqa: E402
from cosmos_t2i.pipeline import NoGuardrail  # noqa: E402
from cosmos_t2i.models import PRESETS  # noqa: E402
from cosmos_t2i.sampling import decode_images, sample_latents  # noqa: E402


@dataclasses.dataclass
class Variant:
    name: str
    stock: bool = False  # the unmodified Cosmos2TextToImagePipeline.__call__
    batched_cfg: bool = False
    compile: bool = False
    single_frame_vae: bool = False  # speed.single_frame_vae_convs
    fp8: bool = False  # fp8.quantize_transformer_blocks: changes the numbers, opt-in
    cuda_graph: bool = False  # cuda_graphs.GraphedTransformer: each step replayed from a CUDA graph
    coordinate_descent: bool = False  # inductor tunes its own kernels' launch configs (longer compile)
    multi_kernel: bool = False  # inductor also builds single-pass (persistent) versions of long-row reductions
    sampler: str = "diffusers"  # sampling.SAMPLERS: "nvidia" makes one more transformer call per image


VARIANTS = [
    Variant("plain: stock pipeline (eager, SDPA, CFG as 2 calls)", stock=True),
    Variant("batched CFG", batched_cfg=True),
    Variant("batched CFG + compiled blocks", batched_cfg=True, compile=True),
    Variant("batched CFG + compiled blocks + 2D VAE convs", batched_cfg=True, compile=True, single_frame_vae=True),
    Variant("same + fp8 matmuls (opt-in)", batched_cfg=True, compile=True, single_frame_vae=True, fp8=True),
    Variant("batched CFG + compiled blocks + 2D VAE convs + CUDA graph", batched_cfg=True, compile=True,
            single_frame_vae=True, cuda_graph=True),
    Variant("same + fp8 matmuls + CUDA graph", batched_cfg=True, compile=True, single_frame_vae=True, fp8=True,
            cuda_graph=True),
    Variant("same + fp8 matmuls + coordinate-descent tuning", batched_cfg=True, compile=True, single_frame_vae=True,
            fp8=True, coordinate_descent=True),
    Variant("same + fp8 matmuls + coordinate-descent tuning + CUDA graph", batched_cfg=True, compile=True,
            single_frame_vae=True, fp8=True, coordinate_descent=True, cuda_graph=True),
    Variant("batched CFG + 2D VAE convs + CUDA graph, not compiled", batched_cfg=True, single_frame_vae=True,
            cuda_graph=True),
    Variant("same + fp8 matmuls + CUDA graph + inductor multi-kernel", batched_cfg=True, compile=True,
            single_frame_vae=True, fp8=True, cuda_graph=True, multi_kernel=True),
    Variant("batched CFG + compiled blocks + 2D VAE convs + CUDA graph + inductor multi-kernel", batched_cfg=True,
            compile=True, single_frame_vae=True, cuda_graph=True, multi_kernel=True),
    Variant("same (the default fast path) with NVIDIA's sampler (--sampler nvidia)", batched_cfg=True, compile=True,
            single_frame_vae=True, cuda_graph=True, multi_kernel=True, sampler="nvidia"),
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="2B", choices=["2B", "14B", "tiny"])
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--width", type=int, default=1360)
    parser.add_argument("--num_steps", type=int, default=35)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--runs", type=int, default=2, help="Timed images per variant.")
    parser.add_argument("--variants", default=None,
                        help="Comma-separated indices of the variants to run (variant 0, the plain path, always runs).")
    parser.add_argument("--profile", default=None, help="Write each variant's GPU kernel times for one image here "
                        "(one file per variant).")
    parser.add_argument("--peak_tflops", type=float, default=800.0)
    parser.add_argument("--device", default="cuda", help="cpu only for a smoke test of the script itself.")
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def build_pipeline(model: str, device):
    from diffusers import (AutoencoderKLWan, Cosmos2TextToImagePipeline, CosmosTransformer3DModel,
                           FlowMatchEulerDiscreteScheduler)

    torch.manual_seed(0)
    with torch.device(device):
        transformer = CosmosTransformer3DModel(**PRESETS[model].transformer_config).to(torch.bfloat16)
        # The default config is Wan 2.1's; the tiny model's own VAE keeps the CPU smoke test quick (a full-size bf16
        # decode takes over ten minutes on a CPU without AVX-512).
        vae = AutoencoderKLWan(**tiny_pipeline.VAE_CONFIG) if model == "tiny" else AutoencoderKLWan()
        vae = vae.to(torch.bfloat16)
    return Cosmos2TextToImagePipeline(
        text_encoder=None, tokenizer=None, transformer=transformer.eval(), vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True), safety_checker=NoGuardrail(),
    )


def generate(pipe, variant: Variant, args, prompt, negative, num_steps: int, denoiser=None):
    """Final latents of one image, and the seconds its decode took (not timed apart in the stock call)."""
    generator = torch.Generator(pipe._execution_device).manual_seed(0)
    kwargs = dict(height=args.height, width=args.width, num_inference_steps=num_steps, guidance_scale=args.guidance)
    if variant.stock:  # the whole stock call, its own decode and post-processing included
        final = {}

        def keep_latents(pipe, step, timestep, tensors):
            final["latents"] = tensors["latents"]
            return tensors

        pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, generator=generator, output_type="pil",
             callback_on_step_end=keep_latents, **kwargs)
        return final["latents"], "in the call"
    latents = sample_latents(pipe, prompt, negative, generator=generator, batched_cfg=variant.batched_cfg,
                             denoiser=denoiser, sampler=variant.sampler, **kwargs)
    with Timer() as decode:
        decode_images(pipe, latents)
    return latents, decode.seconds


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    variants = VARIANTS
    if args.variants:  # the plain path (variant 0) always runs first: every ratio is against it
        variants = [VARIANTS[0]] + [VARIANTS[int(i)] for i in args.variants.split(",") if int(i) != 0]
    config = PRESETS[args.model].transformer_config
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randn(1, 512, config["text_embed_dim"], generator=gen).to(device, torch.bfloat16)
    negative = torch.zeros_like(prompt)
    flops_per_call = 2 * forward_flops_per_sample(config, args.height, args.width)  # CFG: two samples per call
    rows = []
    for variant in variants:
        print(f"--- {variant}", flush=True)
        torch._dynamo.reset()  # compiled graphs are reused across model instances: each variant compiles its own
        rows.append(run_variant(args, variant, device, prompt, negative, flops_per_call))
        print({k: v for k, v in rows[-1].items() if k != "latents"}, flush=True)
    reference = rows[0].pop("latents")
    for row in rows:
        latents = row.pop("latents", reference)
        row["latent_rel_err_vs_plain"] = f"{((latents - reference).norm() / reference.norm()).item():.1e}"
        row["speedup"] = f"{rows[0]['s_per_image'] / row['s_per_image']:.2f}x"
    header = (f"### {args.model} sampling, {args.width}x{args.height}, {args.num_steps} steps, CFG {args.guidance}, "
              f"VAE decode included, {device_name()}, torch {torch.__version__}")
    columns = ["variant", "s_per_image", "decode_s", "speedup", "tflops", "mfu", "peak_gib", "latent_rel_err_vs_plain"]
    write_table(rows, columns, header, args.out)


def run_variant(args, variant, device, prompt, negative, flops_per_call) -> dict:
    transformer_calls = args.num_steps + 1 if variant.sampler == "nvidia" else args.num_steps  # its last x0 pass
    flops_per_image = flops_per_call * transformer_calls
    pipe = build_pipeline(args.model, device)
    pipe.set_progress_bar_config(disable=True)
    fp8.deduplicate_compiled_computations(enable=variant.fp8)  # inductor's config is global: set it every time
    torch._inductor.config.coordinate_descent_tuning = variant.coordinate_descent
    if variant.fp8:
        fp8.quantize_transformer_blocks(pipe.transformer)
    if variant.single_frame_vae:
        speed.single_frame_vae_convs(pipe.vae)
    if variant.compile:
        speed.compile_transformer_blocks(pipe.transformer, multi_kernel=variant.multi_kernel)
    denoiser = GraphedTransformer(pipe.transformer) if variant.cuda_graph else None
    generate(pipe, variant, args, prompt, negative, num_steps=2, denoiser=denoiser)  # warm-up: compilation, cuDNN plans
    reset_peak_memory()
    with Timer() as timer:
        for _ in range(args.runs):
            latents, decode_seconds = generate(pipe, variant, args, prompt, negative, args.num_steps, denoiser)
    seconds = timer.seconds / args.runs
    if args.profile:
        one_image = lambda: generate(pipe, variant, args, prompt, negative, args.num_steps, denoiser)  # noqa: E731
        print(profile_kernels(one_image, args.profile, variant.name), flush=True)
    row = dict(
        variant=variant.name, s_per_image=seconds, decode_s=decode_seconds, tflops=flops_per_image / seconds / 1e12,
        mfu=f"{100 * flops_per_image / seconds / 1e12 / args.peak_tflops:.1f}%", peak_gib=peak_gib(),
        latents=latents.float().cpu(),
    )
    del pipe
    free_memory()
    return row


if __name__ == "__main__":
    main()
