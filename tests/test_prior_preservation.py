"""Prior preservation (--class_prompt ...): the flags, the class images (generated once, resumable, embedded like
the training set), batches that mix both kinds, the weighted loss, and a tiny run that resumes exactly."""

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import assert_same_training, make_dataset, pattern_image, train, weights

import train_text2image
from cosmos_t2i import checkpoint as ckpt
from cosmos_t2i import dataset_format as fmt
from cosmos_t2i import embedding, prior_preservation, sampling
from cosmos_t2i.models import resolve_model
from cosmos_t2i.objective import diffusion_loss
from cosmos_t2i.prior_preservation import PriorBatchSampler, plan_buckets, prior_preservation_loss
from cosmos_t2i.training_data import EmbeddedImages
from cosmos_t2i.user_errors import UserError

CLASS_PROMPT = "An image of a robot."


# Two buckets: two 1:1 images and one 16:9.
IMAGES = [(pattern_image(64, 64, 0), "An image of sks teal robot."),
          (pattern_image(64, 64, 1), "An image of sks teal robot."),
          (pattern_image(96, 48, 2), "An image of sks teal robot.")]


@pytest.fixture(scope="module")
def dataset(tiny_model_dir, tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("prior") / "data", IMAGES, cache_latents=True)


@pytest.fixture(scope="module")
def pixel_dataset(tiny_model_dir, tmp_path_factory):
    """Without cached latents: the instance half is VAE-encoded in the loop, the class half comes cached."""
    return make_dataset(tmp_path_factory.mktemp("prior_pixels") / "data", IMAGES)


# ----------------------------------------------------------------------------------------------------------------
# Flags


@pytest.mark.parametrize("flags, message", [
    (["--class_prompt", CLASS_PROMPT], "--class_prompt needs --class_data_dir"),
    (["--class_data_dir", "cls"], "--class_data_dir configure prior preservation.*add --class_prompt"),
    (["--num_class_images", "5", "--prior_loss_weight", "2"], "--num_class_images and --prior_loss_weight"),
    (["--class_prompt", CLASS_PROMPT, "--class_data_dir", "cls", "--num_class_images", "0"], "at least 1"),
    (["--class_prompt", CLASS_PROMPT, "--class_data_dir", "cls", "--prior_loss_weight", "0"], "weight > 0"),
    (["--class_prompt", " ", "--class_data_dir", "cls"], "--class_prompt is empty"),
    (["--class_prompt", CLASS_PROMPT, "--class_data_dir", "data"], "is the --dataset_dir"),
])
def test_inconsistent_flags_are_one_line_user_errors(flags, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=message):
        train_text2image.parse_args(["--model", "tiny", "--dataset_dir", "data", *flags])


def test_defaults_fill_in_only_when_prior_preservation_is_on(capsys):
    on = train_text2image.parse_args(["--model", "tiny", "--dataset_dir", "d", "--class_prompt", CLASS_PROMPT,
                                      "--class_data_dir", "c"])
    assert (on.num_class_images, on.prior_loss_weight) == (100, 1.0)
    off = train_text2image.parse_args(["--model", "tiny", "--dataset_dir", "d"])
    # None when off: the run config equals one saved before these flags existed, so such runs still resume.
    assert (off.class_prompt, off.class_data_dir, off.num_class_images, off.prior_loss_weight) == (None,) * 4
    with pytest.raises(SystemExit):
        train_text2image.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default 100)" in help_text and "(default 1.0)" in help_text


# ----------------------------------------------------------------------------------------------------------------
# Class images


def test_generated_class_images_follow_the_instance_buckets():
    instance = ["1:1"] * 6 + ["16:9"] * 3 + ["9:16"]
    assert Counter_(plan_buckets(10, instance)) == {"1:1": 6, "16:9": 3, "9:16": 1}
    assert Counter_(plan_buckets(4, instance)) == {"1:1": 2, "16:9": 1, "9:16": 1}  # every bucket at least once
    assert len(plan_buckets(7, instance)) == 7 and plan_buckets(0, instance) == []


def Counter_(items):
    from collections import Counter

    return dict(Counter(items))


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _one_process():
    return SimpleNamespace(is_main_process=True, process_index=0, num_processes=1, device=torch.device("cpu"),
                           wait_for_everyone=lambda: None)


