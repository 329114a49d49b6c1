"""The benchmark path: a random-initialised model trained on synthetic latents, with no dataset, T5 or VAE."""

import logging

import pytest
from train_helpers import train


def test_random_init_on_synthetic_data_loads_nothing(tiny_model_dir, tmp_path, monkeypatch, caplog):
    import diffusers
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("nothing may be loaded from the model folder")

    monkeypatch.setattr(diffusers.AutoencoderKLWan, "from_pretrained", refuse)
    monkeypatch.setattr(diffusers.CosmosTransformer3DModel, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.T5EncoderModel, "from_pretrained", refuse)
    with caplog.at_level(logging.INFO, logger="train_text2image"):
        last = train("--model", "tiny", "--random_init", "--synthetic_data", "48x96", "--lora", "--max_iter", "5",
                     "--save_iter", "0", "--output_dir", tmp_path / "bench", "--report_to", "none",
                     "--dataloader_num_workers", "0", "--gradient_checkpointing", "0.5")
    assert last is None and not (tmp_path / "bench" / "checkpoints").exists()  # --save_iter 0: nothing written
    assert "over 2 steps" in caplog.text  # throughput of the steps after the first three


@pytest.mark.parametrize("size", ["768x1361", "768"])
def test_synthetic_resolution_must_be_height_x_width_in_multiples_of_16(size):
    import train_text2image

    with pytest.raises(ValueError, match="768x1360|multiples of 16"):
        train_text2image.parse_args(["--model", "2B", "--random_init", "--synthetic_data", size])
