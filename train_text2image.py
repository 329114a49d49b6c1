#!/usr/bin/env python
"""Post-train NVIDIA Cosmos-Predict2 Text2Image (2B or 14B): full fine-tune or LoRA, with NVIDIA's recipe.

    accelerate launch train_text2image.py --model 14B --lora --dataset_dir DATA \\
        --output_dir checkpoints/posttraining/text2image/14b_lora_my_run

DATA is made by prepare_dataset.py and embed_captions.py. Every recipe value defaults to NVIDIA's for the chosen
model (cosmos_t2i/models.py) and is a flag. Checkpoints go to OUTPUT_DIR/checkpoints/iter_NNNNNNNNN/ and a rerun of
the same command resumes from the latest one, also on another number of GPUs (the data continues from the same
global batch). SIGTERM / Ctrl-C saves a checkpoint at the end of the step (unless --save_iter 0) and exits;
`python -m cosmos_t2i.launch` instead of `accelerate launch` also waits for that when the launcher is signalled.

Exit codes: 0 the run reached --max_iter; 75 (EX_TEMPFAIL) stopped before it, by a signal: rerun the same command
to resume; 2 a mistake in the flags or inputs (one `error:` line); 1 a failure.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs,
                               ProjectConfiguration, broadcast_object_list)
from tqdm.auto import tqdm

from cosmos_t2i import checkpoint as ckpt
from cosmos_t2i import cli, hub, memory, prior_preservation, run_folder, speed, user_errors
from cosmos_t2i.checkpoint_integrity import verify_for_resume
from cosmos_t2i.user_errors import BadValue, MissingInput
from cosmos_t2i.ema import NVIDIA_SIGMA_REL, PowerEMA
from cosmos_t2i.objective import TEXT_DROPOUT, diffusion_loss
from cosmos_t2i.models import ASPECT_RATIOS, dtype_named, load_vae, resolve_model
from cosmos_t2i.recipe import (LORA_ALPHA, LORA_RANK, apply_defaults, config_differences,
                               distribution_change_refused, effective_batch, linear_decay, reschedule)
from cosmos_t2i.methods import training_method
from cosmos_t2i.dataset_format import content_fingerprint
from cosmos_t2i.stopping import StopOnSignal, exit_code, stop_requested_before_start
from cosmos_t2i.training_data import (EmbeddedImages, SyntheticLatents, derived_seed, global_batch, make_dataloader,
                                      resumed_position)
from cosmos_t2i.vae_latents import encode_normalized
from cosmos_t2i.fidelity import default_metric_models
from cosmos_t2i.text_encoding import encode_prompts
from cosmos_t2i.validation import ValidationMetrics, Validator

logger = get_logger("train_text2image")  # logs on the main process only


def parse_args(argv=None):
    parser = cli.parser(__doc__)
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="2B", help="2B, 14B, tiny (CPU-sized, built locally), a diffusers "
                       "Cosmos2TextToImagePipeline folder or hub id.")
    model.add_argument("--lora", action="store_true", help="Train LoRA adapters instead of the whole transformer.")
    model.add_argument("--rank", type=int, default=None, help="LoRA rank (default 16, NVIDIA's). Needs --lora.")
    model.add_argument("--lora_alpha", type=int, default=None, help="LoRA alpha (default 16). Needs --lora.")
    model.add_argument("--fp8_base", action="store_true", help="With --lora: store the frozen base's block Linear "
                       "weights in float8 e4m3 with one scale per output channel, dequantised layer by layer: about "
                       "half the weight memory (14B: 28 -> 14 GB) for a small accuracy cost measured in BENCHMARKS.md. "
                       "The saved LoRA is an ordinary one for the bf16 base.")
    model.add_argument("--offload_frozen", action="store_true", help="With --lora: keep the frozen base's block "
                       "Linear weights (bf16, or fp8 with --fp8_base) in pinned host memory and stream them to the GPU "
                       "block by block, the next block's copy overlapped with compute. Same math. Meant for 12-16 GB "
                       "cards; its GPU memory and speed are not measured yet (BENCHMARKS.md).")
    model.add_argument("--random_init", action="store_true", help="Random weights of the model's architecture "
                       "instead of its trained ones: nothing to download for 2B/14B (benchmarks, tests).")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset_dir", default=None, help="Made by prepare_dataset.py + embed_captions.py.")
    data.add_argument("--synthetic_data", default=None, metavar="HEIGHTxWIDTH", help="Random latents and 512-token "
                      "embeddings at this pixel resolution instead of a dataset, e.g. 768x1360. Needs --random_init.")
    data.add_argument("--dataloader_num_workers", type=int, default=None, help="Processes decoding images (default "
                      "2 with a GPU; 0 on a CPU, where they would take cores from the training itself).")
    data.add_argument("--text_dropout", type=float, default=TEXT_DROPOUT,
                      help="Share of samples trained with a zero text embedding, for CFG (NVIDIA: 0.2).")
    prior_preservation.add_arguments(parser)

    recipe = parser.add_argument_group("recipe (defaults: NVIDIA's for the model)")
    recipe.add_argument("--max_iter", type=int, default=1000, help="Optimizer steps in the run. A rerun with a larger "
                        "value extends a finished or stopped run, on the schedule of the new length (README).")
    recipe.add_argument("--save_iter", type=int, default=500, help="Save a checkpoint every this many steps and at "
                        "the end; 0 saves nothing (benchmarks).")
    recipe.add_argument("--train_batch_size", type=int, default=1, help="Images per GPU per micro-step.")
    recipe.add_argument("--gradient_accumulation_steps", type=int, default=1)
    recipe.add_argument("--learning_rate", type=float, default=None, help=(
        "Base lr; the step's lr is this x a factor falling linearly from --lr_start_factor to 0 over --max_iter. "
        "Full fine-tune: NVIDIA's 2^-15 (2B) / 2^-14.5 (14B), factor 0.17 / 0.4: peak 5.19e-6 / 1.73e-5. "
        "LoRA: 1e-4 at factor 1, because NVIDIA's full fine-tune lr barely moves adapters that start at B = 0."))
    recipe.add_argument("--lr_start_factor", type=float, default=None,
                        help="Schedule factor at step 0 (default 0.17 for 2B, 0.4 for 14B; 1 with --lora).")
    recipe.add_argument("--weight_decay", type=float, default=None, help="AdamW decay (2B 0.1, 14B 0.2).")
    recipe.add_argument("--adam_beta1", type=float, default=0.9)
    recipe.add_argument("--adam_beta2", type=float, default=0.99)
    recipe.add_argument("--adam_epsilon", type=float, default=1e-8)
    recipe.add_argument("--max_grad_norm", type=float, default=1.0)
    recipe.add_argument("--max_nonfinite_steps", type=int, default=10, help="Stop after this many steps in a row "
                        "whose gradients were NaN/inf (each such step is skipped and reported).")
    recipe.add_argument("--ema", dest="ema", action="store_true", default=True,
                        help="Keep NVIDIA's power EMA of the trained weights (default).")
    recipe.add_argument("--no_ema", dest="ema", action="store_false", help="Train without EMA.")
    recipe.add_argument("--ema_sigma_rel", type=float, default=NVIDIA_SIGMA_REL,
                        help="Relative width of the EMA's averaging profile (NVIDIA: 0.1, gamma ~ 6.94).")
    recipe.add_argument("--seed", type=int, default=0)
    recipe.add_argument("--mixed_precision", default="bf16", choices=["bf16", "no"],
                        help="Compute dtype; master weights are fp32 either way.")

    speed_group = parser.add_argument_group("speed (none of these changes the math)")
    speed_group.add_argument("--gradient_checkpointing", type=float, nargs="?", const=1.0, default=0.0,
                             metavar="FRACTION", help="Recompute activations of this share of the blocks "
                             "(all when given alone): less memory, more compute.")
    speed_group.add_argument("--compile", dest="compile", action="store_true", default=None,
                             help="torch.compile each transformer block (the default on a GPU: ~1.7x on 2B).")
    speed_group.add_argument("--no_compile", dest="compile", action="store_false", help="Eager: the plain path.")
    speed_group.add_argument("--activation_memory_budget", type=float, default=1.0, metavar="FRACTION",
                             help="With --compile, below 1: the compiler saves fewer activations and recomputes the "
                             "cheapest (elementwise) ones in the backward. 0.8 halves 2B's activation memory for ~4%% "
                             "more time per sample, so a larger batch fits: 2B full fine-tune at batch 5 with EMA "
                             "runs 8.1 samples/s in 66 GiB on an H100, against 7.2 at batch 2 without it "
                             "(BENCHMARKS.md). 1.0: the compiler's default.")
    speed_group.add_argument("--attention_backend", default="sdpa", choices=speed.ATTENTION_BACKENDS,
                             help="The SDPA kernel tried first (sdpa: PyTorch's own order, which picks cuDNN's on an "
                             "H100).")

    out = parser.add_argument_group("output")
    out.add_argument("--output_dir", default=None,
                     help="Default: checkpoints/posttraining/text2image/<model>_<full|lora>.")
    out.add_argument("--resume_from_checkpoint", default="latest", help="'latest' (resume if OUTPUT_DIR has "
                     "checkpoints/latest_checkpoint.txt), an iter_* folder, or 'none' to start over (the previous "
                     "run's checkpoints/ is moved to checkpoints.previous-<UTC time>).")
    out.add_argument("--init_from", default=None, metavar="CHECKPOINT", help="Start a new run from this checkpoint's "
                     "weights only (an iter_* folder or a run's OUTPUT_DIR; full fine-tune: its model/, LoRA: its "
                     "adapter), with a new optimizer, lr schedule and data order. Ignored when OUTPUT_DIR has a "
                     "checkpoint to resume.")
    out.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep only the last N checkpoints.")
    out.add_argument("--async_save", dest="async_save", action="store_true", default=True,
                     help="Write checkpoints in the background from a copy in host memory, while training goes on "
                     "(default; the log says how much memory). Falls back to --no_async_save when it does not fit.")
    out.add_argument("--no_async_save", dest="async_save", action="store_false",
                     help="Write each checkpoint while training waits.")
    out.add_argument("--no_verify_checksums", dest="verify_checksums", action="store_false", default=True,
                     help="On resume (and for --init_from's model/), skip hashing the checkpoint against the "
                     "checksums recorded at save time (it reads the whole checkpoint once); sizes and headers are "
                     "still checked.")
    out.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "wandb", "none"])
    out.add_argument("--tracker_project_name", default="cosmos-predict2-text2image")
    out.add_argument("--validation_prompt", action="append", default=None,
                     help="Sample this prompt every --validation_steps (repeat the flag for several).")
    out.add_argument("--validation_steps", type=int, default=500)
    out.add_argument("--validation_num_inference_steps", type=int, default=35)
    out.add_argument("--validation_guidance_scale", type=float, default=4.0)
    out.add_argument("--validation_aspect_ratio", default="16:9", choices=sorted(ASPECT_RATIOS))
    out.add_argument("--validation_metrics", action="store_true",
                     help="At each validation, log CLIP-T (each image with its prompt) and DINO / CLIP-I against 8 "
                          "training images beside the images (DreamBooth's metrics, cosmos_t2i/fidelity.py).")
    out.add_argument("--validation_dino_model", default=None,
                     help="ViT for --validation_metrics (default facebook/dino-vits16; tiny with --model tiny).")
    out.add_argument("--validation_clip_model", default=None,
                     help="CLIP for --validation_metrics (default openai/clip-vit-large-patch14; tiny with --model "
                          "tiny).")
    out.add_argument("--push_to_hub", action="store_true", help="Upload the final model/ with a model card.")
    out.add_argument("--hub_model_id", default=None)

    cluster = parser.add_argument_group("several processes or machines")
    cluster.add_argument("--distributed_timeout", type=float, default=600, metavar="SECONDS", help="How long a "
                         "process waits in a collective (all-reduce, barrier) for the others before it stops with an "
                         "error, e.g. when another node died or hangs. Default: 600 (torch's own: 1800). Raise it if "
                         "one process can take longer than this alone, e.g. the main process writing a large "
                         "checkpoint's model/ while the others wait.")

    args = parser.parse_args(argv)
    if not args.lora and (args.rank is not None or args.lora_alpha is not None):
        raise BadValue("--rank and --lora_alpha configure LoRA: add --lora, or drop them for a full "
                       "fine-tune.")
    if args.fp8_base and not args.lora:
        raise BadValue("--fp8_base stores the frozen base of a LoRA run in fp8: add --lora (a full "
                       "fine-tune trains every weight, and keeps fp32 master weights).")
    if args.offload_frozen and not args.lora:
        raise BadValue("--offload_frozen streams the frozen base of a LoRA run from host memory: add --lora (a full "
                       "fine-tune trains every weight: it has no frozen base).")
    if args.lora:  # NVIDIA's LoRA shape for every model, preset or not
        args.rank = LORA_RANK if args.rank is None else args.rank
        args.lora_alpha = LORA_ALPHA if args.lora_alpha is None else args.lora_alpha
    if args.synthetic_data:
        if not args.random_init:
            raise BadValue("--synthetic_data trains on noise: only meaningful with --random_init (benchmarks).")
        args.synthetic_data = _parse_size(args.synthetic_data)
    elif args.dataset_dir is None:
        raise BadValue("--dataset_dir is required (make one with prepare_dataset.py and "
                       "embed_captions.py).")
    prior_preservation.check_args(args)
    if args.validation_metrics and not (args.validation_prompt and args.dataset_dir):
        raise BadValue("--validation_metrics scores the validation images against training images: it needs "
                       "--validation_prompt and --dataset_dir.")
    if args.push_to_hub and not args.hub_model_id:
        raise BadValue("--push_to_hub needs --hub_model_id (e.g. your-name/cosmos-t2i-robot-lora).")
    if args.push_to_hub and args.save_iter == 0:
        raise BadValue("--push_to_hub uploads the final checkpoint's model/, and --save_iter 0 saves none.")
    if args.dataloader_num_workers is None:
        args.dataloader_num_workers = 2 if torch.cuda.is_available() else 0
    if args.compile is None:
        args.compile = torch.cuda.is_available()
    if not 0.0 < args.activation_memory_budget <= 1.0:
        raise BadValue(f"--activation_memory_budget {args.activation_memory_budget}: expected a fraction in (0, 1].")
    if args.activation_memory_budget < 1.0 and not args.compile:
        raise BadValue("--activation_memory_budget is applied by torch.compile: drop --no_compile, or use "
                       "--gradient_checkpointing to save memory in eager mode.")
    if args.distributed_timeout <= 0:
        raise BadValue(f"--distributed_timeout {args.distributed_timeout}: expected seconds > 0 (default 600).")
    if args.output_dir is None:
        kind = "lora" if args.lora else "full"
        args.output_dir = f"checkpoints/posttraining/text2image/{Path(args.model).name}_{kind}"
    return args


def _parse_size(text: str) -> list[int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise BadValue(f"--synthetic_data {text!r}: expected HEIGHTxWIDTH in pixels, e.g. 768x1360.") from None
    if height % 16 or width % 16:
        raise BadValue(f"--synthetic_data {text}: height and width must be multiples of 16.")
    return [height, width]


def main(args):
    """Train; a CUDA out-of-memory error ends with the flags that lower memory (cosmos_t2i/memory.py)."""
    with memory.explain_out_of_memory(None, memory.training_advice(args), "training"):
        return _train(args)


def _train(args):
    # Everything that can be wrong with the inputs is checked before any weights are loaded.
    model = resolve_model(args.model)
    method = training_method(args)
    preset = model.preset
    if preset is None and (args.learning_rate is None or args.weight_decay is None):
        raise BadValue(f"{args.model} is not one of the presets (2B, 14B, tiny): pass --learning_rate and "
                       "--weight_decay for it.")
    if preset is not None:
        apply_defaults(args, preset, method)
    if args.lr_start_factor is None:
        args.lr_start_factor = 1.0
    output_dir = Path(args.output_dir)
    if stop_requested_before_start():  # restarted by the elastic agent after the launcher was stopped
        logger.warning("The launcher was asked to stop: not starting.")
        return None
    run_folder.require_writable(output_dir)

    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        # DDP: gradients live in its all-reduce buckets instead of being copied there (one fp32 model less memory).
        kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True),
                         # A dead or hung peer stops the others after this long, not after torch's 30 minutes.
                         InitProcessGroupKwargs(timeout=timedelta(seconds=args.distributed_timeout))],
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.ema and _zero3(accelerator):
        raise BadValue("EMA under DeepSpeed ZeRO-3 is not supported (the parameters are partitioned): use the "
                       "FSDP2 config, or --no_ema.")
    if args.compile and _zero3(accelerator):
        # ZeRO-3's parameter hooks run inside each block and dynamo recompiled them block after block until its
        # limit (32), then ran the rest eager (tests/test_multi_gpu.py on two H200s); FSDP2 compiles cleanly.
        if args.activation_memory_budget < 1.0:
            raise BadValue("--activation_memory_budget is applied by torch.compile, which DeepSpeed ZeRO-3 runs "
                           "without: use --gradient_checkpointing, or the FSDP2 config.")
        logger.warning("DeepSpeed ZeRO-3: the transformer blocks run eager (compiled, they recompile per block). "
                       "The FSDP2 config (accelerate_configs/fsdp2_8gpu.yaml) compiles them.")
        args.compile = False
    if args.offload_frozen and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise BadValue("--offload_frozen streams each GPU's own copy of the frozen base: launch a single process or "
                       "DDP (accelerate_configs/single_gpu.yaml, ddp_8gpu.yaml), not FSDP or DeepSpeed.")

    # The data as a resume compares it: by content (read by the main process only), not by its path's text.
    fingerprint = broadcast_object_list([content_fingerprint(args.dataset_dir) if args.dataset_dir
                                         and not args.synthetic_data and accelerator.is_main_process else None])[0]
    # The optimizer checkpoint's format and the data order depend on how the run is spread over processes.
    config = json.loads(json.dumps(dict(vars(args), preset=preset.name if preset else None,
                                        world_size=accelerator.num_processes,
                                        distributed_type=str(accelerator.distributed_type),
                                        dataset_fingerprint=fingerprint)))
    resume = _checkpoint_to_resume(args, output_dir)
    init = run_folder.init_checkpoint(args.init_from, args.lora, args.rank) \
        if args.init_from and resume is None else None
    if init is not None:  # its weights only are read: model/ is checked like a resume's checkpoint
        verify_for_resume(accelerator, init, hashes=args.verify_checksums, within=ckpt.MODEL, flag="--init_from")
    if args.resume_from_checkpoint == "none" and accelerator.is_main_process:
        run_folder.set_previous_run_aside(output_dir)
    saved_config = _check_resume(accelerator, resume, config, args.verify_checksums) if resume is not None else None
    if args.push_to_hub:
        hub.require_token()

    data = _training_data(args, model)

    device = accelerator.device
    weight_dtype = dtype_named(args.mixed_precision)
    # The dtype of the weights that read the inputs first: fp32 masters under autocast, but a frozen base (LoRA)
    # and DeepSpeed's bf16 mode (which turns autocast off and keeps the masters in its optimizer) hold bf16 weights.
    text_dtype = weight_dtype if method.frozen_base or _deepspeed(accelerator) else torch.float32
    validator = _validator(args, model, accelerator, weight_dtype, output_dir) if args.validation_prompt else None
    prior = prior_preservation.setup(args, model, data, accelerator)  # before the model: generation needs the GPU
    vae = None
    if not data.cached_latents:
        vae = load_vae(model, device, weight_dtype).requires_grad_(False)

    torch.manual_seed(args.seed)
    transformer = method.build(model, model.transformer_config, random_init=args.random_init, device=device,
                               checkpoint=resume or init, weights_arrive_later=_fsdp_broadcasts_weights(accelerator)
                               and not accelerator.is_main_process)
    transformer.train()
    if args.gradient_checkpointing:
        speed.checkpoint_blocks(transformer, args.gradient_checkpointing)
    if args.compile:
        speed.compile_transformer_blocks(transformer, activation_memory_budget=args.activation_memory_budget)
    optimizer = torch.optim.AdamW(
        [p for p in transformer.parameters() if p.requires_grad], lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, weight_decay=args.weight_decay,
        fused=True,  # one kernel for all parameters (CUDA and CPU); it also takes the clip (below)
    )
    # Stepped by us once per optimizer step (accelerate's wrapper would step it once per process).
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_decay(args.max_iter, args.lr_start_factor))
    if _deepspeed(accelerator):  # DeepSpeed's engine needs the micro-batch; our data loader is not prepared
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.train_batch_size
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    trainable = [p for p in transformer.parameters() if p.requires_grad]  # after prepare: FSDP swaps them
    ema = PowerEMA(accelerator.unwrap_model(transformer).named_parameters(), args.ema_sigma_rel) if args.ema else None
    memory.reset_peak(device)  # the reported peak is training's, not the model build's (e.g. a 14B loaded and cast)
    # Where gradients are whole tensors, fused AdamW applies the clip as it reads them: one pass less per step.
    clip_in_step = accelerator.distributed_type != DistributedType.FSDP and not _deepspeed(accelerator) \
        and accelerator.scaler is None

    iteration, position = 0, 0
    if resume is not None:
        state = ckpt.load_checkpoint(accelerator, resume, model=transformer, optimizer=optimizer, scheduler=scheduler,
                                     seed=args.seed)
        iteration = state["iteration"]
        if saved_config["max_iter"] != args.max_iter:
            reschedule(scheduler, iteration)
            logger.info("--max_iter %d (the run had %d): from iteration %d the lr factor falls linearly from %.3g to "
                        "0 at %d, as in a run launched with --max_iter %d.", args.max_iter, saved_config["max_iter"],
                        iteration, scheduler.lr_lambdas[0](iteration) if iteration < args.max_iter else 0.0,
                        args.max_iter, args.max_iter)
        position = _continue_data(state["data_position"], saved_config["world_size"], accelerator.num_processes)
        if ema is not None:
            method.load_ema(ema, resume)
        logger.info("Resumed from %s (iteration %d)", resume, iteration)
    elif init is not None:
        logger.info("Initialised from the weights of %s; new optimizer, lr schedule and data order.", init)
    if prior is None:
        batches = iter(make_dataloader(data, args.train_batch_size, args.seed, accelerator.num_processes,
                                       accelerator.process_index, position, args.dataloader_num_workers))
    else:
        batches = iter(prior.dataloader(data, args.train_batch_size, accelerator.num_processes,
                                        accelerator.process_index, position, args.dataloader_num_workers))

    saver = ckpt.CheckpointSaver(accelerator, output_dir, background=args.async_save,
                                 total_limit=args.checkpoints_total_limit)

    def save(iteration):
        return saver.save(
            iteration, snapshot_model=lambda copier: method.snapshot_weights(accelerator, transformer, ema, copier),
            model=transformer, optimizer=optimizer, scheduler=scheduler,
            state={"data_position": position}, config=config,
        )

    validation_images = {}  # iteration -> the images written at it, in prompt order

    def validate(iteration):
        # Sharded weights need every process in the forward pass; replicated ones only the main process.
        if accelerator.is_main_process or _sharded(accelerator):
            with accelerator.autocast():
                images = validator.images(accelerator.unwrap_model(transformer), device, weight_dtype, text_dtype)
            if accelerator.is_main_process:
                validation_images[iteration] = validator.save(images, iteration, accelerator.trackers)
                if validator.metrics is not None:
                    accelerator.log(validator.metrics.compute(images, args.validation_prompt, device), step=iteration)
        accelerator.wait_for_everyone()

    accelerator.init_trackers(args.tracker_project_name, config=_loggable(config))
    logger.info("Training %s (%s) from iteration %d to %d; peak lr %.3g, %d trainable parameters",
                args.model, method.label, iteration, args.max_iter,
                args.learning_rate * args.lr_start_factor, sum(getattr(p, "ds_numel", p.numel()) for p in trainable))
    samples_per_step = effective_batch(config)
    progress = tqdm(total=args.max_iter, initial=iteration, disable=not accelerator.is_main_process)
    nonfinite_in_a_row, step_seconds = 0, []
    with speed.attention_backend(args.attention_backend), StopOnSignal() as stop:
        while iteration < args.max_iter:
            start = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            halves_sum = {}  # prior preservation: the instance and class losses apart, for the log
            for _ in range(args.gradient_accumulation_steps):
                batch = next(batches)
                with accelerator.accumulate(transformer):
                    if "latents" in batch:
                        x0 = batch["latents"].to(device, torch.float32)
                    else:
                        x0 = encode_normalized(vae, batch["pixels"])
                    text_embeds = batch["text_embeds"].to(device, text_dtype)
                    batch_index = global_batch(position, accelerator.num_processes, accelerator.process_index)
                    # The noise of a micro-step is a function of (seed, global batch): a resumed run draws the same
                    # noise, and a batch gets the same noise whatever the number of processes it is trained on.
                    generator = torch.Generator(device).manual_seed(derived_seed(args.seed, batch_index))
                    if prior is None:
                        loss = diffusion_loss(transformer, x0, text_embeds, generator, text_dropout=args.text_dropout)
                    else:
                        loss, halves = prior.loss(transformer, batch, x0, text_embeds, generator, batch_index,
                                                  args.text_dropout)
                        halves_sum = {k: halves_sum.get(k, 0) + v for k, v in halves.items()}
                    accelerator.backward(loss)
                loss_sum += loss.detach()
                position += 1

            if clip_in_step:
                grad_norm = _global(speed.clip_grad_norm_in_fused_adamw(optimizer, trainable, args.max_grad_norm))
            else:
                grad_norm = _global(accelerator.clip_grad_norm_(trainable, args.max_grad_norm))
            if grad_norm is None or math.isfinite(grad_norm):
                optimizer.step()
                if ema is not None:
                    ema.update(iteration)
                nonfinite_in_a_row = 0
            else:
                # NVIDIA zeroes non-finite gradients silently; a run that produces them should be looked at.
                # (DeepSpeed steps inside backward(): there it can only be reported.)
                nonfinite_in_a_row += 1
                logger.warning("Iteration %d: gradient norm is %s; %s (%d in a row).", iteration, grad_norm,
                               "DeepSpeed applied the update" if _deepspeed(accelerator) else "update skipped",
                               nonfinite_in_a_row)
                if nonfinite_in_a_row >= args.max_nonfinite_steps:
                    raise RuntimeError(f"{nonfinite_in_a_row} steps in a row had non-finite gradients (last at "
                                       f"iteration {iteration}). Lower --learning_rate or check the data.")
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            iteration += 1

            loss_value = accelerator.reduce(loss_sum, "mean").item() / args.gradient_accumulation_steps
            step_seconds.append(time.perf_counter() - start)
            samples_per_s = samples_per_step / step_seconds[-1]
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.3g}", samples_s=f"{samples_per_s:.2f}")
            halves_logged = {k: accelerator.reduce(v, "mean").item() / args.gradient_accumulation_steps
                             for k, v in halves_sum.items()}
            accelerator.log({"loss": loss_value, "lr": lr, "grad_norm": grad_norm, "samples_per_s": samples_per_s,
                             **halves_logged}, step=iteration)

            stopping = stop.agreed(accelerator)
            if args.save_iter and (iteration % args.save_iter == 0 or iteration == args.max_iter or stopping):
                save(iteration)
            if validator is not None and (iteration % args.validation_steps == 0 or iteration == args.max_iter):
                validate(iteration)
            if stopping:
                logger.info("Stopped by signal at iteration %d.", iteration)
                break
    progress.close()
    saver.finish()  # the last background save is complete, or its error raised
    _report_speed(step_seconds, samples_per_step, device)

    if args.push_to_hub and iteration == args.max_iter and accelerator.is_main_process:
        _push(args, config, preset, method, data, output_dir / ckpt.CHECKPOINTS / ckpt.iter_name(iteration),
              zip(validation_images.get(iteration, []), args.validation_prompt or []))
    accelerator.end_training()
    args.reached_iteration = iteration  # for the exit code (exit_code); not part of the run's config
    return ckpt.latest_checkpoint(output_dir)


def _checkpoint_to_resume(args, output_dir: Path) -> Path | None:
    if args.resume_from_checkpoint == "none":
        return None
    if args.resume_from_checkpoint == "latest":
        return ckpt.latest_checkpoint(output_dir)
    path = Path(args.resume_from_checkpoint)
    if not (path / ckpt.TRAINER / ckpt.STATE).is_file():
        raise MissingInput(f"--resume_from_checkpoint {path}: not a complete checkpoint (no trainer/state.json).")
    return path


def _training_data(args, model) -> EmbeddedImages | SyntheticLatents:
    """The dataset (or the benchmarks' synthetic latents), checked against the model's text embedding size."""
    dim = model.transformer_config["text_embed_dim"]
    if args.synthetic_data:
        return SyntheticLatents(*args.synthetic_data, embedding_dim=dim)
    data = EmbeddedImages(args.dataset_dir, model.resolutions)
    if data.embedding_dim != dim:
        raise BadValue(
            f"{args.dataset_dir} holds {data.embedding_dim}-dimensional T5 embeddings (embedded with "
            f"{data.info.get('model', 'an unknown model')}), but {args.model}'s transformer takes "
            f"text_embed_dim={dim}. Re-run embed_captions.py --model {args.model}."
        )
    return data


def _validator(args, model, accelerator, weight_dtype, output_dir: Path) -> Validator:
    """--validation_prompt's sampler: the prompts T5-encoded once by the main process (T5 is freed before the
    model is built) and sent to the others, with the metric models of --validation_metrics on the main process."""
    embeds = encode_prompts(model, args.validation_prompt, accelerator.device, weight_dtype) \
        if accelerator.is_main_process else None
    embeds = broadcast_object_list([embeds])[0]
    size = model.resolutions[args.validation_aspect_ratio]
    validator = Validator(model, args.validation_prompt, embeds, size, args.validation_num_inference_steps,
                          args.validation_guidance_scale, args.seed, output_dir)
    if args.validation_metrics and accelerator.is_main_process:
        validator.metrics = ValidationMetrics(args.dataset_dir, *default_metric_models(
            model, args.validation_dino_model, args.validation_clip_model))
    return validator


def _check_resume(accelerator, resume: Path, config: dict, verify_checksums: bool) -> dict:
    """The saved run's config, once `resume` is known to be intact and its settings to allow this run to go on."""
    verify_for_resume(accelerator, resume, hashes=verify_checksums)
    saved_config = ckpt.read_config(resume)
    differing = config_differences(saved_config, config)
    if differing:
        details = ", ".join(f"{k}: {saved_config.get(k)!r} there, {config.get(k)!r} now" for k in differing)
        raise BadValue(f"Cannot resume {resume}: its run used other settings ({details}). Pass the same flags, "
                       "a new --output_dir, or --resume_from_checkpoint none.")
    refused = distribution_change_refused(saved_config, config)
    if refused:
        raise BadValue(f"Cannot resume {resume}: {refused}")
    _report_distribution_change(saved_config, config)
    return saved_config


