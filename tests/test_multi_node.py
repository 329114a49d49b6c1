"""Two "nodes" on this machine: two launchers (separate subprocesses, as on two machines), each with one process,
DDP over gloo on the CPU, meeting at a loopback address. They continue a one-node run and a one-node run continues
theirs, matching the uninterrupted run of the same effective batch; a dead or hung node stops the other within
--distributed_timeout, and latest_checkpoint.txt still names a complete checkpoint. The multi-node accelerate
configs are parsed by accelerate's own launcher code.

As in test_train_distributed.py, ACCELERATE_USE_CPU makes accelerate run MULTI_CPU (it runs FSDP on GPUs only), so
fsdp2_multinode.yaml is checked as far as the torchrun command and environment accelerate builds from it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from train_helpers import assert_same_training, train, two_bucket_dataset

import train_text2image
from cosmos_t2i import checkpoint as ckpt
from cosmos_t2i.recipe import config_differences

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "accelerate_configs"
# --distributed_timeout of the failure tests, seconds. It also bounds how far apart the two processes may reach
# the process group's set-up (gloo connects within it), so it leaves room for a busy machine.
TIMEOUT = 15


@pytest.fixture(scope="module")
def dataset(tiny_model_dir, tmp_path_factory):
    return two_bucket_dataset(tmp_path_factory.mktemp("multi_node") / "data")


def _flags(dataset, output_dir, max_iter, accumulation, *more):
    return ["--model", "tiny", "--dataset_dir", dataset, "--output_dir", output_dir, "--max_iter", max_iter,
            "--save_iter", 2, "--train_batch_size", 1, "--gradient_accumulation_steps", accumulation,
            "--mixed_precision", "no", "--learning_rate", "1e-3", "--dataloader_num_workers", 0, "--report_to", "none",
            *more]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nodes:
    """Two node launchers started from `launcher(node_rank, port)` (a command up to the training script), each in
    its own session, with its output in log_dir/node_<rank>.log. Leaving the block kills what is left of them."""

    def __init__(self, launcher, script_args, log_dir: Path):
        env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        port = _free_port()
        self.logs = [log_dir / f"node_{rank}.log" for rank in (0, 1)]
        self.launchers = [
            subprocess.Popen([*launcher(rank, port), str(ROOT / "train_text2image.py"), *map(str, script_args)],
                             env=env, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                             start_new_session=True)
            for rank, log in zip((0, 1), self.logs)]

    def processes(self, rank: int) -> list[psutil.Process]:
        """Node `rank`'s launcher and its training processes (torchrun starts those in sessions of their own)."""
        launcher = psutil.Process(self.launchers[rank].pid)
        return [launcher, *launcher.children(recursive=True)]

    def log(self, rank: int) -> str:
        return self.logs[rank].read_text()

    def wait(self, timeout=300) -> list[int]:
        return [p.wait(timeout=timeout) for p in self.launchers]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for rank in (0, 1):
            with contextlib.suppress(psutil.NoSuchProcess):
                for process in self.processes(rank):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        process.kill()
            self.launchers[rank].wait()


def _accelerate_launch(config: str):
    def command(rank, port):
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
                "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
    return command


def _torchrun(*more):
    def command(rank, port):
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), *more]
    return command


def _wait_for_first_checkpoint(output_dir: Path, nodes: Nodes) -> None:
    latest = ckpt.checkpoints_dir(output_dir) / ckpt.LATEST
    deadline = time.monotonic() + 240
    while not latest.is_file():
        assert time.monotonic() < deadline and all(p.poll() is None for p in nodes.launchers), nodes.log(0)[-4000:]
        time.sleep(0.05)


def _assert_complete(checkpoint: Path, processes: int) -> None:
    assert (checkpoint / ckpt.MODEL / "config.json").is_file() and (checkpoint / ckpt.MODEL / ckpt.EMA).is_dir()
    assert (checkpoint / ckpt.OPTIM / "optimizer.pt").is_file()
    assert (checkpoint / ckpt.SCHEDULER / "scheduler.pt").is_file()
    assert sorted(p.name for p in (checkpoint / ckpt.TRAINER).iterdir()) == \
        sorted([ckpt.CHECKSUMS, ckpt.CONFIG, ckpt.STATE, *(f"rng_{r}.pt" for r in range(processes))])


def test_two_nodes_continue_a_one_node_run_and_one_node_continues_theirs(dataset, tmp_path, caplog):
    steps = 6
    # The reference: one node, one process accumulating 2 batches of 1 per step, straight through.
    straight = train(*_flags(dataset, tmp_path / "straight", steps, 2))

    # 1 -> 2 nodes from step 2, launched by accelerate with the multi-node DDP config: same effective batch of 2.
    with Nodes(_accelerate_launch("ddp_multinode.yaml"),
               _flags(dataset, tmp_path / "two", steps, 1, "--resume_from_checkpoint",
                      straight.parent / ckpt.iter_name(2)), tmp_path) as nodes:
        assert nodes.wait() == [0, 0], nodes.log(0)[-4000:] + nodes.log(1)[-4000:]
        two_log = nodes.log(0)
    assert "Resuming on 2 processes a checkpoint saved by 1" in two_log and "effective batch" not in two_log
    two = ckpt.latest_checkpoint(tmp_path / "two")
    assert two.name == ckpt.iter_name(steps)
    assert ckpt.read_config(two)["world_size"] == 2
    _assert_complete(two, processes=2)  # each node wrote its process's RNG state into the shared output_dir
    assert_same_training(two, straight)

    # 2 -> 1 node from the two nodes' step 4, accumulating 2 again.
    two_at_4 = two.parent / ckpt.iter_name(4)
    with caplog.at_level(logging.INFO, logger="train_text2image"):
        back = train(*_flags(dataset, tmp_path / "back", steps, 2, "--resume_from_checkpoint", two_at_4))
    assert "Resuming on 1 processes a checkpoint saved by 2" in caplog.text and "effective batch" not in caplog.text
    assert_same_training(back, straight)

    # 2 nodes -> 1 without raising the accumulation: the warning names the effective batch of both.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="train_text2image"):
        train(*_flags(dataset, tmp_path / "halved", steps, 1, "--resume_from_checkpoint", two_at_4))
    assert "The effective batch changes from 2 (1 per process x 1 accumulation x 2 processes) to 1 (1 x 1 x 1)" \
        in caplog.text


