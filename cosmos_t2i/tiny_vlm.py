"""A tiny random Qwen3-VL, built locally, so captioning runs in tests and the demo with no download.

Same classes as the real captioner (Qwen3VLForConditionalGeneration + Qwen3VLProcessor), a couple of layers, a
tokenizer trained here with `tokenizers` and a minimal chat template. It is saved once and then loaded through the
very `from_pretrained` code a hub id goes through. Its weights are random, so its captions are gibberish.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .tiny_pipeline import tiny_cache_dir

# Qwen's special tokens, by the names Qwen3VLProcessor looks for.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

# Enough of Qwen's chat template for one user turn of images and text, then the assistant's turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def default_tiny_vlm_dir() -> Path:
    """Where the tiny VLM is saved once and reused: $COSMOS_T2I_TINY_VLM_DIR or the user cache."""
    return tiny_cache_dir("COSMOS_T2I_TINY_VLM_DIR", "tiny-vlm")


def tiny_vlm_path() -> str:
    """The tiny VLM's folder, built on first use."""
    path = default_tiny_vlm_dir()
    if not (path / "config.json").is_file():
        build_tiny_vlm(path)
    return str(path)


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer (Qwen's kind) trained on a few captions, with Qwen's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [
        "An image of sks teal robot, standing on a wooden table in a bright workshop.",
        "a photo of a red car on a wet street at night, seen from a low angle",
        "a cat sitting on a windowsill in warm afternoon light",
        "a robot arm picks up a green cube in a factory with white walls",
        "Describe this image in one or two sentences.",
    ]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return Qwen2TokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              unk_token=None, bos_token=None, model_max_length=4096)


def build_processor(min_pixels: int, max_pixels: int):
    """Qwen3-VL's processor (16 px patches merged 2x2) around the tiny tokenizer; images are resized to keep
    their pixel count within [min_pixels, max_pixels]."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2,
                                            size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=build_tiny_tokenizer(),
                            video_processor=Qwen3VLVideoProcessor(), chat_template=CHAT_TEMPLATE)


def special_token_ids(tokenizer) -> dict[str, int]:
    return {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}


def vision_token_ids(ids: dict[str, int]) -> dict[str, int]:
    """The Qwen3VLConfig fields that must name the tokenizer's vision tokens."""
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def build_tiny_vlm(path: str | os.PathLike) -> Path:
    """Build the tiny Qwen3-VL with a fixed seed and save model + processor (written aside, renamed into place)."""
    import torch
    from transformers import GenerationConfig, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Images are resized to at most 64x64 pixels: 16 patches of 16 px, merged 2x2 into 4 image tokens.
    processor = build_processor(min_pixels=32 * 32, max_pixels=64 * 64)
    ids = special_token_ids(processor.tokenizer)
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(processor.tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         max_position_embeddings=4096, pad_token_id=ids["<|endoftext|>"],
                         # mrope_section splits head_dim / 2 rotary pairs over (time, height, width).
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           num_position_embeddings=64, deepstack_visual_indexes=[1]),
        **vision_token_ids(ids),
    )
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                                               do_sample=False)

    staging = Path(tempfile.mkdtemp(prefix=".tiny-vlm-", dir=path.parent))
    staging.chmod(0o755)
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        if path.exists():  # another process finished first; theirs is identical
            shutil.rmtree(staging)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path
