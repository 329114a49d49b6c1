"""A CUDA out-of-memory error ends the trainer and the sampler with one message: the peak, the GPU, and the flags
that lower memory, cheapest first, leaving out those already in use."""

import pytest
import torch
from train_helpers import make_dataset, pattern_image, train

import train_text2image
from cosmos_t2i import memory


@pytest.fixture(scope="module")
def dataset(tiny_model_dir, tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("memory") / "data",
                        [(pattern_image(64, 64, 0), "An image of sks teal robot.")], cache_latents=True)


def _out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_in_training_names_the_flags_that_lower_memory(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(train_text2image, "diffusion_loss", _out_of_memory)
    with pytest.raises(memory.OutOfMemory) as error:
        train("--model", "tiny", "--lora", "--dataset_dir", dataset, "--output_dir", tmp_path / "run",
              "--train_batch_size", "2", "--max_iter", "2", "--save_iter", "0", "--report_to", "none",
              "--dataloader_num_workers", "0", "--mixed_precision", "no")
    message = str(error.value)
    assert message.startswith("out of GPU memory while training")
    flags = ["--train_batch_size", "--gradient_checkpointing", "--fp8_base", "--offload_frozen"]
    positions = [message.index(flag) for flag in flags]
    assert positions == sorted(positions)  # cheapest first
    assert error.value.exit_code == 2


def test_the_advice_leaves_out_what_the_run_already_uses(monkeypatch):
    args = train_text2image.parse_args(["--model", "tiny", "--lora", "--fp8_base", "--offload_frozen",
                                        "--gradient_checkpointing", "--dataset_dir", "x"])
    assert memory.training_advice(args) == []
    assert "use a GPU with more memory" in memory.out_of_memory_message("cpu", [], "training")
    full = train_text2image.parse_args(["--model", "tiny", "--dataset_dir", "x"])
    advice = " ".join(memory.training_advice(full))
    assert "--lora --fp8_base" in advice and "--gradient_checkpointing" in advice
    # A full fine-tune is offered the host-memory config after checkpointing, before giving up the full fine-tune...
    positions = [advice.index(s) for s in ("--gradient_checkpointing", "fsdp2_offload.yaml", "--lora --fp8_base")]
    assert positions == sorted(positions)
    # ...unless accelerate launched it with that offload already.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    assert "fsdp2_offload.yaml" not in " ".join(memory.training_advice(full))
