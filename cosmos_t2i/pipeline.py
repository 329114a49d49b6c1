"""Loading `Cosmos2TextToImagePipeline` for sampling, with NVIDIA's guardrail policy, and the transformer a
checkpoint holds (ours, full or EMA, or NVIDIA's .pt).

diffusers' pipeline builds `cosmos_guardrail.CosmosSafetyChecker` when given none and refuses to run with
`safety_checker=None`. NVIDIA's own text2image script runs the guardrail by default for its models and offers
`--disable_guardrail` and `--offload_guardrail`; we do the same. The `tiny` model is not NVIDIA's and runs without.
"""

from __future__ import annotations

import torch

from .checkpoint_paths import Checkpoint, NoEMAError
from .fp8 import quantize_transformer_blocks
from .lora import apply_loras, read_lora
from .models import Model, as_model, check_same_architecture, load_base_transformer
from .speed import single_frame_vae_convs
from .user_errors import BadValue, MissingPackage, unreadable_file


class NoGuardrail:
    """Stand-in safety checker that lets everything through.

    A plain object, not an nn.Module: the pipeline's `_execution_device` walks nn.Module components and one
    without parameters or `.device` breaks it.
    """

    def to(self, *args, **kwargs):
        return self

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, video):
        return video


class PinnedGuardrail:
    """Keeps the guardrail's models where we put them, whatever `.to()` the pipeline calls.

    The pipeline moves the checker to the GPU for each check and back to the CPU after; NVIDIA keeps it on the GPU
    unless `--offload_guardrail`, in which case it stays on the CPU.
    """

    def __init__(self, checker, device):
        self.checker = checker.to(device)

    def to(self, *args, **kwargs):
        return self

    def check_text_safety(self, prompt: str) -> bool:
        return self.checker.check_text_safety(prompt)

    def check_video_safety(self, video):
        return self.checker.check_video_safety(video)


def make_safety_checker(model: Model, device, disable_guardrail: bool = False, offload_guardrail: bool = False):
    if disable_guardrail or model.is_tiny:
        return NoGuardrail()
    try:
        from cosmos_guardrail import CosmosSafetyChecker
    except ImportError as error:
        raise MissingPackage(
            "NVIDIA's Cosmos models run with the Cosmos guardrail, and the `cosmos_guardrail` package is not "
            "installed. Either `pip install cosmos_guardrail` (it downloads Llama-Guard-3-8B and its video filters "
            "from the Hub on first use; add --offload_guardrail to keep them on the CPU), or pass "
            "--disable_guardrail if your use complies with the NVIDIA Open Model License without it."
        ) from error
    return PinnedGuardrail(CosmosSafetyChecker(), "cpu" if offload_guardrail else device)


def load_pipeline(
    model: Model | str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    transformer=None,
    disable_guardrail: bool = False,
    offload_guardrail: bool = False,
    load_text_encoder: bool = True,
    stock_vae: bool = False,
):
    """The stock diffusers pipeline for `--model` (2B, 14B, tiny, a folder or a hub id), on `device`.

    `transformer` replaces the model's own (a fine-tuned one); `load_text_encoder=False` skips T5 when the caller
    passes `prompt_embeds` itself (training's validation). Unless `stock_vae`, the VAE's causal 3D convolutions run
    as 2D ones on single frames (speed.single_frame_vae_convs: same sums, 1.4x faster decoding).
    """
    from diffusers import Cosmos2TextToImagePipeline

    from .hub_errors import explain_hub_errors

    model = as_model(model)
    components = {"safety_checker": make_safety_checker(model, device, disable_guardrail, offload_guardrail)}
    if transformer is not None:
        components["transformer"] = transformer
    if not load_text_encoder:
        components.update(text_encoder=None, tokenizer=None)
    with explain_hub_errors(model.path):
        pipe = Cosmos2TextToImagePipeline.from_pretrained(model.path, dtype=dtype, **components)
    if not stock_vae:
        single_frame_vae_convs(pipe.vae)
    return pipe.to(device)


