"""Training time lost per checkpoint save: synchronous against background (async) saves, on one GPU.

The trainer's own pieces (methods.py's model builder and snapshot, checkpoint.CheckpointSaver) on a randomly
initialised transformer of the real config, fused AdamW, power EMA, bf16 autocast. Three runs of the same steps:
without saves, saving every --save_every steps synchronously, and in the background. The time lost per save is
(run time - run time without saves) / saves; the run time includes waiting for the last background save.
Columns: blocked_s, the training thread's time in one save() call (async: the host copies); write_s, the writing,
flushing and hashing (async: in the background thread); host_gib, host memory holding the state being written;
kept_gib, pinned buffers kept between saves.

    python benchmarks/bench_save.py --model 2B --save_dir /path/on/the/training/disk --out results/save_2b.md

A 2B full fine-tune checkpoint with EMA is ~32 GB (fp32 weights, EMA, AdamW); only the last one is kept on disk.
Put --save_dir on the disk checkpoints go to in training: the write speed there sets the synchronous cost, and
whether a background write finishes within --save_every steps. Each run first saves once untimed (pinned host
buffers are allocated at the first background save).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_train import build_transformer  # noqa: E402
from benchmarks.common import device_name, free_memory, synchronize, write_table  # noqa: E402
from cosmos_t2i import checkpoint as ckpt  # noqa: E402
from cosmos_t2i.ema import PowerEMA  # noqa: E402
from cosmos_t2i.methods import FullFineTune, LoraFineTune  # noqa: E402
from cosmos_t2i.models import PRESETS  # noqa: E402
from cosmos_t2i.objective import diffusion_loss  # noqa: E402

MODES = ["none", "sync", "async"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="2B", choices=["2B", "14B", "tiny"])
    parser.add_argument("--lora", action="store_true", help="LoRA r16 on a frozen bf16 base instead of full FT.")
    parser.add_argument("--no_ema", action="store_true")
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--width", type=int, default=1360)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60, help="Timed optimizer steps per run.")
    parser.add_argument("--save_every", type=int, default=20, help="Save every this many timed steps.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps first (and one untimed save).")
    parser.add_argument("--compile", action="store_true", help="torch.compile the blocks, as the trainer does.")
    parser.add_argument("--save_dir", default=None, help="Where checkpoints go (default: a temporary folder).")
    parser.add_argument("--device", default="cuda", help="cpu only for a smoke test of the script itself.")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES,
                        help="Which runs; lost_per_save_s needs `none` among them (else blocked_s is the measure).")
    parser.add_argument("--out", default=None, help="Write the markdown table here (and the rows as .json).")
    return parser.parse_args(argv)


def run(args, mode: str, device, save_dir: Path) -> dict:
    from accelerate import Accelerator

    from cosmos_t2i import speed

    accelerator = Accelerator(cpu=device.type == "cpu")
    method = LoraFineTune(16, 16, torch.bfloat16) if args.lora else FullFineTune()
    transformer, params = build_transformer(args.model, args.lora, device)
    transformer.train()
    if args.compile:
        speed.compile_transformer_blocks(transformer)
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    ema = None if args.no_ema else PowerEMA(transformer.named_parameters())
    config = PRESETS[args.model].transformer_config
    generator = torch.Generator(device).manual_seed(1)
    x0 = torch.randn(args.batch_size, 16, 1, args.height // 8, args.width // 8, device=device, generator=generator)
    text = torch.randn(args.batch_size, 512, config["text_embed_dim"], device=device, generator=generator)
    text = text.to(torch.bfloat16 if args.lora else torch.float32)
    output_dir = save_dir / mode
    saver = ckpt.CheckpointSaver(accelerator, output_dir, background=mode == "async")
    blocked = []  # seconds the training thread spent in each save() call
    host = []  # (bytes of host memory holding the state being written, bytes of buffers kept between saves)

    def step(i: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = diffusion_loss(transformer, x0, text, generator=torch.Generator(device).manual_seed(i))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(i)

    def save(i: int) -> None:
        saver.wait()  # save() begins with this too; here it also lets the previous checkpoint go before the next
        for old in ckpt.checkpoints_dir(output_dir).glob("iter_*"):  # one checkpoint on disk at a time
            shutil.rmtree(old)
        start = time.perf_counter()
        saver.save(i, snapshot_model=lambda copier: method.snapshot_weights(accelerator, transformer, ema, copier),
                   model=transformer, optimizer=optimizer, scheduler=scheduler, state={"data_position": i},
                   config={"bench": "save"})
        synchronize()
        blocked.append(time.perf_counter() - start)
        host.append((saver.copier.held_bytes, saver.copier.buffer_bytes))

    for i in range(args.warmup):
        step(i)
    if mode != "none":
        save(0)
        saver.wait()
    blocked.clear()
    saver.write_seconds.clear()
    synchronize()
    start = time.perf_counter()
    for i in range(1, args.steps + 1):
        step(args.warmup + i)
        if mode != "none" and i % args.save_every == 0:
            save(i)
    saver.finish()
    synchronize()
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in ckpt.checkpoints_dir(output_dir).rglob("*") if p.is_file()) \
        if mode != "none" else 0
    row = dict(mode=mode, seconds=seconds, saves=len(blocked), checkpoint_gb=size / 1e9,
               blocked_s=sum(blocked) / len(blocked) if blocked else 0.0,
               write_s=sum(saver.write_seconds) / len(saver.write_seconds) if saver.write_seconds else 0.0,
               host_gib=host[-1][0] / 2**30 if mode == "async" and host else 0.0,
               kept_gib=host[-1][1] / 2**30 if host else 0.0)
    shutil.rmtree(output_dir, ignore_errors=True)
    return row


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    temporary = None if args.save_dir else tempfile.TemporaryDirectory(prefix="bench_save_")
    save_dir = Path(args.save_dir or temporary.name)
    rows = []
    for mode in args.modes:
        print(f"--- {mode}", flush=True)
        torch._dynamo.reset()
        rows.append(run(args, mode, device, save_dir))
        free_memory()
        print(rows[-1], flush=True)
    baseline = rows[0]["seconds"] if rows[0]["mode"] == "none" else None
    for row in rows:
        row["step_s"] = baseline / args.steps if baseline is not None else None
        row["lost_per_save_s"] = (row["seconds"] - baseline) / row["saves"] if row["saves"] and baseline else None
    kind = "LoRA r16" if args.lora else "full fine-tune"
    header = (f"### Checkpoint saves, {args.model} {kind}{'' if args.no_ema else ' + EMA'}, batch {args.batch_size} "
              f"at {args.width}x{args.height}, a save every {args.save_every} steps, {device_name()}, "
              f"torch {torch.__version__}")
    columns = ["mode", "lost_per_save_s", "blocked_s", "write_s", "checkpoint_gb", "host_gib", "kept_gib", "saves",
               "seconds", "step_s"]
    write_table(rows, columns, header, args.out)
    if temporary is not None:
        temporary.cleanup()


if __name__ == "__main__":
    main()
