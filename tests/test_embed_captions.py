"""embed_captions.py: NVIDIA-exact T5 columns, latent cache, NVIDIA-layout import, errors (tiny model, CPU)."""

import json
import os
import pickle
import runpy
import signal
import sys
import types
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from hub_helpers import refuse_as_gated
from PIL import Image

import embed_captions
import prepare_dataset
from cosmos_t2i import dataset_format as fmt
from cosmos_t2i import embedding
from cosmos_t2i.buckets import bucket_pixels
from cosmos_t2i.models import PRESETS
from cosmos_t2i.sample_clip import write_sample_clip
from cosmos_t2i.text_encoding import MAX_LENGTH, pad_embedding
from cosmos_t2i.vae_latents import encode_normalized

CAPTIONS = {"robot": "An image of sks teal robot.", "square": "a photo of a red car on a street",
            "wide": "An image of sks teal robot."}  # two rows share a caption: it is encoded once


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_dir):
    """A clip and two images with captions beside them -> prepare -> embed --cache_latents (done once)."""
    root = tmp_path_factory.mktemp("embed")
    source = root / "in"
    write_sample_clip(source / "robot.mp4", num_frames=25, width=64, height=48)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(source / "square.jpg", quality=95)
    Image.new("RGB", (96, 48), (30, 30, 200)).save(source / "wide.jpg", quality=95)
    for stem, caption in CAPTIONS.items():
        (source / f"{stem}.txt").write_text(caption)
    dataset_dir = root / "dataset"
    prepare_dataset.main(["--input_dataset_dir", str(source), "--output_dataset_dir", str(dataset_dir),
                          "--stride", "10", "--num_workers", "0"])
    info = embed_captions.main(["--dataset_dir", str(dataset_dir), "--model", "tiny", "--cache_latents",
                                "--batch_size", "2"])
    return dataset_dir, info


def _caption_of(file_name):
    return CAPTIONS[file_name.split("_f")[0].rsplit(".", 1)[0]]


