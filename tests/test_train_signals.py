"""A stop sent to the launcher (docker stop, Kubernetes, scancel, Ctrl-C) reaches every training process: each
finishes its step, the stop checkpoint is written, and `python -m cosmos_t2i.launch` returns only after that, with
exit code 75. Plain launchers, as far as they allow (cosmos_t2i/stopping.py): torchrun forwards SIGTERM and waits;
a launcher that dies (accelerate's one-process launcher on SIGTERM, any launcher on SIGKILL) leaves no trainer
training on, orphaned.

On the CPU with gloo and the tiny model: ACCELERATE_USE_CPU makes accelerate run MULTI_CPU (test_multi_node.py).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from train_helpers import two_bucket_dataset

from cosmos_t2i import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "accelerate_configs"
MAX_ITER = 100_000  # never reached: every run here ends by a stop


@pytest.fixture(scope="module")
def dataset(tiny_model_dir, tmp_path_factory):
    return two_bucket_dataset(tmp_path_factory.mktemp("signals") / "data")


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _accelerate(processes: int, module: str = "cosmos_t2i.launch") -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", module, "--cpu", "--num_processes", "1"]
    return [sys.executable, "-m", module, "--config_file", str(CONFIGS / "ddp_8gpu.yaml"), "--num_processes",
            str(processes), "--main_process_port", _free_port()]


def _torchrun(processes: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--rdzv_backend",
            "static", "--master_addr", "127.0.0.1", "--master_port", _free_port(), "--nnodes", "1"]


class Launch:
    """A launcher running train_text2image.py in a session of its own, output in log_dir/launch.log; the block's
    end kills whatever is left of it."""

    def __init__(self, launcher: list[str], dataset: Path, output_dir: Path):
        env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        self.output_dir, self.log_path = output_dir, output_dir.parent / f"{output_dir.name}.log"
        flags = ["--model", "tiny", "--dataset_dir", dataset, "--output_dir", output_dir, "--max_iter", MAX_ITER,
                 "--save_iter", 2, "--mixed_precision", "no", "--learning_rate", "1e-3",
                 "--dataloader_num_workers", 0, "--report_to", "none"]
        self.launcher = subprocess.Popen([*launcher, str(ROOT / "train_text2image.py"), *map(str, flags)], env=env,
                                         cwd=ROOT, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.launcher.poll() is None:
            self.launcher.kill()
        for process in self.trainers():
            try:
                process.kill()
            except psutil.Error:
                pass
        self.launcher.wait()

    def log(self) -> str:
        return self.log_path.read_text()

    def trainers(self) -> list[psutil.Process]:
        """The training processes, wherever they live (torchrun starts them in sessions of their own)."""
        found = []
        for process in psutil.process_iter(["cmdline"]):
            command = process.info["cmdline"] or []
            if str(ROOT / "train_text2image.py") in command and str(self.output_dir) in command \
                    and process.pid != self.launcher.pid:
                found.append(process)
        return found

    def wait_for_training(self, processes: int) -> list[psutil.Process]:
        """Until the first checkpoint is complete (the loop runs); returns the training processes."""
        latest = ckpt.checkpoints_dir(self.output_dir) / ckpt.LATEST
        deadline = time.monotonic() + 240
        while not latest.is_file():
            assert time.monotonic() < deadline and self.launcher.poll() is None, self.log()[-4000:]
            time.sleep(0.05)
        trainers = self.trainers()
        assert len(trainers) == processes, (trainers, self.log()[-3000:])
        return trainers

    def assert_stopped_with_a_checkpoint(self) -> int:
        """The run stopped at an iteration after the first checkpoint and saved it; returns that iteration."""
        stops = {int(n) for n in re.findall(r"Stopped by signal at iteration (\d+)", self.log())}
        assert len(stops) == 1, self.log()[-4000:]
        (iteration,) = stops
        latest = ckpt.latest_checkpoint(self.output_dir)
        assert latest.name == ckpt.iter_name(iteration) and 2 < iteration < MAX_ITER
        assert ckpt.read_state(latest)["iteration"] == iteration
        return iteration


@pytest.mark.parametrize("processes, target", [(2, "launcher"), (1, "group")], ids=["2-processes", "1-group"])
def test_stopped_launcher_returns_75_after_every_trainer_saved(dataset, tmp_path, processes, target):
    """2 processes (torchrun's agent inside accelerate): SIGTERM to the launcher alone, as docker stop does.
    1 process (accelerate's Popen): SIGINT to the whole group, as Ctrl-C in a terminal: the trainer gets it twice,
    from the terminal and forwarded by the launcher, and still saves (a second Ctrl-C interrupts only a trainer run
    without a launcher)."""
    with Launch(_accelerate(processes), dataset, tmp_path / "out") as launch:
        trainers = launch.wait_for_training(processes)
        if target == "group":
            os.killpg(launch.launcher.pid, signal.SIGINT)
        else:
            launch.launcher.send_signal(signal.SIGTERM)
        returncode = launch.launcher.wait(timeout=180)
        # It returned only once every trainer had exited: none is left running.
        assert not [t for t in trainers if t.is_running() and t.status() != psutil.STATUS_ZOMBIE], launch.log()
    assert returncode == 75, launch.log()[-4000:]
    launch.assert_stopped_with_a_checkpoint()


def test_plain_torchrun_forwards_sigterm_and_waits(dataset, tmp_path):
    """torchrun's own agent forwards the signal and waits for the trainers (up to TORCH_ELASTIC_SHUTDOWN_TIMEOUT),
    then exits 1: the checkpoint is written, the exit code is torchrun's."""
    with Launch(_torchrun(2), dataset, tmp_path / "out") as launch:
        trainers = launch.wait_for_training(2)
        launch.launcher.send_signal(signal.SIGTERM)
        returncode = launch.launcher.wait(timeout=180)
        assert not [t for t in trainers if t.is_running() and t.status() != psutil.STATUS_ZOMBIE], launch.log()
    assert returncode == 1
    launch.assert_stopped_with_a_checkpoint()
    assert "Received SIGTERM: stopping after this step." in launch.log()


@pytest.mark.parametrize("launcher, sig", [("accelerate-1", signal.SIGTERM), ("torchrun-2", signal.SIGKILL)])
def test_trainers_of_a_dead_launcher_save_and_stop(dataset, tmp_path, launcher, sig):
    """Plain `accelerate launch` with one process dies at once on SIGTERM (it has no handler), and any launcher on
    SIGKILL: its trainers get SIGTERM from the kernel (PR_SET_PDEATHSIG), save and exit, instead of training on."""
    name, processes = launcher.split("-")
    command = _accelerate(1, "accelerate.commands.launch") if name == "accelerate" else _torchrun(int(processes))
    with Launch(command, dataset, tmp_path / "out") as launch:
        trainers = launch.wait_for_training(int(processes))
        launch.launcher.send_signal(sig)
        assert launch.launcher.wait(timeout=60) == -sig  # the launcher itself is gone at once
        gone, alive = psutil.wait_procs(trainers, timeout=180)
        assert not alive, launch.log()[-4000:]  # before: they trained on towards --max_iter
    launch.assert_stopped_with_a_checkpoint()


def test_a_repeated_ctrl_c_interrupts_only_without_a_launcher(monkeypatch):
    from cosmos_t2i.stopping import StopOnSignal

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("COSMOS_T2I_LAUNCHER", raising=False)
    with pytest.raises(KeyboardInterrupt), StopOnSignal() as stop:  # run from a shell: the second one interrupts
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setenv("LOCAL_RANK", "0")  # under torchrun: the same signal can arrive twice (sender and agent)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        with StopOnSignal() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        # On its way out the process ignores the agent's follow-up SIGTERM (it would end the exit with -15).
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in before)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
