"""Frame curation in prepare_dataset.py: scene cuts restart the sampling, blurred frames and near-duplicates
(across videos and images) are dropped and counted, --max_frames_per_video spreads its choice, --no_curation gives
the plain every-N-th-frame output bit for bit, --dry_run writes nothing."""

import io
import json
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import prepare_dataset
from cosmos_t2i import curation
from cosmos_t2i.sample_clip import write_sample_clip

W, H = 96, 64
CUT = 33  # first frame of the second shot
BLURRED = (10, 20, 43)
STILL_FROM = 48  # in the second shot the object stops: frames 48..65 are identical


def _background(shot):
    rng = np.random.default_rng(shot)
    yy, xx = np.mgrid[0:H, 0:W]
    if shot == 0:
        image = np.stack([150 + 60 * np.sin(xx / 5.0), 90 + 50 * np.cos(yy / 4.0), 60 + 0 * xx], -1)
    else:
        image = np.stack([40 + 30 * np.cos((xx + yy) / 6.0), 60 + 40 * np.sin(yy / 3.0), 200 + 0 * xx], -1)
    return (image + rng.normal(0, 8, image.shape)).clip(0, 255).astype(np.uint8)


def _write_video(path, images, fps=24):
    """mp4v, as cosmos_t2i/sample_clip.py writes its clip."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (W, H))
    for image in images:
        writer.write(image)
    writer.release()
    return path


def _two_shot_clip(path):
    """66 frames: shot 1 (warm textured background, a yellow square moving) to frame 32, a hard cut, shot 2 (a blue
    background, a white square that stops at frame 48). Frames 10, 20 and 43 are strongly blurred."""
    images = []
    for t in range(66):
        shot = int(t >= CUT)
        frame = _background(shot)
        u = min(t - CUT, STILL_FROM - CUT) if shot else t
        x = int((W - 20) * u / (32 if shot == 0 else STILL_FROM - CUT))
        y = int((H - 20) / 2 + 15 * np.sin(u / 3))
        frame[y:y + 20, x:x + 20] = (255, 255, 255) if shot else (0, 255, 255)
        if t in BLURRED:
            frame = cv2.GaussianBlur(frame, (0, 0), 2.5)
        images.append(frame)
    return _write_video(path, images)


def _prepare(input_dir, output_dir, *extra):
    out = [] if output_dir is None else ["--output_dataset_dir", str(output_dir)]
    return prepare_dataset.main(["--input_dataset_dir", str(input_dir), *out, "--prompt", "p",
                                 "--num_workers", "0", *extra])


def _names(output_dir):
    rows = [json.loads(line) for line in (Path(output_dir) / "metadata.jsonl").read_text().splitlines()]
    on_disk = sorted(p.name for p in Path(output_dir).iterdir() if p.name != "metadata.jsonl")
    assert [r["file_name"] for r in rows] == on_disk  # dropped frames are neither on disk nor in the metadata
    return on_disk


def _plain_frames(video, stride, limit=None):
    """What prepare_dataset wrote before curation existed: every stride-th decoded frame from frame 0, JPEG q95
    4:4:4, named by frame index (the reference the curation-off output must match byte for byte)."""
    capture, out, index = cv2.VideoCapture(str(video)), {}, 0
    while limit is None or len(out) < limit:
        ok, frame = capture.read()
        if not ok:
            break
        if index % stride == 0:
            buffer = io.BytesIO()
            Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)).save(buffer, "JPEG", quality=95, subsampling=0)
            out[f"{Path(video).stem}_f{index:06d}.jpg"] = buffer.getvalue()
        index += 1
    return out


def test_curation_restarts_at_the_cut_and_drops_blurred_and_duplicate_frames(tmp_path):
    video = _two_shot_clip(tmp_path / "in" / "clip.mp4")
    report = _prepare(tmp_path / "in", tmp_path / "out", "--stride", "5")

    # Shot 1 is sampled at 0, 5, ..., 30; shot 2 restarts at the cut: 33, 38, 43, 48, 53, 58, 63.
    # Blurred: 10, 20, 43. Identical: 48, 53, 58, 63 (one is kept).
    assert report.scene_cuts == 1
    assert report.dropped == {curation.BLURRED: 3, curation.NEAR_DUPLICATE: 3}
    names = _names(tmp_path / "out")
    still = [n for n in names if int(n[6:12]) >= STILL_FROM]
    assert len(still) == 1
    expected = [f"clip_f{i:06d}.jpg" for i in (0, 5, 15, 25, 30, 33, 38)] + still
    assert names == expected and report.frames_written == len(names)
    assert "3 blurred, 3 near-duplicate" in report.summary(tmp_path / "out")
    # The frames kept are written exactly as the plain path writes that frame.
    reference = _plain_frames(video, stride=1)
    assert all((tmp_path / "out" / n).read_bytes() == reference[n] for n in names)


def test_no_curation_gives_the_plain_frames_bit_for_bit(tmp_path):
    video = _two_shot_clip(tmp_path / "in" / "clip.mp4")
    report = _prepare(tmp_path / "in", tmp_path / "off", "--stride", "5", "--no_curation")
    expected = _plain_frames(video, stride=5)
    assert _names(tmp_path / "off") == sorted(expected)  # blurred and identical frames, no restart at the cut
    assert all((tmp_path / "off" / n).read_bytes() == data for n, data in expected.items())
    assert (report.dropped, report.scene_cuts) == ({}, 0)

    # Each filter off by its own flag is the same output; --max_frames_per_video first takes the first N.
    _prepare(tmp_path / "in", tmp_path / "flags", "--stride", "5", "--scene_threshold", "0", "--blur_fraction", "0",
             "--dedup_distance", "-1", "--choose_frames", "first", "--max_frames_per_video", "4")
    first = _plain_frames(video, stride=5, limit=4)
    assert _names(tmp_path / "flags") == sorted(first)
    assert all((tmp_path / "flags" / n).read_bytes() == data for n, data in first.items())


def test_near_duplicates_across_two_videos_and_an_image_folder_keep_the_sharpest(tmp_path):
    source = tmp_path / "in"
    clip = write_sample_clip(source / "videos" / "a.mp4", num_frames=30, width=W, height=H)
    capture, decoded = cv2.VideoCapture(str(clip)), []
    while (frame := capture.read()[1]) is not None:
        decoded.append(frame)
    # b.mp4: the same footage, slightly soft (not blurred enough for the blur filter: it is relative to b itself).
    _write_video(source / "videos" / "b.mp4", [cv2.GaussianBlur(f, (0, 0), 0.8) for f in decoded])
    (source / "images").mkdir()
    soft = cv2.GaussianBlur(decoded[10], (0, 0), 1.0)  # a photo of the scene at frame 10, softer
    Image.fromarray(cv2.cvtColor(soft, cv2.COLOR_BGR2RGB)).save(source / "images" / "still.png")
    other = np.random.default_rng(5).integers(0, 255, (H, W, 3), dtype=np.uint8)  # unrelated: stays
    Image.fromarray(cv2.resize(other, (W // 4, H // 4)).repeat(4, 0).repeat(4, 1)).save(source / "images" / "other.png")

    report = _prepare(source, tmp_path / "out", "--stride", "10", "--num_workers", "2")

    assert _names(tmp_path / "out") == ["a_f000000.jpg", "a_f000010.jpg", "a_f000020.jpg", "other.png"]
    assert report.dropped[curation.NEAR_DUPLICATE] == 4  # b's three frames and still.png
    assert report.dropped[curation.BLURRED] == 0

    _prepare(source, tmp_path / "all", "--stride", "10", "--dedup_distance", "-1")
    assert len(_names(tmp_path / "all")) == 8


def test_flat_images_are_duplicates_only_in_the_same_colour(tmp_path):
    """pHash sees the grey image's structure only: every flat image has one hash. The mean colour separates a red
    wall from a blue one, and a dark frame from a bright one; the same flat image twice is still one image."""
    source = tmp_path / "in"
    source.mkdir()
    colours = {"red": (200, 30, 30), "blue": (30, 30, 200), "dark": (20, 20, 20), "bright": (230, 230, 230),
               "red_again": (202, 31, 29)}
    for name, colour in colours.items():
        Image.new("RGB", (W, H), colour).save(source / f"{name}.png")
    report = _prepare(source, tmp_path / "out")
    assert _names(tmp_path / "out") == ["blue.png", "bright.png", "dark.png", "red.png"]
    assert report.dropped[curation.NEAR_DUPLICATE] == 1


def test_max_frames_per_video_spreads_over_the_video(tmp_path):
    _two_shot_clip(tmp_path / "in" / "clip.mp4")
    report = _prepare(tmp_path / "in", tmp_path / "out", "--stride", "5", "--max_frames_per_video", "3")
    # After the blur filter, 11 frames in three groups: 0 5 15 25 | 30 33 38 48 | 53 58 63; one from each, the
    # sharpest (decoding went on to the end of the video: not the first three frames).
    groups = [(0, 5, 15, 25), (30, 33, 38, 48), (53, 58, 63)]
    names = _names(tmp_path / "out")
    assert [[f"clip_f{i:06d}.jpg" in names for i in group].count(True) for group in groups] == [1, 1, 1]
    assert report.dropped == {curation.BLURRED: 3, curation.OVER_CAP: 8, curation.NEAR_DUPLICATE: 0}


def test_choose_spread_takes_the_sharpest_distinct_frame_of_each_group():
    grey = (128.0, 128.0, 128.0)
    measured = {"a": (5.0, 0b0000, grey), "b": (9.0, 0b0001, grey), "c": (8.0, 0b0011, grey),
                "d": (7.0, 0xFFFF, grey), "e": (1.0, 0, grey)}
    # groups [a b] [c d] [e]: b; c is within 1 bit of b, so d; e repeats b exactly, so nothing.
    assert curation.choose_spread(list("abcde"), measured, 3, distance=1) == ["b", "d"]
    assert curation.choose_spread(list("abcde"), measured, 3, distance=-1) == ["b", "c", "e"]


def test_dry_run_counts_and_writes_nothing(tmp_path):
    _two_shot_clip(tmp_path / "in" / "clip.mp4")
    (tmp_path / "in" / "photo.png").write_bytes(b"")  # unreadable: reported, as in a real run
    scratch = sorted(Path(tempfile.gettempdir()).glob("prepare_dataset_dry_run-*"))

    report = _prepare(tmp_path / "in", tmp_path / "out", "--stride", "5", "--dry_run")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    assert sorted(Path(tempfile.gettempdir()).glob("prepare_dataset_dry_run-*")) == scratch
    assert (report.frames_written, report.scene_cuts) == (8, 1)
    assert report.dropped == {curation.BLURRED: 3, curation.NEAR_DUPLICATE: 3}
    assert [name for name, _ in report.skipped] == ["photo.png"]
    assert _prepare(tmp_path / "in", None, "--stride", "5", "--dry_run").frames_written == 8  # no output needed


@pytest.mark.parametrize("flag, value", [("--blur_fraction", "1.5"), ("--dedup_distance", "-2"),
                                         ("--scene_threshold", "-1")])
def test_bad_filter_values_are_one_line_errors(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        _prepare(tmp_path, tmp_path / "out", flag, value)
    assert exit_info.value.code == 2 and f"error: {flag}" in capsys.readouterr().err


def test_bench_curation_runs_every_variant():
    from benchmarks import bench_curation

    rows = bench_curation.main(["--width", "64", "--height", "48", "--num_frames", "20", "--videos", "2",
                                "--workers", "0", "--stride", "10"])
    written = {name: count for name, rate, count in rows}
    assert list(written) == list(bench_curation.VARIANTS) and all(rate > 0 for _, rate, _ in rows)
    # The two clips differ only in their noise: the duplicate search drops frames of one that repeat the other's.
    assert written["plain (--no_curation)"] == 4 and written["near-duplicates only"] < 4
