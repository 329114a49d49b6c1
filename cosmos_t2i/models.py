"""The model `--model` names, resolved once into a `Model` record, and every loader of its parts.

`--model` is 2B or 14B (NVIDIA's diffusers-format pipelines on the Hub), `tiny` (the same classes with random
weights, built locally: tiny_pipeline.py), a local pipeline folder or a hub id. The record says where the files are,
which preset (NVIDIA's recipe defaults, resolutions) applies, and what the transformer looks like; the loaders below
read the transformer, the VAE and T5 from it. Also here: how a transformer's size is named and compared, and the
one table of dtype names the scripts' flags use.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, CosmosTransformer3DModel
from transformers import AutoTokenizer, T5EncoderModel

from . import tiny_pipeline
from .hub_errors import explain_hub_errors
from .local_paths import is_hub_id, looks_local, missing_path_message
from .user_errors import BadValue, MissingInput
from .speed import single_frame_vae_convs

# The transformer configs of NVIDIA's text2image checkpoints (diffusers' conversion script,
# "Cosmos-2.0-Diffusion-{2B,14B}-Text2Image"). Used for --random_init and the benchmarks: no download needed.
_REAL_TRANSFORMER_COMMON = dict(
    in_channels=16,
    out_channels=16,
    attention_head_dim=128,
    mlp_ratio=4.0,
    text_embed_dim=1024,
    adaln_lora_dim=256,
    max_size=(128, 240, 240),
    patch_size=(1, 2, 2),
    rope_scale=(1.0, 4.0, 4.0),
    concat_padding_mask=True,
    extra_pos_embed_type=None,
)

# NVIDIA's five text2image resolutions as (width, height); the first is the default (16:9).
ASPECT_RATIOS = {
    "16:9": (1360, 768),
    "1:1": (1024, 1024),
    "4:3": (1168, 880),
    "3:4": (880, 1168),
    "9:16": (768, 1360),
}


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    hub_id: str | None  # None: built locally (tiny)
    transformer_config: dict
    # Recipe defaults (README "Recipe"), each overridable by a flag.
    learning_rate: float  # peak lr = base lr x the scheduler's starting factor
    lr_start_factor: float
    weight_decay: float
    lora_learning_rate: float
    # Training/inference resolutions per aspect ratio, (width, height).
    resolutions: dict = dataclasses.field(default_factory=lambda: dict(ASPECT_RATIOS))


PRESETS: dict[str, Preset] = {
    "2B": Preset(
        name="2B",
        hub_id="nvidia/Cosmos-Predict2-2B-Text2Image",
        transformer_config=dict(_REAL_TRANSFORMER_COMMON, num_attention_heads=16, num_layers=28),
        learning_rate=2**-15,
        lr_start_factor=0.17,
        weight_decay=0.1,
        lora_learning_rate=1e-4,
    ),
    "14B": Preset(
        name="14B",
        hub_id="nvidia/Cosmos-Predict2-14B-Text2Image",
        transformer_config=dict(_REAL_TRANSFORMER_COMMON, num_attention_heads=40, num_layers=36),
        learning_rate=2**-14.5,
        lr_start_factor=0.4,
        weight_decay=0.2,
        lora_learning_rate=1e-4,
    ),
    "tiny": Preset(
        name="tiny",
        hub_id=None,
        transformer_config=tiny_pipeline.TRANSFORMER_CONFIG,
        learning_rate=2**-15,
        lr_start_factor=0.17,
        weight_decay=0.1,
        lora_learning_rate=1e-3,
        resolutions=tiny_pipeline.RESOLUTIONS,
    ),
}

# The dtype names of the scripts' flags: --dtype of infer/export (long names), embed_captions' --dtype and the
# trainer's --mixed_precision (short ones).
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_SHORT_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "no": "float32"}


def dtype_named(name: str) -> torch.dtype:
    return DTYPES[_SHORT_DTYPE_NAMES.get(name, name)]


def device_and_dtype(dtype_flag: str | None) -> tuple[torch.device, torch.dtype]:
    """The GPU when there is one, in bf16 unless fp32 is asked for; on a CPU fp32 unless bf16 is asked for."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype_flag is None:
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype_named(dtype_flag)


@dataclasses.dataclass(frozen=True)
class Model:
    """What `--model` stands for; made once per run by `resolve_model` and handed to whatever loads a part of it."""

    name: str  # as given on the command line
    path: str  # what from_pretrained takes: a hub id or a local pipeline folder
    preset: Preset | None  # None: a pipeline no preset matches (its recipe values must be flags)

    @functools.cached_property
    def transformer_config(self) -> dict:
        """The transformer's config, without downloading weights (2B/14B: known locally)."""
        if self.preset is not None and self.preset.hub_id is not None:
            return dict(self.preset.transformer_config)
        with explain_hub_errors(self.path):
            return dict(CosmosTransformer3DModel.load_config(self.path, subfolder="transformer"))

    @property
    def resolutions(self) -> dict[str, tuple[int, int]]:
        """(width, height) per aspect ratio: the buckets of training and the sizes of sampling."""
        return self.preset.resolutions if self.preset else ASPECT_RATIOS

    @property
    def is_tiny(self) -> bool:
        return self.preset is not None and self.preset.name == "tiny"