def test_class_images_are_generated_once_resume_after_an_interruption_and_are_reused(dataset, tmp_path,
                                                                                     monkeypatch):
    model = resolve_model("tiny")
    instance = EmbeddedImages(dataset, model.resolutions)
    folder = tmp_path / "class"
    args = SimpleNamespace(class_data_dir=str(folder), class_prompt=CLASS_PROMPT, num_class_images=3,
                           model="tiny", random_init=False, dataset_dir=str(dataset))
    generated, embedded = [], []
    generate, build = sampling.generate, embedding.build_embedded

    def counted_generate(pipe, prompt, negative, height, width, *rest, seed, **kwargs):
        generated.append((prompt, width, height, seed))
        if fail_after is not None and len(generated) > fail_after:
            raise RuntimeError("interrupted")
        return generate(pipe, prompt, negative, height, width, *rest, seed=seed, **kwargs)

    monkeypatch.setattr(sampling, "generate", counted_generate)
    monkeypatch.setattr(embedding, "build_embedded", lambda *a, **k: embedded.append(1) or build(*a, **k))

    fail_after = 1  # the first run dies while making its second image
    with pytest.raises(RuntimeError, match="interrupted"):
        prior_preservation.prepare_class_data(args, model, instance, _one_process())
    assert sorted(p.name for p in folder.iterdir()) == ["class_00000.png"]  # whole images only
    stale = folder / f".class_00002.tmp-{_dead_pid()}.png"  # what a killed run's atomic write leaves
    stale.write_bytes(b"half a png")

    fail_after, generated[:] = None, []
    classes = prior_preservation.prepare_class_data(args, model, instance, _one_process())
    # Only the two missing images were made, at the instance set's buckets in its proportions (image k: seed k).
    assert [(w, h, seed) for _, w, h, seed in generated] == [(64, 64, 1), (64, 64, 2)]
    assert {prompt for prompt, *_ in generated} == {CLASS_PROMPT}
    assert not stale.exists()
    assert sorted(p.name for p in folder.iterdir()) == ["class_00000.png", "class_00001.png", "class_00002.png",
                                                        "embedded", "metadata.jsonl"]
    assert len(embedded) == 1 and len(classes) == 3 and classes.cached_latents
    assert classes.buckets == ["16:9", "1:1", "1:1"]
    assert Image.open(folder / "class_00000.png").size == (96, 48)  # the model's 16:9 resolution
    rows = fmt.load_embedded_dataset(folder)
    assert set(rows[fmt.TEXT_COLUMN]) == {CLASS_PROMPT}
    # Embedded like the training set: the same T5 gives the class prompt the same embedding as it would there.
    assert fmt.read_info(folder)["dtype"] == fmt.read_info(dataset)["dtype"]

    generated[:] = []
    prior_preservation.prepare_class_data(args, model, instance, _one_process())
    assert generated == [] and len(embedded) == 1  # reused: nothing generated or embedded again

    args.class_prompt = "An image of a machine."  # a new prompt re-captions and re-embeds, without generating
    prior_preservation.prepare_class_data(args, model, instance, _one_process())
    assert generated == [] and len(embedded) == 2
    assert set(fmt.load_embedded_dataset(folder)[fmt.TEXT_COLUMN]) == {"An image of a machine."}


def test_a_class_folder_that_cannot_be_written_is_one_line_before_the_base_model_loads(dataset, tmp_path,
                                                                                        monkeypatch):
    model = resolve_model("tiny")
    instance = EmbeddedImages(dataset, model.resolutions)
    (tmp_path / "a_file").write_text("")
    folder = tmp_path / "a_file" / "class"  # cannot be created, also for root
    args = SimpleNamespace(class_data_dir=str(folder), class_prompt=CLASS_PROMPT, num_class_images=2,
                           model="tiny", random_init=False, dataset_dir=str(dataset))
    monkeypatch.setattr(sampling, "generate", lambda *a, **k: pytest.fail("the base model sampled"))
    with pytest.raises(PermissionError) as error:
        prior_preservation.prepare_class_data(args, model, instance, _one_process())
    message = str(error.value)
    assert message.startswith(f"--class_data_dir {folder} cannot be written") and "\n" not in message
    assert isinstance(error.value, UserError)


def test_own_class_images_count_and_every_instance_bucket_needs_some(dataset, tmp_path):
    model = resolve_model("tiny")
    instance = EmbeddedImages(dataset, model.resolutions)
    folder = tmp_path / "class"
    folder.mkdir()
    for i in range(3):
        pattern_image(64, 64, 10 + i).save(folder / f"mine_{i}.jpg")  # all 1:1
    with pytest.raises(UserError, match="aspect ratios 16:9.*--num_class_images to at least 5"):
        prior_preservation.missing_class_images(folder, 3, instance.buckets, model.resolutions)
    missing = prior_preservation.missing_class_images(folder, 5, instance.buckets, model.resolutions)
    assert missing == [(0, "16:9"), (1, "1:1")]  # 5 - 3 own images, every instance bucket covered