def test_prepare_then_embed_gives_the_training_rows(prepared):
    dataset_dir, info = prepared
    names = ["robot_f000000.jpg", "robot_f000010.jpg", "robot_f000020.jpg", "square.jpg", "wide.jpg"]
    imagefolder = datasets.load_dataset("imagefolder", data_dir=str(dataset_dir), split="train")
    assert len(imagefolder) == 5  # embedded/ beside the images does not disturb the imagefolder

    embedded = fmt.load_embedded_dataset(dataset_dir)
    assert embedded.column_names == ["image", "text", "t5_xxl", "latents", "latents_shape", "bucket"]
    assert embedded.features["t5_xxl"] == datasets.Array2D(shape=(None, 32), dtype="float16")
    assert embedded["text"] == [_caption_of(n) for n in names]
    for row in embedded:
        t5 = np.asarray(row["t5_xxl"])
        assert t5.ndim == 2 and t5.shape[1] == 32 and 1 < t5.shape[0] < MAX_LENGTH
    assert embedded["bucket"] == ["4:3", "4:3", "4:3", "1:1", "16:9"]
    assert embedded["latents_shape"][0] == [16, 1, 64 // 8, 80 // 8]  # tiny 4:3 bucket is 80x64
    assert info["model"] == "tiny" and info["text_embed_dim"] == 32 and info["max_length"] == 512
    assert info["dtype"] == "float32" and info["num_rows"] == 5 and info["num_unique_captions"] == 2
    assert info["bucket_resolutions"]["4:3"] == [80, 64]
    assert fmt.read_info(dataset_dir) == info
    assert sorted(p.name for p in dataset_dir.iterdir() if p.name.startswith(".")) == []  # no work/staging left


def test_stored_embedding_is_the_masked_t5_forward_with_zeros_past_the_length(prepared, tiny_model_dir):
    from transformers import AutoTokenizer, T5EncoderModel

    dataset_dir, _ = prepared
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    encoder = T5EncoderModel.from_pretrained(tiny_model_dir / "text_encoder").eval()
    embedded = fmt.load_embedded_dataset(dataset_dir)
    for caption in set(CAPTIONS.values()):
        tokens = tokenizer([caption], padding="max_length", max_length=512, truncation=True, return_tensors="pt")
        with torch.no_grad():
            hidden = encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state[0]
        length = int(tokens.attention_mask.sum())
        assert tokens.input_ids[0, length - 1] == tokenizer.eos_token_id  # the length counts </s>
        assert hidden[length:].abs().sum() > 0  # the raw forward is not zero there: the zeroing matters
        reference = hidden.clone()
        reference[length:] = 0  # NVIDIA: every position at or past the length is zero

        # Stored as float16 (checked in the features above), so this conversion is exact.
        stored = torch.tensor(np.asarray(embedded[embedded["text"].index(caption)]["t5_xxl"], dtype=np.float16))
        assert stored.shape == (length, 32)
        torch.testing.assert_close(stored.float(), hidden[:length], rtol=1e-3, atol=1e-3)  # float16 rounding
        padded = pad_embedding(stored)  # what training feeds the transformer
        assert torch.equal(padded[length:], torch.zeros(MAX_LENGTH - length, 32, dtype=torch.float16))
        torch.testing.assert_close(padded.float(), reference, rtol=1e-3, atol=1e-3)


def test_cached_latents_are_the_normalized_vae_mean_at_the_bucket(prepared, tiny_model_dir):
    from diffusers import AutoencoderKLWan

    dataset_dir, _ = prepared
    vae = AutoencoderKLWan.from_pretrained(tiny_model_dir / "vae").eval()
    embedded = fmt.load_embedded_dataset(dataset_dir)
    for index in (0, 4):
        row = embedded[index]
        key, pixels = bucket_pixels(row["image"], PRESETS["tiny"].resolutions)
        expected = encode_normalized(vae, pixels[None])[0]
        stored = np.frombuffer(row["latents"], dtype=np.float16).reshape(row["latents_shape"])
        assert row["bucket"] == key and list(expected.shape) == row["latents_shape"]
        torch.testing.assert_close(torch.from_numpy(stored.copy()).float(), expected, rtol=2e-3, atol=2e-3)


def test_nvidia_layout_import_gives_the_same_rows(prepared, tmp_path):
    dataset_dir, _ = prepared
    ours = fmt.load_embedded_dataset(dataset_dir)
    raw = ours.cast_column("image", datasets.Image(decode=False))
    nvidia = tmp_path / "nvidia"
    for sub in ("images", "metas", "t5_xxl"):
        (nvidia / sub).mkdir(parents=True)
    for row in raw:  # NVIDIA's layout written from our own rows
        stem = Path(row["image"]["path"]).stem
        (nvidia / "images" / f"{stem}.jpg").write_bytes(row["image"]["bytes"])
        (nvidia / "metas" / f"{stem}.txt").write_text(row["text"] + "\n")
        with open(nvidia / "t5_xxl" / f"{stem}.pickle", "wb") as f:
            pickle.dump([np.asarray(row["t5_xxl"], dtype=np.float16)], f)

    imported_dir = tmp_path / "imported"
    info = embed_captions.main(["--dataset_dir", str(imported_dir), "--from_nvidia_dir", str(nvidia)])

    assert info["source"] == "nvidia_t5_xxl" and info["text_embed_dim"] == 32 and info["num_rows"] == len(ours)
    assert len(datasets.load_dataset("imagefolder", data_dir=str(imported_dir), split="train")) == len(ours)
    theirs = fmt.load_embedded_dataset(imported_dir).cast_column("image", datasets.Image(decode=False))
    for a, b in zip(raw, theirs, strict=True):
        assert Path(a["image"]["path"]).name == Path(b["image"]["path"]).name
        assert a["image"]["bytes"] == b["image"]["bytes"] and a["text"] == b["text"]
        assert np.array_equal(np.asarray(a["t5_xxl"], np.float16), np.asarray(b["t5_xxl"], np.float16))

    with pytest.raises(FileExistsError, match="--overwrite"):
        embed_captions.main(["--dataset_dir", str(imported_dir), "--from_nvidia_dir", str(nvidia)])


def test_nvidia_import_refuses_non_numpy_pickles_and_missing_ones(tmp_path):
    nvidia = tmp_path / "nvidia"
    (nvidia / "images").mkdir(parents=True)
    (nvidia / "t5_xxl").mkdir()
    Image.new("RGB", (64, 64)).save(nvidia / "images" / "a.jpg")
    Image.new("RGB", (64, 64)).save(nvidia / "images" / "b.jpg")
    with open(nvidia / "t5_xxl" / "a.pickle", "wb") as f:
        pickle.dump([types.SimpleNamespace(x=1)], f)
    with pytest.raises(FileNotFoundError, match=r"b\.jpg"):
        embed_captions.main(["--dataset_dir", str(tmp_path / "out"), "--from_nvidia_dir", str(nvidia)])
    with open(nvidia / "t5_xxl" / "b.pickle", "wb") as f:
        pickle.dump([np.zeros((3, 8), np.float16)], f)
    with pytest.raises(ValueError, match="refusing to load types.SimpleNamespace"):
        embed_captions.main(["--dataset_dir", str(tmp_path / "out"), "--from_nvidia_dir", str(nvidia)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nvidia"]  # nothing half-made


def test_gated_repo_refusal_says_what_to_do_and_keeps_the_old_dataset(prepared, monkeypatch):
    import transformers

    dataset_dir, info = prepared

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse_as_gated)
    with pytest.raises(PermissionError, match=r"accept the NVIDIA Open Model License.*hf auth login.*huggingface-cli login"):
        embed_captions.main(["--dataset_dir", str(dataset_dir), "--model", "nvidia/Cosmos-Predict2-2B-Text2Image"])
    assert fmt.read_info(dataset_dir) == info  # the failed run replaced nothing
    assert sorted(p.name for p in dataset_dir.iterdir() if p.name.startswith(".")) == []


def test_missing_dataset_and_missing_model_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare_dataset.py"):
        embed_captions.main(["--dataset_dir", str(tmp_path / "nope"), "--model", "tiny"])
    assert not (tmp_path / "nope").exists()
    with pytest.raises(SystemExit):
        embed_captions.parse_args(["--dataset_dir", str(tmp_path)])  # --model is required to encode


def _imagefolder(folder, captions):
    """A hand-made imagefolder: one 64x64 image per caption, `<i>.jpg`."""
    folder.mkdir(parents=True)
    with open(folder / "metadata.jsonl", "w") as f:
        for i, caption in enumerate(captions):
            Image.new("RGB", (64, 64), (10 * i, 100, 200)).save(folder / f"img{i}.jpg")
            f.write(json.dumps({"file_name": f"img{i}.jpg", "text": caption}) + "\n")
    return folder


def test_captions_over_512_tokens_are_truncated_with_a_warning_naming_them(tmp_path, tiny_model_dir, caplog):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    long = "A teal robot " + " ".join(f"walks past tree number {i}" for i in range(200)) + "."
    longer = "Another robot " + " ".join(f"rolls over stone {i}" for i in range(300)) + "."
    lost = {c: len(tokenizer(c).input_ids) - MAX_LENGTH for c in (long, longer)}  # input_ids end with </s>
    assert all(n > 0 for n in lost.values())
    dataset_dir = _imagefolder(tmp_path / "ds", ["a short caption", long, longer])

    with caplog.at_level("WARNING", logger="embed_captions"):
        info = embed_captions.main(["--dataset_dir", str(dataset_dir), "--model", "tiny"])

    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "2 captions are longer than T5's 512 tokens" in warning
    assert f"loses {lost[long]} tokens: 'A teal robot walks past tree number 0" in warning and "img1" in warning
    assert f"loses {lost[longer]} tokens: 'Another robot rolls over stone 0" in warning and "img2" in warning
    assert "a short caption" not in warning
    assert info["num_truncated_captions"] == 2
    embedded = fmt.load_embedded_dataset(dataset_dir)
    assert [np.asarray(t).shape[0] for t in embedded["t5_xxl"]] == [len(tokenizer("a short caption").input_ids),
                                                                   MAX_LENGTH, MAX_LENGTH]  # cut, as NVIDIA's


def test_the_next_run_removes_what_a_killed_run_left_in_the_dataset(tmp_path, tiny_model_dir):
    """kill -9 in the middle of writing (no `finally` runs), then a normal run: nothing hidden stays behind."""
    dataset_dir = _imagefolder(tmp_path / "ds", ["one caption", "another caption"])
    pid = os.fork()
    if pid == 0:  # the run that is killed once its intermediate files are written
        try:
            embedding.join_and_save = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
            embed_captions.main(["--dataset_dir", str(dataset_dir), "--model", "tiny"])
        finally:
            os._exit(1)  # never reached when killed; never run pytest's teardown in the child
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert [p.name for p in dataset_dir.iterdir() if p.name.startswith(".")]  # the killed run left something

    embed_captions.main(["--dataset_dir", str(dataset_dir), "--model", "tiny"])

    assert sorted(p.name for p in dataset_dir.iterdir()) == ["embedded", "img0.jpg", "img1.jpg", "metadata.jsonl"]
    assert len(fmt.load_embedded_dataset(dataset_dir)) == 2


def test_user_mistakes_print_one_error_line_and_exit_2(tmp_path, monkeypatch, capsys):
    script = Path(embed_captions.__file__)
    cases = [
        (["--dataset_dir", str(tmp_path / "nope"), "--model", "tiny"], "prepare_dataset.py"),
        (["--dataset_dir", str(_imagefolder(tmp_path / "ds", ["x"])), "--model", "no-such-model"], "Unknown model"),
        (["--dataset_dir", str(tmp_path / "new"), "--from_nvidia_dir", str(tmp_path / "nvidia")],
         "images/ and t5_xxl/"),
    ]
    for argv, fix in cases:
        monkeypatch.setattr(sys, "argv", [str(script), *argv])
        with pytest.raises(SystemExit) as stopped:
            runpy.run_path(str(script), run_name="__main__")
        err = capsys.readouterr().err.strip()
        assert stopped.value.code == 2 and err.startswith("error: ") and fix in err and "Traceback" not in err


def test_out_of_memory_is_one_line_naming_the_batch_size_and_keeps_the_old_embedding(prepared, monkeypatch, capsys):
    dataset_dir, info = prepared

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(embedding, "encode_captions", out_of_memory)
    script = Path(embed_captions.__file__)
    monkeypatch.setattr(sys, "argv", [str(script), "--dataset_dir", str(dataset_dir), "--model", "tiny",
                                      "--batch_size", "4"])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(script), run_name="__main__")
    lines = capsys.readouterr().err.strip().splitlines()  # the datasets library's progress bars come first
    err = lines[-1]
    assert stopped.value.code == 2 and not any("Traceback" in line for line in lines)
    assert err.startswith("error: out of GPU memory while embedding") and "--batch_size (now 4)" in err
    assert fmt.read_info(dataset_dir) == info  # the failed run replaced nothing, and left nothing behind
    assert sorted(p.name for p in dataset_dir.iterdir() if p.name.startswith(".")) == []


def test_a_full_disk_is_one_error_line_and_keeps_the_old_embedded_dataset(tmp_path, tiny_model_dir):
    """A file-size limit (ulimit -f) refuses the write as a full disk does: one line, the previous embedded/ kept."""
    import resource
    import subprocess

    dataset_dir = _imagefolder(tmp_path / "ds", ["one caption"])
    embed_captions.main(["--dataset_dir", str(dataset_dir), "--model", "tiny"])
    before = fmt.read_info(dataset_dir)
    noise = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(dataset_dir / "img0.jpg", quality=100)  # ~30 KB, embedded into the dataset
    script = Path(embed_captions.__file__)
    limit = 16 * 1024
    process = subprocess.run(
        [sys.executable, str(script), "--dataset_dir", str(dataset_dir), "--model", "tiny"],
        cwd=script.parent, capture_output=True, text=True, timeout=120, check=False,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))

    assert process.returncode == 2, process.stderr
    assert "Traceback" not in process.stderr
    assert process.stderr.strip().splitlines()[-1].startswith(
        f"error: Writing the embedded dataset {dataset_dir / 'embedded'} failed (File too large)")
    assert fmt.read_info(dataset_dir) == before
    assert sorted(p.name for p in dataset_dir.iterdir()) == ["embedded", "img0.jpg", "metadata.jsonl"]


