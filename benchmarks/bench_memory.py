"""fp8 base and low-memory sampling, measured: what --fp8_base costs in accuracy, and what sampling needs.

Three parts, each one command (random-initialised real 2B/14B configs, bf16; training memory and speed of every
recipe are bench_train.py's, with --card_gib to emulate a smaller GPU):

    python benchmarks/bench_memory.py layers --model 2B --out benchmarks/results/fp8_layers_2b.md
    python benchmarks/bench_memory.py quality --model 2B --out benchmarks/results/fp8_quality_2b.md
    python benchmarks/bench_memory.py sampling --model 14B --fp8 --card_gib 20 --out benchmarks/results/s.md

- layers: each Linear type of the model with its weight stored in fp8 (fp8_base.Float8StoredLinear) against bf16,
  on the activations it really sees in a forward pass: the relative L2 error of its output; and the whole
  transformer's output with the blocks' token-wise layers in fp8 (what --fp8_base stores), and with the adaLN
  layers in fp8 too (what it does not).
- quality: a one-image LoRA learning run on a bf16 base against one on an fp8 base, from the same weights,
  adapters, data and noise: both loss curves, and how closely each trained LoRA, applied to the bf16 base, samples
  the training latent (relative L2 over 35 steps with CFG 4, three seeds).
- sampling: infer_text2image.py's memory path: T5 (t5-11b's encoder at full size, random: benchmarks/common.py)
  encodes one batch of prompts first and is freed, then the transformer goes to the GPU (in fp8 with --fp8,
  streamed with --offload) and makes images; the peak counts both phases, and the time per image is the mean
  after a warm-up image (compilation).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_infer import build_pipeline  # noqa: E402
from benchmarks.common import (  # noqa: E402
    T5_11B_ENCODER, T5_VOCAB_SIZE, Timer, device_name, free_memory, limit_memory, peak_gib, reset_peak_memory,
    write_table,
)
from cosmos_t2i import fp8, fp8_base, speed  # noqa: E402
from cosmos_t2i.cuda_graphs import GraphedTransformer  # noqa: E402
from cosmos_t2i.methods import LoraFineTune  # noqa: E402
from cosmos_t2i.models import PRESETS  # noqa: E402
from cosmos_t2i.objective import diffusion_loss  # noqa: E402
from cosmos_t2i.pipeline import place_for_sampling  # noqa: E402
from cosmos_t2i.sampling import decode_images, sample_latents  # noqa: E402
from cosmos_t2i.text_encoding import PROMPTS_PER_BATCH  # noqa: E402

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["layers", "quality", "sampling"])
    parser.add_argument("--model", default="2B", choices=["2B", "14B", "tiny"])
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--width", type=int, default=1360)
    parser.add_argument("--steps", type=int, default=200, help="quality: training steps of each run.")
    parser.add_argument("--learning_rate", type=float, default=5e-4, help="quality: LoRA lr (constant).")
    parser.add_argument("--quality_size", type=int, default=512, help="quality: the training image's side (px).")
    parser.add_argument("--num_steps", type=int, default=35, help="sampling steps.")
    parser.add_argument("--runs", type=int, default=2, help="sampling: timed images.")
    parser.add_argument("--fp8", action="store_true", help="sampling: fp8 matmuls, as infer's --fp8.")
    parser.add_argument("--offload", action="store_true", help="sampling: stream the blocks, as infer's --offload.")
    parser.add_argument("--no_text_encoder", action="store_true", help="sampling: leave T5 out.")
    parser.add_argument("--compile", action="store_true", help="sampling: compile the blocks (a prompt list's path).")
    parser.add_argument("--card_gib", type=float, default=None, help="Emulate a GPU of this many GiB.")
    parser.add_argument("--device", default="cuda", help="cpu only for a smoke test of the script itself.")
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def _relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.float() - reference.float()).norm() / reference.float().norm()).item()


def _inputs(config: dict, height: int, width: int, device, batch: int = 1, seed: int = 1):
    generator = torch.Generator(device).manual_seed(seed)
    x0 = torch.randn(batch, config["in_channels"], 1, height // 8, width // 8, device=device, generator=generator)
    text = torch.randn(batch, 512, config["text_embed_dim"], device=device, generator=generator)
    return x0, text.to(torch.bfloat16)


def _layer_type(name: str) -> str:
    """transformer_blocks.3.attn1.to_q -> attn1.to_q (blocks share their types)."""
    parts = name.split(".")
    return ".".join(parts[2:]) if parts[0] == "transformer_blocks" else name


@torch.no_grad()
def layers(args, device) -> tuple[list[dict], str]:
    from cosmos_t2i.models import random_transformer

    torch.manual_seed(0)
    config = PRESETS[args.model].transformer_config
    model = random_transformer(config, torch.bfloat16, device).eval()
    x0, text = _inputs(config, args.height, args.width, device)
    sigma = torch.tensor([1.0], device=device)
    from cosmos_t2i.objective import preconditioning

    c_in, _, _, t = preconditioning(sigma)
    call = dict(hidden_states=(x0 * c_in).to(torch.bfloat16), timestep=t.to(torch.bfloat16),
                encoder_hidden_states=text, padding_mask=torch.zeros(1, 1, args.height, args.width, device=device,
                                                                     dtype=torch.bfloat16), return_dict=False)
    errors: dict[str, list[float]] = {}

    def measure(name):
        def hook(module, inputs, output):
            stored = fp8_base.Float8StoredLinear(module, torch.bfloat16)
            errors.setdefault(_layer_type(name), []).append(_relative(stored(inputs[0]), output))
        return hook

    handles = [m.register_forward_hook(measure(n)) for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    reference = model(**call)[0]
    for handle in handles:
        handle.remove()
    rows = [dict(layer=k, layers=len(v), rel_err_mean=sum(v) / len(v), rel_err_max=max(v))
            for k, v in sorted(errors.items())]

    blocks_fp8 = copy.deepcopy(model)
    count = store(blocks_fp8, adaln=False)
    rows.append(dict(layer=f"whole transformer, {count} block Linears in fp8 (--fp8_base)", layers=count,
                     rel_err_mean=_relative(blocks_fp8(**call)[0], reference)))
    del blocks_fp8
    with_adaln = copy.deepcopy(model)
    count = store(with_adaln, adaln=True)
    rows.append(dict(layer=f"whole transformer, adaLN in fp8 too ({count} Linears)", layers=count,
                     rel_err_mean=_relative(with_adaln(**call)[0], reference)))
    header = f"### fp8-stored weights, output error against bf16, {args.model}, {args.width}x{args.height}, " \
             f"{device_name()}"
    return rows, header


def store(model, adaln: bool) -> int:
    """fp8_base's quantization of the blocks (and, for the measurement only, of their adaLN layers too)."""
    count = fp8_base.store_blocks_in_fp8(model, next(model.parameters()).device)
    if adaln:
        for block in model.transformer_blocks:
            for norm in (block.norm1, block.norm2, block.norm3):
                for name in ("linear_1", "linear_2"):
                    setattr(norm, name, fp8_base.Float8StoredLinear(getattr(norm, name)))
                    count += 1
    return count


