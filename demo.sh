#!/usr/bin/env bash
# The whole job on the tiny model, on a CPU, with no downloads:
# a sample clip -> prepare_dataset -> caption_dataset -> embed_captions -> train (full fine-tune and LoRA) -> infer
# -> images on disk.
# Usage: bash demo.sh [PYTHON] [OUTPUT_DIR]   (`make demo` runs it in the project's virtualenv)
set -euo pipefail
PY=${1:-python}
OUT=${2:-demo_output}
PROMPT="An image of sks teal robot."
export COSMOS_T2I_TINY_DIR="$OUT/tiny-pipeline"   # where `--model tiny` is built once and reused
export COSMOS_T2I_TINY_VLM_DIR="$OUT/tiny-vlm"    # and `--caption_model tiny`
start=$(date +%s)
rm -rf "$OUT" && mkdir -p "$OUT"

"$PY" -m cosmos_t2i.sample_clip "$OUT/videos"
"$PY" prepare_dataset.py --input_dataset_dir "$OUT/videos" --output_dataset_dir "$OUT/dataset" \
    --prompt "$PROMPT" --stride 10
# VLM captions that keep the trigger phrase. The tiny VLM has random weights: its captions are gibberish.
"$PY" caption_dataset.py --dataset_dir "$OUT/dataset" --caption_model tiny --overwrite_captions \
    --caption_prefix "An image of sks teal robot, " --caption_max_words 20
"$PY" embed_captions.py --dataset_dir "$OUT/dataset" --model tiny --cache_latents
"$PY" train_text2image.py --model tiny --dataset_dir "$OUT/dataset" --output_dir "$OUT/full_ft" \
    --max_iter 20 --save_iter 10
"$PY" train_text2image.py --model tiny --lora --dataset_dir "$OUT/dataset" --output_dir "$OUT/lora" \
    --max_iter 20 --save_iter 20
"$PY" infer_text2image.py --model tiny --dit_path "$OUT/full_ft/checkpoints/iter_000000020" --load_ema \
    --prompt "$PROMPT" --save_path "$OUT/robot_full_ft.jpg"
"$PY" infer_text2image.py --model tiny --lora "$OUT/lora/checkpoints/iter_000000020/model" \
    --prompt "$PROMPT" --save_path "$OUT/robot_lora.jpg"

echo "demo finished in $(( $(date +%s) - start )) s: $OUT/robot_full_ft.jpg, $OUT/robot_lora.jpg"
