"""Captions per second of the default captioner, Qwen3-VL-4B-Instruct, on one GPU: random weights at full size.

The model is Qwen3VLForConditionalGeneration built from Qwen/Qwen3-VL-4B-Instruct's config.json (transcribed
below: no download), in bf16, with random weights. The processor is Qwen3-VL's (16 px patches merged 2x2) around
the tiny VLM's tokenizer, so the prompt is a few dozen tokens as with Qwen's own; a frame is not resized, so a
1280x704 frame is 880 image tokens. Random weights never stop on their own, so every answer is forced to the full
budget caption_dataset.py gives --caption_max_words (min = max new tokens): the numbers are those of the longest
captions, an upper bound on time. Timed: captioning.generate (processor + generate + decode), the path
caption_dataset.py runs; image decoding from disk is not included.

    python benchmarks/bench_caption.py --out benchmarks/results/caption_qwen3vl_4b.md
    python benchmarks/bench_caption.py --model tiny --device cpu --batch_sizes 2 --runs 1   # smoke test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import Timer, device_name, free_memory, peak_gib, reset_peak_memory, write_table  # noqa: E402
from cosmos_t2i import captioning, tiny_vlm  # noqa: E402

# Qwen/Qwen3-VL-4B-Instruct's config.json; transformers 5 calls rope_scaling rope_parameters (theta inside).
QWEN3_VL_4B_TEXT = dict(
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, hidden_act="silu", max_position_embeddings=262144, rms_norm_eps=1e-6,
    attention_bias=False, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                     "mrope_interleaved": True},
)
QWEN3_VL_4B_VISION = dict(
    depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560, patch_size=16,
    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17],
    hidden_act="gelu_pytorch_tanh",
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Captions per second of Qwen3-VL-4B (random weights) on a GPU.")
    parser.add_argument("--model", choices=["4B", "tiny"], default="4B",
                        help="4B: Qwen3-VL-4B-Instruct's config at full size; tiny: the test VLM (smoke test).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8, 32],
                        help="Images per generate call (default: 1 8 32).")
    parser.add_argument("--width", type=int, default=1280, help="Frame width in pixels (default: 1280).")
    parser.add_argument("--height", type=int, default=704, help="Frame height in pixels (default: 704).")
    parser.add_argument("--max_words", type=int, default=80,
                        help="caption_dataset.py's --caption_max_words, which sets the token budget (default: 80).")
    parser.add_argument("--runs", type=int, default=2, help="Timed calls per batch size, after one warm-up.")
    parser.add_argument("--out", default=None, help="Markdown table to write (a .json of the rows beside it).")
    return parser.parse_args(argv)


def build(model: str, device: torch.device, dtype: torch.dtype, pixels: int):
    from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen3VLConfig

    if model == "tiny":
        path = tiny_vlm.tiny_vlm_path()
        vlm = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
        processor = AutoProcessor.from_pretrained(path)
    else:
        processor = tiny_vlm.build_processor(min_pixels=pixels, max_pixels=pixels)
        ids = tiny_vlm.special_token_ids(processor.tokenizer)
        config = Qwen3VLConfig(text_config=QWEN3_VL_4B_TEXT, vision_config=QWEN3_VL_4B_VISION,
                               tie_word_embeddings=True, **tiny_vlm.vision_token_ids(ids))
        torch.manual_seed(0)
        with torch.device(device):  # initialised where it runs: no 9 GB detour through the CPU
            vlm = AutoModelForImageTextToText.from_config(config, dtype=dtype)
        vlm.generation_config.eos_token_id = ids["<|im_end|>"]
        vlm.generation_config.pad_token_id = ids["<|endoftext|>"]
    processor.tokenizer.padding_side = "left"
    return processor, vlm.to(device).eval()


def main(argv=None) -> list[dict]:
    from PIL import Image

    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    processor, vlm = build(args.model, device, dtype, args.width * args.height)
    tokens = captioning.max_new_tokens(args.max_words)
    vlm.generation_config.min_new_tokens = tokens  # every answer as long as the budget allows
    params = sum(p.numel() for p in vlm.parameters())
    rows = []
    for batch_size in args.batch_sizes:
        images = [Image.new("RGB", (args.width, args.height), (40 * i % 256, 120, 200)) for i in range(batch_size)]
        captioning.generate(processor, vlm, images, captioning.DEFAULT_PROMPT, tokens)  # warm-up
        reset_peak_memory()
        seconds = 0.0
        for _ in range(args.runs):
            with Timer() as timer:
                captioning.generate(processor, vlm, images, captioning.DEFAULT_PROMPT, tokens)
            seconds += timer.seconds
        captions = batch_size * args.runs
        rows.append(dict(batch=batch_size, captions_per_s=captions / seconds, s_per_call=seconds / args.runs,
                         new_tokens=tokens,
                         generated_tokens_per_s=captions * tokens / seconds, peak_gib=peak_gib()))
        free_memory()
    header = (f"# Captioning: Qwen3-VL {args.model} ({params / 1e9:.2f} B parameters, random weights, "
              f"{str(dtype).removeprefix('torch.')}) on {device_name()}, {args.width}x{args.height} frames, "
              f"{tokens} new tokens per caption (--caption_max_words {args.max_words})")
    write_table(rows, ["batch", "captions_per_s", "s_per_call", "new_tokens", "generated_tokens_per_s", "peak_gib"],
                header, args.out)
    return rows


if __name__ == "__main__":
    main()
