"""--offload_frozen: a LoRA run whose frozen block weights stay in host memory and stream to the device block by
block (cosmos_t2i/offload.py).

Same math as the plain path: the same weights reach the same matmuls in the same order, so on a CPU the losses and
the adapters are equal bit for bit (tolerance 0). On a CPU there is no second device; the streamer's copies are then
made host to host (`copy_on_cpu`), which is enough to see that nothing is kept once a backward is done, that
autograd holds no copy, and that each block is copied once per pass."""

import gc
import json
import shutil
import weakref

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import make_dataset, pattern_image, tiny_transformer_inputs, train

import train_text2image
from cosmos_t2i import checkpoint as ckpt
from cosmos_t2i import offload, speed
from cosmos_t2i.lora import WEIGHT_NAME, lora_config
from cosmos_t2i.models import PRESETS, random_transformer
from cosmos_t2i.objective import diffusion_loss

COMMON = ["--model", "tiny", "--lora", "--report_to", "none", "--dataloader_num_workers", "0",
          "--learning_rate", "1e-3"]


@pytest.fixture(scope="module")
def dataset(tiny_model_dir, tmp_path_factory):
    images = [(pattern_image(64, 64, 0), "An image of sks teal robot."), (pattern_image(64, 64, 1), "a red car")]
    return make_dataset(tmp_path_factory.mktemp("offload") / "data", images, cache_latents=True)


def _adapter(checkpoint):
    return load_file(str(checkpoint / "model" / WEIGHT_NAME))


@pytest.mark.parametrize("flags", [["--mixed_precision", "bf16", "--gradient_checkpointing"],
                                   ["--mixed_precision", "no", "--fp8_base"]], ids=["bf16_checkpointed", "fp8_base"])
def test_an_offloaded_run_trains_exactly_as_the_plain_one(dataset, tmp_path, monkeypatch, flags):
    losses = {}
    loss = train_text2image.diffusion_loss

    def record(name):
        def recorded(*args, **kwargs):
            value = loss(*args, **kwargs)
            losses.setdefault(name, []).append(value.item())
            return value
        return recorded

    runs = {}
    for name, extra in (("plain", []), ("offloaded", ["--offload_frozen"])):
        with monkeypatch.context() as patch:
            patch.setattr(train_text2image, "diffusion_loss", record(name))
            runs[name] = train(*COMMON, *flags, *extra, "--dataset_dir", dataset, "--output_dir", tmp_path / name,
                               "--max_iter", 6, "--save_iter", 6)
    assert len(losses["offloaded"]) == 6
    assert losses["offloaded"] == losses["plain"]  # bit for bit: same ops, same order
    plain, offloaded = _adapter(runs["plain"]), _adapter(runs["offloaded"])
    assert plain.keys() == offloaded.keys() and all(".lora_A." in k or ".lora_B." in k for k in offloaded)
    for name, tensor in plain.items():
        torch.testing.assert_close(offloaded[name], tensor, rtol=0, atol=0, msg=name)
    assert any(name.endswith("lora_B.weight") and tensor.abs().max() > 0 for name, tensor in offloaded.items())


def test_a_resume_may_turn_offload_on(dataset, tmp_path):
    """Where the frozen base lives changes no number, so a run may be resumed with or without the flag."""
    flags = [*COMMON, "--mixed_precision", "no", "--dataset_dir", dataset, "--max_iter", 4, "--save_iter", 2]
    straight = train(*flags, "--output_dir", tmp_path / "straight")
    shutil.copytree(straight.parent / ckpt.iter_name(2), tmp_path / "halfway")
    resumed = train(*flags, "--offload_frozen", "--output_dir", tmp_path / "resumed",
                    "--resume_from_checkpoint", tmp_path / "halfway")
    assert resumed.name == straight.name
    for name, tensor in _adapter(straight).items():
        torch.testing.assert_close(_adapter(resumed)[name], tensor, rtol=0, atol=0, msg=name)


def test_offload_needs_lora():
    with pytest.raises(ValueError, match="--offload_frozen .* add --lora"):
        train_text2image.parse_args(["--model", "tiny", "--offload_frozen", "--dataset_dir", "x"])


def _offloaded_tiny(blocks: int, fp8: bool = False):
    torch.manual_seed(0)
    model = random_transformer(dict(PRESETS["tiny"].transformer_config, num_layers=blocks), torch.float32, "cpu")
    model.requires_grad_(False)
    model.add_adapter(lora_config(4, 4))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    streamer = offload.offload_frozen_blocks(model, "cpu", torch.float32, fp8=fp8, copy_on_cpu=True)
    return model, streamer