def _report_distribution_change(saved: dict, config: dict) -> None:
    """Warn when a resume changes the number of processes or the effective batch (both are allowed)."""
    if saved["world_size"] != config["world_size"]:
        # The data continues from the same global batch, but processes without a saved RNG state seed a new one and
        # gradients are summed in another order.
        logger.warning("Resuming on %d processes a checkpoint saved by %d: from here on the run is not bit-identical "
                       "to an uninterrupted one.", config["world_size"], saved["world_size"])
    before, now = effective_batch(saved), effective_batch(config)
    if before != now:
        logger.warning("The effective batch changes from %d (%d per process x %d accumulation x %d processes) to %d "
                       "(%d x %d x %d); the learning rate schedule stays as it was.", before,
                       saved["train_batch_size"], saved["gradient_accumulation_steps"], saved["world_size"], now,
                       config["train_batch_size"], config["gradient_accumulation_steps"], config["world_size"])


def _continue_data(saved_position: int, saved_processes: int, processes: int) -> int:
    """This process's data position in the resumed run: the same global batch, on any number of processes."""
    position, skipped = resumed_position(saved_position, saved_processes, processes)
    if processes != saved_processes:
        logger.info("Data position %d per process on %d processes (global batch %d) continues as %d per process "
                    "on %d; %d global batches skipped by rounding up.", saved_position, saved_processes,
                    saved_position * saved_processes, position, processes, skipped)
    return position


