"""A checkpoint saved by 2 processes resumes on 1 and the other way round: single process, DDP and MULTI_CPU all keep
the full optimizer state. The data continues from the same global batch; a change of optimizer layout is refused.

Two processes run as in test_train_distributed.py (torchrun with ACCELERATE_USE_CPU, DDP over gloo); one process
runs in this one. Every run records the sample indices it draws (record_batches.py).
"""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from record_batches import recording
from train_helpers import assert_same_training, train, two_bucket_dataset, weights

from cosmos_t2i.methods import FullFineTune, LoraFineTune
from cosmos_t2i import checkpoint as ckpt
from cosmos_t2i.recipe import config_differences, distribution_change_refused, linear_decay
from cosmos_t2i.training_data import BucketBatchSampler, resumed_position

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


@pytest.fixture(scope="module")
def dataset(tiny_model_dir, tmp_path_factory):
    # Two buckets, batches of 1: 4 batches an epoch, so the 12 batches of a run span three shuffled epochs.
    return two_bucket_dataset(tmp_path_factory.mktemp("world_size") / "data")


def _flags(dataset, output_dir, accumulation, *more):
    return ["--model", "tiny", "--dataset_dir", dataset, "--output_dir", output_dir, "--max_iter", STEPS,
            "--save_iter", 2, "--train_batch_size", 1, "--gradient_accumulation_steps", accumulation,
            "--mixed_precision", "no", "--learning_rate", "1e-3", "--dataloader_num_workers", 0, "--report_to", "none",
            *more]


def _one_process(monkeypatch, record_dir, *flags):
    record_dir.mkdir()
    with monkeypatch.context() as patch:
        patch.setattr(BucketBatchSampler, "__iter__", recording(record_dir))
        return train(*flags)


def _two_processes(record_dir, *flags):
    record_dir.mkdir()
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               RECORD_BATCHES=str(record_dir))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "tests" / "record_batches.py"), *map(str, flags)]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr


def _drawn(record_dir, processes):
    """The batches the run drew, in global order (rank r's i-th batch is global batch i x processes + r)."""
    ranks = [[json.loads(line) for line in (record_dir / f"rank_{r}.jsonl").read_text().splitlines()]
             for r in range(processes)]
    assert len({len(batches) for batches in ranks}) == 1
    return [batch for round_ in zip(*ranks) for batch in round_]


def test_one_to_two_to_one_processes_continue_the_same_run(dataset, tmp_path, monkeypatch, caplog):
    # The reference: one process accumulating 2 batches of 1 per step, straight through 6 steps (12 batches).
    straight = _one_process(monkeypatch, tmp_path / "straight_batches", *_flags(dataset, tmp_path / "straight", 2))
    reference = _drawn(tmp_path / "straight_batches", 1)
    assert len(reference) == 2 * STEPS and len(set(map(tuple, reference))) == 4

    # 1 -> 2 from step 2: two processes with 1 batch each per step train on the same 2 images a step.
    two_log = _two_processes(tmp_path / "two_batches", *_flags(dataset, tmp_path / "two", 1, "--resume_from_checkpoint",
                                                                straight.parent / ckpt.iter_name(2)))
    assert "Resuming on 2 processes a checkpoint saved by 1: from here on the run is not bit-identical" in two_log
    assert "Data position 4 per process on 1 processes (global batch 4) continues as 2 per process on 2; 0 global " \
           "batches skipped by rounding up." in two_log
    assert "effective batch" not in two_log
    two = ckpt.latest_checkpoint(tmp_path / "two")
    assert two.name == ckpt.iter_name(STEPS)
    assert ckpt.read_config(two)["world_size"] == 2
    assert [ckpt.read_state(two.parent / ckpt.iter_name(i))["data_position"] for i in (4, 6)] == [4, 6]
    assert _drawn(tmp_path / "two_batches", 2) == reference[4:]

    # 2 -> 1 from the two processes' step 4, back to accumulating 2 batches.
    two_at_4 = two.parent / ckpt.iter_name(4)
    with caplog.at_level(logging.INFO, logger="train_text2image"):
        back = _one_process(monkeypatch, tmp_path / "back_batches",
                            *_flags(dataset, tmp_path / "back", 2, "--resume_from_checkpoint", two_at_4))
    assert "Resuming on 1 processes a checkpoint saved by 2: from here on the run is not bit-identical" in caplog.text
    assert "Data position 4 per process on 2 processes (global batch 8) continues as 8 per process on 1" in caplog.text
    assert "effective batch" not in caplog.text
    assert back.name == ckpt.iter_name(STEPS)
    assert ckpt.read_state(back) == {"data_position": 2 * STEPS, "iteration": STEPS}
    assert _drawn(tmp_path / "back_batches", 1) == reference[8:]

    # Training went on after each resume, and it is the reference's training: the same images with the same noise
    # (drawn per global batch) each step; only the gradients are summed in another order.
    name = "proj_out.weight"
    assert not torch.equal(weights(two)[name], weights(straight.parent / ckpt.iter_name(2))[name])
    assert not torch.equal(weights(back)[name], weights(two_at_4)[name])
    assert_same_training(two, straight)
    assert_same_training(back, straight)

    # 2 -> 1 without raising the accumulation: half the effective batch, the user's choice, said in a warning.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="train_text2image"):
        halved = _one_process(monkeypatch, tmp_path / "halved_batches",
                              *_flags(dataset, tmp_path / "halved", 1, "--resume_from_checkpoint", two_at_4))
    assert "The effective batch changes from 2 (1 per process x 1 accumulation x 2 processes) to 1 (1 x 1 x 1)" \
           in caplog.text
    assert ckpt.read_state(halved) == {"data_position": 8 + 2, "iteration": STEPS}
    assert _drawn(tmp_path / "halved_batches", 1) == reference[8:10]