@pytest.mark.parametrize("failure", ["killed", "hung"])
def test_the_other_node_stops_within_the_timeout_and_latest_stays_complete(dataset, tmp_path, failure):
    """Node 1 (launcher and training process) is killed, or stopped, which is what a machine that drops off the
    network looks like to the others: no connection is closed, so only the timeout ends node 0's wait."""
    flags = _flags(dataset, tmp_path / "run", 100_000, 1, "--distributed_timeout", TIMEOUT,
                   "--checkpoints_total_limit", 2)
    with Nodes(_torchrun(), flags, tmp_path) as nodes:
        _wait_for_first_checkpoint(tmp_path / "run", nodes)
        node_1 = nodes.processes(1)
        assert len(node_1) == 2
        for process in node_1:
            process.send_signal(signal.SIGKILL if failure == "killed" else signal.SIGSTOP)
        start = time.monotonic()
        returncode = nodes.launchers[0].wait(timeout=120)
        stopped_after = time.monotonic() - start
        log = nodes.log(0)
    assert returncode != 0, log[-4000:]
    # The timeout itself, plus the launcher noticing and stopping (a few seconds on 2 busy cores); torch's default
    # would have waited 30 minutes in the hung case.
    assert stopped_after < TIMEOUT + 30, log[-4000:]
    if failure == "hung":
        assert f"Timed out waiting {TIMEOUT * 1000}ms" in log, log[-4000:]
    assert "train_text2image.py FAILED" in log
    latest = ckpt.latest_checkpoint(tmp_path / "run")  # raises if what latest names is incomplete
    assert ckpt.read_state(latest)["iteration"] >= 2
    _assert_complete(latest, processes=2)


def _torchrun_config(config: str, *flags: str):
    """What `accelerate launch --config_file config flags train_text2image.py` hands torchrun: its LaunchConfig
    and the environment of the training processes, built by accelerate's own launcher code."""
    import torch.distributed.run as distrib_run
    from accelerate.commands.launch import _filter_args, _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / config), *flags, "train_text2image.py"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    torchrun_args = _filter_args(args, distrib_run.get_args_parser(), ["--training_script", args.training_script,
                                                                       "--training_script_args", []])
    launch_config, _, _ = distrib_run.config_from_args(torchrun_args)
    return launch_config, env


@pytest.mark.parametrize("config", ["ddp_multinode.yaml", "fsdp2_multinode.yaml"])
def test_one_multi_node_config_serves_every_node_and_node_count(config):
    port = str(_free_port())  # accelerate checks that the port of machine 0 is free
    for machines in (2, 4):
        for rank in range(machines):
            launch, env = _torchrun_config(config, "--num_machines", str(machines), "--num_processes",
                                           str(8 * machines), "--machine_rank", str(rank),
                                           "--main_process_ip", "10.0.0.1", "--main_process_port", port)
            assert (launch.min_nodes, launch.max_nodes, launch.nproc_per_node) == (machines, machines, 8)
            assert (launch.rdzv_backend, launch.rdzv_endpoint) == ("static", f"10.0.0.1:{port}")
            assert launch.rdzv_configs["rank"] == rank
            assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
            if config.startswith("fsdp2"):
                assert (env["ACCELERATE_USE_FSDP"], env["FSDP_VERSION"]) == ("true", "2")
                assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "CosmosTransformerBlock"
                assert env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
                assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
            else:
                assert "ACCELERATE_USE_FSDP" not in env
    # The port of the file when none is passed.
    launch, _ = _torchrun_config(config, "--machine_rank", "1", "--main_process_ip", "10.0.0.1")
    assert (launch.max_nodes, launch.nproc_per_node, launch.rdzv_endpoint) == (2, 8, "10.0.0.1:29500")


def test_distributed_timeout_flag():
    args = train_text2image.parse_args(["--model", "tiny", "--dataset_dir", "x"])
    assert args.distributed_timeout == 600
    with pytest.raises(ValueError, match="--distributed_timeout 0.0: expected seconds > 0"):
        train_text2image.parse_args(["--model", "tiny", "--dataset_dir", "x", "--distributed_timeout", "0"])
    # A run saved before the flag existed, or with another timeout, resumes.
    saved = {"train_batch_size": 1}
    assert config_differences(saved, dict(saved, distributed_timeout=60.0)) == []
    assert config_differences(dict(saved, distributed_timeout=600.0), dict(saved, distributed_timeout=60.0)) == []
