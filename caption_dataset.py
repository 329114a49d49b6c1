#!/usr/bin/env python
"""Caption the images of an imagefolder with a vision-language model: rewrites the `text` of its metadata.jsonl.

    python caption_dataset.py --dataset_dir datasets/robot --overwrite_captions \\
        --caption_prefix "An image of sks teal robot, "

Each caption is --caption_prefix + the VLM's answer to --caption_prompt, cut to --caption_max_words words. The raw
answers go to DATASET_DIR/captions_raw.jsonl for review, batch by batch, so a killed run resumes where it stopped
when run again. Existing non-empty captions are kept unless --overwrite_captions. `--caption_model tiny` is a tiny
random VLM built locally for tests and the demo: its captions are gibberish. See cosmos_t2i/captioning.py for why
the default model is Qwen3-VL-4B-Instruct.
"""

from __future__ import annotations

import logging
import sys

from cosmos_t2i import captioning, cli, memory, user_errors
from cosmos_t2i.models import dtype_named

logger = logging.getLogger("caption_dataset")


def parse_args(argv=None):
    parser = cli.parser("Caption an imagefolder's images with a vision-language model.")
    parser.add_argument("--dataset_dir", required=True,
                        help="The imagefolder made by prepare_dataset.py (images + metadata.jsonl), captioned in "
                             "place.")
    parser.add_argument("--caption_model", "--model", dest="caption_model", default=captioning.DEFAULT_MODEL,
                        help="Hub id or local folder of a VLM that AutoModelForImageTextToText loads, or tiny (a "
                             "random VLM built locally: gibberish captions, for tests). Default: %(default)s.")
    parser.add_argument("--caption_prompt", default=captioning.DEFAULT_PROMPT,
                        help="The instruction given to the VLM with each image. Default: %(default)r.")
    parser.add_argument("--caption_prefix", default="",
                        help='Put before every caption, e.g. "An image of sks teal robot, " to keep the trigger '
                             "phrase. Default: none.")
    parser.add_argument("--caption_max_words", type=int, default=80,
                        help="Cut each answer to this many words (the prefix not counted), so prefix + caption "
                             f"stays well inside T5's 512 tokens; at most {captioning.MAX_WORDS_LIMIT}. "
                             "Default: %(default)s.")
    parser.add_argument("--overwrite_captions", action="store_true",
                        help="Caption every image; by default images that already have a non-empty caption keep "
                             "it.")
    parser.add_argument("--batch_size", type=int, default=8, help="Images per VLM call (default: %(default)s).")
    parser.add_argument("--device", default=None,
                        help="Where the VLM runs: cuda, cuda:1, cpu, ... (default: cuda if available, else cpu).")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                        help="VLM weights and compute dtype (default: bf16 on a GPU, fp32 on a CPU).")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be >= 1.")
    if not 1 <= args.caption_max_words <= captioning.MAX_WORDS_LIMIT:
        parser.error(f"--caption_max_words must be between 1 and {captioning.MAX_WORDS_LIMIT} (T5 reads 512 "
                     "tokens).")
    if args.device is not None:
        import torch

        try:
            torch.device(args.device)
        except RuntimeError:
            parser.error(f"--device {args.device} is not a device torch knows; use cuda, cuda:N or cpu.")
    return args


def main(argv=None) -> captioning.Report:
    import torch

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    dtype = dtype_named(args.dtype) if args.dtype else (torch.bfloat16 if on_gpu else torch.float32)
    advice = memory.batch_size_advice(args.batch_size) + (["--device cpu (much slower)"] if on_gpu else [])
    try:
        with memory.explain_out_of_memory(device, advice, "captioning"):
            report = captioning.caption_dataset(
                args.dataset_dir, model=args.caption_model, prompt=args.caption_prompt, prefix=args.caption_prefix,
                max_words=args.caption_max_words, overwrite=args.overwrite_captions, batch_size=args.batch_size,
                device=device, dtype=dtype)
    except captioning.CaptioningError as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)  # one line, whatever the cause's
        raise SystemExit(2) from None
    logger.info(report.summary(args.dataset_dir, args.caption_model))
    if report.captioned or report.resumed:
        logger.info("Next: python embed_captions.py --dataset_dir %s --model 2B", args.dataset_dir)
    return report


if __name__ == "__main__":
    user_errors.run(main)
