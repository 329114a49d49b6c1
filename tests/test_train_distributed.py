"""Two processes (DDP over gloo, on the CPU) train, save one checkpoint with per-rank RNG state, and resume it
exactly.

accelerate does not run FSDP on CPUs (it only enables FSDP for GPU-like devices) and `accelerate launch --cpu`
with several processes needs MPI, so this uses torchrun with ACCELERATE_USE_CPU, which accelerate picks up as
MULTI_CPU. FSDP2 and DeepSpeed are exercised on GPUs only.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import assert_same_training, train, two_bucket_dataset

from cosmos_t2i import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tiny_model_dir, tmp_path_factory):
    return two_bucket_dataset(tmp_path_factory.mktemp("ddp") / "data")


def _torchrun(*flags, check=True):
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "train_text2image.py"), *map(str, flags)]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 or not check, result.stderr[-4000:]
    return result


def test_two_processes_train_save_and_resume(dataset, tmp_path):
    flags = ["--model", "tiny", "--dataset_dir", dataset, "--max_iter", 4, "--save_iter", 2, "--mixed_precision",
             "no", "--learning_rate", "1e-3", "--dataloader_num_workers", 0, "--report_to", "none"]
    _torchrun(*flags, "--output_dir", tmp_path / "straight")
    checkpoints = tmp_path / "straight" / "checkpoints"
    final = ckpt.latest_checkpoint(tmp_path / "straight")
    assert final.name == "iter_000000004"
    assert ckpt.read_config(final)["world_size"] == 2
    assert sorted(p.name for p in (final / "trainer").iterdir()) == ["checksums.json", "config.json", "rng_0.pt",
                                                                      "rng_1.pt", "state.json"]
    # The main process's checksums cover the other process's files too (each rank writes its own RNG state).
    assert "trainer/rng_1.pt" in json.loads((final / "trainer" / "checksums.json").read_text())["files"]
    assert ckpt.read_state(final)["data_position"] == 4  # per process: each took every other batch

    _torchrun(*flags, "--output_dir", tmp_path / "resumed", "--resume_from_checkpoint",
              checkpoints / "iter_000000002")
    resumed = ckpt.latest_checkpoint(tmp_path / "resumed")
    # It went on from iteration 2: a run that started over would have saved iteration 2 again.
    assert sorted(p.name for p in resumed.parent.glob("iter_*")) == ["iter_000000004"]
    assert_same_training(resumed, final, rtol=0, atol=0)  # bit for bit, EMA too


def test_two_processes_refuse_a_damaged_checkpoint_with_one_line(dataset, tmp_path):
    """The hashing is shared out between the processes; each stops with the same error line, exit code 2."""
    flags = ["--model", "tiny", "--dataset_dir", dataset, "--max_iter", 2, "--save_iter", 1, "--mixed_precision",
             "no", "--learning_rate", "1e-3", "--dataloader_num_workers", 0, "--report_to", "none"]
    final = train(*flags, "--output_dir", tmp_path / "run")
    weights = final / "model" / "diffusion_pytorch_model.safetensors"
    header = 8 + int.from_bytes(weights.read_bytes()[:8], "little")
    with open(weights, "r+b") as f:  # tensor data zeroed under an intact header: only a checksum tells
        f.seek(header)
        f.write(bytes(weights.stat().st_size - header))
    result = _torchrun(*flags, "--output_dir", tmp_path / "run", "--max_iter", 2, check=False)
    line = (f"error: Checkpoint {final} is damaged: {weights} has changed since it was saved (its sha256 differs from "
            f"the one recorded). Resume from the previous complete checkpoint with --resume_from_checkpoint "
            f"{final.parent.absolute() / 'iter_000000001'}")
    assert result.returncode != 0 and result.stderr.count(line) == 2, result.stderr[-4000:]


def test_power_ema_of_fsdp2_sharded_parameters():
    """FSDP2 itself runs on CPUs with gloo: each rank averages its shard, a checkpoint gathers one tensor at a
    time to the main process, and a resume scatters it back."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "tests" / "fsdp_ema_worker.py")]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr.count("ok") == 2, result.stderr[-4000:]
