"""Which checkpoint to keep: subject fidelity, prompt fidelity and prior drift of fine-tunes, in numbers and pictures.

    python evaluate_text2image.py --run_dir checkpoints/posttraining/text2image/2b_lora_robot \\
        --subject "sks teal robot" --output_dir eval/robot
    accelerate launch --num_processes 8 evaluate_text2image.py --run_dir RUN --subject "sks teal robot" ...

Every candidate (the base model; each checkpoint of --run_dir, with and without EMA; each --dit_path; each --lora at
each --lora_scale) samples the same prompts with the same seeds, with the kit's sampler (cosmos_t2i/sampling.py:
batched CFG, compiled blocks and CUDA graphs on a GPU). Then, as DreamBooth (Ruiz et al. 2022) measures them:
DINO (ViT-S/16 CLS cosine to the real subject images) and CLIP-I for subject fidelity, CLIP-T (CLIP text-image
cosine) for prompt fidelity; and prior drift: on prompts without the subject, 1 - the similarity of each image to
the base model's image of the same prompt and seed (cosmos_t2i/fidelity.py).

Writes to --output_dir: metrics.md / metrics.csv / metrics.json, contact_sheets/<candidate>.png (prompts x seeds),
plots/<metric>.png (against the iteration), images/<candidate>/; prints the candidate with the best DINO among
those within --max_drift.
"""

from __future__ import annotations

import time
from pathlib import Path

from cosmos_t2i import cli
from cosmos_t2i import evaluation as ev
from cosmos_t2i.checkpoint_paths import NoEMAError
from cosmos_t2i.fidelity import CLIP_MODEL, DINO_MODEL, TINY, MetricModels, default_metric_models
from cosmos_t2i.models import ASPECT_RATIOS, DTYPES, resolve_model
from cosmos_t2i.sampling import SAMPLERS, uses_unconditional_pass

DEFAULT_MAX_DRIFT = 0.3


