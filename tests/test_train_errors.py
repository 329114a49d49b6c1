"""Bad inputs stop train_text2image.py with an error that says what to do, before any model is loaded; bad steps
(non-finite gradients) are skipped and reported."""

import json

import pytest
from train_helpers import make_dataset, pattern_image, train, weights

import train_text2image
from cosmos_t2i.methods import FullFineTune, LoraFineTune


@pytest.fixture(scope="module")
def dataset(tiny_model_dir, tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("errors") / "data",
                        [(pattern_image(64, 64, 0), "An image of sks teal robot.")], cache_latents=True)


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    for method in (FullFineTune, LoraFineTune):
        monkeypatch.setattr(method, "build", refuse)


COMMON = ["--report_to", "none", "--dataloader_num_workers", "0", "--mixed_precision", "no"]


def test_missing_dataset(tmp_path, no_model_loading, tiny_model_dir):
    with pytest.raises(FileNotFoundError, match="does not exist.*prepare_dataset.py"):
        train("--model", "tiny", "--dataset_dir", tmp_path / "nowhere", "--output_dir", tmp_path / "out", *COMMON)


def test_dataset_without_t5_embeddings(tmp_path, no_model_loading, tiny_model_dir):
    folder = tmp_path / "imagefolder"
    folder.mkdir()
    pattern_image(64, 64, 0).save(folder / "a.jpg")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.jpg", "text": "a robot"}) + "\n")
    with pytest.raises(FileNotFoundError, match="no T5 embeddings.*embed_captions.py"):
        train("--model", "tiny", "--dataset_dir", folder, "--output_dir", tmp_path / "out", *COMMON)


def test_embedding_dim_other_than_the_models(dataset, tmp_path, no_model_loading):
    # The tiny dataset's 32-dim embeddings against 2B's 1024 (architecture from the preset: no download).
    with pytest.raises(ValueError, match=r"32-dimensional T5 embeddings \(embedded with tiny\).*2B.*"
                                         r"text_embed_dim=1024.*embed_captions.py --model 2B"):
        train("--model", "2B", "--random_init", "--dataset_dir", dataset, "--output_dir", tmp_path / "out", *COMMON)


def test_unknown_model(dataset, tmp_path, no_model_loading):
    with pytest.raises(ValueError, match="Unknown model '3B'.*2B, 14B, tiny"):
        train("--model", "3B", "--dataset_dir", dataset, "--output_dir", tmp_path / "out", *COMMON)


@pytest.mark.parametrize("flag", [["--rank", "8"], ["--lora_alpha", "8"]])
def test_lora_flags_without_lora(flag):
    with pytest.raises(ValueError, match="--rank and --lora_alpha configure LoRA: add --lora"):
        train_text2image.parse_args(["--model", "tiny", "--dataset_dir", "x", *flag])


def test_lora_defaults_hold_for_any_model_and_push_needs_a_saved_checkpoint():
    args = train_text2image.parse_args(["--model", "some-user/cosmos-finetune", "--lora", "--dataset_dir", "x"])
    assert (args.rank, args.lora_alpha) == (16, 16)  # NVIDIA's, also for a model that is not a preset
    with pytest.raises(ValueError, match="--save_iter 0 saves none"):
        train_text2image.parse_args(["--model", "tiny", "--dataset_dir", "x", "--push_to_hub", "--hub_model_id",
                                     "me/x", "--save_iter", "0"])


def test_synthetic_data_needs_random_init():
    with pytest.raises(ValueError, match="--random_init"):
        train_text2image.parse_args(["--model", "2B", "--synthetic_data", "768x1360"])


def test_push_to_hub_without_token(dataset, tmp_path, no_model_loading, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(PermissionError, match="token"):
        train("--model", "tiny", "--dataset_dir", dataset, "--output_dir", tmp_path / "out", "--push_to_hub",
              "--hub_model_id", "me/x", *COMMON)


def test_resume_with_other_flags_names_them(dataset, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train("--model", "tiny", "--dataset_dir", dataset, "--output_dir", out, "--max_iter", "2", "--save_iter", "2",
          *COMMON)
    for method in (FullFineTune, LoraFineTune):
        monkeypatch.setattr(method, "build", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ValueError, match=r"Cannot resume .*iter_000000002.*learning_rate: 3\.05.*e-05 there, "
                                         r"0\.001 now.*seed: 0 there, 1 now"):
        train("--model", "tiny", "--dataset_dir", dataset, "--output_dir", out, "--max_iter", "2",
              "--learning_rate", "1e-3", "--seed", "1", *COMMON)


def _nan_loss_on(monkeypatch, bad_calls):
    calls = []
    loss = train_text2image.diffusion_loss

    def maybe_nan(*args, **kwargs):
        calls.append(1)
        value = loss(*args, **kwargs)
        return value * float("nan") if len(calls) in bad_calls else value

    monkeypatch.setattr(train_text2image, "diffusion_loss", maybe_nan)


def test_nonfinite_gradients_skip_the_update_and_say_so(dataset, tmp_path, monkeypatch, caplog):
    import logging

    _nan_loss_on(monkeypatch, bad_calls={2})
    with caplog.at_level(logging.WARNING, logger="train_text2image"):
        checkpoint = train("--model", "tiny", "--dataset_dir", dataset, "--output_dir", tmp_path / "out",
                           "--max_iter", "3", "--save_iter", "3", *COMMON)
    assert "Iteration 1: gradient norm is nan; update skipped (1 in a row)." in caplog.text
    assert checkpoint.name == "iter_000000003"  # the run went on, with nothing of the NaN step in its weights
    assert all(t.isfinite().all() for t in {**weights(checkpoint), **weights(checkpoint, ema=True)}.values())


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(dataset, tmp_path, monkeypatch):
    _nan_loss_on(monkeypatch, bad_calls=set(range(2, 100)))
    with pytest.raises(RuntimeError, match="3 steps in a row had non-finite gradients .*iteration 3"):
        train("--model", "tiny", "--dataset_dir", dataset, "--output_dir", tmp_path / "out", "--max_iter", "10",
              "--max_nonfinite_steps", "3", *COMMON)


@pytest.mark.parametrize("flags, message", [
    (["--activation_memory_budget", "0"], r"expected a fraction in \(0, 1\]"),
    (["--activation_memory_budget", "0.8", "--no_compile"], "applied by torch.compile.*--gradient_checkpointing"),
])
def test_activation_memory_budget_needs_a_fraction_and_compilation(flags, message):
    with pytest.raises(ValueError, match=message):
        train_text2image.parse_args(["--model", "tiny", "--dataset_dir", "x", *flags])
