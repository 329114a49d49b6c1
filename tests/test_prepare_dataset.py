"""prepare_dataset.py: videos/images -> imagefolder; bad files reported and skipped; nothing half-written."""

import json
from pathlib import Path

import datasets
import pytest
from PIL import Image

import prepare_dataset
from cosmos_t2i import frames
from cosmos_t2i.sample_clip import write_sample_clip

PROMPT = "An image of sks teal robot."


def _clip(path, num_frames=25):
    return write_sample_clip(path, num_frames=num_frames, width=64, height=48)


def _jpeg(path, size=(80, 64), color=(10, 200, 30)):
    Image.new("RGB", size, color).save(path, quality=90)
    return path


def _prepare(input_dir, output_dir, *extra):
    return prepare_dataset.main(["--input_dataset_dir", str(input_dir), "--output_dataset_dir", str(output_dir),
                                 "--num_workers", "0", *extra])


def _metadata(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metadata.jsonl").read_text().splitlines()]


def test_video_frames_every_stride_load_as_imagefolder(tmp_path):
    _clip(tmp_path / "in" / "videos" / "robot.mp4", num_frames=25)  # NVIDIA's videos/ layout
    report = _prepare(tmp_path / "in", tmp_path / "out", "--prompt", PROMPT, "--stride", "10")

    assert (report.files_read, report.frames_written, report.skipped) == (1, 3, [])
    names = ["robot_f000000.jpg", "robot_f000010.jpg", "robot_f000020.jpg"]
    assert _metadata(tmp_path / "out") == [{"file_name": n, "text": PROMPT} for n in names]
    dataset = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "out"), split="train")
    assert dataset.column_names == ["image", "text"] and dataset["text"] == [PROMPT] * 3
    assert dataset[0]["image"].size == (64, 48)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no staging folder left

    _prepare(tmp_path / "in", tmp_path / "capped", "--prompt", PROMPT, "--stride", "10", "--max_frames_per_video", "2",
             "--choose_frames", "first")
    assert [r["file_name"] for r in _metadata(tmp_path / "capped")] == names[:2]


def test_captions_beside_files_or_in_metas_and_min_side(tmp_path):
    source = tmp_path / "in"
    _clip(source / "videos" / "clip.mp4", num_frames=5)
    (source / "metas").mkdir()
    (source / "metas" / "clip.txt").write_text("a teal robot moving\n")  # NVIDIA's metas/
    _jpeg(source / "photo.jpg")
    (source / "photo.txt").write_text("a green square")  # beside the file
    _jpeg(source / "small.jpg", size=(30, 20))
    (source / "small.txt").write_text("too small")
    Image.new("RGBA", (64, 64), (0, 128, 128, 128)).save(source / "logo.png")
    (source / "logo.txt").write_text("a logo")

    # Flat test images all share one perceptual hash (no structure), so near-duplicate removal stays off here.
    report = _prepare(source, tmp_path / "out", "--min_side", "40", "--dedup_distance", "-1")

    assert report.too_small == [("small.jpg", "30x20")]
    rows = {r["file_name"]: r["text"] for r in _metadata(tmp_path / "out")}
    assert rows == {"clip_f000000.jpg": "a teal robot moving", "photo.jpg": "a green square", "logo.png": "a logo"}
    # An unchanged JPEG is copied byte for byte; an image with alpha becomes RGB PNG.
    assert (tmp_path / "out" / "photo.jpg").read_bytes() == (source / "photo.jpg").read_bytes()
    assert Image.open(tmp_path / "out" / "logo.png").mode == "RGB"