def resolve_model(name: str) -> Model:
    """`--model` -> its record; an unknown name or a folder that is no pipeline fails here, before any work."""
    return Model(name, _model_path(name), _preset_for(name))


def as_model(model: Model | str) -> Model:
    """For library calls that take either the record or a `--model` string (tests, notebooks)."""
    return model if isinstance(model, Model) else resolve_model(model)


def _preset_for(model: str) -> Preset | None:
    """The preset named by `model`, or the one whose transformer a local pipeline folder matches, or None."""
    if model in PRESETS:
        return PRESETS[model]
    config_path = Path(model) / "transformer" / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        for preset in PRESETS.values():
            if all(_same(config.get(k), v) for k, v in preset.transformer_config.items() if k != "max_size"):
                return preset
    return None


def _same(a, b) -> bool:
    if isinstance(b, (tuple, list)):
        return a is not None and list(a) == list(b)
    if isinstance(b, float):
        return a is not None and math.isclose(a, b)
    return a == b


def _model_path(model: str) -> str:
    """What `from_pretrained` takes for `model`: a hub id, a local folder, or the tiny folder (built on first use)."""
    if model == "tiny":
        return str(tiny_pipeline.tiny_pipeline_dir())
    if model in PRESETS:
        return PRESETS[model].hub_id
    if Path(model).expanduser().exists():
        if not (Path(model).expanduser() / "model_index.json").is_file():
            raise MissingInput(
                f"{model} is not a diffusers pipeline folder (no model_index.json). Pass --model 2B, 14B, tiny, a "
                "hub id, or a folder saved by Cosmos2TextToImagePipeline.save_pretrained."
            )
        return str(Path(model).expanduser())
    if is_hub_id(model):
        return model  # from_pretrained reports a missing or gated repo
    if looks_local(model):
        raise MissingInput(missing_path_message("Model folder", model)[:-1] + ": pass a folder saved by "
                           "Cosmos2TextToImagePipeline.save_pretrained, or --model 2B, 14B, tiny or a hub id.")
    raise BadValue(f"Unknown model {model!r}: use 2B, 14B, tiny, a local pipeline folder, or a hub id.")


# ----------------------------------------------------------------------------------------------------------------
# Loaders of the model's parts


def load_base_transformer(model: Model | str, dtype) -> CosmosTransformer3DModel:
    """The model's own transformer with its trained weights, without the rest of the pipeline."""
    model = as_model(model)
    with explain_hub_errors(model.path):
        return CosmosTransformer3DModel.from_pretrained(model.path, subfolder="transformer", dtype=dtype)


def random_transformer(config: dict, dtype: torch.dtype, device) -> CosmosTransformer3DModel:
    """A transformer of `config`'s architecture with random weights, built directly in `dtype` on `device`.

    Built in fp32 and cast, a 14B model would take 56 GB (twice its bf16 size) on the way: the memory a 24 GB card
    lacks, and the peak the trainer then reported."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return CosmosTransformer3DModel.from_config(config)
    finally:
        torch.set_default_dtype(default)


def load_text_encoder(model: Model | str, device, dtype):
    """Only the tokenizer and T5 encoder of the pipeline (T5-XXL's encoder alone is ~9 GiB in bf16)."""
    model = as_model(model)
    with explain_hub_errors(model.path):
        tokenizer = AutoTokenizer.from_pretrained(model.path, subfolder="tokenizer")
        text_encoder = T5EncoderModel.from_pretrained(model.path, subfolder="text_encoder", dtype=dtype)
    return tokenizer, text_encoder.to(device).eval()


def load_vae(model: Model | str, device, dtype) -> AutoencoderKLWan:
    model = as_model(model)
    with explain_hub_errors(model.path):
        vae = AutoencoderKLWan.from_pretrained(model.path, subfolder="vae", dtype=dtype)
    single_frame_vae_convs(vae)  # images are single frames: same sums, a third of the work
    return vae.to(device).eval()


# ----------------------------------------------------------------------------------------------------------------
# A transformer's size, named and compared


def _dims(config: dict) -> tuple[int, int, int]:
    return config["num_layers"], config["num_attention_heads"], config["attention_head_dim"]


def preset_name_for(config: dict) -> str | None:
    """The preset whose transformer has these dimensions (2B, 14B, tiny), if any."""
    return next((p.name for p in PRESETS.values() if _dims(p.transformer_config) == _dims(config)), None)


def describe_architecture(config: dict) -> str:
    """'2B (28 blocks x 16 heads)', or '3 blocks x 4 heads of 16' for a size no preset has."""
    layers, heads, head_dim = _dims(config)
    name = preset_name_for(config)
    return f"{name} ({layers} blocks x {heads} heads)" if name else f"{layers} blocks x {heads} heads of {head_dim}"


def check_same_architecture(checkpoint_config: dict, model: Model, source: str = "checkpoint") -> None:
    """Refuse a checkpoint (`source`: its path, for the message) of another size than `--model`, naming both."""
    if _dims(checkpoint_config) == _dims(model.transformer_config):
        return
    model_desc = describe_architecture(model.transformer_config)
    if model.name not in PRESETS:
        model_desc = f"{model.name}, {model_desc}"
    hint = preset_name_for(checkpoint_config)
    raise BadValue(f"{source} is {describe_architecture(checkpoint_config)}, --model is {model_desc}"
                     + (f": pass --model {hint}." if hint else "."))
