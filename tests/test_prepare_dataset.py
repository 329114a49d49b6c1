"""prepare_dataset.py: videos/images -> imagefolder; bad files reported and skipped; nothing half-written."""

import json
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
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

    report = _prepare(source, tmp_path / "out", "--min_side", "40")

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


def _files_under(folder):
    """Every entry under `folder` as prepare_dataset counts them: files, symlinks, and hidden folders as one."""
    entries = []
    for path in sorted(Path(folder).rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts[:-1]):
            continue  # inside a hidden folder: counted as that folder
        if path.name.startswith(".") and path.is_dir():
            entries.append(path)
        elif path.is_symlink() or path.is_file():
            entries.append(path)
    return entries


def test_subfolders_are_read_with_their_captions_and_every_file_is_accounted_for(tmp_path):
    source = tmp_path / "in"
    for folder in ("cam1", "cam2", "images/cam3", "metas/cam3", ".git"):
        (source / folder).mkdir(parents=True)
    _jpeg(source / "cam1" / "a.jpg", color=(200, 0, 0))
    (source / "cam1" / "a.txt").write_text("left camera")  # beside the file, as at the top level
    _jpeg(source / "cam2" / "a.jpg", color=(0, 0, 200))
    (source / "cam2" / "a.txt").write_text("right camera")
    _jpeg(source / "images" / "cam3" / "b.jpg")
    (source / "metas" / "cam3" / "b.txt").write_text("third camera")  # NVIDIA's metas/, mirroring the folders
    _clip(source / "cam1" / "walk.mp4", num_frames=3)
    (source / "metas" / "walk.txt").write_text("walking")  # NVIDIA's flat metas/<stem>.txt
    (source / "notes.md").write_text("not an image")
    (source / "stray.txt").write_text("no image of this name")
    (source / ".DS_Store").write_bytes(b"")
    (source / ".git" / "config").write_text("")
    (source / "cam2" / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    (source / "cam2" / "empty.jpg").write_bytes(b"")
    (source / "cam2" / "empty.txt").write_text("an empty image")

    # The cameras' stills are one flat image (true duplicates): every file is to be accounted for, so no curation.
    report = _prepare(source, tmp_path / "out", "--stride", "2", "--no_curation")

    rows = {r["file_name"]: r["text"] for r in _metadata(tmp_path / "out")}
    assert rows == {"cam1__a.jpg": "left camera", "cam2__a.jpg": "right camera", "cam3__b.jpg": "third camera",
                    "cam1__walk_f000000.jpg": "walking", "cam1__walk_f000002.jpg": "walking"}
    assert (tmp_path / "out" / "cam2__a.jpg").read_bytes() == (source / "cam2" / "a.jpg").read_bytes()
    assert (report.files_read, report.frames_written) == (4, 5)
    assert [name for name, _ in report.skipped] == ["cam2/empty.jpg"]
    assert report.not_read == [
        (".DS_Store", "hidden file"), (".git/", "hidden folder"),
        ("cam2/gone.jpg", f"broken symlink (-> {tmp_path / 'deleted.jpg'})"),
        ("notes.md", "unsupported extension (.md)"), ("stray.txt", "no video or image has this caption's name"),
    ]
    assert report.captions_read == 5  # a.txt twice, cam3/b.txt, walk.txt, empty.txt
    # Every file under the input is in exactly one count, and the summary names every one not written.
    entries = len(_files_under(source))
    assert entries == report.files_read + report.captions_read + len(report.skipped) + len(report.not_read) == 15
    summary = report.summary(tmp_path / "out")
    assert f"All {entries} entries under {source}" in summary
    assert all(name in summary for name, _ in report.not_read + report.skipped)
    assert "cam2/gone.jpg: broken symlink" in summary

    # Output inside the input, on a rerun: the output folder is not read as input.
    _prepare(source, source / "prepared", "--stride", "2", "--no_curation")
    report = _prepare(source, source / "prepared", "--stride", "2", "--overwrite", "--no_curation")
    assert ("prepared/", "the output folder") in report.not_read
    assert sorted(r["file_name"] for r in _metadata(source / "prepared")) == sorted(rows)


def test_no_two_inputs_share_an_output_name(tmp_path):
    source = tmp_path / "in"
    (source / "images").mkdir(parents=True)
    (source / "cam1").mkdir()
    stills = ["a.jpg", "images/a.jpg", "cam1/a.jpg", "cam1__a.jpg", "clip_f000000.jpg", "A.png"]
    for i, name in enumerate(stills):
        _jpeg(source / name, color=(40 * i, 255 - 40 * i, 7 * i))
    _clip(source / "clip.mp4", num_frames=3)

    report = _prepare(source, tmp_path / "out", "--prompt", PROMPT, "--stride", "2")

    names = [r["file_name"] for r in _metadata(tmp_path / "out")]
    assert len(names) == len({n.casefold() for n in names}) == len(stills) + 2 == report.frames_written
    written = {n: np.asarray(Image.open(tmp_path / "out" / n).convert("RGB"))[0, 0] for n in names}
    for name in stills:  # each still is in the dataset, as its own file
        colour = np.asarray(Image.open(source / name).convert("RGB"))[0, 0]
        assert sum(np.abs(pixel.astype(int) - colour).max() <= 2 for pixel in written.values()) == 1, name
    assert sum(n.endswith(("_f000000.jpg", "_f000002.jpg")) and "clip" in n for n in names) >= 2


def test_output_names_are_unique_by_construction_and_flat_layouts_keep_theirs():
    is_video = lambda p: p.suffix in (".mp4", ".mov")  # noqa: E731
    paths = [Path(p) for p in (
        "a.jpg", "a.png", "A.jpg", "a.mp4", "a.mov", "images/a.jpg", "videos/a.mp4", "cam1/a.jpg", "cam1__a.jpg",
        "cam1__a_jpg.jpg", "cam1/a_jpg.jpg", "clip.mp4", "clip_f000000.jpg", "clip_mp4_f000000.png",
        "clip_mp4_f1234567.jpg", "x_jpg_3.jpg", "x.jpg", "x.jpeg", "x_jpg.png")]
    stems = frames.output_stems(paths)

    def writes(path, stem):  # the names `extract` can give this input's files
        return [f"{stem}_f{i:06d}.jpg" for i in (0, 1234567)] if is_video(path) else [f"{stem}.jpg", f"{stem}.png"]

    claimed = [name.casefold() for path in paths for name in writes(path, stems[path])]
    assert len(claimed) == len(set(claimed))
    flat = [Path(p) for p in ("videos/robot.mp4", "images/photo.jpg", "metas_free.png", "clip.mov")]
    assert frames.output_stems(flat) == {p: p.stem for p in flat}


def _children(pid):
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        if int(fields[1]) == pid:  # field 4 of /proc/PID/stat: the parent's pid
            children.append(int(stat.parent.name))
    return children


def _the_process_reading(parent, file_name, timeout=120):
    """The pid of the child of `parent` that has `file_name` open."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in _children(parent):
            try:
                opened = [os.readlink(fd) for fd in Path(f"/proc/{child}/fd").iterdir()]
            except OSError:
                continue
            if any(path.endswith(file_name) for path in opened):
                return child
        time.sleep(0.005)
    pytest.fail(f"no worker of {parent} opened {file_name}")


def _kill_the_process_reading(parent, file_name, timeout=120):
    """SIGKILL the child of `parent` that has `file_name` open (what the OOM killer does); its pid."""
    child = _the_process_reading(parent, file_name, timeout)
    os.kill(child, signal.SIGKILL)
    return child


def _running(pid):
    """Whether `pid` is a live process (a zombie, dead but not yet reaped by whoever adopted it, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _prepare_a_long_clip(tmp_path, **popen):
    """prepare_dataset.py with two workers, in its own session, on a still and a long clip: at 150 frames and
    stride 1 the worker holds the video open for a second or more, long enough to be found."""
    source = tmp_path / "in"
    _jpeg(source.mkdir() or source / "still.jpg")
    write_sample_clip(source / "long.mp4", num_frames=150, width=320, height=240)
    script = Path(prepare_dataset.__file__)
    return subprocess.Popen(
        [sys.executable, str(script), "--input_dataset_dir", str(source), "--output_dataset_dir",
         str(tmp_path / "out"), "--prompt", PROMPT, "--stride", "1", "--num_workers", "2"],
        cwd=script.parent, start_new_session=True, **popen)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the worker through Linux's /proc")
def test_a_decoding_worker_that_dies_ends_the_run_naming_its_file(tmp_path):
    process = _prepare_a_long_clip(tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _kill_the_process_reading(process.pid, "long.mp4")
        _, stderr = process.communicate(timeout=60)
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)  # multiprocessing.Pool waits forever for the lost file
        process.communicate()
        raise

    assert process.returncode == 1, stderr
    assert "error: The decoding worker for long.mp4 died" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # nothing written, no staging folder left


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the worker through Linux's /proc")
def test_decoding_workers_end_when_the_main_process_is_killed(tmp_path):
    """kill -9 (or the OOM killer) of the main process: its workers must not live on, idle forever or still writing
    into the staging folder that the next run removes."""
    process = _prepare_a_long_clip(tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        worker = _the_process_reading(process.pid, "long.mp4")
        workers = _children(process.pid)
        process.kill()
        process.wait()
        deadline = time.monotonic() + 10
        while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker in workers and not [pid for pid in workers if _running(pid)]
    finally:
        for pid in _children(process.pid) + [p for p in locals().get("workers", []) if _running(p)]:
            os.kill(pid, signal.SIGKILL)


def test_user_mistakes_print_one_error_line_and_exit_2(tmp_path, monkeypatch, capsys):
    script = Path(prepare_dataset.__file__)
    _jpeg((tmp_path / "in").mkdir() or tmp_path / "in" / "uncaptioned.jpg")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("")
    cases = [
        (["--input_dataset_dir", str(tmp_path / "nope"), "--output_dataset_dir", str(tmp_path / "o")], "not a folder"),
        (["--input_dataset_dir", str(tmp_path / "in"), "--output_dataset_dir", str(tmp_path / "o")],
         "No caption for 1 of 1 files: uncaptioned.jpg"),
        (["--input_dataset_dir", str(tmp_path / "in"), "--output_dataset_dir", str(tmp_path / "full"), "--prompt",
          "x"], "--overwrite"),
        (["--input_dataset_dir", str(tmp_path / "in"), "--output_dataset_dir", str(tmp_path / "o"), "--prompt", " "],
         "--prompt is empty"),
        (["--input_dataset_dir", str(tmp_path / "in"), "--output_dataset_dir", str(tmp_path)], "would replace"),
    ]
    for argv, fix in cases:
        monkeypatch.setattr(sys, "argv", [str(script), *argv])
        with pytest.raises(SystemExit) as stopped:
            runpy.run_path(str(script), run_name="__main__")
        err = capsys.readouterr().err.strip()
        assert stopped.value.code == 2 and err.startswith("error: ") and fix in err and "Traceback" not in err, err
        assert len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "in"]


def test_a_caption_saved_with_a_byte_order_mark_does_not_start_with_it(tmp_path):
    source = tmp_path / "in"
    _jpeg(source.mkdir() or source / "a.jpg")
    (source / "a.txt").write_bytes("\ufeffa teal robot".encode("utf-8"))  # Windows Notepad's "UTF-8"
    _jpeg(source / "b.jpg", color=(200, 10, 10))
    (source / "b.txt").write_bytes("\ufeff".encode("utf-8"))  # a mark alone is an empty caption
    (source / "metas").mkdir()
    (source / "metas" / "b.txt").write_text("a red square")

    _prepare(source, tmp_path / "out")

    assert _metadata(tmp_path / "out") == [{"file_name": "a.jpg", "text": "a teal robot"},
                                           {"file_name": "b.jpg", "text": "a red square"}]


def test_names_too_long_for_a_file_are_shortened_not_skipped(tmp_path):
    source = tmp_path / "in"
    deep = source / ("d" * 200)
    _jpeg(deep.mkdir(parents=True) or deep / ("f" * 200 + ".jpg"))  # cam folders fold into one 400-byte name
    _clip(source / ("v" * 250 + ".mp4"), num_frames=3)  # + "_f000000.jpg" is over 255 bytes
    _jpeg(source / ("é" * 120 + ".jpg"), color=(200, 10, 10))  # 240 bytes: fits, as it is

    report = _prepare(source, tmp_path / "out", "--prompt", PROMPT)

    assert report.skipped == [] and report.frames_written == 3
    names = [row["file_name"] for row in _metadata(tmp_path / "out")]
    assert "é" * 120 + ".jpg" in names
    assert all(len(name.encode()) <= 255 for name in names)
    stems = frames.output_stems([deep / ("f" * 200 + ".jpg"), deep / ("f" * 199 + "g.jpg")], source)
    assert len(set(stems.values())) == 2  # same start, told apart by the hash


@pytest.mark.parametrize("num_workers", ["0", "2"])
def test_a_full_disk_stops_the_run_with_one_error_line_and_writes_nothing(tmp_path, num_workers):
    """A disk that refuses a write is no fault of the input: the run must not skip the files as unreadable and
    make a smaller dataset. A file-size limit (ulimit -f) refuses writes the way a full disk does."""
    import resource

    source = tmp_path / "in"
    _jpeg(source.mkdir() or source / "small.jpg")
    noise = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(source / "big.png")  # ~49 KB: over the limit below
    script = Path(prepare_dataset.__file__)
    limit = 16 * 1024
    process = subprocess.run(
        [sys.executable, str(script), "--input_dataset_dir", str(source), "--output_dataset_dir",
         str(tmp_path / "out"), "--prompt", PROMPT, "--num_workers", num_workers],
        cwd=script.parent, capture_output=True, text=True, timeout=120, check=False,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))

    errors = [line for line in process.stderr.splitlines() if line.startswith("error:")]
    assert process.returncode == 2, process.stderr
    assert errors == [line for line in process.stderr.splitlines() if "rror" in line] and len(errors) == 1
    assert f"Writing the dataset {tmp_path / 'out'} failed (File too large)" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # nothing written, no staging folder left


def test_a_mount_point_as_the_output_is_refused_before_decoding(tmp_path, monkeypatch):
    """A mount point cannot be replaced by a rename (EBUSY): found before the work, not after it. (A real mount
    needs root; os.path.ismount says it is one.)"""
    _jpeg((tmp_path / "in").mkdir() or tmp_path / "in" / "one.jpg")
    (tmp_path / "volume").mkdir()
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == tmp_path / "volume")
    monkeypatch.setattr(frames, "extract_all", lambda *a, **k: pytest.fail("decoded before checking the output"))

    with pytest.raises(FileExistsError, match=r"is a mount point.*inside it instead, e\.g\. .*volume/dataset"):
        _prepare(tmp_path / "in", tmp_path / "volume", "--prompt", PROMPT)


def test_every_staged_output_names_a_disk_that_refuses_a_write(tmp_path):
    """staged_folder is where prepare, embed and prior preservation's class embedding write: a disk that refuses
    a write inside it (pyarrow wraps the OSError in its own error) is one line naming the output, and the
    previous folder is kept. Before, only the callers that wrapped it themselves said so."""
    import errno
    import re

    from cosmos_t2i.atomic import staged_folder
    from cosmos_t2i.user_errors import OutputFailed

    target = tmp_path / "embedded"
    target.mkdir()
    (target / "old.txt").write_text("previous")
    with pytest.raises(OutputFailed, match=rf"Writing the class embedding {re.escape(str(target))} failed \(No space"):
        with staged_folder(target, what="the class embedding"):
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError as error:
                raise RuntimeError("arrow: could not close the file") from error
    assert [p.name for p in tmp_path.iterdir()] == ["embedded"] and (target / "old.txt").read_text() == "previous"