def parse_args(argv=None):
    parser = cli.parser(__doc__)
    what = parser.add_argument_group("what to compare (the base model is always one of them)")
    what.add_argument("--run_dir", nargs="+", default=[],
                      help="train_text2image.py --output_dir(s): every checkpoint under checkpoints/iter_*.")
    what.add_argument("--dit_path", nargs="+", default=[],
                      help="Fine-tuned weights, each a candidate: an iter_N/ folder, its model/, or NVIDIA's .pt.")
    what.add_argument("--lora", nargs="+", default=[],
                      help="LoRAs, each a candidate: an iter_N/ folder, its model/, a .safetensors file or a hub id.")
    what.add_argument("--lora_scale", nargs="+", type=float, default=[1.0],
                      help="Each LoRA is evaluated at each of these scales (default 1).")
    what.add_argument("--ema", default="both", choices=["both", "no", "only"],
                      help="Checkpoints with their trained weights, their EMA weights (where saved), or both.")
    what.add_argument("--model", default=None,
                      help="2B, 14B, tiny, a pipeline folder or hub id. Default: the model the runs were trained "
                           "from (trainer/config.json).")
    what.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="Sampling dtype of the Cosmos pipeline.")
    what.add_argument("--disable_guardrail", action="store_true",
                      help="Do not run NVIDIA's Cosmos guardrail (only where the NVIDIA Open Model License allows).")
    what.add_argument("--offload_guardrail", action="store_true", help="Keep the guardrail models on the CPU.")

    data = parser.add_argument_group("subject and prompts")
    data.add_argument("--reference_dir", default=None,
                      help="The subject's real images: an imagefolder or a folder of images. Default: the run's "
                           "training dataset (its --dataset_dir).")
    data.add_argument("--num_reference_images", type=int, default=64,
                      help="At most this many reference images, spread evenly over the set (0: all).")
    data.add_argument("--subject", default=None,
                      help="The subject phrase the prompts are built around, e.g. 'sks teal robot'.")
    data.add_argument("--prompts_file", default=None,
                      help="One prompt a line; lines with {subject} measure the subject, the others prior drift. "
                           f"Default: DreamBooth's {len(ev.SUBJECT_TEMPLATES)} object prompts with --subject, and "
                           f"{len(ev.PRIOR_PROMPTS)} scenes without it.")
    data.add_argument("--num_images_per_prompt", type=int, default=4,
                      help="Images per prompt, with seeds --seed, --seed + 1, ...: the same for every candidate.")
    data.add_argument("--seed", type=cli.seed, default=0, help="The first seed.")

    gen = parser.add_argument_group("sampling")
    gen.add_argument("--aspect_ratio", default="1:1", choices=list(ASPECT_RATIOS),
                     help="1:1 by default: the metric models look at a square (CLIP center-crops, ViT resizes).")
    gen.add_argument("--sampler", default="diffusers", choices=SAMPLERS,
                     help="diffusers' Euler sampler or NVIDIA's own (infer_text2image.py --help).")
    gen.add_argument("--num_steps", type=int, default=35, help="Sampling steps (NVIDIA's default).")
    gen.add_argument("--guidance", type=float, default=4.0, help="x0 = c + g (c - u); 0 turns guidance off.")
    gen.add_argument("--no_batched_cfg", action="store_true", help="Run the unconditional pass as a second call.")
    gen.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                     help="torch.compile the transformer blocks (auto: on a GPU).")
    gen.add_argument("--no_cuda_graph", action="store_true", help="No CUDA graph replay of the sampling steps.")

    metrics = parser.add_argument_group("metrics")
    metrics.add_argument("--dino_model", default=None,
                         help=f"ViT for DINO (default {DINO_MODEL}; {TINY!r}: a tiny random one, with --model tiny).")
    metrics.add_argument("--clip_model", default=None,
                         help=f"CLIP for CLIP-I and CLIP-T (default {CLIP_MODEL}; {TINY!r} with --model tiny).")
    metrics.add_argument("--drift_metric", default="dino", choices=["dino", "clip_i"],
                         help="The image similarity prior drift is measured with.")
    metrics.add_argument("--max_drift", type=float, default=DEFAULT_MAX_DRIFT,
                         help="The pick is the best DINO among candidates whose drift is at most this (a judgment "
                              "call, not a measured threshold: 0.3 allows images about 70%% similar to the base "
                              "model's).")
    out = parser.add_argument_group("output")
    out.add_argument("--output_dir", default="evaluation", help="Where the table, sheets, plots and images go.")
    out.add_argument("--thumbnail_size", type=int, default=256, help="Pixels per image in the contact sheets.")
    args = parser.parse_args(argv)

    if args.num_images_per_prompt < 1:
        parser.error("--num_images_per_prompt must be at least 1")
    if args.guidance and not uses_unconditional_pass(args.guidance, args.sampler):
        parser.error("--guidance in (0, 1] is not NVIDIA's guidance in diffusers' pipeline; use 0 (off), > 1, or "
                     "--sampler nvidia")
    try:
        args.candidates = ev.collect_candidates(args.run_dir, args.dit_path, args.lora, args.lora_scale, args.ema)
    except (FileNotFoundError, NoEMAError, ValueError) as error:
        parser.error(str(error))
    run_config = ev.run_config_of(args.candidates)
    args.model = args.model or run_config.get("model")
    if args.model is None:
        parser.error("--model is needed: no candidate comes from a run that names its model (e.g. --model 2B)")
    args.dino_model, args.clip_model = default_metric_models(args.model, args.dino_model, args.clip_model)
    args.reference_dir = args.reference_dir or run_config.get("dataset_dir")
    if args.reference_dir is None:
        parser.error("--reference_dir is needed: no candidate comes from a run whose dataset could be used")
    try:
        args.prompts = ev.read_prompts(args.prompts_file, args.subject) if args.prompts_file else None
        args.references = ev.load_reference_images(args.reference_dir, args.num_reference_images or None)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    if args.prompts is None:
        if not args.subject:
            parser.error("--subject is needed for the built-in prompts (e.g. --subject 'sks teal robot'), or give "
                         "--prompts_file")
        args.prompts = ev.subject_prompts(args.subject) + ev.prior_prompts()
    return args


