"""Model presets: where each model comes from and NVIDIA's recipe defaults for it.

`2B` and `14B` are NVIDIA's diffusers-format pipelines on the Hub. `tiny` is the same pipeline classes with random
weights and a tokenizer built locally, saved as an ordinary diffusers folder so that every script and test runs on
a CPU through the very `from_pretrained` code the real models use.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

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
    # Recipe defaults (DESIGN section 4), each overridable by a flag.
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
        transformer_config=dict(
            in_channels=16,
            out_channels=16,
            # 128 wide: more than the 68 numbers of a latent patch (16 channels x 2 x 2 + the padding mask), so it
            # can pass its input through and learn an image; a narrower one never reproduces what it trains on.
            num_attention_heads=8,
            attention_head_dim=16,
            num_layers=2,
            mlp_ratio=2.0,
            text_embed_dim=32,
            adaln_lora_dim=8,
            max_size=(4, 64, 64),
            patch_size=(1, 2, 2),
            rope_scale=(1.0, 4.0, 4.0),
            concat_padding_mask=True,
            extra_pos_embed_type=None,
        ),
        learning_rate=2**-15,
        lr_start_factor=0.17,
        weight_decay=0.1,
        lora_learning_rate=1e-3,
        # NVIDIA's aspect ratios at 1/16 of the size (multiples of 16), so CPU runs take seconds.
        resolutions={"16:9": (96, 48), "1:1": (64, 64), "4:3": (80, 64), "3:4": (64, 80), "9:16": (48, 96)},
    ),
}

TINY_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8)


def default_tiny_dir() -> Path:
    """Where the tiny pipeline is saved once and reused: $COSMOS_T2I_TINY_DIR or the user cache."""
    env = os.environ.get("COSMOS_T2I_TINY_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cosmos_t2i" / "tiny-pipeline"


def preset_for(model: str) -> Preset | None:
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


def resolve_model_path(model: str) -> str:
    """Turn `--model` into something `from_pretrained` takes: a hub id, a local folder, or the tiny folder.

    The tiny pipeline is built on first use and saved, so later calls load it like any other pipeline.
    """
    if model == "tiny":
        path = default_tiny_dir()
        if not (path / "model_index.json").is_file():
            build_tiny_pipeline(path)
        return str(path)
    if model in PRESETS:
        return PRESETS[model].hub_id
    if Path(model).exists():
        if not (Path(model) / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{model} is not a diffusers pipeline folder (no model_index.json). Pass --model 2B, 14B, tiny, a "
                "hub id, or a folder saved by Cosmos2TextToImagePipeline.save_pretrained."
            )
        return model
    if "/" in model and not model.startswith((".", "/")):
        return model  # a hub id; from_pretrained reports a missing or gated repo
    raise ValueError(f"Unknown model {model!r}: use 2B, 14B, tiny, a local pipeline folder, or a hub id.")


def transformer_config(model: str) -> dict:
    """The transformer config `--model` stands for, without downloading weights (2B/14B: known locally)."""
    preset = PRESETS.get(model)
    if preset is not None and preset.hub_id is not None:
        return dict(preset.transformer_config)
    from diffusers import CosmosTransformer3DModel

    from .hub_errors import explain_hub_errors

    path = resolve_model_path(model)
    with explain_hub_errors(path):
        return dict(CosmosTransformer3DModel.load_config(path, subfolder="transformer"))


def load_model_transformer(model: str, dtype):
    """`--model`'s own transformer with its trained weights, without the rest of the pipeline."""
    from diffusers import CosmosTransformer3DModel

    from .hub_errors import explain_hub_errors

    path = resolve_model_path(model)
    with explain_hub_errors(path):
        return CosmosTransformer3DModel.from_pretrained(path, subfolder="transformer", dtype=dtype)


def build_tiny_tokenizer():
    """A small T5 tokenizer trained here on a fixed corpus: same special tokens and `</s>` handling as T5's."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'-()"
    corpus = [
        "An image of sks teal robot.",
        "a photo of a red car on a street",
        "a cat sitting on a wooden table in the sun",
        "a robot arm picks up a green cube in a factory",
        " ".join(letters),
    ]
    trainer = trainers.UnigramTrainer(
        vocab_size=256,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        initial_alphabet=list(letters),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tokenizer.token_to_id("</s>"))]
    )
    return T5TokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)


def build_tiny_pipeline(path: str | os.PathLike) -> Path:
    """Build the tiny pipeline with fixed seeds and save it (written aside, then renamed into place)."""
    import shutil
    import tempfile

    import torch
    from diffusers import AutoencoderKLWan, CosmosTransformer3DModel, FlowMatchEulerDiscreteScheduler
    from transformers import T5Config, T5EncoderModel

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    transformer = CosmosTransformer3DModel(**PRESETS["tiny"].transformer_config)
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    torch.manual_seed(0)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, **TINY_T5))
    scheduler = FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True)

    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=path.parent))
    staging.chmod(0o755)
    try:
        transformer.save_pretrained(staging / "transformer")
        vae.save_pretrained(staging / "vae")
        text_encoder.save_pretrained(staging / "text_encoder")
        tokenizer.save_pretrained(staging / "tokenizer")
        scheduler.save_pretrained(staging / "scheduler")
        (staging / "model_index.json").write_text(json.dumps({
            "_class_name": "Cosmos2TextToImagePipeline",
            "_diffusers_version": _diffusers_version(),
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "CosmosTransformer3DModel"],
            "vae": ["diffusers", "AutoencoderKLWan"],
            "safety_checker": [None, None],
        }, indent=2))
        if path.exists():  # another process finished first; theirs is identical
            shutil.rmtree(staging)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
