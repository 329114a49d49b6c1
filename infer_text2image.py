"""Generate images with Cosmos-Predict2 Text2Image: the base model, a fine-tuned checkpoint, NVIDIA's .pt, LoRAs.

    python infer_text2image.py --model 2B --dit_path OUTPUT_DIR/checkpoints/iter_000001000 \\
        --prompt "An image of sks teal robot." --save_path out.jpg
    accelerate launch --num_processes 8 infer_text2image.py --model 14B --batch_input_json prompts.json

Sampling is diffusers' `Cosmos2TextToImagePipeline` with its inputs prepared the way NVIDIA's
`examples/text2image.py` does: an empty negative prompt is the zero embedding (NVIDIA's unconditional branch),
35 steps, guidance 4 in the x0 = c + g (c - u) form (which is the pipeline's `guidance_scale`), seed 0. On a GPU
the sampler runs the conditional and unconditional passes as one batch and compiles the transformer blocks for
prompt lists (cosmos_t2i/sampling.py, BENCHMARKS.md); `--no_batched_cfg --compile off --stock_vae` is the stock call
exactly. Each sampling step is replayed from a CUDA graph on a GPU (same kernels, same numbers). `--fp8` (opt-in)
trades a few percent of accuracy for 1.3x (2B) / 1.5x (14B) more speed.
`--sampler nvidia` samples as NVIDIA's script does instead (its second-order sampler and its noise for the seed),
for the image NVIDIA's repo gives. The initial noise is drawn on the CPU from the seed, so a seed gives the same
noise on any device.
Each image gets a sidecar JSON (same name, .json) with everything needed to make it again.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import torch

from cosmos_t2i.atomic import atomic_output, unwritable_reason
from cosmos_t2i.cuda_graphs import GraphedTransformer
from cosmos_t2i.checkpoint_paths import loras_to_apply, resolve_checkpoint, trained_from
from cosmos_t2i.local_paths import missing_path_message
from cosmos_t2i.user_errors import BadValue, MissingInput
from cosmos_t2i.lora import expand_scales
from cosmos_t2i.pipeline import NoGuardrail, fine_tuned_transformer, load_pipeline, place_for_sampling
from cosmos_t2i import cli, fp8, memory, speed
from cosmos_t2i.models import ASPECT_RATIOS, DTYPES, resolve_model
from cosmos_t2i.sampling import SAMPLERS, generate, uses_unconditional_pass
from cosmos_t2i.text_encoding import encode_prompts

DEFAULT_MODEL = "2B"  # NVIDIA's default --model_size
UNSAFE_TEXT = "Cosmos Guardrail detected unsafe text"  # the pipeline's ValueError for a prompt the guardrail refuses
COMPILE_AUTO_MIN_IMAGES = 4  # below this, compiling (~1 min) costs more than it saves (~4 s/image for 2B)


def parse_args(argv=None):
    parser = cli.parser(__doc__)
    model = parser.add_argument_group("model and checkpoint")
    model.add_argument("--model", default=None,
                       help="2B, 14B, tiny, a local pipeline folder or a hub id. Default: the model the --dit_path "
                            "(else the first --lora) run was trained from (its trainer/config.json), else "
                            f"{DEFAULT_MODEL}.")
    model.add_argument("--dit_path", default=None,
                       help="Fine-tuned weights: a training OUTPUT_DIR (latest checkpoint), an iter_N/ folder, its "
                            "model/ (full fine-tune or LoRA), or NVIDIA's iter_N.pt / model.pt.")
    model.add_argument("--load_ema", action="store_true",
                       help="Use the EMA weights of --dit_path and the EMA adapter (model/ema/) of every --lora.")
    model.add_argument("--trust_checkpoint", action="store_true",
                       help="Load an NVIDIA .pt that torch.load(weights_only=True) refuses with weights_only=False "
                            "(runs code stored in the file: only for files you trust).")
    model.add_argument("--nvidia_lora_alpha", type=float, default=None,
                       help="alpha of the PEFT LoRA inside an NVIDIA .pt (not stored in the file). Default: the "
                            "rank, as in all of NVIDIA's LoRA configs (scale alpha/r = 1).")
    model.add_argument("--lora", nargs="+", default=[],
                       help="One or more LoRAs: an iter_N/ folder, its model/, a .safetensors file, or a hub id.")
    model.add_argument("--lora_scale", nargs="+", type=float, default=None,
                       help="One scale per LoRA, or one for all (default 1). A LoRA given as --dit_path comes first.")
    model.add_argument("--fuse_lora", action="store_true",
                       help="Fold the LoRAs into the weights before sampling (faster; same result up to rounding).")
    model.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    model.add_argument("--disable_guardrail", action="store_true",
                       help="Do not run NVIDIA's Cosmos guardrail (only where the NVIDIA Open Model License allows).")
    model.add_argument("--offload_guardrail", action="store_true", help="Keep the guardrail models on the CPU.")

    fast = parser.add_argument_group("speed (same math; BENCHMARKS.md)")
    fast.add_argument("--no_batched_cfg", action="store_true",
                      help="Run the unconditional pass as a second call, as the stock pipeline does (default on a "
                           "GPU: one batched call, 1.3x faster for 2B; on a CPU the stock way).")
    fast.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                      help="torch.compile the transformer blocks: with batched CFG, 2.3x (2B) / 1.45x (14B) faster "
                           "than the stock pipeline after a one-off compilation of about a minute, so 'auto' "
                           "compiles on a GPU for more than "
                           f"{COMPILE_AUTO_MIN_IMAGES - 1} images per process.")
    fast.add_argument("--no_cuda_graph", action="store_true",
                      help="Launch each sampling step's kernels from Python (default on a GPU: replay them from a "
                           "CUDA graph recorded on the first step: same numbers, and the GPU waits less on the CPU).")
    fast.add_argument("--stock_vae", action="store_true",
                      help="Decode with the VAE's 3D convolutions as diffusers does (default: the same sums as 2D "
                           "convolutions on the one frame of an image, 1.4x faster decoding).")
    fast.add_argument("--fp8", action="store_true",
                      help="Opt-in, changes the numbers: run the transformer blocks' matmuls in fp8 (e4m3, one scale "
                           "per token and per output channel; cosmos_t2i/fp8.py). Measured compiled (--compile on, or "
                           "a prompt list) on an H100: 2B "
                           "1.96 s and 14B 9.6 s per image instead of 2.48 s and 14.0 s, latents within about 4%% of "
                           "bf16 (BENCHMARKS.md). Needs a GPU with fp8 tensor cores (compute capability 8.9+); LoRAs "
                           "are fused first (--fuse_lora implied).")

    low = parser.add_argument_group("memory (BENCHMARKS.md: what fits on which GPU)")
    low.add_argument("--text_encoder_device", default=None,
                     help="Where T5-XXL (9 GiB in bf16) encodes every prompt before the transformer reaches the "
                          "GPU; it is freed after. Default: the sampling device; 'cpu' keeps it off the GPU "
                          "altogether (slower; its rounding differs from the GPU's).")
    low.add_argument("--offload", action="store_true",
                     help="Keep the transformer's weights in host memory and stream them to the GPU block by block, "
                          "copies overlapped with compute (for 12-16 GB cards; slower: BENCHMARKS.md). Turns off "
                          "compilation and the CUDA graph.")

    gen = parser.add_argument_group("generation")
    gen.add_argument("--prompt", default=None)
    gen.add_argument("--negative_prompt", default="",
                     help="Empty (default): the zero embedding, as NVIDIA's sampler uses. Otherwise T5-encoded.")
    gen.add_argument("--batch_input_json", default=None,
                     help="A JSON list (NVIDIA's format) or JSONL of {\"prompt\", \"output_image\"}; an item may also "
                          "set seed, negative_prompt, aspect_ratio. Several processes split the list.")
    gen.add_argument("--save_path", default="output/generated_image.jpg",
                     help="Image path for --prompt; the extension picks the format.")
    gen.add_argument("--seed", type=cli.seed, default=0)
    gen.add_argument("--aspect_ratio", default="16:9", choices=list(ASPECT_RATIOS),
                     help="NVIDIA's sizes: 16:9 1360x768, 1:1 1024x1024, 4:3 1168x880, 3:4, 9:16 (the tiny model "
                          "has its own small ones).")
    gen.add_argument("--height", type=int, default=None, help="With --width: any size in multiples of 16.")
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--sampler", default="diffusers", choices=SAMPLERS,
                     help="diffusers (default): Cosmos2TextToImagePipeline's Euler sampler, the image diffusers gives "
                          "for the seed. nvidia: NVIDIA's own examples/text2image.py sampler (second-order multistep, "
                          "its numpy noise for the seed, one more transformer call), for the image NVIDIA's repo "
                          "gives.")
    gen.add_argument("--num_steps", type=int, default=35)
    gen.add_argument("--guidance", type=float, default=4.0,
                     help="x0 = c + g (c - u); 0 turns guidance off.")
    args = parser.parse_args(argv)

    if (args.prompt is None) == (args.batch_input_json is None):
        parser.error("give exactly one of --prompt and --batch_input_json")
    if (args.height is None) != (args.width is None):
        parser.error("give both --height and --width, or neither")
    if args.text_encoder_device is not None:
        try:
            device = torch.device(args.text_encoder_device)
        except RuntimeError:
            parser.error(f"--text_encoder_device {args.text_encoder_device!r} is not a device: use cpu or cuda")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error("--text_encoder_device cuda: no CUDA GPU here; use cpu")
    if args.offload and args.compile == "on":
        parser.error("--offload streams weights with hooks that run on every call: use --compile off or auto")
    if args.guidance and not uses_unconditional_pass(args.guidance, args.sampler):
        # The pipeline skips the unconditional pass for guidance_scale <= 1, where NVIDIA's c + g(c - u) still uses it.
        parser.error("--guidance in (0, 1] is not NVIDIA's guidance in diffusers' pipeline; use 0 (off), > 1, or "
                     "--sampler nvidia")
    return args


@dataclasses.dataclass
class Request:
    prompt: str
    output: Path
    seed: int
    negative_prompt: str
    width: int
    height: int
    aspect_ratio: str | None  # None when --height/--width set the size


def read_requests(args, resolutions: dict) -> list[Request]:
    """The prompts to run, every one checked before anything is generated."""
    if args.batch_input_json is None:
        if not args.prompt.strip():
            raise BadValue("--prompt is empty.")
        items, where = [{"prompt": args.prompt, "output_image": args.save_path}], "--prompt"
    else:
        where = args.batch_input_json
        if not Path(where).is_file():
            raise MissingInput(missing_path_message("--batch_input_json", where))
        text = Path(where).read_text()
        try:
            items = json.loads(text)
        except json.JSONDecodeError:  # JSONL: one object a line
            items = []
            for number, line in enumerate(text.splitlines(), start=1):
                try:
                    items += [json.loads(line)] if line.strip() else []
                except json.JSONDecodeError as error:
                    raise BadValue(f"{where} line {number} is not JSON ({error}).") from error
        if not isinstance(items, list) or not items:
            raise BadValue(f"{where} holds no prompts: expected a non-empty list of {{'prompt', 'output_image'}}.")

    requests, errors = [], []
    for index, item in enumerate(items):
        prompt = item.get("prompt") if isinstance(item, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            errors.append(f"item {index}: no prompt")
            continue
        aspect_ratio = item.get("aspect_ratio", args.aspect_ratio if args.height is None else None)
        if aspect_ratio is not None and aspect_ratio not in resolutions:
            errors.append(f"item {index}: unknown aspect_ratio {aspect_ratio!r} (choose {', '.join(resolutions)})")
            continue
        width, height = resolutions[aspect_ratio] if aspect_ratio else (args.width, args.height)
        if width <= 0 or height <= 0 or width % 16 or height % 16:
            errors.append(f"item {index}: {width}x{height} is not a positive multiple of 16 (8x VAE, 2x2 patches)")
            continue
        output = Path(item.get("output_image", f"output_{index}.jpg"))
        if _image_format(output) is None:
            errors.append(f"item {index}: {output} has no image extension PIL can write (.jpg, .png, .webp, ...)")
            continue
        try:
            seed = cli.check_seed(item.get("seed", args.seed), f"item {index}")
        except BadValue as error:
            errors.append(str(error).rstrip("."))
            continue
        # Checked now, for every item: a folder it cannot write would otherwise stop the run after the images
        # before it were sampled (the sidecar goes beside the image, so one check covers both).
        unwritable = unwritable_reason(output)
        if unwritable:
            errors.append(f"item {index}: cannot write {output}: {unwritable}")
            continue
        requests.append(Request(prompt, output, seed, item.get("negative_prompt", args.negative_prompt), width,
                                height, aspect_ratio))
    # Sidecars too: a.png and a.jpg would share a.json.
    outputs = [r.output.resolve().with_suffix("") for r in requests]
    shared = sorted({p for p in outputs if outputs.count(p) > 1})
    errors += [f"{path}.* is the output of several items" for path in shared]
    if errors:
        raise BadValue(f"{where}: " + "; ".join(errors))
    return requests


def _image_format(path: Path) -> str | None:
    from PIL import Image

    return Image.registered_extensions().get(path.suffix.lower())


def save_image(image, path: Path) -> None:
    fmt = _image_format(path)
    # PIL's default JPEG/WebP quality (75) visibly softens the fine detail a fine-tune is judged on.
    options = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    with atomic_output(path) as tmp:
        image.save(tmp, format=fmt, **options)


def reproduce_command(args, model: str, request: Request, scales: list[float], compiled: bool) -> str:
    """The command line that makes this one image again (compilation changes bf16 rounding, so it is pinned)."""
    cmd = ["python", "infer_text2image.py", "--model", model, "--prompt", request.prompt,
           "--negative_prompt", request.negative_prompt, "--seed", str(request.seed),
           "--save_path", str(request.output),
           "--num_steps", str(args.num_steps), "--guidance", str(args.guidance), "--sampler", args.sampler,
           "--dtype", args.dtype]
    cmd += ["--aspect_ratio", request.aspect_ratio] if request.aspect_ratio else \
        ["--height", str(request.height), "--width", str(request.width)]
    if args.dit_path:
        cmd += ["--dit_path", args.dit_path]
    if args.load_ema:  # of --dit_path and of every --lora
        cmd.append("--load_ema")
    if args.nvidia_lora_alpha is not None:
        cmd += ["--nvidia_lora_alpha", str(args.nvidia_lora_alpha)]
    if args.lora:
        cmd += ["--lora", *args.lora]
    if scales:
        cmd += ["--lora_scale", *map(str, scales)]
    for flag in ("trust_checkpoint", "fuse_lora", "disable_guardrail", "no_batched_cfg", "stock_vae", "fp8"):
        if getattr(args, flag):
            cmd.append(f"--{flag}")
    if args.text_encoder_device == "cpu":  # the CPU's T5 rounds differently
        cmd += ["--text_encoder_device", "cpu"]
    cmd += ["--compile", "on" if compiled else "off"]
    return shlex.join(cmd)


def main(args):
    """Sample; a CUDA out-of-memory error ends with the flags that lower memory (cosmos_t2i/memory.py)."""
    with memory.explain_out_of_memory(None, memory.sampling_advice(args), "sampling"):
        _sample(args)


def _sample(args):
    import diffusers
    from accelerate import PartialState
    from tqdm.auto import tqdm

    dit = resolve_checkpoint(args.dit_path, args.load_ema) if args.dit_path else None
    loras = loras_to_apply(dit, args.lora, args.load_ema)
    model = resolve_model(args.model or trained_from([dit, *loras]) or DEFAULT_MODEL)
    requests = read_requests(args, model.resolutions)
    scales = expand_scales(args.lora_scale, len(loras))

    state = PartialState()
    dtype = DTYPES[args.dtype]
    if args.fp8:  # before any model is loaded
        fp8.require_fp8_matmuls(state.device, dtype)
    with state.split_between_processes(requests) as mine:
        mine = list(mine)
    fuse_lora = args.fuse_lora or args.fp8  # an unfused adapter layer would stay out of fp8
    # Loaded (and checked against --model) in host memory, then T5 encodes the prompts and is freed, and only then
    # does the transformer reach the GPU: the GPU holds one of the two, never both.
    transformer = fine_tuned_transformer(model, dit, loras, scales, dtype, "cpu", fuse_lora, args.nvidia_lora_alpha,
                                         args.trust_checkpoint)
    texts = sorted({r.prompt for r in mine} | {r.negative_prompt for r in mine if r.negative_prompt})
    embeddings = dict(zip(texts, encode_prompts(model, texts, args.text_encoder_device or state.device, dtype))) \
        if texts else {}
    place_for_sampling(transformer, state.device, fp8=args.fp8, offload=args.offload)
    pipe = load_pipeline(model, state.device, dtype, transformer=transformer, disable_guardrail=args.disable_guardrail,
                         offload_guardrail=args.offload_guardrail, load_text_encoder=False, stock_vae=args.stock_vae)
    # The per-step bar is useful for one image; for a list, one bar over the images says more.
    pipe.set_progress_bar_config(disable=len(requests) > 1)
    on_gpu = state.device.type == "cuda"
    batched_cfg = on_gpu and not args.no_batched_cfg
    compiled = not args.offload and (args.compile == "on" or (
        args.compile == "auto" and on_gpu and len(mine) >= COMPILE_AUTO_MIN_IMAGES))
    if args.fp8:
        fp8.deduplicate_compiled_computations()
    if compiled:
        speed.compile_transformer_blocks(pipe.transformer, multi_kernel=True)
    cuda_graph = on_gpu and not args.no_cuda_graph and not args.offload
    denoiser = GraphedTransformer(pipe.transformer) if cuda_graph else None

    record = {
        "model": model.name,
        "checkpoint": dit.describe() if dit else None,
        "nvidia_lora_alpha": args.nvidia_lora_alpha if dit and dit.kind == "nvidia" else None,
        "loras": [dict(c.describe(), scale=s) for c, s in zip(loras, scales)],
        "fuse_lora": fuse_lora,
        "fp8": args.fp8,
        "stock_vae": args.stock_vae,
        "sampler": args.sampler,
        "num_steps": args.num_steps,
        "guidance": args.guidance,
        "dtype": args.dtype,
        "batched_cfg": batched_cfg,
        "compiled": compiled,
        "cuda_graph": cuda_graph,
        "offload": args.offload,
        "text_encoder_device": str(args.text_encoder_device or state.device),
        "guardrail": not isinstance(pipe.safety_checker, NoGuardrail),
        "versions": {"diffusers": diffusers.__version__, "torch": torch.__version__},
    }
    bar = tqdm(mine, desc=f"images (process {state.process_index + 1}/{state.num_processes})",
               disable=len(requests) == 1, position=state.process_index)
    for request in bar:
        negative = embeddings[request.negative_prompt][None] if request.negative_prompt else None
        try:
            image = generate(pipe, request.prompt, request.negative_prompt, request.height, request.width,
                             args.num_steps, args.guidance, request.seed, batched_cfg, denoiser, args.sampler,
                             prompt_embeds=embeddings[request.prompt][None], negative_prompt_embeds=negative)
        except ValueError as error:
            if not str(error).startswith(UNSAFE_TEXT):
                raise
            if len(requests) == 1:  # the user's prompt, not a bug: one line
                raise BadValue(f"{request.output} not written: {error}") from error
            bar.write(f"skipped {request.output}: the guardrail refused its prompt")  # as NVIDIA's script does
            continue
        save_image(image, request.output)
        sidecar = dict(prompt=request.prompt, negative_prompt=request.negative_prompt, seed=request.seed,
                       width=request.width, height=request.height, aspect_ratio=request.aspect_ratio, **record,
                       command=reproduce_command(args, model.name, request, scales, compiled))
        with atomic_output(request.output.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(sidecar, indent=2) + "\n")
        bar.write(f"wrote {request.output}")
    peak = memory.peak(state.device)
    if peak is not None:
        print(f"peak GPU memory {memory.gib(peak)} (text encoding included), process {state.process_index}")
    state.wait_for_everyone()


if __name__ == "__main__":
    cli.main_entry(parse_args, main)