def main(args):
    import torch
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from cosmos_t2i.evaluation_report import pick, write_contact_sheet, write_report
    from cosmos_t2i.pipeline import load_pipeline

    state = PartialState()
    output_dir = Path(args.output_dir)
    model = resolve_model(args.model)
    width, height = model.resolutions[args.aspect_ratio]
    seeds = [args.seed + k for k in range(args.num_images_per_prompt)]
    jobs = ev.jobs_for(args.prompts, seeds)
    on_gpu = state.device.type == "cuda"
    settings = ev.SamplingSettings(model, width, height, args.num_steps, args.guidance, args.sampler, args.dtype,
                                   batched_cfg=on_gpu and not args.no_batched_cfg,
                                   compiled=args.compile == "on" or (args.compile == "auto" and on_gpu),
                                   cuda_graph=on_gpu and not args.no_cuda_graph)

    pipe = load_pipeline(model, state.device, DTYPES[args.dtype], disable_guardrail=args.disable_guardrail,
                         offload_guardrail=args.offload_guardrail)
    pipe.set_progress_bar_config(disable=True)
    base_transformer = pipe.transformer
    seconds = {}
    with state.split_between_processes(jobs) as mine:
        progress = tqdm(total=len(mine) * len(args.candidates), position=state.process_index,
                        desc=f"images (process {state.process_index + 1}/{state.num_processes})")
        for candidate in args.candidates:
            progress.set_postfix(candidate=candidate.name)
            start = time.perf_counter()
            ev.generate_candidate(pipe, base_transformer, candidate, args.prompts, mine,
                                  output_dir / "images" / candidate.name, settings, progress)
            seconds[candidate.name] = (time.perf_counter() - start) / max(len(mine), 1)
        progress.close()
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    del pipe, base_transformer
    if on_gpu:
        torch.cuda.empty_cache()

    models = MetricModels.load(args.dino_model, args.clip_model, state.device)
    reference = models.embed(args.references)
    rows, base_prior, sheets = [], None, []
    for candidate in tqdm(args.candidates, desc="metrics"):
        folder = output_dir / "images" / candidate.name
        images = ev.read_images(folder, args.prompts, jobs)
        scores, prior = ev.score_candidate(models, images, args.prompts, jobs, reference, base_prior,
                                           args.drift_metric)
        base_prior = prior if candidate.is_base else base_prior
        rows.append(dict(candidate=candidate.name, iteration=candidate.iteration, ema=candidate.ema,
                         lora_scale=candidate.lora_scale, **scores, seconds_per_image=seconds[candidate.name],
                         is_base=candidate.is_base, details=candidate.describe()))
        sheets.append(write_contact_sheet(output_dir / "contact_sheets" / f"{candidate.name}.png", folder, jobs,
                                          args.prompts, seeds, args.thumbnail_size))

    settings_record = dict(vars(settings), model=model.name, dino_model=args.dino_model, clip_model=args.clip_model,
                           drift_metric=args.drift_metric, reference_dir=str(args.reference_dir),
                           num_reference_images=len(args.references), seeds=seeds,
                           prompts=[{"text": p.text, "subject": p.subject} for p in args.prompts],
                           processes=state.num_processes)
    written = write_report(output_dir, rows, settings_record, args.max_drift)
    print(f"\nWrote to {output_dir}/:")
    print(f"  tables: {', '.join(p.name for p in written['table'])}")
    print(f"  contact sheets: {len(sheets)} in contact_sheets/")
    print(f"  plots: {', '.join(p.name for p in written['plots'])} in plots/" if "plots" in written
          else "  plots: none (no candidate has an iteration)")
    print(f"  images: {len(jobs)} per candidate in images/<candidate>/")
    chosen = pick(rows, args.max_drift)
    if chosen is None:
        print(f"\nNo candidate is within --max_drift {args.max_drift}.")
    else:
        drift = "n/a (no prior prompts)" if chosen["drift"] is None else f"{chosen['drift']:.4f}"
        print(f"\nBest subject fidelity within drift {args.max_drift}: {chosen['candidate']} (DINO "
              f"{chosen['dino']:.4f}, CLIP-I {chosen['clip_i']:.4f}, CLIP-T {chosen['clip_t']:.4f}, drift {drift})")
    return rows


if __name__ == "__main__":
    cli.main_entry(parse_args, main)