def test_resumed_position_continues_the_global_stream():
    assert resumed_position(4, 2, 1) == (8, 0)
    assert resumed_position(8, 1, 2) == (4, 0)
    assert resumed_position(3, 1, 2) == (2, 1)  # global batch 3 is skipped: both ranks must share one position
    assert resumed_position(5, 3, 2) == (8, 1)
    buckets = ["1:1"] * 5 + ["16:9"] * 3
    stream = [b for _, b in zip(range(30), BucketBatchSampler(buckets, 2, seed=1))]
    three_at_5 = [BucketBatchSampler(buckets, 2, seed=1, num_replicas=3, rank=r, start=5) for r in range(3)]
    assert [next(iter(s)) for s in three_at_5] == stream[15:18]
    two_at_8 = [BucketBatchSampler(buckets, 2, seed=1, num_replicas=2, rank=r, start=8) for r in range(2)]
    assert [next(iter(s)) for s in two_at_8] == stream[16:18]


def test_only_layouts_every_world_size_can_load_may_change():
    ddp = {"distributed_type": "DistributedType.MULTI_GPU", "world_size": 8}
    for other in ("DistributedType.NO", "DistributedType.MULTI_CPU", "DistributedType.MULTI_GPU"):
        for world_size in (1, 2, 8):
            assert distribution_change_refused(ddp, dict(distributed_type=other, world_size=world_size)) is None
    fsdp = {"distributed_type": "DistributedType.FSDP", "world_size": 8}
    for world_size in (1, 2, 8):  # torch.distributed.checkpoint reshards (run on GPUs: test_multi_gpu.py)
        assert distribution_change_refused(fsdp, dict(fsdp, world_size=world_size)) is None
    refused = distribution_change_refused(fsdp, ddp)
    assert "distributed_type: DistributedType.FSDP there, DistributedType.MULTI_GPU now" in refused
    assert "sharded by FSDP" in refused and "--resume_from_checkpoint none" in refused
    deepspeed = {"distributed_type": "DistributedType.DEEPSPEED", "world_size": 8}
    assert distribution_change_refused(deepspeed, dict(deepspeed)) is None
    refused = distribution_change_refused(deepspeed, dict(deepspeed, world_size=4))
    assert "world_size: 8 there, 4 now, under DeepSpeed" in refused and "launch 8 processes again" in refused

    # How the run is spread is checked above; every other flag must still match.
    saved = {"world_size": 2, "distributed_type": "DistributedType.MULTI_GPU", "gradient_accumulation_steps": 1,
             "train_batch_size": 1}
    assert config_differences(saved, dict(saved, world_size=1, distributed_type="DistributedType.NO",
                                          gradient_accumulation_steps=2)) == []
    assert config_differences(saved, dict(saved, train_batch_size=2)) == ["train_batch_size"]


def test_resume_into_another_optimizer_layout_is_refused_before_loading(dataset, tmp_path, monkeypatch):
    run = train(*_flags(dataset, tmp_path / "run", 1, "--max_iter", 1, "--save_iter", 1))
    config = ckpt.read_config(run)
    (run / "trainer" / "config.json").write_text(json.dumps(dict(config, distributed_type="DistributedType.FSDP")))
    (run / "trainer" / "checksums.json").unlink()  # the edit would be refused as damage otherwise
    for method in (FullFineTune, LoraFineTune):
        monkeypatch.setattr(method, "build", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ValueError, match=r"Cannot resume .*iter_000000001: distributed_type: DistributedType\.FSDP "
                                         r"there, DistributedType\.NO now\. .*sharded by FSDP"):
        train(*_flags(dataset, tmp_path / "run", 1, "--max_iter", 1, "--save_iter", 1))


class Process:
    """The parts of an Accelerator that the checkpoint functions use, for process `index` of a DDP-like run."""

    def __init__(self, index):
        from accelerate.utils import DistributedType

        self.process_index, self.is_main_process = index, index == 0
        self.distributed_type = DistributedType.NO

    def wait_for_everyone(self):
        pass


def test_a_process_without_saved_rng_seeds_it_from_seed_iteration_and_rank(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_decay(10, 1.0))
    parts = SimpleNamespace(model=model, optimizer=optimizer, scheduler=scheduler)
    saved = ckpt.save_checkpoint(Process(0), tmp_path, 3, save_model=lambda d: d.mkdir(), **vars(parts),
                                 state={"data_position": 3}, config={})

    def draws_after_loading(rank, seed=0):
        ckpt.load_checkpoint(Process(rank), saved, seed=seed, **vars(parts))
        return torch.rand(4)

    assert torch.equal(draws_after_loading(1), draws_after_loading(1))
    assert not torch.equal(draws_after_loading(1), draws_after_loading(2))
    assert not torch.equal(draws_after_loading(1), draws_after_loading(1, seed=1))
    assert not torch.equal(draws_after_loading(1), draws_after_loading(0))  # rank 0 restores its saved state
