#!/usr/bin/env python
"""Videos and/or images with captions -> a Hugging Face imagefolder that `embed_captions.py` and training read.

    python prepare_dataset.py --input_dataset_dir datasets/cosmos_nemo_assets \
        --output_dataset_dir datasets/robot --prompt "An image of sks teal robot."

Input: videos (`DIR/videos/*.mp4` as in NVIDIA's example, or anywhere under DIR, subfolders too; anything OpenCV
decodes), images, or NVIDIA's `images/` + `metas/*.txt`. Captions: --prompt for all, else `<file>.txt` beside each
file, else `DIR/metas/<its folders>/<stem>.txt`, else `DIR/metas/<stem>.txt`. Every --stride-th frame is kept, from
frame 0 (NVIDIA: 30) and again from each scene cut; blurred frames and near-duplicates (across the whole dataset) are
dropped, each filter with its flag (cosmos_t2i/curation.py says how each works). --no_curation gives NVIDIA's frames
exactly. The final summary accounts for every file under DIR: read, or skipped with the reason.

Output: OUT/<video-stem>_f000030.jpg ... (`cam1__a.jpg` for DIR/cam1/a.jpg; longer names only where two inputs
would write one file) and OUT/metadata.jsonl (`file_name`, `text`), so that
`datasets.load_dataset("imagefolder", data_dir=OUT)` gives `image` and `text` columns. The folder is built beside
OUT and renamed into place at the end (metadata.jsonl written last), so an interrupted run never leaves a dataset
that loads as if it were complete. Unreadable files are reported by name and skipped; a decoding worker that dies
ends the run with the file it had, writing nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path

from cosmos_t2i import cli, curation, frames, user_errors
from cosmos_t2i.atomic import require_empty_or_overwrite, staged_folder
from cosmos_t2i.dataset_format import METADATA_FILE

logger = logging.getLogger("prepare_dataset")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Turn videos and/or images with captions into an imagefolder.",
                                     formatter_class=cli.HelpFormatter)
    parser.add_argument("--input_dataset_dir", required=True,
                        help="Folder with videos and/or images, directly or in videos/ and images/ (NVIDIA's "
                             "layouts); captions in .txt files beside them or in metas/ unless --prompt is given.")
    parser.add_argument("--output_dataset_dir", default=None,
                        help="Folder for the imagefolder (images + metadata.jsonl). Must be empty or new unless "
                             "--overwrite. Required unless --dry_run.")
    parser.add_argument("--prompt", default=None,
                        help='One caption for every image, e.g. "An image of sks teal robot." (NVIDIA\'s example). '
                             "Without it each file needs a caption file.")
    parser.add_argument("--stride", type=int, default=30,
                        help="Keep every N-th video frame, starting at frame 0 (NVIDIA's default: 30).")
    parser.add_argument("--max_frames_per_video", type=int, default=None,
                        help="Keep at most N frames per video, chosen by --choose_frames (default: no limit).")
    defaults = curation.Filters()
    parser.add_argument("--choose_frames", choices=("spread", "first"), default=defaults.choose,
                        help="How --max_frames_per_video picks: 'spread' cuts the video's sampled frames into N "
                             "consecutive groups and takes from each its sharpest frame that is not a near-duplicate "
                             "of an earlier pick; 'first' takes the first N (and stops decoding there). "
                             "Default: %(default)s.")
    parser.add_argument("--scene_threshold", type=float, default=defaults.scene_threshold,
                        help="Scene-cut threshold of PySceneDetect's ContentDetector (mean HSV change between "
                             "frames); --stride sampling restarts at each cut. 0 turns it off. Default: %(default)s.")
    parser.add_argument("--blur_fraction", type=float, default=defaults.blur_fraction,
                        help="Drop video frames whose sharpness (variance of the Laplacian) is below this fraction "
                             "of the video's median frame. 0 turns it off. Default: %(default)s.")
    parser.add_argument("--dedup_distance", type=int, default=defaults.dedup_distance,
                        help="Near-duplicates across all videos and images: of images whose 64-bit perceptual "
                             "hashes differ in at most this many bits, only the sharpest is kept. -1 turns it off. "
                             "Default: %(default)s.")
    parser.add_argument("--no_curation", action="store_true",
                        help="All of the above off (scene cuts, blur, near-duplicates; --choose_frames first): "
                             "every --stride-th frame from frame 0, as NVIDIA's recipe and earlier versions do.")
    parser.add_argument("--dry_run", action="store_true",
                        help="Decode and curate, print what would be written and dropped, write no dataset "
                             "(images are checked in a temporary folder that is then removed).")
    parser.add_argument("--min_side", type=int, default=0,
                        help="Skip videos/images whose shorter side is below this many pixels (reported). "
                             "Default 0: keep all.")
    parser.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="Decoding processes (default: min(8, CPU count)); 0 or 1 decodes in this process.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace a non-empty --output_dataset_dir (only once the new dataset is complete).")
    user_errors.add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.stride < 1:
        parser.error("--stride must be >= 1.")
    if args.max_frames_per_video is not None and args.max_frames_per_video < 1:
        parser.error("--max_frames_per_video must be >= 1.")
    if args.output_dataset_dir is None and not args.dry_run:
        parser.error("--output_dataset_dir is required (unless --dry_run).")
    if args.scene_threshold < 0:
        parser.error("--scene_threshold must be >= 0 (0 turns scene detection off).")
    if not 0 <= args.blur_fraction < 1:
        parser.error("--blur_fraction must be in [0, 1) (0 turns the blur filter off).")
    if not -1 <= args.dedup_distance <= 64:
        parser.error("--dedup_distance must be in [-1, 64] (-1 turns near-duplicate removal off).")
    return args


def curation_filters(args) -> curation.Filters:
    if args.no_curation:
        return curation.Filters.off()
    return curation.Filters(args.scene_threshold, args.blur_fraction, args.dedup_distance, args.choose_frames)


def main(argv=None) -> frames.Report:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    input_dir = Path(args.input_dataset_dir).resolve()
    output_dir = Path(args.output_dataset_dir).resolve() if args.output_dataset_dir else None
    if output_dir is not None and (output_dir == input_dir or output_dir in input_dir.parents):
        raise user_errors.BadValue(
            f"--output_dataset_dir {output_dir} would replace the input {input_dir}; choose another.")
    # Every check that can fail cheaply runs before any decoding.
    if not args.dry_run:
        require_empty_or_overwrite(output_dir, args.overwrite)
    # Subfolders too; the output may lie inside the input.
    inventory = frames.find_sources(input_dir, exclude=[output_dir] if output_dir else [])
    sources = inventory.sources
    captions = frames.find_captions(sources, input_dir, args.prompt)
    stems = frames.output_stems(sources, input_dir)
    filters = curation_filters(args)

    # A dry run decodes into a scratch folder that is removed; a real one into the staging folder.
    folder = (tempfile.TemporaryDirectory(prefix="prepare_dataset_dry_run-") if args.dry_run
              else staged_folder(output_dir, what="the dataset"))
    with folder as staging:
        staging = Path(staging)
        options = frames.Options(str(staging), args.stride, args.max_frames_per_video, args.min_side, filters,
                                 write_frames=not args.dry_run)
        jobs = [(str(source), stems[source]) for source in sources]
        results, report = frames.extract_all(jobs, options, args.num_workers, input_dir)
        report.add_unread(inventory, prompt_given=args.prompt is not None)
        curation.curate_dataset(results, report, filters, staging)
        if args.dry_run:
            logger.info(report.summary(output_dir or "--output_dataset_dir", args.min_side, dry_run=True))
            return report
        records = sorted(
            (name, captions[Path(result.source)]) for result in results for name in result.files
        )
        if not records:
            logger.info(report.summary(output_dir, args.min_side))
            raise user_errors.UserError("No image was written, so no dataset was made; the summary above says why "
                                        "each file was skipped.")
        # metadata.jsonl last: only a folder with every image in it can carry it.
        with open(staging / METADATA_FILE, "w", encoding="utf-8") as f:
            for name, text in records:
                f.write(json.dumps({"file_name": name, "text": text}, ensure_ascii=False) + "\n")
    logger.info(report.summary(output_dir, args.min_side))
    logger.info("Next: python embed_captions.py --dataset_dir %s --model 2B", args.output_dataset_dir)
    return report


if __name__ == "__main__":
    user_errors.run(main)
