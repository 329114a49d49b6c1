"""Videos and images -> the image files of an imagefolder, decoded in parallel, with every failure reported by name.

What goes in: a folder of videos (NVIDIA's `videos/`), images (NVIDIA's `images/`) or both, subfolders too
(input_files.py sorts every file into read or skipped-with-why), with captions from one `--prompt`, a `.txt` beside
each file, or `metas/`. What comes out: `<video-stem>_f000030.jpg` for frame 30 of a video, `<image-stem>.jpg|.png`
for an image (stems unique: input_files.unique_stems), written by worker processes straight into a staging folder.

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

import concurrent.futures
import contextlib
import dataclasses
import multiprocessing
import os
import re
import shutil
import tempfile
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from . import curation, image_modes, input_files
from .dataset_format import IMAGE_EXTENSIONS
from .user_errors import BadValue, MissingInput, UserError, disk_refusal

VIDEO_EXTENSIONS = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ts"}
JPEG_QUALITY = 95


# ----------------------------------------------------------------------------------------------------------------
# Finding the inputs and their captions (before any decoding, so a missing caption costs nothing)


def find_sources(input_dir: str | os.PathLike, exclude: list[Path] = ()) -> input_files.Inventory:
    """Every file under `input_dir`, subfolders too: the videos and images to read (sorted), the text files, and
    what is skipped with the reason (input_files.py). `exclude`: folders not to read (the output, on a rerun)."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise MissingInput(f"--input_dataset_dir {input_dir} is not a folder.")
    extensions = VIDEO_EXTENSIONS | IMAGE_EXTENSIONS
    inventory = input_files.scan(input_dir, extensions, exclude)
    if not inventory.sources:
        others = "; ".join(f"{name}: {why}" for name, why in inventory.skipped[:5])
        others += f"; and {len(inventory.skipped) - 5} more" if len(inventory.skipped) > 5 else ""
        raise MissingInput(
            f"No videos or images under {input_dir} (extensions {' '.join(sorted(extensions))}). Found "
            f"{len(inventory.texts)} text files and {len(inventory.skipped)} others"
            + (f" ({others})." if others else ".")
        )
    return inventory


def find_captions(sources: list[Path], input_dir: str | os.PathLike, prompt: str | None) -> dict[Path, str]:
    """The caption of every source: `prompt`, else the first of input_files.caption_candidates: `<file>.txt`
    beside it, `metas/<its folders>/<stem>.txt`, `metas/<stem>.txt`.

    Raises, naming the files, if any source has none (an empty caption file counts as none).
    """
    if prompt is not None:
        if not prompt.strip():
            raise BadValue("--prompt is empty.")
        return {source: prompt for source in sources}
    input_dir = Path(input_dir)
    captions, missing = {}, []
    for source in sources:
        found = input_files.first_caption(source, input_dir)
        if found is None:
            missing.append(input_files.relative_name(source, input_dir))
        else:
            captions[source] = found[1]
    if missing:
        shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise MissingInput(
            f"No caption for {len(missing)} of {len(sources)} files: {shown}. Give one caption for all with "
            f"--prompt, or a non-empty .txt with the same name beside each file, or {input_dir / 'metas'}/<name>.txt."
        )
    return captions


def output_stems(sources: list[Path], input_dir: str | os.PathLike | None = None) -> dict[Path, str]:
    """Output name stem per source, no two writing one file (input_files.unique_stems): `a` for a.jpg or
    videos/a.mp4, `cam1__a` for cam1/a.jpg, longer names only where short ones would clash (a.mp4 and a.mov would
    both write a_f000000.jpg: a_mp4, a_mov). `sources` are taken relative to `input_dir` when given."""
    relative = {source: source.relative_to(input_dir) if input_dir else source for source in sources}
    stems = input_files.unique_stems(list(relative.values()), lambda p: p.suffix.lower() in VIDEO_EXTENSIONS)
    return {source: stems[path] for source, path in relative.items()}


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
    measured: dict[str, tuple] = dataclasses.field(default_factory=dict)  # name -> curation.measure()
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
            if disk_refusal(error):  # ... but a full disk is no fault of the file: it stops the run
                raise
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
            image_modes.to_rgb8(ImageOps.exif_transpose(image), opened=image).save(out / name, "PNG")
    result.files.append(name)


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
    # Set by add_unread: every other file under the input, so that the summary accounts for all of them.
    input_dir: str | None = None
    captions_read: int = 0
    not_read: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (file name, why)

    def add_unread(self, inventory: input_files.Inventory, prompt_given: bool) -> None:
        """Account for the files of `inventory` that were not decoded: captions used, and the rest with why."""
        unused = input_files.unused_texts(inventory, prompt_given)
        self.input_dir = str(inventory.root)
        self.captions_read = len(inventory.texts) - len(unused)
        self.not_read = sorted(inventory.skipped + unused)

    def summary(self, output_dir, min_side: int = 0, dry_run: bool = False) -> str:
        wrote = "dry run, nothing written; would write" if dry_run else "wrote"
        lines = [f"Read {self.files_read} files in {self.seconds:.1f} s; {wrote} {self.frames_written} images to "
                 f"{output_dir}."]
        if self.input_dir is not None:
            counts = [(self.files_read, "read"), (self.captions_read, "captions"), (len(self.skipped), "unreadable"),
                      (len(self.too_small), "too small"), (len(self.not_read), "not read")]
            lines.append(f"All {sum(n for n, _ in counts)} entries under {self.input_dir}: "
                         + ", ".join(f"{n} {what}" for n, what in counts) + ".")
        if self.skipped:
            lines.append(f"Skipped {len(self.skipped)} unreadable files:")
            lines += [f"  {name}: {why}" for name, why in self.skipped]
        if self.too_small:
            lines.append(f"Skipped {len(self.too_small)} files whose shorter side is under --min_side {min_side}:")
            lines += [f"  {name}: {size}" for name, size in self.too_small]
        lines += curation.summary_lines(self)
        if self.not_read:
            lines.append(f"Not read ({len(self.not_read)}):")
            lines += _grouped(self.not_read)
        return "\n".join(lines)


