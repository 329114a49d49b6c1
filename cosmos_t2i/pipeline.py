"""Loading `Cosmos2TextToImagePipeline` for sampling, with NVIDIA's guardrail policy.

diffusers' pipeline builds `cosmos_guardrail.CosmosSafetyChecker` when given none and refuses to run with
`safety_checker=None`. NVIDIA's own text2image script runs the guardrail by default for its models and offers
`--disable_guardrail` and `--offload_guardrail`; we do the same. The `tiny` model is not NVIDIA's and runs without.
"""

from __future__ import annotations

import torch

from .presets import preset_for, resolve_model_path


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


def make_safety_checker(model: str, device, disable_guardrail: bool = False, offload_guardrail: bool = False):
    preset = preset_for(model)
    if disable_guardrail or (preset is not None and preset.name == "tiny"):
        return NoGuardrail()
    try:
        from cosmos_guardrail import CosmosSafetyChecker
    except ImportError as error:
        raise ImportError(
            "NVIDIA's Cosmos models run with the Cosmos guardrail, and the `cosmos_guardrail` package is not "
            "installed. Either `pip install cosmos_guardrail` (it downloads Llama-Guard-3-8B and its video filters "
            "from the Hub on first use; add --offload_guardrail to keep them on the CPU), or pass "
            "--disable_guardrail if your use complies with the NVIDIA Open Model License without it."
        ) from error
    return PinnedGuardrail(CosmosSafetyChecker(), "cpu" if offload_guardrail else device)


def load_pipeline(
    model: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    transformer=None,
    disable_guardrail: bool = False,
    offload_guardrail: bool = False,
    load_text_encoder: bool = True,
):
    """The stock diffusers pipeline for `--model` (2B, 14B, tiny, a folder or a hub id), on `device`.

    `transformer` replaces the model's own (a fine-tuned one); `load_text_encoder=False` skips T5 when the caller
    passes `prompt_embeds` itself (training's validation).
    """
    from diffusers import Cosmos2TextToImagePipeline

    from .hub_errors import explain_hub_errors

    path = resolve_model_path(model)
    components = {"safety_checker": make_safety_checker(model, device, disable_guardrail, offload_guardrail)}
    if transformer is not None:
        components["transformer"] = transformer
    if not load_text_encoder:
        components.update(text_encoder=None, tokenizer=None)
    with explain_hub_errors(path):
        pipe = Cosmos2TextToImagePipeline.from_pretrained(path, dtype=dtype, **components)
    return pipe.to(device)
