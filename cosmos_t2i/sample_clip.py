"""Write a short synthetic video (a teal "robot" moving across a scene) for the demo and the tests.

    python -m cosmos_t2i.sample_clip OUT_DIR [--name robot.mp4] [--num_frames 72]

Uses OpenCV's `mp4v` encoder, which every opencv-python(-headless) wheel has (H.264 often is not built in).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def write_sample_clip(path: str | Path, num_frames: int = 72, width: int = 320, height: int = 180,
                      fps: int = 24, seed: int = 0) -> Path:
    """Write the clip to `path` (its parent is created) and return the path. Same arguments, same video."""
    import cv2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write mp4v video to {path}.")
    rng = np.random.default_rng(seed)
    # A fixed textured background so frames are not trivially compressible, and a moving object on it.
    yy, xx = np.mgrid[0:height, 0:width]
    background = np.stack([80 + 60 * np.sin(xx / 23.0), 90 + 50 * np.cos(yy / 17.0), 120 + 0 * xx], axis=-1)
    background = (background + rng.normal(0, 6, background.shape)).clip(0, 255).astype(np.uint8)
    size = height // 3
    for t in range(num_frames):
        frame = background.copy()
        x = int((width - size) * t / max(1, num_frames - 1))
        y = int((height - size) / 2 + (height / 6) * np.sin(2 * np.pi * t / 24))
        frame[y:y + size, x:x + size] = (128, 128, 0)  # BGR teal body
        eye = size // 5
        frame[y + eye:y + 2 * eye, x + eye:x + 2 * eye] = (255, 255, 255)
        frame[y + eye:y + 2 * eye, x + 3 * eye:x + 4 * eye] = (255, 255, 255)
        writer.write(frame)
    writer.release()
    return path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Write a short synthetic mp4 for the demo and the tests.")
    parser.add_argument("output_dir", help="Folder to write the clip into (created if missing).")
    parser.add_argument("--name", default="robot.mp4", help="File name of the clip.")
    parser.add_argument("--num_frames", type=int, default=72, help="Number of frames (24 fps).")
    parser.add_argument("--width", type=int, default=320, help="Frame width in pixels.")
    parser.add_argument("--height", type=int, default=180, help="Frame height in pixels.")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    path = write_sample_clip(Path(args.output_dir) / args.name, args.num_frames, args.width, args.height)
    print(f"Wrote {path} ({args.num_frames} frames, {args.width}x{args.height})")
    return path


if __name__ == "__main__":
    main()
