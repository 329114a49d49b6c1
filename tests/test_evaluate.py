"""evaluate_text2image.py and its metrics (cosmos_t2i/fidelity.py) on the tiny models: the metrics are the ones
DreamBooth defines, and a run's evaluation writes its table, sheets and plots and picks a checkpoint."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import make_dataset, pattern_image, train

import evaluate_text2image
from cosmos_t2i import fidelity

SUBJECT = "sks teal robot"


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    return fidelity.MetricModels.load(fidelity.TINY, fidelity.TINY)


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """A real tiny training run with two checkpoints (iter 1 and 2, each with EMA), on a two-image dataset."""
    root = tmp_path_factory.mktemp("evaluate")
    data = make_dataset(root / "data", [(pattern_image(64, 64, i), f"An image of {SUBJECT}.") for i in range(2)],
                        cache_latents=True)
    train("--model", "tiny", "--dataset_dir", data, "--output_dir", root / "run", "--max_iter", "2",
          "--save_iter", "1", "--learning_rate", "1e-1", "--report_to", "none", "--mixed_precision", "no",
          "--dataloader_num_workers", "0")
    prompts = root / "prompts.txt"
    prompts.write_text("a {subject} on the beach\n# a comment\n\na {subject} in the snow\na cat on a sofa\n")
    return root


def evaluate(run, output_dir, *extra):
    args = evaluate_text2image.parse_args(
        ["--run_dir", str(run / "run"), "--subject", SUBJECT, "--prompts_file", str(run / "prompts.txt"),
         "--num_images_per_prompt", "2", "--num_steps", "2", "--dtype", "float32", "--output_dir", str(output_dir),
         "--thumbnail_size", "32", *extra])
    return evaluate_text2image.main(args)


def test_identical_images_have_cosine_one_and_different_ones_less(models):
    image = pattern_image(64, 64, 0)
    pixels = np.asarray(image)
    shuffled = Image.fromarray(np.random.default_rng(0).permutation(pixels.reshape(-1, 3)).reshape(pixels.shape))
    for name in ("dino", "clip_i"):
        embedded = models.embed([image, image.copy(), shuffled])[name]
        assert fidelity.mean_pairwise_similarity(embedded[:1], embedded[1:2]) == pytest.approx(1.0, abs=1e-6)
        assert fidelity.mean_pairwise_similarity(embedded[:1], embedded[2:]) < 0.999, name


def test_dino_is_the_cls_token_of_the_vit(models):
    from transformers import ViTModel

    images = [pattern_image(64, 48, i) for i in range(3)]
    # The checkpoint as saved, loaded independently: DINO's embedding is the final (normed) CLS token.
    vit = ViTModel.from_pretrained(fidelity.resolve_metric_model(fidelity.TINY, "dino"), add_pooling_layer=False)
    pixels = models.dino.processor(images=images, return_tensors="pt").pixel_values
    with torch.no_grad():
        expected = vit(pixel_values=pixels).last_hidden_state[:, 0]
    torch.testing.assert_close(models.dino.images(images), expected)


def test_clip_t_is_the_cosine_of_each_image_with_its_own_prompt(models):
    """CLIP-T by DreamBooth's definition, against a manual computation with the same models: the mean over images
    of cos(CLIP text embedding of its prompt, CLIP image embedding)."""
    images = [pattern_image(64, 64, i) for i in range(3)]
    texts = ["a sks teal robot on the beach", "a red car", "an old man with a beard"]
    clip = models.clip
    with torch.no_grad():
        tokens = clip.tokenizer(texts, padding=True, return_tensors="pt")
        text = clip.model.get_text_features(**tokens).pooler_output
        pixels = clip.processor(images=images, return_tensors="pt").pixel_values
        image = clip.model.get_image_features(pixel_values=pixels).pooler_output
    cosines = [float(torch.dot(t, i) / (t.norm() * i.norm())) for t, i in zip(text, image)]

    matched = fidelity.clip_t(clip.images(images), clip.texts(texts))
    assert matched == pytest.approx(np.mean(cosines), abs=1e-5)
    # A shuffled pairing is scored on its own pairs: a different number, equal to its own manual mean.
    shuffled = fidelity.clip_t(clip.images(images), clip.texts(texts[1:] + texts[:1]))
    rolled = [float(torch.dot(t, i) / (t.norm() * i.norm())) for t, i in zip(text.roll(-1, 0), image)]
    assert shuffled == pytest.approx(np.mean(rolled), abs=1e-5)
    assert shuffled != pytest.approx(matched, abs=1e-4)


def test_tiny_metric_models_load_back_through_from_pretrained(tiny_model_dir):
    from transformers import AutoTokenizer

    folder = fidelity.resolve_metric_model(fidelity.TINY, "clip")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(tokenizer).__name__ == "CLIPTokenizer"
    ids = tokenizer("A photo of SKS robot").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of sks robot"  # CLIP lower-cases


def test_evaluate_a_run_with_two_checkpoints(run, tmp_path, capsys):
    rows = evaluate(run, tmp_path / "eval")
    out = capsys.readouterr().out
    names = [r["candidate"] for r in rows]
    assert names == ["base", "iter_000000001", "iter_000000001_ema", "iter_000000002", "iter_000000002_ema"]
    assert [r["iteration"] for r in rows] == [0, 1, 1, 2, 2]

    table = (tmp_path / "eval" / "metrics.md").read_text()
    assert all(name in table for name in names)
    with open(tmp_path / "eval" / "metrics.csv") as f:
        assert [r["candidate"] for r in csv.DictReader(f)] == names
    record = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert [c["candidate"] for c in record["candidates"]] == names
    assert record["settings"]["num_reference_images"] == 2
    for name in names:
        sheet = Image.open(tmp_path / "eval" / "contact_sheets" / f"{name}.png")
        assert sheet.size == (320 + 2 * 32, 20 + 3 * 32)  # label column + 2 seeds, header + 3 prompts
    for metric in ("dino", "clip_i", "clip_t", "drift"):
        assert Image.open(tmp_path / "eval" / "plots" / f"{metric}.png").size[0] > 0
    assert not list((tmp_path / "eval").rglob(".*tmp*"))  # nothing left half-written

    base = rows[0]
    assert base["drift"] == pytest.approx(0.0, abs=1e-6)
    assert all(-1 <= r[m] <= 1 for r in rows for m in ("dino", "clip_i", "clip_t"))
    # Training moved the weights: its images, and so its drift, differ from the base model's.
    trained = np.asarray(Image.open(tmp_path / "eval" / "images" / "iter_000000002" / "p002_seed0.png"), int)
    untrained = np.asarray(Image.open(tmp_path / "eval" / "images" / "base" / "p002_seed0.png"), int)
    assert np.abs(trained - untrained).mean() > 1
    assert rows[3]["drift"] > 1e-7
    best = max((r for r in rows if r["drift"] <= 0.3), key=lambda r: r["dino"])
    assert record["pick"] == best["candidate"]
    assert f"Best subject fidelity within drift 0.3: {best['candidate']}" in out


def test_numbers_are_reproducible_and_a_copy_of_the_base_does_not_drift(run, tmp_path, tiny_model_dir):
    """Same seeds, same numbers; and the same weights as the base, passed as a checkpoint, make the base's images
    (every candidate starts from the same noise), so their drift is zero and their scores the base's."""
    from diffusers import CosmosTransformer3DModel

    copy = tmp_path / "copy_of_base" / "model"
    CosmosTransformer3DModel.from_pretrained(tiny_model_dir / "transformer").save_pretrained(copy)
    first = evaluate(run, tmp_path / "a", "--ema", "no", "--dit_path", str(copy))
    again = evaluate(run, tmp_path / "b", "--ema", "no", "--dit_path", str(copy))
    metrics = ("dino", "clip_i", "clip_t", "drift")
    assert [[r[m] for m in metrics] for r in first] == [[r[m] for m in metrics] for r in again]
    base, copied = first[0], first[-1]
    assert copied["candidate"] == "copy_of_base"
    assert copied["drift"] == pytest.approx(0.0, abs=1e-6)
    assert [copied[m] for m in ("dino", "clip_i", "clip_t")] == pytest.approx([base[m] for m in
                                                                               ("dino", "clip_i", "clip_t")])