def _global(norm) -> float | None:
    """The total gradient norm as a float (DeepSpeed gives a float, or None before its first step)."""
    if norm is None or isinstance(norm, float):
        return norm
    from torch.distributed.tensor import DTensor

    return (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()


def _report_speed(step_seconds: list[float], samples_per_step: int, device) -> None:
    """Throughput of the steps after the first three (compilation, allocator warm-up); checkpoints and validation
    are not counted."""
    timed = step_seconds[3:] or step_seconds
    if not timed:
        return
    peak = memory.peak(device)
    used = "" if peak is None else f"; peak GPU memory while training {memory.gib(peak)} of " \
        f"{memory.gib(torch.cuda.get_device_properties(device).total_memory)}"
    logger.info("Throughput: %.3f samples/s, %.1f ms/step over %d steps%s",
                samples_per_step * len(timed) / sum(timed), 1000 * sum(timed) / len(timed), len(timed), used)


def _deepspeed(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _zero3(accelerator) -> bool:
    return _deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3


def _fsdp_broadcasts_weights(accelerator) -> bool:
    """FSDP's cpu_ram_efficient_loading (fsdp2_8gpu.yaml): accelerate sends the main process's weights to the others."""
    return accelerator.distributed_type == DistributedType.FSDP \
        and bool(accelerator.state.fsdp_plugin.cpu_ram_efficient_loading)


def _sharded(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP or _zero3(accelerator)


def _loggable(config: dict) -> dict:
    """TensorBoard's hparams take only scalars and strings."""
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in config.items()}


def _push(args, config: dict, preset, method, data, checkpoint: Path, validation) -> None:
    """Upload the final model/ with a model card and the final validation images ((path, prompt) pairs)."""
    pairs = list(validation)
    card_images = [(f"images/{path.name}", prompt) for path, prompt in pairs]
    card = hub.model_card(
        repo_id=args.hub_model_id, base_model=preset.hub_id if preset and preset.hub_id else args.model,
        method=method, instance_prompt=data.instance_prompt(), recipe=recipe_summary(config, method),
        images=card_images,
    )
    folder = hub.prepare_upload(checkpoint / ckpt.MODEL, Path(args.output_dir) / "hub_upload", card,
                                {f"images/{path.name}": path for path, _ in pairs})
    logger.info("Uploaded %s to https://huggingface.co/%s", folder, hub.push(folder, args.hub_model_id))


def recipe_summary(config: dict, method) -> dict:
    """The run's settings worth a line in the model card."""
    summary = {
        "base model": config["model"],
        "method": method.summary(config),
        "steps": config["max_iter"],
        "batch": f"{config['train_batch_size']} per GPU x {config['gradient_accumulation_steps']} accumulation x "
                 f"{config['world_size']} GPUs",
        "learning rate": f"{config['learning_rate'] * config['lr_start_factor']:.3g} peak, linear decay to 0",
        "optimizer": f"AdamW, betas ({config['adam_beta1']}, {config['adam_beta2']}), eps {config['adam_epsilon']}, "
                     f"weight decay {config['weight_decay']}, grad clip {config['max_grad_norm']}",
        "EMA": f"power EMA, sigma_rel {config['ema_sigma_rel']}" if config["ema"] else "off",
        "precision": f"{config['mixed_precision']} compute, fp32 master weights",
        "text dropout (CFG)": config["text_dropout"],
    }
    if config.get("class_prompt"):
        summary["prior preservation"] = (f"{config['num_class_images']} class images of \"{config['class_prompt']}\" "
                                         f"made by the base model, class loss weight {config['prior_loss_weight']}")
    return summary


def _run() -> None:
    args = parse_args()
    main(args)
    sys.exit(exit_code(getattr(args, "reached_iteration", 0), args.max_iter))  # 75: stopped early, a rerun resumes


if __name__ == "__main__":
    user_errors.run(_run)
