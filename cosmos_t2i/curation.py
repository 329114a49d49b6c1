"""Frame curation for prepare_dataset.py: scene cuts, blurred frames, near-duplicates and the choice of frames.

Raw footage sampled every N-th frame (NVIDIA's recipe) gives many near-identical frames, motion-blurred ones and
frames on both sides of a cut. What this module does about it, in the order it happens:

1. **Scene cuts** (in the decoding worker, on every frame): PySceneDetect's ContentDetector, fed each frame scaled
   to 256 pixels wide as its SceneManager does, finds the hard cuts; `--stride` sampling restarts at each cut, so
   every shot gets its frames 0, stride, 2*stride, ... of its own.
2. **Blur** (worker, at the end of each video): sharpness is the variance of the Laplacian of the grey frame
   (OpenCV). A frame is dropped when its sharpness is below `blur_fraction` times the median of the video's sampled
   frames: relative to the video itself, so it works at any resolution, noise level and amount of texture.
3. **--max_frames_per_video N** (worker, end of each video), rule "spread": the video's remaining frames, in time
   order, are split into N consecutive groups of (nearly) equal size; each group gives its sharpest frame that is
   not a near-duplicate of a frame already picked from an earlier group (a group with none gives nothing). Rule
   "first" keeps the first N sampled frames and stops decoding there, as before.
4. **Near-duplicates** (main process, after all workers, across every video and image of the dataset): 64-bit
   perceptual hashes (imagehash.phash of the grey image); going from the sharpest image to the least sharp, an
   image is dropped when its hash is within `dedup_distance` bits of one already kept and its mean colour within
   MEAN_COLOUR_TOLERANCE of that one's in every channel. So each group of near-duplicates keeps its sharpest member.
   pHash sees only the grey image's structure: a red and a blue wall, or a flat dark and a flat bright frame, share
   a hash, and the mean colour tells them apart. Workers return only the sharpness, hash and mean colour of each
   image.

Every dropped frame is deleted from the staging folder (so it is not in metadata.jsonl) and counted per reason in
the report. With `Filters.off()` the frames written are exactly those of the plain every-N-th-frame path.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

# Reasons a frame is dropped, as the summary names them.
BLURRED = "blurred"
NEAR_DUPLICATE = "near-duplicate"
OVER_CAP = "not chosen by --max_frames_per_video"
REASONS = (BLURRED, NEAR_DUPLICATE, OVER_CAP)

# PySceneDetect's SceneManager scales frames to about this width before detection (its DEFAULT_MIN_WIDTH): cut
# scores are mean pixel differences, so they barely depend on resolution, and small frames are fast.
DETECTION_WIDTH = 256
MIN_SHOT_FRAMES = 15  # ContentDetector's default min_scene_len: no second cut within 15 frames of the last


@dataclasses.dataclass(frozen=True)
class Filters:
    """The curation settings (prepare_dataset.py's flags). Each filter has an "off" value."""

    scene_threshold: float = 27.0  # ContentDetector's threshold (its default); 0 = no scene detection
    blur_fraction: float = 0.3  # drop below this fraction of the video's median sharpness; 0 = off
    dedup_distance: int = 6  # Hamming distance (of 64 bits) for near-duplicates; -1 = off
    choose: str = "spread"  # how --max_frames_per_video picks its frames: "spread" or "first"

    @classmethod
    def off(cls) -> "Filters":
        """No curation: every --stride-th frame from frame 0, the first N with --max_frames_per_video."""
        return cls(scene_threshold=0.0, blur_fraction=0.0, dedup_distance=-1, choose="first")

    def measures(self, max_frames: int | None) -> bool:
        """Whether the workers must measure every frame they write (the hash only where near-duplicates are
        searched: `dedup_distance` >= 0)."""
        return self.blur_fraction > 0 or self.dedup_distance >= 0 or (max_frames is not None
                                                                     and self.choose == "spread")


# How far (of 255) a channel's mean may move between two near-duplicates: a frame and the next differ by a few
# levels; a relit scene or another wall colour by more.
MEAN_COLOUR_TOLERANCE = 12.0


def measure(grey, mean_rgb: tuple[float, float, float], with_hash: bool = True) -> tuple[float, int, tuple]:
    """(sharpness, perceptual hash, mean colour) of an image: the variance of the Laplacian of its grey uint8 image,
    its 64-bit pHash as an int (0 when not `with_hash`: only the duplicate search needs it, and imagehash's import
    alone costs ~1 s a worker) and `mean_rgb`, its channels' means."""
    import cv2

    _, deviation = cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_32F))
    sharpness = float(deviation[0, 0]) ** 2
    mean_rgb = tuple(round(float(v), 2) for v in mean_rgb)
    if not with_hash:
        return sharpness, 0, mean_rgb
    import imagehash
    from PIL import Image

    return sharpness, int(str(imagehash.phash(Image.fromarray(grey))), 16), mean_rgb


