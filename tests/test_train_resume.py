"""A run stopped by SIGTERM and resumed ends with the weights and EMA of a run that went straight through, bit for
bit: same data order, noise, optimizer and scheduler state, EMA."""

import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import make_dataset, pattern_image, train, weights

import train_text2image
from cosmos_t2i import checkpoint as ckpt

STEPS, ACCUMULATION = 6, 2


@pytest.fixture(scope="module")
def dataset(tiny_model_dir, tmp_path_factory):
    # Two buckets (1:1 and 16:9) and no cached latents: batches of one bucket, encoded by the VAE in the loop.
    images = [(pattern_image(64, 64, 0), "An image of sks teal robot."), (pattern_image(70, 64, 1), "a red car"),
              (pattern_image(96, 48, 2), "a cat on a table")]
    return make_dataset(tmp_path_factory.mktemp("resume") / "data", images)


def _flags(dataset, output_dir, lora):
    return ["--model", "tiny", "--dataset_dir", dataset, "--output_dir", output_dir, "--max_iter", STEPS,
            "--save_iter", STEPS, "--train_batch_size", 2, "--gradient_accumulation_steps", ACCUMULATION,
            "--learning_rate", "1e-3", "--dataloader_num_workers", 0, "--report_to", "none",
            *(["--lora", "--mixed_precision", "bf16"] if lora else ["--mixed_precision", "no"]),
            *(["--fp8_base"] if lora == "fp8_base" else [])]


def _sigterm_during_iteration(monkeypatch, iteration):
    """SIGTERM arrives in the middle of `iteration` (1-based), between its micro-steps."""
    calls = []
    loss = train_text2image.diffusion_loss

    def loss_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == (iteration - 1) * ACCUMULATION + 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss(*args, **kwargs)

    monkeypatch.setattr(train_text2image, "diffusion_loss", loss_then_signal)


def _count_loss_calls(monkeypatch) -> list:
    """Each training micro-step appends to the returned list: a resume must run only the steps that are left."""
    calls, loss = [], train_text2image.diffusion_loss

    def counted(*args, **kwargs):
        calls.append(1)
        return loss(*args, **kwargs)

    monkeypatch.setattr(train_text2image, "diffusion_loss", counted)
    return calls


def _final_tensors(checkpoint, lora):
    if lora:
        return {kind: load_file(str(checkpoint / "model" / sub / "pytorch_lora_weights.safetensors"))
                for kind, sub in (("model", ""), ("ema", "ema"))}
    return {"model": weights(checkpoint), "ema": weights(checkpoint, ema=True)}


@pytest.mark.parametrize("lora", [False, True, "fp8_base"], ids=["full", "lora", "lora_on_fp8_base"])
def test_sigterm_then_resume_equals_straight_run(dataset, tmp_path, monkeypatch, lora):
    straight = train(*_flags(dataset, tmp_path / "straight", lora))

    with monkeypatch.context() as patch:
        _sigterm_during_iteration(patch, STEPS // 2)
        stopped = train(*_flags(dataset, tmp_path / "resumed", lora))
    assert stopped.name == ckpt.iter_name(STEPS // 2)  # the step finished, was saved, and the run ended
    assert ckpt.latest_checkpoint(tmp_path / "resumed") == stopped
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    assert ckpt.read_state(stopped)["data_position"] == STEPS // 2 * ACCUMULATION

    with monkeypatch.context() as patch:
        calls = _count_loss_calls(patch)
        resumed = train(*_flags(dataset, tmp_path / "resumed", lora))  # the same command again picks it up
    assert resumed.name == straight.name
    assert len(calls) == (STEPS - STEPS // 2) * ACCUMULATION  # it went on from the checkpoint, not from step 0
    expected, got = _final_tensors(straight, lora), _final_tensors(resumed, lora)
    for kind in ("model", "ema"):
        assert expected[kind].keys() == got[kind].keys()
        for name, tensor in expected[kind].items():
            torch.testing.assert_close(got[kind][name], tensor, rtol=0, atol=0, msg=f"{kind} {name}")
    # The weights moved after the checkpoint, so matching the straight run is not a matter of nothing happening.
    assert not torch.equal(expected["model"][name], _final_tensors(stopped, lora)["model"][name])


def test_resume_from_an_explicit_checkpoint_folder(dataset, tmp_path, monkeypatch):
    first = train(*_flags(dataset, tmp_path / "a", False), "--max_iter", 2, "--save_iter", 1)
    earlier = first.parent / ckpt.iter_name(1)
    shutil.copytree(earlier, tmp_path / "copy")
    calls = _count_loss_calls(monkeypatch)
    again = train(*_flags(dataset, tmp_path / "b", False), "--max_iter", 2, "--save_iter", 1,
                  "--resume_from_checkpoint", tmp_path / "copy")
    assert len(calls) == ACCUMULATION  # only iteration 2 was trained
    assert not (tmp_path / "b" / "checkpoints" / ckpt.iter_name(1)).exists()
    for name, tensor in weights(first).items():
        torch.testing.assert_close(weights(again)[name], tensor, rtol=0, atol=1e-6)