# ----------------------------------------------------------------------------------------------------------------
# Batches and loss


def test_each_batch_holds_instance_and_class_images_of_one_bucket_in_equal_numbers():
    instance = ["1:1", "1:1", "1:1", "16:9", "16:9"]
    classes = ["1:1"] * 4 + ["16:9"] * 3
    batch_size, n = 2, len(instance)

    def stream(start=0, replicas=1, rank=0, count=12):
        sampler = PriorBatchSampler(instance, classes, batch_size, seed=3, num_replicas=replicas, rank=rank,
                                    start=start)
        return [next(it) for it in [iter(sampler)] for _ in range(count)]

    batches = stream()
    for batch in batches:
        own, cls = batch[:batch_size], batch[batch_size:]
        assert len(own) == len(cls) == batch_size  # the stated ratio: train_batch_size of each
        assert all(i < n for i in own) and all(i >= n for i in cls)
        assert len({instance[i] for i in own} | {classes[i - n] for i in cls}) == 1  # one bucket: they stack
    # Deterministic, resumable from any position, and the same global stream on two processes.
    assert stream() == batches
    assert stream(start=5, count=7) == batches[5:]
    two = [stream(replicas=2, rank=r, count=6) for r in (0, 1)]
    assert [b for pair in zip(*two) for b in pair] == batches
    # Every class image of a bucket comes up once per pass through that bucket's class images.
    one_bucket = PriorBatchSampler(["1:1"] * 3, ["1:1"] * 4, 2, seed=0)
    drawn = [i for batch, _ in zip(one_bucket, range(2)) for i in batch[2:]]
    assert sorted(drawn) == [3, 4, 5, 6]


def test_loss_is_instance_loss_plus_weight_times_class_loss(tiny_model_dir):
    from diffusers import CosmosTransformer3DModel

    transformer = CosmosTransformer3DModel.from_pretrained(tiny_model_dir, subfolder="transformer").eval()
    g = torch.Generator().manual_seed(0)
    x0, class_x0 = torch.randn(2, 16, 1, 8, 8, generator=g), torch.randn(2, 16, 1, 8, 8, generator=g)
    embeds, class_embeds = torch.randn(2, 512, 32, generator=g), torch.randn(2, 512, 32, generator=g)

    def mixed(weight):
        total, halves = prior_preservation_loss(transformer, x0, embeds, torch.Generator().manual_seed(1), class_x0,
                                                class_embeds, torch.Generator().manual_seed(2), weight,
                                                text_dropout=0.5)
        torch.testing.assert_close(total, halves["loss_instance"] + weight * halves["loss_class"])
        return total

    with torch.no_grad():
        # The two losses computed separately, each by the plain objective with its own generator.
        instance = diffusion_loss(transformer, x0, embeds, torch.Generator().manual_seed(1), text_dropout=0.5)
        prior = diffusion_loss(transformer, class_x0, class_embeds, torch.Generator().manual_seed(2),
                               text_dropout=0.5)
        torch.testing.assert_close(mixed(0.5), instance + 0.5 * prior, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mixed(2.0), instance + 2.0 * prior, rtol=1e-5, atol=1e-6)
        # The halves the trainer logs are the two plain losses.
        _, halves = prior_preservation_loss(transformer, x0, embeds, torch.Generator().manual_seed(1), class_x0,
                                            class_embeds, torch.Generator().manual_seed(2), 1.0, text_dropout=0.5)
        torch.testing.assert_close(halves["loss_instance"], instance, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(halves["loss_class"], prior, rtol=1e-5, atol=1e-6)
    assert abs(prior - instance) > 1e-3  # the weight matters


# ----------------------------------------------------------------------------------------------------------------
# Training


def _logged(output_dir, tags) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output_dir / "logs" / "cosmos-predict2-text2image"))
    events.Reload()
    return {tag: np.array([e.value for e in events.Scalars(tag)]) for tag in tags}


