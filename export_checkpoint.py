"""Export a checkpoint of this kit to the formats other tools read.

    # ours (full fine-tune, with its EMA when present; or a LoRA merged into --model) -> NVIDIA's iter_N.pt
    python export_checkpoint.py nvidia --checkpoint OUTPUT_DIR/checkpoints/iter_000001000 --output iter_000001000.pt
    # LoRA -> ComfyUI (NVIDIA module names under diffusion_model., alpha included)
    python export_checkpoint.py comfyui --lora OUTPUT_DIR/checkpoints/iter_000001000 --output my_lora_comfyui.safetensors
    # base model (+ a fine-tuned or NVIDIA checkpoint) + LoRA(s) merged -> one diffusers transformer folder
    python export_checkpoint.py diffusers --model 2B --lora OUTPUT_DIR/checkpoints/iter_000001000 --output merged/

Weights are cast to --dtype (default bfloat16, as NVIDIA's and diffusers' released weights); LoRA merges are computed
in float32 first. Every output is written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cosmos_t2i import cli, user_errors
from cosmos_t2i.atomic import atomic_output
from cosmos_t2i.checkpoint_paths import (Checkpoint, NoEMAError, loras_to_apply, resolve_checkpoint, resolve_lora,
                                         trained_from)
from cosmos_t2i.lora import expand_scales, read_lora, to_comfyui
from cosmos_t2i.nvidia_format import save_nvidia_checkpoint
from cosmos_t2i.models import DTYPES, Model, resolve_model
from cosmos_t2i.pipeline import fine_tuned_transformer



def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    sub = parser.add_subparsers(dest="format", required=True)

    nvidia = sub.add_parser("nvidia", formatter_class=cli.HelpFormatter,
                            help="ours -> NVIDIA's .pt (net.* and, when present, net_ema.*)")
    nvidia.add_argument("--checkpoint", required=True, help="OUTPUT_DIR, an iter_N/ folder or its model/.")
    nvidia.add_argument("--model", default=None,
                        help="For a LoRA checkpoint: the base model it is merged into (default: the run's).")

    comfyui = sub.add_parser("comfyui", formatter_class=cli.HelpFormatter,
                             help="LoRA -> ComfyUI's LoRA format for Cosmos-Predict2")
    comfyui.add_argument("--lora", required=True, help="An iter_N/ folder, its model/, a .safetensors or a hub id.")
    comfyui.add_argument("--load_ema", action="store_true", help="Export the EMA adapter (model/ema/).")

    merged = sub.add_parser("diffusers", formatter_class=cli.HelpFormatter,
                            help="base + checkpoint + LoRA(s) -> one diffusers transformer folder")
    merged.add_argument("--model", default=None,
                        help="2B, 14B, tiny, a pipeline folder or hub id (default: the run's).")
    merged.add_argument("--checkpoint", default=None,
                        help="Ours (full or LoRA) or NVIDIA's .pt, as infer_text2image.py --dit_path takes it.")
    merged.add_argument("--load_ema", action="store_true", help="The EMA weights of --checkpoint.")
    merged.add_argument("--trust_checkpoint", action="store_true",
                        help="Load an NVIDIA .pt with weights_only=False (runs code in the file; trusted files only).")
    merged.add_argument("--nvidia_lora_alpha", type=float, default=None)
    merged.add_argument("--lora", nargs="+", default=[])
    merged.add_argument("--lora_scale", nargs="+", type=float, default=None)

    for p in (nvidia, comfyui, merged):
        p.add_argument("--output", required=True)
        p.add_argument("--dtype", default="bfloat16", choices=DTYPES)
        user_errors.add_debug_flag(p)
    return parser.parse_args(argv)


def _base_model(args, checkpoints: list[Checkpoint]) -> Model:
    """--model, else the model the first of our runs among `checkpoints` was trained from."""
    name = args.model or trained_from(checkpoints)
    if name is None:
        raise user_errors.BadValue("Pass --model: the checkpoint does not record the model it was trained from.")
    return resolve_model(name)


def export_nvidia(args) -> None:
    from diffusers import CosmosTransformer3DModel

    dtype = DTYPES[args.dtype]
    checkpoint = resolve_checkpoint(args.checkpoint)
    if checkpoint.kind == "nvidia":
        raise user_errors.BadValue(f"{args.checkpoint} is already an NVIDIA checkpoint.")
    try:
        ema = resolve_checkpoint(args.checkpoint, load_ema=True)
    except NoEMAError:
        ema = None
    if checkpoint.kind == "full":
        transformer_config = CosmosTransformer3DModel.load_config(checkpoint.path)

        def weights(c):
            return CosmosTransformer3DModel.from_pretrained(c.path, dtype=dtype).state_dict()
    else:
        model = _base_model(args, [checkpoint])
        transformer_config = model.transformer_config

        def weights(c):
            fused = fine_tuned_transformer(model, None, [c], [1.0], torch.float32, fuse=True)
            return {k: v.to(dtype) for k, v in fused.state_dict().items()}
    with atomic_output(args.output) as tmp:
        save_nvidia_checkpoint(tmp, weights(checkpoint), weights(ema) if ema else None, transformer_config)
    print(f"wrote {args.output} (net.*{' and net_ema.*' if ema else ''}, {args.dtype})")


def export_comfyui(args) -> None:
    from safetensors.torch import save_file

    checkpoint = resolve_lora(args.lora, args.load_ema)
    lora = read_lora(checkpoint.path, checkpoint.source)
    # alpha stays float32: ComfyUI reads it with .item().
    tensors = {k: v if k.endswith(".alpha") else v.to(DTYPES[args.dtype]).contiguous()
               for k, v in to_comfyui(lora).items()}
    with atomic_output(args.output) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    print(f"wrote {args.output} ({len(lora.modules)} LoRA modules, ComfyUI names)")


def export_diffusers(args) -> None:
    output = Path(args.output)
    if output.exists():
        raise user_errors.ExistingOutput(f"{output} exists; choose a new --output folder.")
    checkpoint = resolve_checkpoint(args.checkpoint, args.load_ema) if args.checkpoint else None
    loras = loras_to_apply(checkpoint, args.lora)
    model = _base_model(args, ([checkpoint] if checkpoint else []) + loras)
    scales = expand_scales(args.lora_scale, len(loras))
    transformer = fine_tuned_transformer(model, checkpoint, loras, scales, torch.float32, fuse=True,
                                         nvidia_lora_alpha=args.nvidia_lora_alpha,
                                         trust_checkpoint=args.trust_checkpoint)
    with atomic_output(output) as tmp:
        transformer.to(DTYPES[args.dtype]).save_pretrained(tmp)
    print(f"wrote {output} (diffusers CosmosTransformer3DModel, {args.dtype})")


def main(args):
    {"nvidia": export_nvidia, "comfyui": export_comfyui, "diffusers": export_diffusers}[args.format](args)


if __name__ == "__main__":
    cli.main_entry(parse_args, main)