def test_missing_captions_error_names_the_files_before_decoding(tmp_path, monkeypatch):
    source = tmp_path / "in"
    _clip(source / "a.mp4", num_frames=3)
    _jpeg(source / "b.jpg")
    (source / "b.txt").write_text("has one")
    _jpeg(source / "c.jpg")
    monkeypatch.setattr(frames, "extract_all", lambda *a, **k: pytest.fail("decoded before checking captions"))

    with pytest.raises(FileNotFoundError, match=r"No caption for 2 of 3 files: a\.mp4, c\.jpg"):
        _prepare(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_empty_output_needs_overwrite(tmp_path):
    _jpeg((tmp_path / "in").mkdir() or tmp_path / "in" / "one.jpg")
    _prepare(tmp_path / "in", tmp_path / "out", "--prompt", "first")
    with pytest.raises(FileExistsError, match="--overwrite"):
        _prepare(tmp_path / "in", tmp_path / "out", "--prompt", "second")
    assert _metadata(tmp_path / "out")[0]["text"] == "first"

    _prepare(tmp_path / "in", tmp_path / "out", "--prompt", "second", "--overwrite")
    assert _metadata(tmp_path / "out")[0]["text"] == "second"


def test_interrupted_run_leaves_previous_dataset_and_no_partial_one(tmp_path, monkeypatch):
    _jpeg((tmp_path / "in").mkdir() or tmp_path / "in" / "one.jpg")
    _prepare(tmp_path / "in", tmp_path / "out", "--prompt", "first")
    real = frames.extract_all

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)  # images written into the staging folder ...
        raise KeyboardInterrupt  # ... then the user presses Ctrl-C

    monkeypatch.setattr(frames, "extract_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _prepare(tmp_path / "in", tmp_path / "out", "--prompt", "second", "--overwrite")
    with pytest.raises(KeyboardInterrupt):
        _prepare(tmp_path / "in", tmp_path / "new", "--prompt", "second")
    assert _metadata(tmp_path / "out")[0]["text"] == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_truncated_and_empty_files_are_reported_and_skipped(tmp_path):
    source = tmp_path / "in"
    _clip(source / "good.mp4", num_frames=12)
    data = _clip(tmp_path / "whole.mp4", num_frames=12).read_bytes()
    (source / "truncated.mp4").write_bytes(data[: len(data) // 2])
    _jpeg(source / "good.jpg")
    (source / "empty.jpg").write_bytes(b"")
    jpeg = _jpeg(tmp_path / "whole.jpg").read_bytes()
    (source / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])

    # Two worker processes: the real parallel path.
    report = _prepare(source, tmp_path / "out", "--prompt", PROMPT, "--stride", "5", "--num_workers", "2")

    assert [name for name, _ in report.skipped] == ["cut.jpg", "empty.jpg", "truncated.mp4"]
    summary = report.summary(tmp_path / "out")
    assert all(name in summary for name in ("cut.jpg", "empty.jpg", "truncated.mp4"))
    assert (report.files_read, report.frames_written) == (2, 4)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["good.jpg", "good_f000000.jpg", "good_f000005.jpg", "good_f000010.jpg", "metadata.jsonl"]
    dataset = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "out"), split="train")
    assert len(dataset) == 4 and all(image.size in [(64, 48), (80, 64)] for image in dataset["image"])


def test_output_names_do_not_collide():
    stems = frames.output_stems([Path("a.mp4"), Path("a.mov"), Path("a.jpg"), Path("b.jpg"), Path("b.jpeg")])
    assert stems == {Path("a.mp4"): "a_mp4", Path("a.mov"): "a_mov", Path("a.jpg"): "a", Path("b.jpg"): "b_jpg",
                     Path("b.jpeg"): "b_jpeg"}


def test_a_run_that_died_mid_swap_gets_its_previous_output_back(tmp_path):
    """A run killed between moving the old output aside and renaming the new one in: the next run puts the
    complete old output back (never losing it) and clears the dead run's staging folder."""
    from cosmos_t2i.atomic import staged_folder

    target = tmp_path / "dataset"
    dead_pid = 2**22 + 12345  # above Linux's default pid_max: no such process
    (tmp_path / f".dataset.old-{dead_pid}").mkdir()
    (tmp_path / f".dataset.old-{dead_pid}" / "metadata.jsonl").write_text("previous\n")
    (tmp_path / f".dataset.partial-{dead_pid}").mkdir()
    with pytest.raises(RuntimeError):
        with staged_folder(target):
            raise RuntimeError("this run fails too")
    assert (target / "metadata.jsonl").read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]