def quality(args, device) -> tuple[list[dict], str]:
    """One image learned by a LoRA on a bf16 base and by one on an fp8 base, from the same start."""
    config = PRESETS[args.model].transformer_config
    torch.manual_seed(0)
    exact = LoraFineTune(16, 16, torch.bfloat16).build(None, config, random_init=True, device=device)
    quantized = copy.deepcopy(exact)
    fp8_base.store_blocks_in_fp8(quantized, device)
    x0, text = _inputs(config, args.quality_size, args.quality_size, device, seed=7)
    curves = {}
    for name, model in (("bf16 base", exact), ("fp8 base", quantized)):
        model.train()
        speed.checkpoint_blocks(model, 1.0)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(0.9, 0.99), weight_decay=0.0, fused=True)
        losses = []
        for step in range(args.steps):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = diffusion_loss(model, x0, text, generator=torch.Generator(device).manual_seed(step),
                                      text_dropout=0.0)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves[name] = losses
        print(name, "loss first/last 20:", sum(losses[:20]) / 20, sum(losses[-20:]) / 20, flush=True)

    # Each trained adapter on the bf16 base: copy the fp8 run's adapter into the exact model.
    adapters = {n: p.detach().clone() for n, p in quantized.named_parameters() if p.requires_grad}
    del quantized
    free_memory()
    pipe = build_pipeline("tiny", device)  # scheduler and latent shapes only: no decode here
    pipe.transformer = exact.eval()
    pipe.set_progress_bar_config(disable=True)
    negative = torch.zeros_like(text)

    def sample_errors():
        return [_relative(sample_latents(pipe, text, negative, args.quality_size, args.quality_size, 35, 4.0,
                                         torch.Generator("cpu").manual_seed(seed)), x0) for seed in range(3)]

    with torch.no_grad():
        bf16_errors = sample_errors()
        for n, p in exact.named_parameters():
            if p.requires_grad:
                p.copy_(adapters[n])
        fp8_errors = sample_errors()
        for n, p in exact.named_parameters():  # B = 0: the untrained base
            if n.endswith("lora_B.default.weight"):
                p.zero_()
        untrained_errors = sample_errors()
    a, b = curves["bf16 base"], curves["fp8 base"]
    window = min(20, args.steps)  # 20-step means (fewer steps: one mean of all)
    smooth = lambda c: [sum(c[i:i + window]) / window for i in range(0, len(c) - window + 1, window)]  # noqa: E731
    gaps = [abs(x - y) / y for x, y in zip(smooth(b), smooth(a))]
    rows = [
        dict(run="bf16 base", loss_first_20=sum(a[:20]) / 20, loss_last_20=sum(a[-20:]) / 20,
             sample_rel_err=", ".join(f"{e:.3f}" for e in bf16_errors)),
        dict(run="fp8 base", loss_first_20=sum(b[:20]) / 20, loss_last_20=sum(b[-20:]) / 20,
             sample_rel_err=", ".join(f"{e:.3f}" for e in fp8_errors),
             curve_gap_max=f"{max(gaps):.3f} (per {window}-step mean, relative to bf16's)"),
        dict(run="untrained (B = 0)", sample_rel_err=", ".join(f"{e:.3f}" for e in untrained_errors)),
    ]
    if args.out:
        Path(args.out).with_suffix(".curves.json").write_text(json.dumps(curves))
    header = (f"### LoRA r16 one-image learning, bf16 vs fp8 base, {args.model}, {args.quality_size}x"
              f"{args.quality_size}, {args.steps} steps, lr {args.learning_rate:g}, {device_name()}")
    return rows, header


