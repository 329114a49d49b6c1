"""The two ways to post-train: a full fine-tune and LoRA. Everything that differs between them lives here, chosen
once in the trainer's main (`training_method(args)`): how the transformer is built and resumed, how its weights and
EMA are saved and read back, the default learning rate, and the model card's section.

Precision: trained parameters are fp32 master weights (autocast does the bf16 compute). With LoRA the frozen base
is stored in the compute dtype: it is never updated, and 14B in fp32 would not leave room to train on one GPU.

What a checkpoint's model/ holds (the rest of the layout is checkpoint.py's):
- full fine-tune: a diffusers transformer folder (`CosmosTransformer3DModel.from_pretrained(model/)`), written from
  a state dict because under FSDP the live module holds shards and only the gathered state dict is whole;
- LoRA: `pytorch_lora_weights.safetensors` in diffusers' format (lora.py);
- either: the EMA in the same format in model/ema/.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import CosmosTransformer3DModel
from huggingface_hub import save_torch_state_dict
from safetensors import safe_open

from .checkpoint import EMA, MODEL
from .ema import PowerEMA
from .fp8_base import store_blocks_in_fp8
from .offload import offload_frozen_blocks
from .lora import lora_config, lora_layers, lora_metadata, read_lora, write_lora_layers
from .models import Preset, dtype_named, load_base_transformer, random_transformer

TRANSFORMER_WEIGHTS = "diffusion_pytorch_model{suffix}.safetensors"


class _Method:
    """What both methods share: saving and reading back model/ and its EMA, through the method's `write`/`read`."""

    name: str  # as in the default output folder and the card's tags
    label: str  # for people
    frozen_base: bool  # whether the weights that read the inputs are frozen ones, stored in the compute dtype

    def snapshot_weights(self, accelerator, transformer, ema: PowerEMA | None, copier):
        """Capture model/ (and model/ema/) now; every process calls this. On the main process, returns the function
        that writes them into a directory, from `copier`'s host copies (a background save runs it in a thread
        while training goes on: it reads nothing live)."""
        state_dict = accelerator.get_state_dict(transformer)  # gathered to the main process under FSDP / ZeRO-3
        ema_state = ema.full_state_dict(keep=accelerator.is_main_process) if ema is not None else None
        if not accelerator.is_main_process:
            return None
        if ema is not None:
            copier.also_live(ema.shadow.values())  # unsharded, ema_state holds the live tensors: copy them
        unwrapped = accelerator.unwrap_model(transformer)
        model_part = copier(self.to_write(unwrapped, state_dict), MODEL)
        ema_part = copier(self.to_write(unwrapped, {**state_dict, **ema_state}), f"{MODEL}/{EMA}") \
            if ema_state is not None else None
        context = self.write_context(unwrapped)

        def write(directory: Path) -> None:
            self.write(directory, context, model_part)
            if ema_part is not None:
                self.write(directory / EMA, context, ema_part)

        return write

    def load_ema(self, ema: PowerEMA, checkpoint: Path) -> None:
        ema.load_full_state_dict(self.read(checkpoint / MODEL / EMA))


