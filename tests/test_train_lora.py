"""A trained LoRA, saved in diffusers' format, loads into a fresh transformer and reproduces the trained model."""

import pytest
import torch
from safetensors import safe_open
from train_helpers import make_dataset, pattern_image, tiny_transformer_inputs, train

from cosmos_t2i.lora import WEIGHT_NAME
from cosmos_t2i.methods import LoraFineTune


@pytest.fixture(scope="module")
def dataset(tiny_model_dir, tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("lora") / "data",
                        [(pattern_image(64, 64, 0), "An image of sks teal robot.")], cache_latents=True)


def test_saved_lora_loads_into_a_fresh_transformer(dataset, tiny_model_dir, tmp_path, monkeypatch):
    from diffusers import CosmosTransformer3DModel

    built, build = [], LoraFineTune.build

    def keep(*args, **kwargs):  # the trained module itself, to compare against after the run
        built.append(build(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(LoraFineTune, "build", keep)
    # Rank and alpha other than the defaults (scale 2): the saved metadata must carry them.
    checkpoint = train("--model", "tiny", "--lora", "--rank", "4", "--lora_alpha", "8", "--dataset_dir", dataset,
                       "--output_dir", tmp_path / "run", "--max_iter", "5", "--save_iter", "5",
                       "--mixed_precision", "no", "--dataloader_num_workers", "0", "--report_to", "none")
    trained = built[0].eval()

    with safe_open(str(checkpoint / "model" / WEIGHT_NAME), "pt") as f:
        keys = set(f.keys())
    assert "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert "transformer.transformer_blocks.1.ff.net.2.lora_B.weight" in keys
    assert len(keys) == 2 * 2 * (2 * 4 + 2)  # blocks x (A, B) x (2 attentions x 4 + 2 MLP linears)
    assert (checkpoint / "model" / "ema" / WEIGHT_NAME).is_file()

    fresh = CosmosTransformer3DModel.from_pretrained(tiny_model_dir, subfolder="transformer")
    fresh.load_lora_adapter(checkpoint / "model", weight_name=WEIGHT_NAME, prefix="transformer")
    config = next(iter(fresh.peft_config.values()))
    assert (config.r, config.lora_alpha) == (4, 8)

    inputs = tiny_transformer_inputs(seed=0)
    with torch.no_grad():
        expected, got = trained(**inputs)[0], fresh(**inputs)[0]
        base = CosmosTransformer3DModel.from_pretrained(tiny_model_dir, subfolder="transformer")(**inputs)[0]
    assert (expected - base).abs().max() > 1e-3  # training moved the adapters away from B = 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_validation_images_and_hub_upload(dataset, tmp_path, monkeypatch):
    """Validation samples are saved and logged; --push_to_hub uploads model/ with the card and those samples."""
    import huggingface_hub
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cosmos_t2i import hub

    pushed = {}
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(hub, "push", lambda folder, repo_id: pushed.update(folder=folder, repo_id=repo_id) or repo_id)
    train("--model", "tiny", "--lora", "--dataset_dir", dataset, "--output_dir", tmp_path / "run", "--max_iter", "2",
          "--save_iter", "2", "--validation_prompt", "An image of sks teal robot.", "--validation_prompt", "a cat",
          "--validation_steps", "2", "--validation_num_inference_steps", "2", "--dataloader_num_workers", "0",
          "--push_to_hub", "--hub_model_id", "me/robot-lora")

    images = sorted(p.name for p in (tmp_path / "run" / "validation").iterdir())
    assert images == ["iter_000000002_0.jpg", "iter_000000002_1.jpg"]
    events = EventAccumulator(str(tmp_path / "run" / "logs" / "cosmos-predict2-text2image"))
    events.Reload()
    assert [image.step for image in events.Images("validation")] == [2]  # the prompts side by side

    folder = pushed["folder"]
    assert pushed["repo_id"] == "me/robot-lora"
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == [
        "README.md", "ema/pytorch_lora_weights.safetensors", "images/iter_000000002_0.jpg",
        "images/iter_000000002_1.jpg", "pytorch_lora_weights.safetensors"]
    card = (folder / "README.md").read_text()
    assert 'instance_prompt: "An image of sks teal robot."' in card and "LoRA rank 16, alpha 16" in card
    assert "| learning rate | 0.001 peak, linear decay to 0 |" in card
