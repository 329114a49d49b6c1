"""The `tiny` model: the real Cosmos2TextToImagePipeline classes with random weights and a tokenizer trained here.

Saved once as an ordinary diffusers folder, so that every script and test runs on a CPU, with no download, through
the very `from_pretrained` code the real models use.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKLWan, CosmosTransformer3DModel, FlowMatchEulerDiscreteScheduler
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import Unigram
from transformers import T5Config, T5EncoderModel, T5TokenizerFast

from .atomic import staged_folder

TRANSFORMER_CONFIG = dict(
    in_channels=16,
    out_channels=16,
    # 128 wide: more than the 68 numbers of a latent patch (16 channels x 2 x 2 + the padding mask), so it can pass
    # its input through and learn an image; a narrower one never reproduces what it trains on.
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
)
# NVIDIA's aspect ratios at 1/16 of the size (multiples of 16), so CPU runs take seconds.
RESOLUTIONS = {"16:9": (96, 48), "1:1": (64, 64), "4:3": (80, 64), "3:4": (64, 80), "9:16": (48, 96)}
VAE_CONFIG = dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                  temperal_downsample=[False, True, True])
T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8)


def tiny_cache_dir(env_var: str, name: str) -> Path:
    """Where a tiny model is saved once and reused: $`env_var`, else `name` in the user cache."""
    env = os.environ.get(env_var)
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cosmos_t2i" / name


def default_tiny_dir() -> Path:
    """Where the tiny pipeline is saved once and reused: $COSMOS_T2I_TINY_DIR or the user cache."""
    return tiny_cache_dir("COSMOS_T2I_TINY_DIR", "tiny-pipeline")


def tiny_pipeline_dir() -> Path:
    """The tiny pipeline's folder, built on first use."""
    path = default_tiny_dir()
    if not (path / "model_index.json").is_file():
        build_tiny_pipeline(path)
    return path


def build_tiny_tokenizer() -> T5TokenizerFast:
    """A small T5 tokenizer trained here on a fixed corpus: same special tokens and `</s>` handling as T5's."""
    tokenizer = Tokenizer(Unigram())
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
    """Build the tiny pipeline with fixed seeds and save it to `path` (written aside, then renamed into place; if
    another process finished first, its identical copy is kept)."""
    return build_random_pipeline(path, TRANSFORMER_CONFIG, VAE_CONFIG, T5)


def build_random_pipeline(path: str | os.PathLike, transformer_config: dict, vae_config: dict, t5_config: dict,
                          device="cpu", dtype: torch.dtype = torch.float32) -> Path:
    """A pipeline folder of these shapes with random weights (seeded) and the tiny tokenizer: the tiny model, or a
    full-size stand-in for GPU benchmarks of whole commands (built on `device`, saved in `dtype`)."""
    tokenizer = build_tiny_tokenizer()
    with torch.device(device):
        torch.manual_seed(0)
        transformer = CosmosTransformer3DModel(**transformer_config).to(dtype)
        torch.manual_seed(0)
        vae = AutoencoderKLWan(**vae_config).to(dtype)
        torch.manual_seed(0)
        text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1,
                                               **t5_config)).to(dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True)

    with staged_folder(path, keep_existing=True) as staging:
        staging.chmod(0o755)
        transformer.save_pretrained(staging / "transformer")
        vae.save_pretrained(staging / "vae")
        text_encoder.save_pretrained(staging / "text_encoder")
        tokenizer.save_pretrained(staging / "tokenizer")
        scheduler.save_pretrained(staging / "scheduler")
        (staging / "model_index.json").write_text(json.dumps({
            "_class_name": "Cosmos2TextToImagePipeline",
            "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "CosmosTransformer3DModel"],
            "vae": ["diffusers", "AutoencoderKLWan"],
            "safety_checker": [None, None],
        }, indent=2))
    return Path(path)
