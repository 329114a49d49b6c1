"""How a training process stops: on a signal, or when its launcher dies, it finishes the step, saves a checkpoint
and exits with EXIT_STOPPED; only a run that reached --max_iter exits 0.

Who sends what (README "Stopping"):
- `python train_text2image.py` in a terminal: Ctrl-C (SIGINT) reaches it; a second Ctrl-C interrupts at once.
- torchrun, and `accelerate launch` with several processes (torchrun's agent, in-process): the agent forwards
  SIGTERM/SIGINT/SIGHUP to every worker, waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default 30), SIGKILLs what is
  left and exits 1. A group signal (SLURM, Ctrl-C) reaches the workers twice: once from the sender, once from the
  agent; so under a launcher a repeated signal is only logged.
- `accelerate launch` with one process: its launcher has no handler, so SIGTERM kills it at once (exit 143) and the
  trainer would train on, orphaned. The trainer asks the kernel for SIGTERM when its launcher dies
  (PR_SET_PDEATHSIG): it saves and exits; but the command has returned before that, and a container whose PID 1
  exits is torn down. cosmos_t2i/launch.py is the launcher that waits: it forwards the signal and returns the
  trainers' exit code once they are done.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal

import torch

logger = logging.getLogger("train_text2image")

EXIT_FINISHED = 0
EXIT_STOPPED = 75  # EX_TEMPFAIL (sysexits.h): stopped before --max_iter, a rerun of the same command resumes
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Set by cosmos_t2i/launch.py once it was asked to stop: a trainer the elastic agent (re)starts after that (with
# --max_restarts) exits at once instead of training on.
STOP_REQUESTED_ENV = "COSMOS_T2I_STOP_REQUESTED"
LAUNCHER_ENV = "COSMOS_T2I_LAUNCHER"  # set by cosmos_t2i/launch.py for its trainers
_PR_SET_PDEATHSIG = 1
_PARENT = os.getppid()  # at import, early in the trainer's start: the launcher, if there is one


def stop_requested_before_start() -> bool:
    return os.environ.get(STOP_REQUESTED_ENV) == "1"


def exit_code(iteration: int, max_iter: int) -> int:
    return EXIT_FINISHED if iteration >= max_iter else EXIT_STOPPED


# How the launchers appear in their command line: `accelerate launch` (or `python -m accelerate.commands.launch`),
# torchrun (`python -m torch.distributed.run`), ours.
_LAUNCHER_NAMES = ("accelerate", "accelerate.commands.launch", "torchrun", "torch.distributed.run",
                   "cosmos_t2i.launch")


def under_launcher() -> bool:
    """Whether a launcher started this process: torchrun sets LOCAL_RANK, ours LAUNCHER_ENV; accelerate's
    one-process launcher sets nothing that a user might not set too, so its command line is looked at. (A
    process started from a shell is not one: a shell that exits must not stop a `nohup` run.)"""
    if "LOCAL_RANK" in os.environ or LAUNCHER_ENV in os.environ:
        return True
    try:
        import psutil

        command = psutil.Process(_PARENT).cmdline()
    except Exception:  # gone, or no psutil (it comes with accelerate)
        return False
    return any(os.path.basename(part) in _LAUNCHER_NAMES for part in command[:3])


class StopOnSignal:
    """SIGTERM / SIGINT / SIGHUP ask the run to stop: it finishes the current step, saves a checkpoint and exits.
    Run directly, a second Ctrl-C interrupts at once; under a launcher repeats are only logged (see above)."""

    def __enter__(self):
        self.requested = False
        self.launched = under_launcher()
        self.previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        if self.launched:
            _signal_me_when_parent_dies(signal.SIGTERM)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            if signum == signal.SIGINT and not self.launched:
                raise KeyboardInterrupt
            logger.info("Received %s again: already stopping after this step.", signal.Signals(signum).name)
            return
        self.requested = True
        logger.warning("Received %s: stopping after this step.", signal.Signals(signum).name)

    def agreed(self, accelerator) -> bool:
        """Whether any process was asked to stop: all of them must save together."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor(float(self.requested), device=accelerator.device)
        return accelerator.reduce(flag, "max").item() > 0

    def __exit__(self, *exc):
        if self.launched and self.requested:
            # On its way out after a stop: torchrun's agent sends SIGTERM to every worker still alive once the first
            # has exited, which must not cut this one's exit short (it saw 75 from one worker and -15 from the
            # other). Ignored, not handled: the interpreter resets Python-level handlers to the default as it
            # finalizes, which took seconds here; it keeps SIG_IGN.
            for s in SIGNALS:
                signal.signal(s, signal.SIG_IGN)
            return
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if self.launched:
            _signal_me_when_parent_dies(0)


def _signal_me_when_parent_dies(signum: int) -> None:
    """Linux: the kernel sends `signum` (0: nothing) when the launcher that started this process exits."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux
        return
    if signum and os.getppid() != _PARENT:  # it died before the request: nobody will signal
        os.kill(os.getpid(), signum)