def measure_image_file(path: str | Path) -> tuple[float, int, tuple]:
    """measure() of an image file as written to the dataset (already upright RGB or grey)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"))
        return measure(np.asarray(image.convert("L")), tuple(rgb.reshape(-1, 3).mean(axis=0)))


def near_duplicates(a: tuple, b: tuple, distance: int) -> bool:
    """Whether two measure() results are near-duplicates: hashes within `distance` bits, colours alike."""
    return hamming(a[1], b[1]) <= distance and \
        max(abs(x - y) for x, y in zip(a[2], b[2])) <= MEAN_COLOUR_TOLERANCE


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


class VideoCurator:
    """Which frames of one video to sample (restarting at scene cuts), their measures, and the blur and
    --max_frames_per_video decisions at the end of the video. Lives in the decoding worker."""

    def __init__(self, filters: Filters, stride: int, max_frames: int | None, fps: float):
        self.filters, self.stride, self.max_frames = filters, stride, max_frames
        self.measuring = filters.measures(max_frames)
        self.shot_start = 0
        self.cuts = 0
        self.measured: dict[str, tuple[float, int]] = {}
        self._detector = None
        if filters.scene_threshold > 0:
            from scenedetect.detector import FlashFilter
            from scenedetect.detectors import ContentDetector

            # SUPPRESS reports a cut on the frame where it happens; the default MERGE may report it up to
            # min_scene_len frames later, when frames of the new shot would already have been sampled wrongly.
            self._detector = ContentDetector(threshold=filters.scene_threshold, min_scene_len=MIN_SHOT_FRAMES,
                                             filter_mode=FlashFilter.Mode.SUPPRESS)
            self._fps = float(fps) if fps and fps > 0 else 30.0  # FrameTimecode refuses an int

    def needs_pixels(self, index: int) -> bool:
        """Whether frame `index` must be decoded to pixels (else it is only grabbed: cheaper)."""
        return self._detector is not None or index % self.stride == 0

    def take(self, index: int, frame) -> bool:
        """Whether to keep frame `index` (BGR, decoded because needs_pixels said so). Called for frames in order."""
        if self._detector is not None:
            import cv2
            from scenedetect.common import FrameTimecode

            height, width = frame.shape[:2]
            if width > DETECTION_WIDTH:
                small = (DETECTION_WIDTH, max(1, round(height * DETECTION_WIDTH / width)))
                frame = cv2.resize(frame, small, interpolation=cv2.INTER_LINEAR)  # SceneManager's default
            if self._detector.process_frame(FrameTimecode(index, self._fps), frame):
                self.shot_start = index
                self.cuts += 1
        return (index - self.shot_start) % self.stride == 0

    def record(self, name: str, frame) -> None:
        """Measure a kept frame (BGR) written as `name`."""
        if self.measuring:
            import cv2

            grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
            blue, green, red, _ = cv2.mean(frame)
            self.measured[name] = measure(grey, (red, green, blue), with_hash=self.filters.dedup_distance >= 0)

    def finish(self, names: list[str], output_dir: str | Path) -> tuple[list[str], dict[str, int]]:
        """Apply the blur filter and the spread choice to the video's kept frames `names` (in time order): delete
        the dropped files, return the names left and the count dropped per reason."""
        dropped = {}
        if self.filters.blur_fraction > 0 and names:
            import numpy as np

            floor = self.filters.blur_fraction * float(np.median([self.measured[n][0] for n in names]))
            sharp = [n for n in names if self.measured[n][0] >= floor]
            dropped[BLURRED] = len(names) - len(sharp)
            names = sharp
        if self.filters.choose == "spread" and self.max_frames is not None:
            chosen = names
            if len(names) > self.max_frames:
                chosen = choose_spread(names, self.measured, self.max_frames, self.filters.dedup_distance)
            dropped[OVER_CAP] = len(names) - len(chosen)
            names = chosen
        kept = set(names)
        for name in self.measured:
            if name not in kept:
                (Path(output_dir) / name).unlink(missing_ok=True)
        self.measured = {n: m for n, m in self.measured.items() if n in kept}
        return names, dropped


def choose_spread(names: list[str], measured: dict[str, tuple], count: int, distance: int) -> list[str]:
    """The "spread" rule (module docstring, step 3): `count` consecutive groups of `names` (time order), from each
    its sharpest frame that is no near-duplicate of an earlier pick (`distance` -1: any). Returned in time order."""
    picked: list[str] = []
    for group in _split(names, count):
        for name in sorted(group, key=lambda n: (-measured[n][0], n)):
            if distance < 0 or not any(near_duplicates(measured[name], measured[p], distance) for p in picked):
                picked.append(name)
                break
    return picked


def _split(items: list, parts: int) -> list[list]:
    """`items` cut into `parts` consecutive runs whose lengths differ by at most one (numpy.array_split's rule)."""
    size, extra = divmod(len(items), parts)
    runs, start = [], 0
    for part in range(parts):
        end = start + size + (part < extra)
        runs.append(items[start:end])
        start = end
    return runs


def drop_near_duplicates(measured: dict[str, tuple], distance: int, output_dir: str | Path) -> set[str]:
    """Step 4 of the module docstring over the whole dataset: `measured` maps every image name in `output_dir` to
    measure()'s (sharpness, hash, mean colour). Deletes the near-duplicates and returns their names."""
    import numpy as np
    from tqdm.auto import tqdm

    # Sharpest first (name breaks ties, so identical images keep the same one every run).
    order = sorted(measured, key=lambda n: (-measured[n][0], n))
    kept = np.empty(len(order), dtype=np.uint64)
    kept_colours = np.empty((len(order), 3), dtype=np.float64)
    count = 0
    dropped = set()
    for name in tqdm(order, unit="image", desc="Near-duplicates", disable=len(order) < 5000):
        _, code, colour = measured[name]
        code, colour = np.uint64(code), np.asarray(colour, dtype=np.float64)
        if count and bool(((np.bitwise_count(kept[:count] ^ code) <= distance)
                           & (np.abs(kept_colours[:count] - colour).max(axis=1) <= MEAN_COLOUR_TOLERANCE)).any()):
            dropped.add(name)
            (Path(output_dir) / name).unlink(missing_ok=True)
        else:
            kept[count], kept_colours[count] = code, colour
            count += 1
    return dropped


def curate_dataset(results: list, report, filters: Filters, output_dir: str | Path) -> None:
    """After all workers: drop near-duplicates across the dataset from `results` (frames.Result; their `files` are
    updated) and put every reason's count and the number of scene cuts into `report` (frames.Report)."""
    for result in results:
        report.scene_cuts += result.scene_cuts
        for reason, count in result.dropped.items():
            report.dropped[reason] = report.dropped.get(reason, 0) + count
    if filters.dedup_distance < 0:
        return
    measured = {name: result.measured[name] for result in results for name in result.files}
    duplicates = drop_near_duplicates(measured, filters.dedup_distance, output_dir)
    for result in results:
        result.files = [name for name in result.files if name not in duplicates]
    report.dropped[NEAR_DUPLICATE] = report.dropped.get(NEAR_DUPLICATE, 0) + len(duplicates)
    report.frames_written -= len(duplicates)


def summary_lines(report) -> list[str]:
    """The curation part of the final summary: frames dropped per reason, scene cuts found."""
    lines = []
    total = sum(report.dropped.values())
    if report.dropped:
        counts = ", ".join(f"{report.dropped.get(reason, 0)} {reason}" for reason in REASONS
                           if reason in report.dropped)
        lines.append(f"Curation dropped {total} frames: {counts}.")
    if report.scene_cuts:
        cuts = f"{report.scene_cuts} scene cut" + ("s" if report.scene_cuts > 1 else "")
        lines.append(f"Found {cuts}; --stride sampling restarted at each.")
    return lines