def test_nvidia_captions_with_a_byte_order_mark_or_not_utf8(tmp_path):
    nvidia = tmp_path / "nvidia"
    for folder in ("images", "t5_xxl", "metas"):
        (nvidia / folder).mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(nvidia / "images" / "a.jpg")
    with open(nvidia / "t5_xxl" / "a.pickle", "wb") as f:
        pickle.dump([np.zeros((3, 8), np.float16)], f)
    (nvidia / "metas" / "a.txt").write_bytes("\ufeffa teal robot".encode("utf-8"))
    embed_captions.main(["--dataset_dir", str(tmp_path / "out"), "--from_nvidia_dir", str(nvidia)])
    assert fmt.load_embedded_dataset(tmp_path / "out")["text"] == ["a teal robot"]

    (nvidia / "metas" / "a.txt").write_bytes("un caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"metas/a\.txt is not UTF-8 text.*save it as UTF-8"):
        embed_captions.main(["--dataset_dir", str(tmp_path / "new"), "--from_nvidia_dir", str(nvidia)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nvidia", "out"]


def test_an_empty_or_latin1_metadata_file_is_one_error_line(tmp_path, tiny_model_dir, monkeypatch, capsys):
    script = Path(embed_captions.__file__)
    dataset_dir = _imagefolder(tmp_path / "ds", ["x"])
    cases = [(b"", "metadata.jsonl lists no image"),
             ('{"file_name": "img0.jpg", "text": "un café"}\n'.encode("latin-1"), "metadata.jsonl is not UTF-8 text")]
    for content, fix in cases:
        (dataset_dir / "metadata.jsonl").write_bytes(content)
        monkeypatch.setattr(sys, "argv", [str(script), "--dataset_dir", str(dataset_dir), "--model", "tiny"])
        with pytest.raises(SystemExit) as stopped:
            runpy.run_path(str(script), run_name="__main__")
        err = capsys.readouterr().err.strip()
        assert stopped.value.code == 2 and err.startswith("error: ") and fix in err and "Traceback" not in err, err
    assert sorted(p.name for p in dataset_dir.iterdir()) == ["img0.jpg", "metadata.jsonl"]
