"""Multi-GPU training throughput: train_text2image.py launched by accelerate on 1, 2, ... 8 GPUs of one machine.

Each row is one `accelerate launch` of the real training script with an `accelerate_configs/` file, on a random-
initialised real 2B/14B config and synthetic 768x1360 latents (no download), without checkpoints. The throughput
is the script's own (steps after the first three, compilation excluded); per GPU it is compared with the same
workload's 1-GPU row when there is one.

    python benchmarks/bench_scaling.py --workload 2B_full_ddp --gpus 1,2,4,8
    python benchmarks/bench_scaling.py --workload 14B_full_fsdp2 --gpus 8 --steps 8
    python benchmarks/bench_scaling.py --workload 2B_full_fsdp2_offload --gpus 1 --card_gib 24  # a 24 GB card

`--card_gib` runs every process under an emulated smaller GPU (benchmarks/card_limited.py). Each row also gives the
host memory the launch needed at its peak (the largest resident set of its processes), what offloading costs.

Every launch keeps NVLink multicast off (benchmarks.common.MULTICAST_OFF).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import MULTICAST_OFF, train_flops_per_sample, write_table  # noqa: E402
from cosmos_t2i.models import resolve_model  # noqa: E402

CONFIGS = ROOT / "accelerate_configs"
THROUGHPUT = re.compile(r"Throughput: ([\d.]+) samples/s, ([\d.]+) ms/step over \d+ steps(?:; peak GPU memory "
                        r"(?:while training )?([\d.]+) GiB)?")


@dataclasses.dataclass
class Workload:
    model: str
    config: str  # accelerate config for several processes; one process of a DDP workload runs single_gpu.yaml
    flags: list[str]
    lora: bool = False
    recompute: float = 0.0  # share of the forward recomputed by --gradient_checkpointing (for the FLOP count)


WORKLOADS = {
    # The 1-GPU fast path of BENCHMARKS.md (batch 6, activation budget 0.8, EMA on), data parallel.
    "2B_full_ddp": Workload("2B", "ddp_8gpu.yaml", ["--train_batch_size", "6", "--activation_memory_budget", "0.8"]),
    "2B_full_fsdp2": Workload("2B", "fsdp2_8gpu.yaml",
                              ["--train_batch_size", "6", "--activation_memory_budget", "0.8"]),
    # fp32 weights, gradients and AdamW state are 16 bytes a parameter (224 GB): sharded, every block checkpointed,
    # and no EMA (another 56 GB), which does not fit on two H200s; `-- --ema` adds it back on more GPUs.
    "14B_full_fsdp2": Workload("14B", "fsdp2_8gpu.yaml",
                               ["--train_batch_size", "2", "--gradient_checkpointing", "--no_ema"], recompute=1.0),
    # The same with DeepSpeed ZeRO-3 (pip install deepspeed): bf16 weights and fp32 master weights in its optimizer.
    "14B_full_zero3": Workload("14B", "deepspeed_zero3.yaml",
                               ["--train_batch_size", "2", "--gradient_checkpointing", "--no_ema"], recompute=1.0),
    "14B_lora_ddp": Workload("14B", "ddp_8gpu.yaml", ["--lora", "--train_batch_size", "1"], lora=True),
    # Weights, gradients, AdamW state and EMA in host memory (fsdp2_offload.yaml): the 24 GB-card recipe. The CPU's
    # AdamW step is paid once per optimizer step, so 64 samples a step (16 x 4 accumulated) amortise it.
    "2B_full_fsdp2_offload": Workload("2B", "fsdp2_offload.yaml",
                                      ["--train_batch_size", "16", "--gradient_accumulation_steps", "4",
                                       "--gradient_checkpointing"], recompute=1.0),
}


def launch(workload: Workload, processes: int, steps: int, height: int, width: int, extra: list[str],
           log_path: Path, card_gib: float | None = None) -> dict:
    config = "single_gpu.yaml" if processes == 1 and workload.config.startswith("ddp") else workload.config
    script = [str(ROOT / "benchmarks" / "card_limited.py"), str(card_gib)] if card_gib else []
    with tempfile.TemporaryDirectory() as output_dir:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
                   "--num_processes", str(processes), *script, str(ROOT / "train_text2image.py"),
                   "--model", workload.model,
                   "--random_init", "--synthetic_data", f"{height}x{width}", "--max_iter", str(steps),
                   "--save_iter", "0", "--report_to", "none", "--output_dir", output_dir, *workload.flags, *extra]
        print(" ".join(command[2:]), flush=True)
        with open(log_path, "w") as log:
            launcher = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                        env=dict(os.environ, **MULTICAST_OFF))
            # wait4's usage covers the launcher and the trainers it waited for: ru_maxrss is the largest resident
            # set among them (KiB on Linux), this launch's alone.
            _, status, usage = os.wait4(launcher.pid, 0)
            code = launcher.returncode = os.waitstatus_to_exitcode(status)
    host_gib = usage.ru_maxrss / 2**20
    text = log_path.read_text()
    found = THROUGHPUT.findall(text)
    if code or not found:
        print(text[-3000:], flush=True)
        return dict(gpus=processes, config=config, error=f"exit {code}, see {log_path}")
    samples_per_s, step_ms, peak = found[-1]
    return dict(gpus=processes, config=config, samples_per_s=float(samples_per_s), step_ms=float(step_ms),
                peak_gib=float(peak) if peak else "", host_peak_gib=host_gib, card_gib=card_gib or "full")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", required=True, choices=sorted(WORKLOADS),
                        help="Model, parallelism and flags (WORKLOADS in this file).")
    parser.add_argument("--model", default=None, help="Another model for the workload's flags (tiny: a CPU smoke "
                        "test of this script).")
    parser.add_argument("--gpus", default="1,2", help="Comma-separated process counts, one launch each.")
    parser.add_argument("--steps", type=int, default=12, help="Optimizer steps per launch (the first 3 untimed).")
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--width", type=int, default=1360)
    parser.add_argument("--card_gib", type=float, default=None, help="Emulate GPUs of this many GiB "
                        "(benchmarks/card_limited.py): a launch that needs more fails with out-of-memory.")
    parser.add_argument("--peak_tflops", type=float, default=800.0, help="Measured bf16 matmul rate per GPU, for MFU.")
    parser.add_argument("--out", default=None, help="Write the markdown table here (and the rows as .json); the "
                        "launches' logs go beside it.")
    parser.add_argument("extra", nargs="*", help="More train_text2image.py flags (after --), for every launch.")
    args = parser.parse_args(argv)

    workload = WORKLOADS[args.workload]
    if args.model:
        workload = dataclasses.replace(workload, model=args.model)
    flops = train_flops_per_sample(resolve_model(workload.model).transformer_config, args.height, args.width, workload.lora,
                                   workload.recompute)
    log_dir = Path(args.out).parent if args.out else Path(tempfile.mkdtemp())
    log_dir.mkdir(parents=True, exist_ok=True)
    rows, one_gpu = [], None
    for processes in (int(g) for g in args.gpus.split(",")):
        row = launch(workload, processes, args.steps, args.height, args.width, args.extra,
                     log_dir / f"{args.workload}_{processes}gpu.log", args.card_gib)
        if "samples_per_s" in row:
            per_gpu = row["samples_per_s"] / processes
            one_gpu = per_gpu if processes == 1 else one_gpu
            tflops = per_gpu * flops / 1e12
            row.update(per_gpu=per_gpu, tflops_per_gpu=tflops, mfu=f"{100 * tflops / args.peak_tflops:.1f}%")
            if one_gpu:
                row["scaling"] = f"{100 * per_gpu / one_gpu:.1f}%"
        rows.append(row)

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke test, not a measurement)"
    header = (f"## {args.workload}: {workload.model} {' '.join(workload.flags + args.extra)}, "
              f"{args.height}x{args.width}, {args.steps} steps per launch (3 untimed), {device}")
    columns = ["gpus", "config", "samples_per_s", "per_gpu", "scaling", "step_ms", "tflops_per_gpu", "mfu",
               "peak_gib", "card_gib", "host_peak_gib", "error"]
    write_table(rows, columns, header, args.out)


if __name__ == "__main__":
    main()
