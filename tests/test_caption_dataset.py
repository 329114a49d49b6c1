"""caption_dataset.py: an imagefolder captioned by a (tiny, random) Qwen3-VL; resume, kept captions, clear errors."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hub_helpers import refuse_as_gated
from PIL import Image

import caption_dataset
from cosmos_t2i import captioning
from cosmos_t2i.tiny_vlm import build_tiny_vlm

PREFIX = "An image of sks teal robot, "


@pytest.fixture(scope="session", autouse=True)
def tiny_vlm(tmp_path_factory):
    """The tiny VLM, built once per session; `--caption_model tiny` resolves to it."""
    path = tmp_path_factory.getbasetemp() / "tiny-vlm"
    if not (path / "config.json").is_file():
        build_tiny_vlm(path)
    os.environ["COSMOS_T2I_TINY_VLM_DIR"] = str(path)
    return path


def _imagefolder(path: Path, texts: list[str]) -> Path:
    path.mkdir(parents=True)
    with open(path / "metadata.jsonl", "w") as f:
        for i, text in enumerate(texts):
            Image.new("RGB", (96 + 8 * i, 64), (30 * i, 120, 200)).save(path / f"frame{i}.jpg")
            f.write(json.dumps({"file_name": f"frame{i}.jpg", "text": text}) + "\n")
    return path


def _caption(dataset_dir, *extra):
    return caption_dataset.main(["--dataset_dir", str(dataset_dir), "--caption_model", "tiny", "--device", "cpu",
                                 "--caption_max_words", "12", "--batch_size", "2", *extra])


def _metadata(dataset_dir):
    return [json.loads(line) for line in (Path(dataset_dir) / "metadata.jsonl").read_text().splitlines()]


def _raw(dataset_dir):
    return [json.loads(line) for line in (Path(dataset_dir) / captioning.RAW_FILE).read_text().splitlines()]


def test_every_image_gets_a_prefixed_caption_and_its_raw_answer_is_kept(tmp_path):
    import datasets

    dataset_dir = _imagefolder(tmp_path / "ds", [""] * 5)
    report = _caption(dataset_dir, "--caption_prefix", PREFIX)

    names = [f"frame{i}.jpg" for i in range(5)]
    assert sorted(report.captioned) == names and report.failed == {}
    rows = _metadata(dataset_dir)
    raw = {entry["file_name"]: entry for entry in _raw(dataset_dir)}
    assert [row["file_name"] for row in rows] == names and sorted(raw) == names
    for row in rows:
        entry = raw[row["file_name"]]
        assert row["text"].startswith(PREFIX) and len(row["text"]) > len(PREFIX)
        assert row["text"] == entry["caption"] == captioning.compose_caption(PREFIX, entry["raw"], 12)
        assert entry["model"] == "tiny" and entry["prompt"] == captioning.DEFAULT_PROMPT
        assert len(row["text"][len(PREFIX):].split()) <= 12
    # The side file does not disturb the imagefolder that embed_captions.py loads.
    loaded = datasets.load_dataset("imagefolder", data_dir=str(dataset_dir), split="train")
    assert sorted(loaded["text"]) == sorted(row["text"] for row in rows)


def test_a_rerun_skips_done_files_and_a_new_prefix_needs_no_vlm(tmp_path, monkeypatch):
    dataset_dir = _imagefolder(tmp_path / "ds", ["one caption for all"] * 3)
    _caption(dataset_dir, "--overwrite_captions", "--caption_prefix", PREFIX)
    first = _metadata(dataset_dir)

    def no_vlm(*args, **kwargs):
        raise AssertionError("the VLM was loaded although every file had an answer")

    monkeypatch.setattr(captioning, "load_vlm", no_vlm)
    report = _caption(dataset_dir, "--overwrite_captions", "--caption_prefix", PREFIX)
    assert report.captioned == [] and len(report.resumed) == 3
    assert _metadata(dataset_dir) == first and len(_raw(dataset_dir)) == 3

    _caption(dataset_dir, "--overwrite_captions", "--caption_prefix", "A photo of zwx dog, ")
    raw = {entry["file_name"]: entry["raw"] for entry in _raw(dataset_dir)}
    assert [row["text"] for row in _metadata(dataset_dir)] == [
        captioning.compose_caption("A photo of zwx dog, ", raw[row["file_name"]], 12) for row in first]


def test_a_run_killed_after_its_first_batch_resumes_without_duplicates(tmp_path, monkeypatch):
    dataset_dir = _imagefolder(tmp_path / "ds", [""] * 5)
    before = (dataset_dir / "metadata.jsonl").read_bytes()
    real_generate = captioning.generate
    calls = []

    def killed_after_first_batch(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt  # what Ctrl-C does; a SIGKILL leaves less (see the torn-line test)
        calls.append(1)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(captioning, "generate", killed_after_first_batch)
    with pytest.raises(KeyboardInterrupt):
        _caption(dataset_dir, "--caption_prefix", PREFIX)
    assert (dataset_dir / "metadata.jsonl").read_bytes() == before  # untouched until the run completes
    assert [entry["file_name"] for entry in _raw(dataset_dir)] == ["frame0.jpg", "frame1.jpg"]

    monkeypatch.setattr(captioning, "generate", real_generate)
    report = _caption(dataset_dir, "--caption_prefix", PREFIX)
    assert report.resumed == ["frame0.jpg", "frame1.jpg"]
    assert report.captioned == ["frame2.jpg", "frame3.jpg", "frame4.jpg"]
    names = [entry["file_name"] for entry in _raw(dataset_dir)]
    assert sorted(names) == [f"frame{i}.jpg" for i in range(5)]  # each once
    assert [row["file_name"] for row in _metadata(dataset_dir)] == sorted(names)
    assert all(row["text"].startswith(PREFIX) for row in _metadata(dataset_dir))


def test_a_process_killed_mid_run_resumes_without_duplicates(tmp_path):
    dataset_dir = _imagefolder(tmp_path / "ds", [""] * 16)
    before = (dataset_dir / "metadata.jsonl").read_bytes()
    raw_file = dataset_dir / captioning.RAW_FILE
    script = Path(caption_dataset.__file__)
    process = subprocess.Popen([sys.executable, str(script), "--dataset_dir", str(dataset_dir), "--caption_model",
                                "tiny", "--device", "cpu", "--caption_max_words", "12", "--batch_size", "1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (raw_file.is_file() and raw_file.read_bytes().count(b"\n") >= 1):
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first batch"
            time.sleep(0.01)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert (dataset_dir / "metadata.jsonl").read_bytes() == before  # the kill came before the end

    report = _caption(dataset_dir)
    names = [entry["file_name"] for entry in _raw(dataset_dir)]
    assert 1 <= len(report.resumed) < 16 and len(report.resumed) + len(report.captioned) == 16
    assert sorted(names) == sorted(f"frame{i}.jpg" for i in range(16))  # each exactly once
    assert all(row["text"] for row in _metadata(dataset_dir))


def test_a_line_torn_by_a_kill_is_dropped_and_its_file_captioned_again(tmp_path):
    dataset_dir = _imagefolder(tmp_path / "ds", [""] * 3)
    _caption(dataset_dir)
    lines = (dataset_dir / captioning.RAW_FILE).read_text().splitlines(keepends=True)
    # A kill in the middle of writing the last line: frame2's answer is half there.
    (dataset_dir / captioning.RAW_FILE).write_text("".join(lines[:2]) + lines[2][:20])
    captioning.write_metadata(dataset_dir, [{"file_name": f"frame{i}.jpg", "text": ""} for i in range(3)])

    report = _caption(dataset_dir)
    assert report.captioned == ["frame2.jpg"] and report.resumed == ["frame0.jpg", "frame1.jpg"]
    assert [entry["file_name"] for entry in _raw(dataset_dir)] == ["frame0.jpg", "frame1.jpg", "frame2.jpg"]
    assert all(row["text"] for row in _metadata(dataset_dir))


def test_existing_captions_are_kept_unless_overwrite_captions(tmp_path):
    dataset_dir = _imagefolder(tmp_path / "ds", ["a hand-written caption", "", "another one", ""])
    report = _caption(dataset_dir, "--caption_prefix", PREFIX)
    assert report.kept == ["frame0.jpg", "frame2.jpg"] and report.captioned == ["frame1.jpg", "frame3.jpg"]
    texts = [row["text"] for row in _metadata(dataset_dir)]
    assert texts[0] == "a hand-written caption" and texts[2] == "another one"
    assert texts[1].startswith(PREFIX) and texts[3].startswith(PREFIX)

    report = _caption(dataset_dir, "--caption_prefix", PREFIX, "--overwrite_captions")
    assert report.captioned == ["frame0.jpg", "frame2.jpg"] and len(report.resumed) == 2
    assert all(row["text"].startswith(PREFIX) for row in _metadata(dataset_dir))


def test_images_that_fail_are_named_left_uncaptioned_and_retried(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    dataset_dir = _imagefolder(tmp_path / "ds", [""] * 3)
    (dataset_dir / "frame1.jpg").write_bytes(b"not a jpeg")
    # Qwen's image processor refuses aspect ratios beyond 200:1; in the same batch as the unreadable frame1.
    Image.new("RGB", (4020, 20)).save(dataset_dir / "frame0.jpg")

    report = _caption(dataset_dir)
    assert sorted(report.failed) == ["frame0.jpg", "frame1.jpg"] and report.captioned == ["frame2.jpg"]
    assert "cannot read the image" in report.failed["frame1.jpg"]
    assert "the VLM failed on it" in report.failed["frame0.jpg"]
    assert "2 images failed" in caplog.text and "frame0.jpg" in caplog.text and "frame1.jpg" in caplog.text
    texts = {row["file_name"]: row["text"] for row in _metadata(dataset_dir)}
    assert texts["frame0.jpg"] == texts["frame1.jpg"] == "" and texts["frame2.jpg"]
    assert [entry["file_name"] for entry in _raw(dataset_dir)] == ["frame2.jpg"]

    Image.new("RGB", (64, 64)).save(dataset_dir / "frame1.jpg")  # fixed: the rerun captions it
    report = _caption(dataset_dir)
    assert report.captioned == ["frame1.jpg"] and sorted(report.failed) == ["frame0.jpg"]


def _error_line(capsys, dataset_dir, model):
    with pytest.raises(SystemExit) as exit_info:
        caption_dataset.main(["--dataset_dir", str(dataset_dir), "--caption_model", model, "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_a_vlm_that_cannot_be_loaded_is_one_error_line_naming_it_and_the_fix(tmp_path, capsys, monkeypatch):
    import transformers

    dataset_dir = _imagefolder(tmp_path / "ds", [""] * 2)
    before = (dataset_dir / "metadata.jsonl").read_bytes()

    err = _error_line(capsys, dataset_dir, "nobody/no-such-vlm")  # HF_HUB_OFFLINE=1 and not in the cache
    assert "nobody/no-such-vlm" in err and "hf download nobody/no-such-vlm" in err

    (tmp_path / "empty").mkdir()
    err = _error_line(capsys, dataset_dir, str(tmp_path / "empty"))
    assert "without config.json" in err

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", refuse_as_gated)
    err = _error_line(capsys, dataset_dir, "someorg/gated-vlm")
    assert "someorg/gated-vlm" in err and "https://huggingface.co/someorg/gated-vlm" in err
    assert "hf auth login" in err

    assert (dataset_dir / "metadata.jsonl").read_bytes() == before
    assert not (dataset_dir / captioning.RAW_FILE).exists()


def test_a_folder_that_is_not_an_imagefolder_is_one_error_line(tmp_path, capsys):
    err = _error_line(capsys, tmp_path, "tiny")
    assert "metadata.jsonl" in err and "prepare_dataset.py" in err


def test_compose_caption_continues_the_prefix_and_bounds_the_words():
    answer = 'The image shows A robot arm\x13 lifting a  green cube in a bright factory hall.'
    assert captioning.compose_caption(PREFIX, answer, 80) == (
        PREFIX + "a robot arm lifting a green cube in a bright factory hall.")
    assert captioning.compose_caption(PREFIX, "Standing on a table, lit from the left", 3) == (
        PREFIX + "standing on a.")
    assert captioning.compose_caption("", "The image shows a cat.", 80) == "The image shows a cat."
    assert captioning.compose_caption(PREFIX, "In this frame, LED strips light a hall.", 80) == (
        PREFIX + "LED strips light a hall.")
    assert captioning.compose_caption(PREFIX, "The scene is set in a factory.", 80) == (
        PREFIX + "the scene is set in a factory.")


def test_out_of_memory_even_one_image_at_a_time_stops_the_run_naming_the_fix(tmp_path, monkeypatch):
    """A batch that does not fit is captioned one image at a time; when one image does not fit either, no image
    will: the run ends with the memory message instead of marking every image as failed."""
    import torch

    from cosmos_t2i import memory

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    dataset_dir = _imagefolder(tmp_path / "ds", [""] * 3)
    before = (dataset_dir / "metadata.jsonl").read_bytes()
    monkeypatch.setattr(captioning, "generate", out_of_memory)
    with pytest.raises(memory.OutOfMemory, match=r"while captioning.*--batch_size \(now 2\)"):
        _caption(dataset_dir)
    assert (dataset_dir / "metadata.jsonl").read_bytes() == before


def test_a_hand_edited_metadata_file_saved_as_latin1_or_with_a_bom(tmp_path, capsys):
    dataset_dir = _imagefolder(tmp_path / "ds", ["x"])
    (dataset_dir / "metadata.jsonl").write_bytes('{"file_name": "frame0.jpg", "text": "un café"}\n'.encode("latin-1"))
    err = _error_line(capsys, dataset_dir, "tiny")
    assert "metadata.jsonl is not UTF-8 text" in err and "save it as UTF-8" in err

    (dataset_dir / "metadata.jsonl").write_bytes('\ufeff{"file_name": "frame0.jpg", "text": "kept"}\n'.encode())
    report = _caption(dataset_dir)  # a BOM is read past, as `datasets` reads past it when embedding
    assert report.kept == ["frame0.jpg"]