@pytest.mark.parametrize("checkpointed", [False, True], ids=["no_checkpointing", "checkpointed"])
@pytest.mark.parametrize("fp8,compiled", [(False, False), (True, False), (False, True)],
                         ids=["bf16", "fp8", "bf16_compiled"])
def test_nothing_stays_on_the_device_and_autograd_holds_no_copy(checkpointed, fp8, compiled, monkeypatch):
    blocks = 4
    model, streamer = _offloaded_tiny(blocks, fp8)
    assert not [n for n, _ in model.transformer_blocks.named_parameters() if "lora_" not in n and "norm" not in n]
    assert isinstance(model.transformer_blocks[0].attn1.to_q.base_layer, offload.OffloadedLinear)
    if checkpointed:
        speed.checkpoint_blocks(model, 1.0)
    if compiled:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        speed.compile_transformer_blocks(model)
    copies = []  # (block, weak reference) of every device tensor the streamer made
    fetch = streamer._fetch

    def watched(index):
        tensors, event = fetch(index)
        copies.extend((index, weakref.ref(t)) for layer in tensors for t in layer if t is not None)
        return tensors, event

    monkeypatch.setattr(streamer, "_fetch", watched)

    def alive():
        gc.collect()
        return {index for index, ref in copies if ref() is not None}

    generator = torch.Generator().manual_seed(1)
    loss = diffusion_loss(model, torch.randn(2, 16, 1, 8, 8, generator=generator),
                          torch.randn(2, 16, 32, generator=generator), generator=generator)
    # The graph is alive, yet only the last block and the one the backward starts with are held.
    assert alive() == {blocks - 1, blocks - 2}
    loss.backward()
    assert alive() == set() and streamer.resident == {} and streamer.device_bytes() == 0
    # Each block was copied once for the forward and once for the backward (recompute and backward share a copy),
    # except the two held across the turn: every copy was the one predicted, none made twice.
    assert streamer.fetches == 2 * blocks - 2
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    if compiled:  # the streamer ran inside the compiled graphs, which the blocks share (not one graph per block)
        assert 0 < torch._dynamo.utils.counters["stats"]["unique_graphs"] < blocks
        assert not torch._dynamo.utils.counters["graph_break"]


def test_the_benchmark_runs_the_offloaded_variants(tmp_path):
    from benchmarks import bench_train

    out = tmp_path / "train.md"
    bench_train.main(["--model", "tiny", "--lora", "--device", "cpu", "--height", "64", "--width", "64", "--steps", "1",
                      "--warmup", "1", "--variants", "5,10,11", "--out", str(out)])
    plain, fp8, offloaded, fp8_offloaded = json.loads(out.with_suffix(".json").read_text())
    assert "bf16 base offloaded" in offloaded["variant"] and "fp8 base offloaded" in fp8_offloaded["variant"]
    assert offloaded["loss_vs_plain"] == "0.0e+00"  # the same math as the plain path
    assert fp8_offloaded["first_loss"] == fp8["first_loss"]  # and as --fp8_base alone


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_forwards_without_a_backward_in_between_give_the_plain_models_output(compiled):
    """Validation samples with no_grad between training steps: the streamer's state after a forward without a
    backward must not change what the next forward computes. Eager, the same ops in the same order: equal bit for
    bit; compiled, inductor may sum in another order (float32 rounding)."""
    tolerance = dict(rtol=1e-5, atol=1e-6) if compiled else dict(rtol=0, atol=0)
    blocks = 3
    offloaded, streamer = _offloaded_tiny(blocks, fp8=False)
    if compiled:
        torch._dynamo.reset()
        speed.compile_transformer_blocks(offloaded)
    torch.manual_seed(0)
    plain = random_transformer(dict(PRESETS["tiny"].transformer_config, num_layers=blocks), torch.float32, "cpu")
    plain.add_adapter(lora_config(4, 4))
    with torch.no_grad():
        adapters = dict(offloaded.named_parameters())
        for name, p in plain.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
                adapters[name].copy_(p)
    inputs = tiny_transformer_inputs(seed=2, text_tokens=16)
    with torch.no_grad():
        expected = plain(**inputs)[0]
        for _ in range(2):
            torch.testing.assert_close(offloaded(**inputs)[0], expected, **tolerance)
    assert len(streamer.resident) <= 1  # no prefetch for a backward that will not come
    offloaded(**inputs)[0].square().mean().backward()
    plain(**inputs)[0].square().mean().backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    for name, p in offloaded.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], **tolerance, msg=name)
    assert streamer.resident == {}
