"""What frame curation costs on a CPU: video frames per second through prepare_dataset.py, plain and with each filter.

Writes synthetic mp4v clips (cosmos_t2i/sample_clip.py: a textured background and a moving object) and runs
prepare_dataset.main on them once per variant, in one process per clip (--num_workers), into a scratch folder.
Frames/s counts every frame of the input videos (all are decoded); the time is the whole run (decode, curation,
JPEG writing, the dataset-wide duplicate search), without Python's start-up.

    python benchmarks/bench_curation.py --width 1280 --height 720 --num_frames 300 --videos 2 --workers 2
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import prepare_dataset  # noqa: E402
from cosmos_t2i.sample_clip import write_sample_clip  # noqa: E402

# Each variant: prepare_dataset flags on top of --no_curation's all-off (the plain path) or the defaults (all on).
VARIANTS = {
    "plain (--no_curation)": ["--no_curation"],
    "scene cuts only": ["--blur_fraction", "0", "--dedup_distance", "-1"],
    "blur only": ["--scene_threshold", "0", "--dedup_distance", "-1"],
    "near-duplicates only": ["--scene_threshold", "0", "--blur_fraction", "0"],
    "all filters (defaults)": [],
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--num_frames", type=int, default=300, help="Frames per clip.")
    parser.add_argument("--videos", type=int, default=2, help="Number of clips.")
    parser.add_argument("--workers", type=int, default=2, help="prepare_dataset.py --num_workers.")
    parser.add_argument("--stride", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=1, help="Runs per variant; the fastest is reported.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for video in range(args.videos):
            write_sample_clip(Path(tmp) / "in" / f"clip{video}.mp4", args.num_frames, args.width, args.height,
                              seed=video)
        total = args.videos * args.num_frames
        print(f"{args.videos} clips x {args.num_frames} frames, {args.width}x{args.height}, --stride {args.stride}, "
              f"--num_workers {args.workers}\n")
        print("| variant | frames/s | vs plain | images written |\n|---|---|---|---|")
        plain = None
        run = lambda *flags: prepare_dataset.main([  # noqa: E731
            "--input_dataset_dir", str(Path(tmp) / "in"), "--output_dataset_dir", str(Path(tmp) / "out"),
            "--overwrite", "--prompt", "p", "--stride", str(args.stride), "--num_workers", str(args.workers), *flags])
        run("--no_curation")  # warm-up: imports and the page cache are paid here, not by the first variant
        for name, flags in VARIANTS.items():
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                report = run(*flags)
                best = min(best, time.perf_counter() - start)
            rate = total / best
            plain = plain or rate
            rows.append((name, rate, report.frames_written))
            print(f"| {name} | {rate:.0f} | {rate / plain:.2f}x | {report.frames_written} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