def load_transformer(
    model: Model | str,
    checkpoint: Checkpoint | None,
    dtype: torch.dtype = torch.bfloat16,
    nvidia_lora_alpha: float | None = None,
    trust_checkpoint: bool = False,
):
    """The transformer `checkpoint` holds, after checking it is the size of `--model`.

    None when the model's own transformer is to be used: no checkpoint, or a LoRA (which goes on top of it).
    NVIDIA's .pt is built on the meta device and filled by assignment, so a 14B checkpoint is never held twice.
    """
    from diffusers import CosmosTransformer3DModel

    from . import nvidia_format

    if checkpoint is None or checkpoint.kind == "lora":
        return None
    model = as_model(model)
    if checkpoint.kind == "full":
        with unreadable_file(f"Checkpoint {checkpoint.source}"):
            config = CosmosTransformer3DModel.load_config(checkpoint.path)
            check_same_architecture(config, model, checkpoint.source)
            return CosmosTransformer3DModel.from_pretrained(checkpoint.path, dtype=dtype)

    try:
        net, ema = nvidia_format.split_net_ema(
            nvidia_format.load_nvidia_checkpoint(checkpoint.path, trust_checkpoint=trust_checkpoint)
        )
        if checkpoint.ema and not ema:
            raise NoEMAError(f"--load_ema: {checkpoint.source} has no EMA weights (no net_ema.* keys). Drop "
                             "--load_ema.")
        weights = nvidia_format.merge_peft_lora(ema if checkpoint.ema else net, alpha=nvidia_lora_alpha, dtype=dtype)
        check_same_architecture(nvidia_format.nvidia_dims(weights), model, checkpoint.source)
        state_dict = nvidia_format.nvidia_to_diffusers(weights)
    except BadValue as error:  # what is wrong with the file's contents: say which file
        if checkpoint.source in str(error) or str(checkpoint.path) in str(error):
            raise
        raise type(error)(f"{checkpoint.source}: {error}") from error
    with torch.device("meta"):
        transformer = CosmosTransformer3DModel.from_config(model.transformer_config)
    expected = {k: v.shape for k, v in transformer.state_dict().items()}
    missing = sorted(expected.keys() - state_dict.keys())
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(s)}" for k, s in expected.items()
             if k in state_dict and state_dict[k].shape != s]
    if missing or wrong:
        raise BadValue(f"{checkpoint.source} does not match the {model.name} transformer: "
                         f"{len(missing)} weights missing (e.g. {missing[:3]}), {len(wrong)} of another shape "
                         f"(e.g. {wrong[:3]}).")
    transformer.load_state_dict(state_dict, strict=True, assign=True)
    return transformer.to(dtype)


def fine_tuned_transformer(model: Model | str, checkpoint: Checkpoint | None, loras: list[Checkpoint],
                           scales: list[float], dtype: torch.dtype = torch.bfloat16, device="cpu", fuse: bool = False,
                           nvidia_lora_alpha: float | None = None, trust_checkpoint: bool = False):
    """`--model`'s transformer with `checkpoint`'s weights (--dit_path; the model's own without one), on `device`,
    with `loras` applied at `scales` (folded into the weights when `fuse`): what sampling and the merged export use."""
    model = as_model(model)
    transformer = load_transformer(model, checkpoint, dtype, nvidia_lora_alpha, trust_checkpoint)
    if transformer is None:
        transformer = load_base_transformer(model, dtype)
    transformer = transformer.to(device)
    if loras:
        apply_loras(transformer, [read_lora(c.path, c.source) for c in loras], scales, fuse=fuse)
    return transformer


def place_for_sampling(transformer, device, fp8: bool = False, offload: bool = False) -> None:
    """Move a transformer held in host memory to `device` for sampling, in place.

    `fp8`: the blocks' token-wise layers become fp8 ones (cosmos_t2i/fp8.py; fuse LoRAs first), block by block as
    they reach `device`, so the GPU never holds the bf16 weights beside the fp8 ones. `offload`: the weights stay in
    host memory and each block is copied to `device` just before it runs (diffusers' group offloading, one block
    per group), the next block's copy overlapped with this one's compute on a GPU: for cards smaller than the
    weights, at the copies' cost (BENCHMARKS.md). The hooks run on every call, so no CUDA graph or compilation.
    """
    from diffusers.hooks import apply_group_offloading

    if fp8:
        quantize_transformer_blocks(transformer, None if offload else device)
    if not offload:
        transformer.to(device)
        return
    on_gpu = torch.device(device).type == "cuda"
    apply_group_offloading(transformer, onload_device=torch.device(device), offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=1, use_stream=on_gpu,
                           non_blocking=on_gpu)
