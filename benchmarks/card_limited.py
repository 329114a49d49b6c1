"""Run a script as if the GPU had only GIB GiB: `python benchmarks/card_limited.py GIB script.py [args...]`.

For whole commands under `accelerate launch` (bench_scaling.py --card_gib): each process limits its own GPU
(torch.cuda.set_per_process_memory_fraction, LOCAL_RANK's device) before the script starts, so the script's own
model build counts too, then runs the script as `__main__`. An allocation past the limit raises CUDA's
out-of-memory error, as on the smaller card.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import limit_memory  # noqa: E402


def main() -> None:
    card_gib, script, *args = sys.argv[1:]
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        limit_memory(float(card_gib), device)
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
