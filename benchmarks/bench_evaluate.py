"""Seconds per evaluation candidate: evaluate_text2image.py itself, on full-size models with random weights.

Builds, once, stand-ins of the real shapes with random weights (nothing can be downloaded): a 2B (or 14B) pipeline
folder (the preset's transformer, T5-11B's encoder, Wan 2.1's VAE, the tiny tokenizer), DINO ViT-S/16 and CLIP
ViT-L/14 at 224 pixels, and a folder of reference images. Then runs the real command on them, the base model as
the one candidate, DreamBooth's 25 subject prompts x --num_images_per_prompt seeds, and times it whole. The numbers
of the metrics mean nothing here; the time does.

    python benchmarks/bench_evaluate.py --model 2B --work_dir /tmp/bench-eval --out results/evaluate_2b.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate_text2image  # noqa: E402
from benchmarks.common import T5_11B_ENCODER, device_name, peak_gib, reset_peak_memory, write_table  # noqa: E402
from cosmos_t2i import evaluation as ev  # noqa: E402
from cosmos_t2i import fidelity, tiny_pipeline  # noqa: E402
from cosmos_t2i.models import PRESETS  # noqa: E402

DINO_VITS16 = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                   image_size=224, patch_size=16)
CLIP_VIT_L14 = dict(
    text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=224, patch_size=14),
    projection_dim=768,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="2B", choices=["2B", "14B", "tiny"],
                        help="tiny: the test shapes everywhere (a CPU smoke test of this script).")
    parser.add_argument("--work_dir", required=True, help="Where the stand-in models and the evaluation go.")
    parser.add_argument("--num_images_per_prompt", type=int, default=4)
    parser.add_argument("--num_prompts", type=int, default=len(ev.SUBJECT_TEMPLATES),
                        help="The first N of DreamBooth's 25 subject prompts.")
    parser.add_argument("--num_steps", type=int, default=35)
    parser.add_argument("--out", default=None, help="Markdown table to write (a .json of the rows beside it).")
    return parser.parse_args(argv)


def build_stand_ins(model: str, work_dir: Path) -> dict[str, Path]:
    """The pipeline, DINO, CLIP and reference folders under `work_dir` (each built once)."""
    from PIL import Image

    tiny = model == "tiny"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    paths = {name: work_dir / name for name in ("pipeline", "dino", "clip", "reference")}
    if not (paths["pipeline"] / "model_index.json").is_file():
        if tiny:
            tiny_pipeline.build_tiny_pipeline(paths["pipeline"])
        else:
            tiny_pipeline.build_random_pipeline(paths["pipeline"], PRESETS[model].transformer_config, {},
                                                T5_11B_ENCODER, device=device, dtype=torch.bfloat16)
    if not (paths["dino"] / "config.json").is_file():
        fidelity.build_random_dino(paths["dino"], fidelity.TINY_DINO_SHAPE if tiny else DINO_VITS16)
    if not (paths["clip"] / "config.json").is_file():
        fidelity.build_random_clip(paths["clip"], fidelity.TINY_CLIP_SHAPE if tiny else CLIP_VIT_L14)
    paths["reference"].mkdir(parents=True, exist_ok=True)
    for k in range(8):
        Image.new("RGB", (512, 512), (30 * k, 100, 200)).save(paths["reference"] / f"ref_{k}.png")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the builders' fp32 copies
    return paths


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    work_dir = Path(args.work_dir)
    start = time.perf_counter()
    paths = build_stand_ins(args.model, work_dir)
    build_s = time.perf_counter() - start
    prompts_file = work_dir / "prompts.txt"
    prompts_file.write_text("\n".join(ev.SUBJECT_TEMPLATES[:args.num_prompts]) + "\n")

    reset_peak_memory()
    start = time.perf_counter()
    rows = evaluate_text2image.main(evaluate_text2image.parse_args([
        "--model", str(paths["pipeline"]), "--disable_guardrail", "--subject", "sks teal robot",
        "--prompts_file", str(prompts_file), "--reference_dir", str(paths["reference"]),
        "--num_images_per_prompt", str(args.num_images_per_prompt), "--num_steps", str(args.num_steps),
        "--dino_model", str(paths["dino"]), "--clip_model", str(paths["clip"]),
        "--output_dir", str(work_dir / "evaluation"),
    ]))
    total_s = time.perf_counter() - start
    images = args.num_prompts * args.num_images_per_prompt
    generate_s = rows[0]["seconds_per_image"] * images
    result = [dict(images=images, steps=args.num_steps, command_s=total_s, generate_s=generate_s,
                   s_per_image=rows[0]["seconds_per_image"], rest_s=total_s - generate_s,
                   peak_gib=peak_gib(), stand_in_build_s=build_s)]
    header = (f"# evaluate_text2image.py, one candidate ({args.model}, random weights, 1:1 {args.num_steps} steps, "
              f"guidance 4) x {args.num_prompts} prompts x {args.num_images_per_prompt} seeds on {device_name()}. "
              "command_s: the whole call (pipeline load, T5, generation with compile warm-up, metric models, "
              "scores, report); generate_s: its sampling; rest_s: everything else")
    write_table(result, list(result[0]), header, args.out)
    return result


if __name__ == "__main__":
    main()
