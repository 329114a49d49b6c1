"""`accelerate launch` that stops cleanly: SIGTERM / SIGINT / SIGHUP reach every trainer process, which save a
checkpoint and exit, and the command returns only after that, with their exit code (75: stopped, resumable).

    python -m cosmos_t2i.launch [accelerate launch options] train_text2image.py [training flags]

Takes exactly `accelerate launch`'s options and runs its own code in this process. Why plain `accelerate launch`
cannot do this (accelerate 1.15, torch 2.14): with one process it runs the script with Popen + wait and installs no
signal handler, so SIGTERM ends it at once (143) while the trainer runs on; with several it runs torchrun's agent
in-process, which forwards the signal but SIGKILLs the workers after TORCH_ELASTIC_SHUTDOWN_TIMEOUT (30 s) and exits
1 with a traceback. Here this process forwards the signal to its trainer processes and keeps waiting for them,
however long the checkpoint takes (the bound is the scheduler's: Kubernetes' terminationGracePeriodSeconds, docker
stop -t, SLURM's KillWait). torchrun's agent is told to handle no signal, and once a stop was asked for, a worker
it restarts (--max_restarts) exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

from .stopping import EXIT_STOPPED, LAUNCHER_ENV, SIGNALS, STOP_REQUESTED_ENV


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    os.environ[LAUNCHER_ENV] = "1"
    # torchrun's --signals_to_handle (its PET_ variable sets the default accelerate passes on): no name matches, so
    # its agent leaves our handlers in place. It logs that with a traceback, which is dropped here.
    os.environ["PET_SIGNALS_TO_HANDLE"] = ""
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(
        lambda record: not str(record.msg).startswith("Failed to register signal handler"))
    script = os.path.basename(args.training_script)
    for signum in SIGNALS:
        signal.signal(signum, lambda s, frame: _forward(s, script))
    try:
        launch_command(args)
    except subprocess.CalledProcessError as error:  # one process: accelerate raises on a non-zero exit
        return _exit_status(error.returncode)
    except ChildFailedError as error:  # several: torchrun's agent names each failed worker
        codes = [failure.exitcode for failure in error.failures.values()]
        if all(code == EXIT_STOPPED for code in codes):
            return EXIT_STOPPED
        return next(_exit_status(code) for code in codes if code != EXIT_STOPPED)
    return 0


def _forward(signum: int, script: str) -> None:
    """Send `signum` on to this process's children that run the training script (accelerate's single child, or
    the workers of torchrun's agent, which live in sessions of their own, so a group signal misses them)."""
    import psutil

    os.environ[STOP_REQUESTED_ENV] = "1"
    for child in psutil.Process().children():
        try:
            if any(os.path.basename(part) == script for part in child.cmdline()):
                child.send_signal(signum)
        except psutil.Error:  # gone meanwhile
            pass


def _exit_status(code: int) -> int:
    """A process killed by signal N has exit code -N in Python: report it as a shell does, 128 + N."""
    return 128 - code if code < 0 else (code or 1)


if __name__ == "__main__":
    sys.exit(main())
