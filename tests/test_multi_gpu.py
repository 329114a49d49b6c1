"""FSDP2 and DeepSpeed through `accelerate launch` and NCCL, as users run them: needs two CUDA GPUs (and
deepspeed for its tests), skipped elsewhere.

accelerate runs FSDP on GPUs only, so this is the one place the FSDP2 training path (sharded parameters, EMA of
the shards, model/ gathered to the main process, the optimizer state saved and resharded by
torch.distributed.checkpoint) runs end to end. A run saved by 2 processes resumes on 2, on 1 (accumulating 2
batches: the same effective batch) and back on 2, and each continues the same training: the same images with the
same noise each step, so the weights match the uninterrupted run's to float rounding.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import assert_same_training, two_bucket_dataset, weights

from benchmarks.common import MULTICAST_OFF
from cosmos_t2i import checkpoint as ckpt
from cosmos_t2i.methods import read_transformer_weights

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP2 over NCCL needs two CUDA GPUs")


@pytest.fixture(scope="module")
def dataset(tiny_model_dir, tmp_path_factory):
    return two_bucket_dataset(tmp_path_factory.mktemp("fsdp") / "data")


def _launch(processes: int, accumulation: int, dataset, output_dir, *more, config="fsdp2_8gpu.yaml",
            precision="no") -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", **MULTICAST_OFF)
    command = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", str(ROOT / "accelerate_configs" / config), "--num_processes", str(processes),
               str(ROOT / "train_text2image.py"), "--model", "tiny", "--dataset_dir", str(dataset),
               "--output_dir", str(output_dir), "--max_iter", str(STEPS), "--save_iter", "2",
               "--train_batch_size", "1", "--gradient_accumulation_steps", str(accumulation),
               "--mixed_precision", precision, "--learning_rate", "1e-3", "--report_to", "none", *map(str, more)]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    return result.stderr


def test_fsdp2_run_resumes_on_two_and_on_one_gpu(dataset, tmp_path):
    # Compiled blocks (the default on a GPU) in the reference; the resumes run eager, which must not matter.
    _launch(2, 1, dataset, tmp_path / "straight")
    straight = ckpt.latest_checkpoint(tmp_path / "straight")
    assert straight.name == ckpt.iter_name(STEPS)
    assert ckpt.read_config(straight)["distributed_type"] == "DistributedType.FSDP"
    at_2 = straight.parent / ckpt.iter_name(2)
    # The optimizer state is sharded (one file per rank and the metadata), model/ and model/ema/ are whole.
    shards = sorted(p.name for p in (at_2 / "optim").rglob("*") if p.is_file())
    assert len([s for s in shards if s.endswith(".distcp")]) == 2 and ".metadata" in shards, shards
    assert weights(at_2).keys() == weights(at_2, ema=True).keys()

    same = _launch(2, 1, dataset, tmp_path / "same", "--resume_from_checkpoint", at_2, "--no_compile")
    assert "not bit-identical" not in same
    assert_same_training(ckpt.latest_checkpoint(tmp_path / "same"), straight)

    one_log = _launch(1, 2, dataset, tmp_path / "one", "--resume_from_checkpoint", at_2, "--no_compile")
    assert "Resuming on 1 processes a checkpoint saved by 2" in one_log and "effective batch" not in one_log
    one = ckpt.latest_checkpoint(tmp_path / "one")
    assert ckpt.read_state(one) == {"data_position": 2 * STEPS, "iteration": STEPS}
    assert_same_training(one, straight)

    one_at_4 = one.parent / ckpt.iter_name(4)
    back_log = _launch(2, 1, dataset, tmp_path / "back", "--resume_from_checkpoint", one_at_4, "--no_compile")
    assert "Resuming on 2 processes a checkpoint saved by 1" in back_log
    back = ckpt.latest_checkpoint(tmp_path / "back")
    name = "proj_out.weight"
    assert not torch.equal(weights(back)[name], weights(one_at_4)[name])  # it trained after the resume
    assert_same_training(back, straight)


def test_fsdp2_processes_start_from_the_main_process_weights(dataset, tiny_model_dir, tmp_path):
    # Only the main process reads the model (cpu_ram_efficient_loading); the other builds it on uninitialised memory
    # and must receive its shards. A step at learning rate 0 saves the weights unchanged.
    _launch(2, 1, dataset, tmp_path / "run", "--learning_rate", "0", "--max_iter", "1", "--no_ema", "--no_compile")
    saved = weights(ckpt.latest_checkpoint(tmp_path / "run"))
    pretrained = read_transformer_weights(tiny_model_dir / "transformer")
    assert saved.keys() == pretrained.keys()
    for name, tensor in pretrained.items():
        assert torch.equal(saved[name], tensor.float()), name


@pytest.mark.parametrize("config, precision", [("deepspeed_zero2.yaml", "bf16"), ("deepspeed_zero3.yaml", "no")])
def test_deepspeed_run_resumes_where_it_stopped(config, precision, dataset, tmp_path):
    pytest.importorskip("deepspeed")
    # EMA needs whole parameters, which ZeRO-3 partitions (the trainer refuses the combination).
    flags = [] if config == "deepspeed_zero2.yaml" else ["--no_ema"]
    _launch(2, 1, dataset, tmp_path / "straight", *flags, config=config, precision=precision)
    straight = ckpt.latest_checkpoint(tmp_path / "straight")
    assert ckpt.read_config(straight)["distributed_type"] == "DistributedType.DEEPSPEED"
    at_2 = straight.parent / ckpt.iter_name(2)
    _launch(2, 1, dataset, tmp_path / "resumed", *flags, "--resume_from_checkpoint", at_2, config=config,
            precision=precision)
    resumed = ckpt.latest_checkpoint(tmp_path / "resumed")
    assert sorted(p.name for p in resumed.parent.glob("iter_*")) == ["iter_000000004", "iter_000000006"]
    name = "proj_out.weight"
    assert not torch.equal(weights(resumed)[name], weights(at_2)[name])
    # DeepSpeed's bf16 mode keeps the model's own weights (what model/ holds) in bf16: two of its steps may round.
    tolerance = dict(rtol=2e-2, atol=1e-3) if precision == "bf16" else {}
    assert_same_training(resumed, straight, ema=not flags, **tolerance)