def test_user_mistakes_are_one_line_errors(run, tmp_path, capsys):
    cases = [
        (["--run_dir", str(tmp_path)], "has no checkpoints"),
        (["--run_dir", str(run / "run"), "--subject", SUBJECT, "--reference_dir", str(tmp_path / "nowhere")],
         "does not exist"),
        (["--run_dir", str(run / "run")], "--subject is needed"),
        (["--dit_path", str(run / "run" / "checkpoints" / "iter_000000001"), "--ema", "only", "--model", "tiny",
          "--lora", str(tmp_path / "missing")], "does not exist"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            evaluate_text2image.parse_args(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err.splitlines()[-1], argv


def test_validation_metrics_are_logged_beside_the_validation_images(run, tmp_path, models):
    """--validation_metrics: at each validation, DINO / CLIP-I against the training images and CLIP-T with the
    prompts, in TensorBoard at the validation's step, the numbers of those very images."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prompts = [f"An image of {SUBJECT}.", "a cat"]
    train("--model", "tiny", "--lora", "--dataset_dir", run / "data", "--output_dir", tmp_path / "run",
          "--max_iter", "2", "--save_iter", "0", "--validation_prompt", prompts[0], "--validation_prompt", prompts[1],
          "--validation_steps", "1", "--validation_num_inference_steps", "2", "--validation_metrics",
          "--dataloader_num_workers", "0", "--mixed_precision", "no")
    events = EventAccumulator(str(tmp_path / "run" / "logs" / "cosmos-predict2-text2image"))
    events.Reload()
    references = [Image.open(p).convert("RGB") for p in sorted((run / "data").glob("*.png"))]
    for iteration in (1, 2):
        images = [Image.open(tmp_path / "run" / "validation" / f"iter_{iteration:09d}_{k}.jpg") for k in range(2)]
        expected = fidelity.subject_metrics(models, images, prompts, models.embed(references))
        for name in ("dino", "clip_i", "clip_t"):
            logged = {e.step: e.value for e in events.Scalars(f"validation/{name}")}
            # The logged numbers are of the images before JPEG compression.
            assert logged[iteration] == pytest.approx(expected[name], abs=0.02), (name, iteration)


def test_validation_metrics_need_training_images(tmp_path):
    import train_text2image

    with pytest.raises(ValueError, match="--validation_metrics.*--validation_prompt"):
        train_text2image.parse_args(["--dataset_dir", str(tmp_path), "--validation_metrics"])


def test_a_lora_at_several_scales(run, tmp_path):
    """Each --lora is a candidate at each --lora_scale: scale 0 is the base model exactly, scale 1 is not."""
    from infer_helpers import make_lora_checkpoint

    lora = make_lora_checkpoint(tmp_path / "lora_run", ema=False)
    rows = evaluate(run, tmp_path / "eval", "--ema", "no", "--model", "tiny", "--lora", str(lora),
                    "--lora_scale", "0", "1", "--num_images_per_prompt", "1")
    assert [r["candidate"] for r in rows][-2:] == ["iter_000000500_x0", "iter_000000500_x1"]
    base, zero, one = rows[0], rows[-2], rows[-1]
    assert zero["lora_scale"] == 0 and one["lora_scale"] == 1 and zero["iteration"] == 500
    assert zero["drift"] == pytest.approx(0.0, abs=1e-6) and zero["dino"] == pytest.approx(base["dino"])
    assert one["drift"] > 1e-7