@torch.no_grad()
def sampling(args, device) -> tuple[list[dict], str]:
    """The peak of infer_text2image.py's two phases (T5, then the transformer and VAE) and the time per image."""
    from transformers import T5Config, T5EncoderModel

    pipe = build_pipeline(args.model, device)
    pipe.transformer = pipe.transformer.to("cpu")  # as infer loads it: in host memory until T5 is gone
    free_memory()
    limit_memory(args.card_gib, device)
    reset_peak_memory()
    t5_peak = None
    if not args.no_text_encoder:
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(device):
                encoder = T5EncoderModel(T5Config(vocab_size=T5_VOCAB_SIZE, **T5_11B_ENCODER)).eval()
        finally:
            torch.set_default_dtype(default)
        # One batch of prompts as infer_text2image.py encodes them (text_encoding.PROMPTS_PER_BATCH x 512 tokens).
        ids = torch.randint(0, T5_VOCAB_SIZE, (PROMPTS_PER_BATCH, 512), device=device)
        encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.cpu()
        del encoder
        free_memory()
        t5_peak = peak_gib()
    place_for_sampling(pipe.transformer, device, fp8=args.fp8, offload=args.offload)
    if args.fp8:
        fp8.deduplicate_compiled_computations()
    if args.compile and not args.offload:
        speed.compile_transformer_blocks(pipe.transformer, multi_kernel=True)
    denoiser = GraphedTransformer(pipe.transformer) if device.type == "cuda" and not args.offload else None
    speed.single_frame_vae_convs(pipe.vae)
    pipe.set_progress_bar_config(disable=True)
    config = PRESETS[args.model].transformer_config
    _, text = _inputs(config, args.height, args.width, device)

    def image(seed):
        latents = sample_latents(pipe, text, torch.zeros_like(text), args.height, args.width, args.num_steps, 4.0,
                                 torch.Generator("cpu").manual_seed(seed), batched_cfg=True, denoiser=denoiser)
        return decode_images(pipe, latents)

    try:
        image(0)  # warm-up: compilation, CUDA graph recording, cuDNN plans
        with Timer() as timer:
            for seed in range(args.runs):
                image(seed + 1)
        s_per_image, fits = timer.seconds / args.runs, "yes"
    except torch.OutOfMemoryError:
        s_per_image, fits = "OOM", "no"
    mode = ("fp8" if args.fp8 else "bf16") + (" + offload" if args.offload else "") + \
        (" + compiled" if args.compile and not args.offload else "")
    row = dict(model=args.model, weights=mode, text_encoder="none" if args.no_text_encoder else "T5 (t5-11b), then freed",
               card_gib=args.card_gib or "full", fits=fits, s_per_image=s_per_image, peak_gib=peak_gib(),
               t5_phase_peak_gib=t5_peak)
    header = f"### Sampling memory, {args.model}, {args.width}x{args.height}, {args.num_steps} steps, CFG 4, " \
             f"VAE decode included, {device_name()}"
    return [row], header


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    rows, header = {"layers": layers, "quality": quality, "sampling": sampling}[args.part](args, device)
    columns = sorted({k for row in rows for k in row}, key=lambda k: [k for r in rows for k in r].index(k))
    write_table(rows, columns, header, args.out)


if __name__ == "__main__":
    main()
