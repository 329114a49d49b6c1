"""Videos and images -> the image files of an imagefolder, decoded in parallel, with every failure reported by name.

What goes in: a folder of videos (NVIDIA's `videos/`), images (NVIDIA's `images/`) or both, with captions from one
`--prompt`, a `.txt` beside each file, or `metas/<stem>.txt`. What comes out: `<video-stem>_f000030.jpg` for frame 30
of a video, `<image-stem>.jpg|.png` for an image, written by worker processes straight into a staging folder.

File formats, chosen so that nothing is lost that training could see:
- Video frames are JPEG quality 95 with 4:4:4 chroma. The frames come out of a lossy 4:2:0 video codec already; at
  q95 without chroma subsampling the JPEG error is far below that codec's, while the file is ~5-10x smaller than a
  PNG and faster to decode in the training dataloader (NVIDIA's own datasets are JPEG too).
- A JPEG image that needs no change (RGB or grey, no EXIF rotation) is copied byte for byte: no second generation
  of compression. Any other image is decoded, rotated upright, flattened onto white if it has alpha, and written as
  PNG, which is lossless.

Which frames of a video are kept beyond every N-th (scene cuts, blur, near-duplicates) is curation.py's concern;
`Options.filters` carries its settings into the workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import multiprocessing
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from . import curation
from .dataset_format import IMAGE_EXTENSIONS

VIDEO_EXTENSIONS = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ts"}
JPEG_QUALITY = 95


# ----------------------------------------------------------------------------------------------------------------
# Finding the inputs and their captions (before any decoding, so a missing caption costs nothing)


def find_sources(input_dir: str | os.PathLike) -> list[Path]:
    """Videos and images directly in `input_dir` and in its `videos/` and `images/` (NVIDIA's layouts), sorted."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"--input_dataset_dir {input_dir} is not a folder.")
    folders = [input_dir] + [input_dir / sub for sub in ("videos", "images") if (input_dir / sub).is_dir()]
    extensions = VIDEO_EXTENSIONS | IMAGE_EXTENSIONS
    sources = sorted(
        path for folder in folders for path in folder.iterdir()
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in extensions
    )
    if not sources:
        raise FileNotFoundError(
            f"No videos or images in {input_dir} (looked in {', '.join(str(f) for f in folders)}; extensions "
            f"{' '.join(sorted(VIDEO_EXTENSIONS | IMAGE_EXTENSIONS))})."
        )
    return sources


def find_captions(sources: list[Path], input_dir: str | os.PathLike, prompt: str | None) -> dict[Path, str]:
    """The caption of every source: `prompt`, else `<file>.txt` beside it, else `metas/<stem>.txt`.

    Raises, naming the files, if any source has none (an empty caption file counts as none).
    """
    if prompt is not None:
        if not prompt.strip():
            raise ValueError("--prompt is empty.")
        return {source: prompt for source in sources}
    metas = Path(input_dir) / "metas"
    captions, missing = {}, []
    for source in sources:
        for candidate in (source.with_suffix(".txt"), metas / f"{source.stem}.txt"):
            if candidate.is_file():
                text = candidate.read_text(encoding="utf-8").strip()
                if text:
                    captions[source] = text
                    break
        else:
            missing.append(source.name)
    if missing:
        shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise FileNotFoundError(
            f"No caption for {len(missing)} of {len(sources)} files: {shown}. Give one caption for all with "
            f"--prompt, or a non-empty .txt with the same name beside each file, or {metas}/<name>.txt."
        )
    return captions


def output_stems(sources: list[Path]) -> dict[Path, str]:
    """Output name stem per source: its own stem, plus its extension where two videos or two images share a stem
    (a.mp4 and a.mov would both write a_f000000.jpg; a.jpg and a.jpeg both a.jpg)."""
    def kind(source: Path) -> str:
        return "video" if source.suffix.lower() in VIDEO_EXTENSIONS else "image"

    counts: dict[tuple[str, str], int] = {}
    for source in sources:
        counts[kind(source), source.stem] = counts.get((kind(source), source.stem), 0) + 1
    return {s: s.stem if counts[kind(s), s.stem] == 1 else f"{s.stem}_{s.suffix.lower().lstrip('.')}"
            for s in sources}


# ----------------------------------------------------------------------------------------------------------------
# Decoding one file (runs in a worker process; never raises, reports instead)


@dataclasses.dataclass(frozen=True)
class Options:
    output_dir: str
    stride: int = 30
    max_frames_per_video: int | None = None
    min_side: int = 0
    filters: curation.Filters = curation.Filters.off()  # scene cuts, blur, near-duplicates (curation.py)
    write_frames: bool = True  # False for --dry_run: video frames are decoded and measured, not encoded


@dataclasses.dataclass
class Result:
    source: str
    files: list[str] = dataclasses.field(default_factory=list)  # names written into output_dir
    error: str | None = None  # unreadable / truncated: the file is skipped
    too_small: str | None = None  # "WxH" when below --min_side: the file is skipped
    measured: dict[str, tuple[float, int]] = dataclasses.field(default_factory=dict)  # name -> (sharpness, hash)
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)  # curation reason -> frames dropped
    scene_cuts: int = 0


