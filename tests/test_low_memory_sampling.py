"""Sampling in less memory: T5 encodes the prompts and is gone before the transformer reaches the device, the
weights can stream from host memory block by block (--offload), and none of it changes the image."""

import gc
import json
import weakref

import numpy as np
import pytest
import torch
from infer_helpers import PROMPT, stock_image
from PIL import Image

import infer_text2image as infer
from cosmos_t2i import memory, models, text_encoding

FAST = ["--model", "tiny", "--num_steps", "2", "--dtype", "float32", "--stock_vae"]


def _run(path, *extra):
    infer.main(infer.parse_args([*FAST, "--prompt", PROMPT, "--save_path", str(path), *extra]))
    return np.asarray(Image.open(path))


def test_t5_is_freed_before_the_transformer_is_placed_and_the_image_is_the_stock_one(tiny_model_dir, tmp_path,
                                                                                     monkeypatch):
    events, encoders = [], []
    load, place = models.load_text_encoder, infer.place_for_sampling

    def load_and_watch(*args, **kwargs):
        tokenizer, encoder = load(*args, **kwargs)
        encoders.append(weakref.ref(encoder))
        events.append("T5 loaded")
        return tokenizer, encoder

    def place_and_check(*args, **kwargs):
        gc.collect()
        events.append("T5 alive" if encoders[0]() is not None else "T5 freed")
        events.append("transformer placed")
        return place(*args, **kwargs)

    monkeypatch.setattr(models, "load_text_encoder", load_and_watch)
    monkeypatch.setattr(infer, "place_for_sampling", place_and_check)
    image = _run(tmp_path / "a.png", "--seed", "3", "--text_encoder_device", "cpu")
    assert events == ["T5 loaded", "T5 freed", "transformer placed"]
    assert np.array_equal(image, stock_image(tiny_model_dir, seed=3))
    assert json.loads((tmp_path / "a.json").read_text())["text_encoder_device"] == "cpu"


def test_offloaded_weights_stream_block_by_block_and_give_the_same_image(tiny_model_dir, tmp_path, monkeypatch):
    from diffusers.hooks import apply_group_offloading

    offloaded = []

    def watch(module, **kwargs):
        offloaded.append((type(module).__name__, kwargs["offload_type"], kwargs["num_blocks_per_group"]))
        return apply_group_offloading(module, **kwargs)

    monkeypatch.setattr("diffusers.hooks.apply_group_offloading", watch)
    image = _run(tmp_path / "o.png", "--seed", "5", "--offload")
    assert offloaded == [("CosmosTransformer3DModel", "block_level", 1)]
    assert np.array_equal(image, stock_image(tiny_model_dir, seed=5))
    sidecar = json.loads((tmp_path / "o.json").read_text())
    assert sidecar["offload"] and not sidecar["compiled"] and not sidecar["cuda_graph"]


def test_offload_refuses_forced_compilation():
    with pytest.raises(SystemExit):
        infer.parse_args([*FAST, "--prompt", PROMPT, "--offload", "--compile", "on"])


@pytest.mark.parametrize("device", ["gpu0", "cuda"] if not torch.cuda.is_available() else ["gpu0"])
def test_a_text_encoder_device_that_cannot_work_is_one_line_before_any_loading(device, capsys):
    with pytest.raises(SystemExit) as exit_:
        infer.parse_args([*FAST, "--prompt", PROMPT, "--text_encoder_device", device])
    assert exit_.value.code == 2
    assert "--text_encoder_device" in capsys.readouterr().err


def test_prompts_are_encoded_in_batches_with_the_same_numbers(tiny_model_dir, monkeypatch):
    prompts = [f"prompt number {i}" for i in range(5)]
    monkeypatch.setattr(text_encoding, "PROMPTS_PER_BATCH", 8)
    one_batch = text_encoding.encode_prompts(models.resolve_model("tiny"), prompts, "cpu", torch.float32)
    monkeypatch.setattr(text_encoding, "PROMPTS_PER_BATCH", 2)
    batched = text_encoding.encode_prompts(models.resolve_model("tiny"), prompts, "cpu", torch.float32)
    assert batched.shape == (5, 512, one_batch.shape[-1])
    torch.testing.assert_close(batched, one_batch, rtol=1e-5, atol=1e-6)


def test_t5_sees_at_most_a_prompt_and_its_negative_at_once(tiny_model_dir, monkeypatch):
    """t5-11b's activations are about 0.5 GiB per prompt (H200: 13.0 GiB peak for 8 at once, 9.1 of it weights), so
    a prompt list is encoded two at a time: the T5 phase stays near 10 GiB, inside a 12 GiB card."""
    batches, encode = [], text_encoding.encode_captions

    def spy(tokenizer, text_encoder, captions, *args, **kwargs):
        batches.append(len(captions))
        return encode(tokenizer, text_encoder, captions, *args, **kwargs)

    monkeypatch.setattr(text_encoding, "encode_captions", spy)
    text_encoding.encode_prompts(models.resolve_model("tiny"), [f"p{i}" for i in range(5)], "cpu", torch.float32)
    assert batches == [2, 2, 1]


def test_out_of_memory_while_sampling_names_the_flags_cheapest_first(tiny_model_dir, tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(infer, "generate", out_of_memory)
    with pytest.raises(memory.OutOfMemory) as error:
        _run(tmp_path / "x.png")
    message = str(error.value)
    assert message.startswith("out of GPU memory while sampling")
    positions = [message.index(flag) for flag in ("--text_encoder_device cpu", "--fp8", "--offload")]
    assert positions == sorted(positions)
    assert not (tmp_path / "x.png").exists()