class FullFineTune(_Method):
    name, label, frozen_base = "full", "full fine-tune", False

    def default_learning_rate(self, preset: Preset) -> float:
        return preset.learning_rate

    def default_lr_start_factor(self, preset: Preset) -> float:
        return preset.lr_start_factor

    def build(self, model, config: dict, *, random_init: bool, device, checkpoint: Path | None = None,
              weights_arrive_later: bool = False):
        """The fp32 transformer to train, with resumed weights when `checkpoint` is given. Randomly initialised
        models are built directly on `device` (2B/14B take minutes to initialise on a CPU).

        `weights_arrive_later`: build the structure only, in CPU memory that is allocated but never touched,
        because FSDP's cpu_ram_efficient_loading will send the main process's weights; 8 processes would otherwise
        each hold the whole fp32 model in host memory (14B: 8 x 56 GB). Not on `meta`: accelerate maps the
        optimizer's parameters to the sharded ones by their data pointers, which are all 0 there.
        """
        if weights_arrive_later:
            with init_empty_weights():
                transformer = CosmosTransformer3DModel.from_config(config)
            return transformer.to_empty(device="cpu")
        if checkpoint is not None:
            return CosmosTransformer3DModel.from_pretrained(checkpoint / MODEL, dtype=torch.float32)
        if random_init:
            return random_transformer(config, torch.float32, device)
        return load_base_transformer(model, torch.float32)

    def to_write(self, transformer, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state_dict

    def write_context(self, transformer):
        return transformer

    def write(self, directory: Path, transformer, state_dict: dict[str, torch.Tensor]) -> None:
        """`transformer`'s config and `state_dict` as a folder CosmosTransformer3DModel.from_pretrained loads."""
        transformer.save_config(directory)
        save_torch_state_dict(state_dict, directory, filename_pattern=TRANSFORMER_WEIGHTS, max_shard_size="10GB")

    def read(self, directory: Path) -> TransformerWeights:
        return read_transformer_weights(directory)

    def summary(self, config: dict) -> str:
        return "full fine-tune"

    def card_usage(self, repo_id: str, base_model: str, prompt: str) -> str:
        return f"""```python
import torch
from diffusers import Cosmos2TextToImagePipeline, CosmosTransformer3DModel

transformer = CosmosTransformer3DModel.from_pretrained("{repo_id}", torch_dtype=torch.bfloat16)
pipe = Cosmos2TextToImagePipeline.from_pretrained(
    "{base_model}", transformer=transformer, torch_dtype=torch.bfloat16
).to("cuda")
image = pipe("{prompt}", num_inference_steps=35, guidance_scale=4.0).images[0]
```
The EMA weights are in `ema/` (same format, `subfolder="ema"`)."""


class LoraFineTune(_Method):
    name, label, frozen_base = "lora", "LoRA", True

    def __init__(self, rank: int, alpha: int, frozen_dtype: torch.dtype = torch.bfloat16, fp8_base: bool = False,
                 offload_frozen: bool = False):
        self.rank, self.alpha, self.frozen_dtype, self.fp8_base = rank, alpha, frozen_dtype, fp8_base
        self.offload_frozen = offload_frozen

    def default_learning_rate(self, preset: Preset) -> float:
        return preset.lora_learning_rate

    def default_lr_start_factor(self, preset: Preset) -> float:
        return 1.0  # recipe.py: the lr decays from its peak, which NVIDIA's full fine-tune factor would lower

    def build(self, model, config: dict, *, random_init: bool, device, checkpoint: Path | None = None,
              weights_arrive_later: bool = False):
        """The frozen base in `frozen_dtype` (its blocks' Linear weights in fp8 with `fp8_base`) with fp32 adapters
        (B = 0), resumed from `checkpoint` when given. Every process loads the base itself (it is small next to a
        full fine-tune's fp32 state). An fp8 base is built on the CPU and moved to `device` block by block as it is
        quantized, so the GPU never holds it in bf16. With `offload_frozen` the blocks' frozen Linear weights stay in
        host memory and stream to `device` block by block (offload.py)."""
        on_cpu = self.fp8_base or self.offload_frozen
        if random_init:
            transformer = random_transformer(config, self.frozen_dtype, "cpu" if on_cpu else device)
        else:
            transformer = load_base_transformer(model, self.frozen_dtype)
        transformer.requires_grad_(False)
        transformer.add_adapter(lora_config(self.rank, self.alpha))
        for p in transformer.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        if self.offload_frozen:
            offload_frozen_blocks(transformer, device, self.frozen_dtype, fp8=self.fp8_base)
        elif self.fp8_base:
            store_blocks_in_fp8(transformer, device, self.frozen_dtype)
        if checkpoint is not None:
            _load_trainable(transformer, self.read(checkpoint / MODEL))
        return transformer

    def to_write(self, transformer, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The adapters only: a LoRA save copies megabytes, not the frozen base."""
        return lora_layers(transformer, state_dict)

    def write_context(self, transformer):
        return lora_metadata(transformer)

    def write(self, directory: Path, metadata: dict, layers: dict[str, torch.Tensor]) -> None:
        write_lora_layers(directory, layers, metadata)

    def read(self, directory: Path) -> dict[str, torch.Tensor]:
        return read_lora(directory).parameters()

    def summary(self, config: dict) -> str:
        base = ", trained on an fp8-stored base (--fp8_base)" if config.get("fp8_base") else ""
        return f"LoRA rank {config['rank']}, alpha {config['lora_alpha']}{base}"

    def card_usage(self, repo_id: str, base_model: str, prompt: str) -> str:
        return f"""```python
import torch
from diffusers import Cosmos2TextToImagePipeline

pipe = Cosmos2TextToImagePipeline.from_pretrained("{base_model}", torch_dtype=torch.bfloat16).to("cuda")
pipe.transformer.load_lora_adapter("{repo_id}", weight_name="pytorch_lora_weights.safetensors", prefix="transformer")
image = pipe("{prompt}", num_inference_steps=35, guidance_scale=4.0).images[0]
```
The EMA of the adapter is in `ema/` (same format, `subfolder="ema"`)."""


def training_method(args) -> FullFineTune | LoraFineTune:
    """The method the trainer's flags ask for (`--lora`, `--rank`, `--lora_alpha`, `--fp8_base`, `--offload_frozen`;
    the base in the compute dtype)."""
    if not args.lora:
        return FullFineTune()
    return LoraFineTune(args.rank, args.lora_alpha, dtype_named(args.mixed_precision), args.fp8_base,
                        args.offload_frozen)


@torch.no_grad()
def _load_trainable(transformer, tensors: Mapping[str, torch.Tensor]) -> None:
    params = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
    if params.keys() != tensors.keys():
        raise KeyError(f"Saved adapter does not match the model's: {sorted(params.keys() ^ tensors.keys())[:3]}")
    for name, p in params.items():
        p.copy_(tensors[name])


def read_transformer_weights(directory: str | Path) -> TransformerWeights:
    """The tensors of a folder FullFineTune.write wrote, by name, each read from disk when it is asked for."""
    return TransformerWeights(sorted(Path(directory).glob("diffusion_pytorch_model*.safetensors")))


class TransformerWeights(Mapping):
    """Tensors of safetensors files, read one at a time on access. Every process of a sharded resume reads the whole
    EMA to keep its own shard of each tensor: in fp32 a 14B EMA is 56 GB, which 8 processes could not hold at once,
    while one tensor at a time is at most a few hundred MB."""

    def __init__(self, files: list[Path]):
        self._files = {path: safe_open(str(path), framework="pt") for path in files}
        self._where = {name: path for path, f in self._files.items() for name in f.keys()}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._files[self._where[name]].get_tensor(name)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)