def extract(job: tuple[str, str], options: Options) -> Result:
    """Decode `job` = (source path, output stem) into options.output_dir."""
    source, stem = job
    result = Result(source)
    # FFmpeg and OpenCV print their complaints on fd 2; catch them so they explain the skip instead of
    # scrolling over the progress bar.
    with capture_native_stderr() as messages:
        try:
            if Path(source).suffix.lower() in VIDEO_EXTENSIONS:
                _extract_video(source, stem, options, result)
            else:
                _extract_image(source, stem, options, result)
                if options.filters.dedup_distance >= 0:  # images take part in the dataset-wide duplicate search
                    result.measured = {name: curation.measure_image_file(Path(options.output_dir) / name)
                                       for name in result.files}
        except Exception as error:  # a worker must survive any single bad file
            result.error = f"{type(error).__name__}: {error}"
    if result.error or result.too_small:
        for name in result.files:  # a skipped file leaves nothing behind
            (Path(options.output_dir) / name).unlink(missing_ok=True)
        result.files = []
    if result.error:
        detail = _summarize_native(messages())
        if detail:
            result.error += f" ({detail})"
    return result


def _extract_video(source: str, stem: str, options: Options, result: Result) -> None:
    import cv2
    from PIL import Image

    capture = cv2.VideoCapture(source)
    try:
        if not capture.isOpened():
            result.error = "cannot be opened as a video"
            return
        width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if width and height and min(width, height) < options.min_side:
            result.too_small = f"{width}x{height}"
            return
        expected = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))  # exact for mp4/mov, an estimate for some others
        curator = curation.VideoCurator(options.filters, options.stride, options.max_frames_per_video,
                                        capture.get(cv2.CAP_PROP_FPS))
        index = 0
        # "spread" chooses among the whole video's frames, so only "first" stops decoding at the cap.
        limit = options.max_frames_per_video if options.filters.choose == "first" else None
        # Sequential read: grab() skips the colour conversion of frames we do not keep, and unlike seeking it lands
        # on exactly the frame asked for with every codec.
        while limit is None or len(result.files) < limit:
            decode = curator.needs_pixels(index)
            if decode:
                ok, frame = capture.read()
                if not ok:
                    break
            elif not capture.grab():
                break
            if decode and curator.take(index, frame):
                if min(frame.shape[:2]) < options.min_side:
                    result.too_small = f"{frame.shape[1]}x{frame.shape[0]}"
                    return
                name = f"{stem}_f{index:06d}.jpg"
                if options.write_frames:
                    Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)).save(
                        Path(options.output_dir) / name, "JPEG", quality=JPEG_QUALITY, subsampling=0)
                result.files.append(name)
                curator.record(name, frame)
            index += 1
        reached_end = limit is None or len(result.files) < limit  # else we stopped on purpose
        if index == 0:
            result.error = "no frame could be decoded"
        elif reached_end and expected > 0 and index < expected - max(2, round(0.02 * expected)):
            result.error = f"decoding stopped at frame {index} of {expected}: truncated or corrupt"
        else:
            result.files, result.dropped = curator.finish(result.files, options.output_dir)
            result.measured, result.scene_cuts = curator.measured, curator.cuts
    finally:
        capture.release()