def _grouped(entries: list[tuple[str, str]], most: int = 5) -> list[str]:
    """One line per entry, except that more than `most` entries of one folder with one reason (NVIDIA's t5_xxl/
    pickles, say) share a line; each entry with its own reason (a broken symlink's target) keeps its line."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name, why in entries:
        groups.setdefault((name.rstrip("/").rpartition("/")[0], why), []).append(name)
    lines = []
    for (folder, why), names in sorted(groups.items()):
        if len(names) > most:
            lines.append(f"  {folder + '/' if folder else ''}* ({len(names)}: {names[0]} ... {names[-1]}): {why}")
        else:
            lines += [f"  {name}: {why}" for name in names]
    return lines


class DecodingWorkerDied(UserError, RuntimeError):
    """Not the user's mistake, but one they can act on (memory, a file that crashes the decoder): one line."""

    exit_code = 1


def extract_all(jobs: list[tuple[str, str]], options: Options, num_workers: int,
                input_dir: str | os.PathLike | None = None) -> tuple[list[Result], Report]:
    """Run `extract` on every job with a progress bar: in `num_workers` processes, or in this one if <= 1.

    Files are named relative to `input_dir` in the report. Raises DecodingWorkerDied, naming the file, if a
    worker process dies."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    results, report = [], Report()
    with contextlib.closing(_decoded(jobs, options, num_workers, input_dir)) as stream, \
            tqdm(total=len(jobs), unit="file", desc="Decoding") as bar:
        for result in stream:
            results.append(result)
            name = input_files.relative_name(result.source, input_dir)
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


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: end this worker once the main process `parent` is gone. A worker outlives a main process
    killed with -9 (it waits for its next file on a pipe whose writing end it holds itself): idle for ever, or still
    writing into a staging folder that the next run removes."""
    import threading

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _decoded(jobs: list[tuple[str, str]], options: Options, num_workers: int, input_dir):
    """`extract` of every job, in the order they finish.

    Each worker process is an executor of its own, given one file at a time: when a worker dies (the
    out-of-memory killer, kill -9, a crash inside a decoder) only its executor breaks (BrokenProcessPool), and the
    file it had is the one its future holds. (multiprocessing.Pool replaces a dead worker and waits forever for the
    result of the file it lost.) Leaving early waits for the other workers' current files, so that nothing writes
    into the output after the caller has removed it.
    """
    if num_workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield extract(job, options)
        return
    # spawn, not fork: the caller may hold torch/OpenCV thread pools, which forking can deadlock.
    context = multiprocessing.get_context("spawn")
    waiting = list(reversed(jobs))  # pop() takes them in order
    running: dict[concurrent.futures.Future, tuple[concurrent.futures.Executor, tuple[str, str]]] = {}

    def give_next(worker: concurrent.futures.Executor) -> None:
        if waiting:
            job = waiting.pop()
            running[worker.submit(extract, job, options)] = worker, job

    with contextlib.ExitStack() as stack:
        for _ in range(min(num_workers, len(jobs))):
            give_next(stack.enter_context(concurrent.futures.ProcessPoolExecutor(
                1, mp_context=context, initializer=_exit_with_parent, initargs=(os.getpid(),))))
        while running:
            done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                worker, (source, _) = running.pop(future)
                try:
                    result = future.result()
                except BrokenProcessPool:
                    raise DecodingWorkerDied(
                        f"The decoding worker for {input_files.relative_name(source, input_dir)} died: it was killed "
                        "(by the out-of-memory killer, or kill -9) or crashed inside the decoder. Nothing was "
                        "written. If memory ran out, retry with fewer --num_workers; if this file crashes the "
                        "decoder, move it out of the input."
                    ) from None
                give_next(worker)
                yield result