def _flags(dataset, output_dir, class_dir, lora, *more):
    return ["--model", "tiny", "--dataset_dir", dataset, "--output_dir", output_dir, "--max_iter", 4,
            "--save_iter", 2, "--train_batch_size", 1, "--learning_rate", "1e-3", "--dataloader_num_workers", 0,
            "--report_to", "none", "--class_prompt", CLASS_PROMPT, "--class_data_dir", class_dir,
            "--num_class_images", 2, *(["--lora", "--mixed_precision", "bf16"] if lora else
                                       ["--mixed_precision", "no"]), *more]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_a_run_with_prior_preservation_trains_and_resumes_exactly(dataset, pixel_dataset, tmp_path, monkeypatch,
                                                                  lora):
    dataset = dataset if lora else pixel_dataset
    generated, halves = [], []
    generate_images, loss = prior_preservation.generate_class_images, prior_preservation.prior_preservation_loss
    monkeypatch.setattr(prior_preservation, "generate_class_images",
                        lambda model, jobs, *a, **k: generated.extend(jobs) or generate_images(model, jobs, *a, **k))
    monkeypatch.setattr(prior_preservation, "prior_preservation_loss",
                        lambda t, x0, e, g, cx0, *a, **k: halves.append((len(x0), len(cx0))) or loss(t, x0, e, g, cx0,
                                                                                                   *a, **k))
    class_dir = tmp_path / "class"
    straight = train(*_flags(dataset, tmp_path / "straight", class_dir, lora, "--report_to", "tensorboard"))
    assert len(generated) == 2 and halves == [(1, 1)] * 4  # one instance and one class image per micro-step
    logged = _logged(tmp_path / "straight", ("loss", "loss_instance", "loss_class"))
    assert all(len(v) == 4 for v in logged.values())  # the two halves beside the total, every step
    np.testing.assert_allclose(logged["loss"], logged["loss_instance"] + logged["loss_class"], rtol=1e-4)

    middle = straight.parent / ckpt.iter_name(2)
    shutil.copytree(middle, tmp_path / "copy")
    generated[:], halves[:] = [], []
    resumed = train(*_flags(dataset, tmp_path / "resumed", class_dir, lora, "--resume_from_checkpoint",
                            tmp_path / "copy"))
    assert generated == [] and len(halves) == 2  # the class images were reused; only iterations 3 and 4 ran
    assert resumed.name == straight.name
    if lora:
        from safetensors.torch import load_file

        def tensors(c):
            return load_file(str(c / "model" / "pytorch_lora_weights.safetensors"))
    else:
        tensors = weights
    final, earlier = tensors(straight), tensors(middle)
    for name, tensor in final.items():
        torch.testing.assert_close(tensors(resumed)[name], tensor, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(final[k], earlier[k]) for k in final)  # it trained after the checkpoint
    config = ckpt.read_config(straight)
    assert (config["class_prompt"], config["num_class_images"], config["prior_loss_weight"]) == (CLASS_PROMPT, 2, 1.0)

    with pytest.raises(ValueError, match="prior_loss_weight: 1.0 there, 0.5 now"):
        train(*_flags(dataset, tmp_path / "resumed", class_dir, lora, "--prior_loss_weight", "0.5"))
    assert os.listdir(class_dir)  # untouched


def test_two_processes_split_the_generation_and_train_as_one_process_does(dataset, tmp_path, monkeypatch):
    """torchrun with two CPU processes (gloo): each generates its share of the class images, the main process
    embeds them, and the run equals one process accumulating the same two batches a step."""
    root = Path(__file__).resolve().parents[1]
    class_dir = tmp_path / "class"
    flags = [str(f) for f in _flags(dataset, tmp_path / "two", class_dir, False, "--max_iter", 1)]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(root / "train_text2image.py"), *flags], env=env, cwd=root, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Generating 2 class images" in result.stderr
    assert "(1 on process 0)" in result.stderr and "(1 on process 1)" in result.stderr
    assert len(list(class_dir.glob("class_*.png"))) == 2

    generated = []
    monkeypatch.setattr(prior_preservation, "generate_class_images", lambda *a, **k: generated.append(1))
    one = train(*_flags(dataset, tmp_path / "one", class_dir, False, "--max_iter", 1,
                        "--gradient_accumulation_steps", 2))
    assert generated == []
    assert_same_training(ckpt.latest_checkpoint(tmp_path / "two"), one)


def test_the_model_card_names_prior_preservation():
    import train_text2image
    from cosmos_t2i.methods import LoraFineTune

    config = dict(model="tiny", max_iter=4, train_batch_size=1, gradient_accumulation_steps=1, world_size=1,
                  learning_rate=1e-3, lr_start_factor=1.0, adam_beta1=0.9, adam_beta2=0.99, adam_epsilon=1e-8,
                  weight_decay=0.1, max_grad_norm=1.0, ema=True, ema_sigma_rel=0.1, mixed_precision="bf16",
                  text_dropout=0.2, rank=16, lora_alpha=16)
    method = LoraFineTune(16, 16)
    assert "prior preservation" not in train_text2image.recipe_summary(config, method)
    config.update(class_prompt=CLASS_PROMPT, num_class_images=100, prior_loss_weight=1.0)
    line = train_text2image.recipe_summary(config, method)["prior preservation"]
    assert CLASS_PROMPT in line and "100 class images" in line and "1.0" in line