def _extract_image(source: str, stem: str, options: Options, result: Result) -> None:
    from PIL import Image, ImageOps

    out = Path(options.output_dir)
    with Image.open(source) as image:
        image.load()  # decode fully now: a truncated file raises here, not later in training
        upright = image.getexif().get(0x0112, 1) in (0, 1)  # EXIF orientation: 1 = as stored
        size = ImageOps.exif_transpose(image).size if not upright else image.size
        if min(size) < options.min_side:
            result.too_small = f"{size[0]}x{size[1]}"
            return
        if image.format == "JPEG" and image.mode in ("RGB", "L") and upright:
            name = f"{stem}.jpg"
            shutil.copyfile(source, out / name)
        else:
            name = f"{stem}.png"
            _flatten_rgb(ImageOps.exif_transpose(image)).save(out / name, "PNG")
    result.files.append(name)


def _flatten_rgb(image):
    """RGB, with any transparency composited onto white (training reads RGB; black under alpha is an artefact)."""
    from PIL import Image

    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@contextlib.contextmanager
def capture_native_stderr():
    """Redirect file descriptor 2 (where C libraries write) to a temp file; yields a function returning its text."""
    import sys

    captured = {"text": ""}
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lambda: captured["text"]
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured["text"] = sink.read(20000).decode("utf-8", "replace")


def _summarize_native(text: str) -> str:
    """The distinct FFmpeg messages ("[mov,mp4 @ 0x..] moov atom not found" -> "moov atom not found"), at most 2."""
    messages = []
    for line in text.splitlines():
        match = re.match(r"^\[[^\]]+ @ 0x[0-9a-f]+\] (.+)$", line.strip())
        if match and match.group(1) not in messages:
            messages.append(match.group(1))
    return "; ".join(messages[-2:])


# ----------------------------------------------------------------------------------------------------------------
# All files, in parallel


@dataclasses.dataclass
class Report:
    files_read: int = 0
    frames_written: int = 0
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (file name, why)
    too_small: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (file name, "WxH")
    seconds: float = 0.0
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)  # curation reason -> frames dropped
    scene_cuts: int = 0

    def summary(self, output_dir, min_side: int = 0, dry_run: bool = False) -> str:
        wrote = "dry run, nothing written; would write" if dry_run else "wrote"
        lines = [f"Read {self.files_read} files in {self.seconds:.1f} s; {wrote} {self.frames_written} images to "
                 f"{output_dir}."]
        if self.skipped:
            lines.append(f"Skipped {len(self.skipped)} unreadable files:")
            lines += [f"  {name}: {why}" for name, why in self.skipped]
        if self.too_small:
            lines.append(f"Skipped {len(self.too_small)} files whose shorter side is under --min_side {min_side}:")
            lines += [f"  {name}: {size}" for name, size in self.too_small]
        lines += curation.summary_lines(self)
        return "\n".join(lines)


def extract_all(jobs: list[tuple[str, str]], options: Options, num_workers: int) -> tuple[list[Result], Report]:
    """Run `extract` on every job with a progress bar: in `num_workers` processes, or in this one if <= 1."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    work = functools.partial(extract, options=options)
    results, report = [], Report()
    with contextlib.ExitStack() as stack:
        if num_workers > 1 and len(jobs) > 1:
            # spawn, not fork: the caller may hold torch/OpenCV thread pools, which forking can deadlock.
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(min(num_workers, len(jobs))))
            chunksize = max(1, min(16, len(jobs) // (num_workers * 8)))  # fewer round trips for many small images
            stream = pool.imap_unordered(work, jobs, chunksize=chunksize)
        else:
            stream = map(work, jobs)
        bar = stack.enter_context(tqdm(total=len(jobs), unit="file", desc="Decoding"))
        for result in stream:
            results.append(result)
            name = Path(result.source).name
            if result.error:
                report.skipped.append((name, result.error))
            elif result.too_small:
                report.too_small.append((name, result.too_small))
            else:
                report.files_read += 1
                report.frames_written += len(result.files)
            bar.update()
            bar.set_postfix(images=report.frames_written, skipped=len(report.skipped) + len(report.too_small))
    report.skipped.sort()
    report.too_small.sort()
    report.seconds = time.perf_counter() - start
    return results, report
