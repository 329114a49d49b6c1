"""What a run's start and end say: the exit code of a stopped run, an output folder that cannot be written, a
resume that compares the data by content, a longer --max_iter, --init_from, and --resume_from_checkpoint none in
a folder of an earlier run."""

import logging
import os
import runpy
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import make_dataset, pattern_image, train, weights

import train_text2image
from cosmos_t2i import checkpoint as ckpt
from cosmos_t2i import objective
from cosmos_t2i.methods import FullFineTune, LoraFineTune

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--model", "tiny", "--report_to", "none", "--dataloader_num_workers", "0", "--mixed_precision", "no",
          "--learning_rate", "1e-3", "--lr_start_factor", "0.5"]


@pytest.fixture(scope="module")
def dataset(tiny_model_dir, tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("runs") / "data",
                        [(pattern_image(64, 64, 0), "An image of sks teal robot."),
                         (pattern_image(64, 64, 1), "a red car")], cache_latents=True)


def _run_script(monkeypatch, *argv) -> int:
    """train_text2image.py as `python train_text2image.py ARGV` runs it, in this process; returns its exit code."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.setattr(sys, "argv", ["train_text2image.py", *map(str, argv)])
    try:
        runpy.run_path(str(ROOT / "train_text2image.py"), run_name="__main__")
    except SystemExit as done:
        return done.code or 0
    return 0


def test_exit_code_says_whether_the_run_finished(dataset, tmp_path, monkeypatch):
    calls, loss = [], objective.diffusion_loss

    def loss_then_signal(*args, **kwargs):  # SIGTERM during the second step
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss(*args, **kwargs)

    flags = [*COMMON, "--dataset_dir", dataset, "--output_dir", tmp_path / "out", "--max_iter", 4, "--save_iter", 4]
    with monkeypatch.context() as patch:
        patch.setattr(objective, "diffusion_loss", loss_then_signal)  # the script imports it from there
        assert _run_script(patch, *flags) == 75  # EX_TEMPFAIL: stopped, a rerun resumes
    assert ckpt.latest_checkpoint(tmp_path / "out").name == ckpt.iter_name(2)
    assert _run_script(monkeypatch, *flags) == 0  # the rerun resumed and finished
    assert ckpt.latest_checkpoint(tmp_path / "out").name == ckpt.iter_name(4)
    assert "75" in train_text2image.__doc__


def test_unwritable_output_dir_is_refused_before_the_model_loads(dataset, tmp_path):
    (tmp_path / "a_file").write_text("")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(ROOT / "train_text2image.py"), *COMMON,
                             "--dataset_dir", str(dataset), "--output_dir", str(tmp_path / "a_file" / "out"), "--max_iter", "1"],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --output_dir ") and "cannot be written" in last, last
    assert "Loading" not in result.stderr  # refused before any weights were read


@pytest.fixture
def no_model_loading(monkeypatch):
    for method in (FullFineTune, LoraFineTune):
        monkeypatch.setattr(method, "build", lambda *a, **k: pytest.fail("the model was loaded"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_dir_is_refused(dataset, tmp_path, no_model_loading):
    (tmp_path / "ro").mkdir(mode=0o500)
    with pytest.raises(PermissionError, match="cannot be written"):
        train(*COMMON, "--dataset_dir", dataset, "--output_dir", tmp_path / "ro" / "out")


def _count_steps(monkeypatch) -> list:
    calls, loss = [], train_text2image.diffusion_loss
    monkeypatch.setattr(train_text2image, "diffusion_loss", lambda *a, **k: calls.append(1) or loss(*a, **k))
    return calls


def test_resume_recognises_the_same_data_under_another_path(dataset, tmp_path, monkeypatch):
    out = tmp_path / "run"
    flags = [*COMMON, "--output_dir", out, "--save_iter", 2]
    train(*flags, "--dataset_dir", dataset, "--max_iter", 2)
    moved = shutil.copytree(dataset, tmp_path / "elsewhere" / "data")
    calls = _count_steps(monkeypatch)
    # A trailing slash and a moved copy are the same data: the run resumes and trains only what is left.
    assert train(*flags, "--dataset_dir", f"{moved}/", "--max_iter", 3).name == ckpt.iter_name(3)
    assert len(calls) == 1

    other = make_dataset(tmp_path / "other", [(pattern_image(64, 64, 5), "something else")], cache_latents=True)
    with pytest.raises(ValueError, match="Cannot resume .*dataset_fingerprint"):
        train(*flags, "--dataset_dir", other, "--max_iter", 4)


def test_the_data_fingerprint_is_recorded_when_embedding_not_hashed_at_every_start(dataset, tmp_path, monkeypatch):
    """embed_captions.py hashes the data it writes; a training start reads the record, not the whole dataset (for
    100k cached latents, a hundred GB). A dataset embedded before the record existed is hashed, to the same value."""
    import json

    from cosmos_t2i import dataset_format as fmt

    recorded = fmt.read_info(dataset)[fmt.FINGERPRINT_KEY]
    assert recorded == fmt.hash_data_files(fmt.embedded_dir(dataset))
    hashed, real = [], fmt.hash_data_files
    monkeypatch.setattr(fmt, "hash_data_files", lambda path: hashed.append(path) or real(path))
    final = train(*COMMON, "--output_dir", tmp_path / "run", "--dataset_dir", dataset, "--max_iter", 1,
                  "--save_iter", 1)
    assert hashed == [] and ckpt.read_config(final)["dataset_fingerprint"] == recorded

    older = shutil.copytree(dataset, tmp_path / "older")
    info_file = fmt.embedded_dir(older) / fmt.INFO_FILE
    info = json.loads(info_file.read_text())
    del info[fmt.FINGERPRINT_KEY]
    info_file.write_text(json.dumps(info))
    assert fmt.content_fingerprint(older) == recorded and len(hashed) == 1


def _record_lrs(monkeypatch) -> list:
    lrs, step = [], torch.optim.AdamW.step

    def recorded(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recorded)
    return lrs


def test_raising_max_iter_continues_a_finished_run_on_the_longer_schedule(dataset, tmp_path, monkeypatch):
    flags = [*COMMON, "--dataset_dir", dataset, "--output_dir", tmp_path / "run", "--save_iter", 2]
    with monkeypatch.context() as patch:
        lrs = _record_lrs(patch)
        train(*flags, "--max_iter", 2)
    assert lrs == pytest.approx([5e-4, 2.5e-4])  # 1e-3 x 0.5 x (1 - i/2)
    with monkeypatch.context() as patch:
        lrs, calls = _record_lrs(patch), _count_steps(patch)
        final = train(*flags, "--max_iter", 4)
    assert final.name == ckpt.iter_name(4) and len(calls) == 2  # steps 2 and 3 only
    # The factor of a 4-step run at steps 2 and 3, not the finished run's 0.
    assert lrs == pytest.approx([2.5e-4, 1.25e-4])


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_init_from_takes_the_weights_only(dataset, tmp_path, monkeypatch, lora):
    kind = ["--lora", "--mixed_precision", "bf16"] if lora else []
    source = train(*COMMON, *kind, "--dataset_dir", dataset, "--output_dir", tmp_path / "a", "--max_iter", 2,
                   "--save_iter", 2)
    seen, loss = [], train_text2image.diffusion_loss

    def first_weights(transformer, *args, **kwargs):
        if not seen:
            seen.append({n: p.detach().clone() for n, p in transformer.named_parameters() if p.requires_grad})
        return loss(transformer, *args, **kwargs)

    monkeypatch.setattr(train_text2image, "diffusion_loss", first_weights)
    new = train(*COMMON, *kind, "--dataset_dir", dataset, "--output_dir", tmp_path / "b", "--max_iter", 1,
                "--save_iter", 1, "--init_from", source)
    assert new.name == ckpt.iter_name(1)  # a new run: its own step count, data position and schedule
    assert ckpt.read_state(new)["data_position"] == 1
    assert torch.load(new / "scheduler" / "scheduler.pt", weights_only=True)["last_epoch"] == 1
    started = seen[0]
    if lora:
        from safetensors.torch import load_file

        saved = load_file(str(source / "model" / "pytorch_lora_weights.safetensors"))
        assert len(saved) == len(started)
        for name, tensor in saved.items():  # transformer.<module>.lora_A.weight -> <module>.lora_A.default.weight
            short = name.removeprefix("transformer.").replace(".weight", ".default.weight")
            torch.testing.assert_close(started[short], tensor.float(), rtol=0, atol=0)
    else:
        saved = weights(source)
        assert started.keys() == set(saved)
        for name, tensor in saved.items():
            torch.testing.assert_close(started[name], tensor, rtol=0, atol=0)
    optimizer = torch.load(new / "optim" / "optimizer.pt", weights_only=True)
    assert {s["step"].item() for s in optimizer["state"].values()} == {1.0}  # a fresh AdamW: one step taken


def test_init_from_a_checkpoint_of_the_other_kind_is_refused(dataset, tmp_path, monkeypatch):
    source = train(*COMMON, "--lora", "--mixed_precision", "bf16", "--dataset_dir", dataset, "--output_dir", tmp_path / "a", "--max_iter", 1,
                   "--save_iter", 1)
    for method in (FullFineTune, LoraFineTune):
        monkeypatch.setattr(method, "build", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match="holds a LoRA's weights and this run is a full fine-tune: add --lora"):
        train(*COMMON, "--dataset_dir", dataset, "--output_dir", tmp_path / "b", "--init_from", source)


def test_starting_over_sets_the_previous_run_aside(dataset, tmp_path, caplog):
    out = tmp_path / "run"
    flags = [*COMMON, "--dataset_dir", dataset, "--output_dir", out, "--save_iter", 1]
    train(*flags, "--max_iter", 3)
    old = {p.name: weights(p) for p in sorted((out / "checkpoints").glob("iter_*"))}
    with caplog.at_level(logging.WARNING, logger="train_text2image"):
        final = train(*flags, "--max_iter", 2, "--seed", 1, "--resume_from_checkpoint", "none",
                      "--checkpoints_total_limit", 2)
    # Only the new run's checkpoints are in checkpoints/: the limit kept its last two, not the old run's iter 3.
    assert sorted(p.name for p in (out / "checkpoints").glob("iter_*")) == [ckpt.iter_name(1), ckpt.iter_name(2)]
    assert final == out / "checkpoints" / ckpt.iter_name(2) and ckpt.read_config(final)["seed"] == 1
    (aside,) = out.glob("checkpoints.previous-*")
    assert f"moved to {aside}" in caplog.text
    assert sorted(p.name for p in aside.glob("iter_*")) == list(old)  # all of the old run, untouched
    for name, tensors in old.items():
        for key, tensor in tensors.items():
            torch.testing.assert_close(weights(aside / name)[key], tensor, rtol=0, atol=0)
