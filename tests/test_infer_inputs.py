"""What infer_text2image.py and export_checkpoint.py make of their inputs: --load_ema reaches --lora, a LoRA run
names its base model, every error about a file names it (corrupt, missing, a path that is not a Hub id), seeds are
checked, and a prompt list's outputs are all checked before the first image."""

import json
import os
import shlex

import numpy as np
import pytest
import torch
from infer_helpers import PROMPT, make_full_checkpoint, make_lora_checkpoint
from PIL import Image

import export_checkpoint
import infer_text2image as infer
from cosmos_t2i import local_paths
from cosmos_t2i.cli import SEED_MAX

FAST = ["--num_steps", "2", "--dtype", "float32"]


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    """A LoRA run trained from --model tiny (its trainer/config.json says so), with an EMA adapter."""
    return make_lora_checkpoint(tmp_path_factory.mktemp("lora_run"))


def infer_main(*argv):
    infer.main(infer.parse_args([*FAST, *map(str, argv)]))


def image(path):
    return np.asarray(Image.open(path))


def test_load_ema_with_lora_uses_the_ema_adapter(lora_run, tmp_path):
    infer_main("--model", "tiny", "--lora", lora_run, "--load_ema", "--prompt", PROMPT, "--save_path", tmp_path / "a.png")
    infer_main("--model", "tiny", "--dit_path", lora_run, "--load_ema", "--prompt", PROMPT,
               "--save_path", tmp_path / "b.png")
    infer_main("--model", "tiny", "--lora", lora_run, "--prompt", PROMPT, "--save_path", tmp_path / "c.png")
    assert np.array_equal(image(tmp_path / "a.png"), image(tmp_path / "b.png"))  # the EMA adapter, as --dit_path
    assert not np.array_equal(image(tmp_path / "a.png"), image(tmp_path / "c.png"))
    sidecar = json.loads((tmp_path / "a.json").read_text())
    assert [lora["ema"] for lora in sidecar["loras"]] == [True]
    assert sidecar["loras"][0]["path"].endswith("model/ema/pytorch_lora_weights.safetensors")
    assert "--load_ema" in shlex.split(sidecar["command"])  # its command makes the same image again
    with pytest.raises(ValueError, match="single LoRA file, with no EMA"):  # refused, not silently ignored
        infer_main("--model", "tiny", "--lora", lora_run / "model" / "pytorch_lora_weights.safetensors", "--load_ema",
                   "--prompt", PROMPT, "--save_path", tmp_path / "d.png")


def test_lora_without_model_uses_the_runs_model(lora_run, tmp_path):
    # Named by its run, its iteration, its model/ folder or its file: each finds the run's trainer/config.json.
    for i, source in enumerate([lora_run.parent.parent, lora_run / "model",
                                lora_run / "model" / "pytorch_lora_weights.safetensors"]):
        infer_main("--lora", source, "--prompt", PROMPT, "--save_path", tmp_path / f"{i}.png")
        assert json.loads((tmp_path / f"{i}.json").read_text())["model"] == "tiny"


def test_export_diffusers_finds_the_lora_runs_model(lora_run, tmp_path):
    for i, source in enumerate([lora_run / "model" / "pytorch_lora_weights.safetensors", lora_run / "model" / "ema"]):
        export_checkpoint.main(export_checkpoint.parse_args(
            ["diffusers", "--lora", str(source), "--output", str(tmp_path / f"merged{i}"), "--dtype", "float32"]))
        assert (tmp_path / f"merged{i}" / "config.json").is_file()


def test_corrupt_files_are_named(lora_run, tmp_path):
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes((lora_run / "model" / "pytorch_lora_weights.safetensors").read_bytes()[:200])
    with pytest.raises(ValueError, match=f"LoRA {lora} cannot be read .*damaged or incomplete"):
        infer_main("--model", "tiny", "--lora", lora, "--prompt", PROMPT, "--save_path", tmp_path / "x.png")

    full = make_full_checkpoint(tmp_path / "full", ema=False)
    weights = full / "model" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"Checkpoint {full} cannot be read .*diffusion_pytorch_model.safetensors"):
        infer_main("--model", "tiny", "--dit_path", full, "--prompt", PROMPT, "--save_path", tmp_path / "x.png")

    nvidia = tmp_path / "iter_000000500.pt"
    torch.save({"net.x": torch.zeros(1000)}, nvidia)
    nvidia.write_bytes(nvidia.read_bytes()[:300])
    with pytest.raises(ValueError, match=f"NVIDIA checkpoint {nvidia} cannot be read"):
        infer_main("--model", "tiny", "--dit_path", nvidia, "--prompt", PROMPT, "--save_path", tmp_path / "x.png")


def test_paths_that_look_local_never_go_to_the_hub(tiny_model_dir, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("asked the Hub"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in ["runs/lora", "./lora", "../lora", "a/b/c", "~/no-such-lora"]:
        assert local_paths.looks_local(name) and not local_paths.is_hub_id(name)
        with pytest.raises(FileNotFoundError, match=f"LoRA {name} does not exist .*not looked up on the Hub"):
            infer_main("--model", "tiny", "--lora", name, "--prompt", PROMPT, "--save_path", "x.png")
    assert local_paths.is_hub_id("your-name/style-lora") and local_paths.is_hub_id("nvidia/Cosmos-Predict2-2B-Text2Image")


def test_missing_model_folder_is_named(tmp_path):
    folder = tmp_path / "models" / "my_pipeline"
    with pytest.raises(FileNotFoundError, match=f"Model folder {folder} does not exist"):  # not the guardrail
        infer_main("--model", folder, "--prompt", PROMPT, "--save_path", tmp_path / "x.png")


def test_seeds_are_checked(tiny_model_dir, tmp_path, capsys):
    for seed in ["-1", str(SEED_MAX + 1), "1.5"]:
        with pytest.raises(SystemExit):
            infer.parse_args(["--model", "tiny", "--prompt", PROMPT, "--seed", seed])
        assert "is not a seed: expected an integer from 0 to 4294967295" in capsys.readouterr().err
    items = [{"prompt": PROMPT, "output_image": str(tmp_path / "a.png"), "seed": SEED_MAX},
             {"prompt": PROMPT, "output_image": str(tmp_path / "b.png"), "seed": "seven"},
             {"prompt": PROMPT, "output_image": str(tmp_path / "c.png"), "seed": -3}]
    batch = tmp_path / "prompts.json"
    batch.write_text(json.dumps(items))
    with pytest.raises(ValueError, match=f"{batch}: item 1: seed 'seven' is not an integer from 0 to {SEED_MAX}; "
                                         f"item 2: seed -3 is not"):
        infer_main("--model", "tiny", "--batch_input_json", batch)
    batch.write_text(json.dumps(items[:1]))
    infer_main("--model", "tiny", "--batch_input_json", batch, "--sampler", "nvidia")  # numpy's largest seed works
    assert json.loads((tmp_path / "a.json").read_text())["seed"] == SEED_MAX


def test_a_prompt_list_checks_every_output_before_the_first_image(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "not_a_folder").write_text("a file")
    items = [{"prompt": PROMPT, "output_image": str(tmp_path / "ok" / "a.png")},
             {"prompt": PROMPT, "output_image": str(tmp_path / "not_a_folder" / "b.png")},
             {"prompt": PROMPT, "output_image": str(tmp_path / "c.gif2")}]
    batch = tmp_path / "prompts.json"
    batch.write_text(json.dumps(items))
    with pytest.raises(ValueError, match=f"item 1: cannot write {tmp_path / 'not_a_folder' / 'b.png'}: "
                                         f"{tmp_path / 'not_a_folder'} is a file, not a folder; item 2: .*c.gif2 has "
                                         "no image extension"):
        infer_main("--model", "tiny", "--batch_input_json", batch)
    assert not (tmp_path / "ok").exists()  # nothing was sampled

    if os.geteuid() != 0:  # root writes into read-only folders
        read_only = tmp_path / "read_only"
        read_only.mkdir()
        read_only.chmod(0o555)
        batch.write_text(json.dumps([items[0], {"prompt": PROMPT, "output_image": str(read_only / "b.png")}]))
        with pytest.raises(ValueError, match=f"item 1: cannot write {read_only / 'b.png'}: cannot write in"):
            infer_main("--model", "tiny", "--batch_input_json", batch)
        assert not (tmp_path / "ok").exists()

    # Each image's path is printed as it is written.
    batch.write_text(json.dumps([items[0], {"prompt": PROMPT, "output_image": str(tmp_path / "ok" / "b.jpg")}]))
    capsys.readouterr()
    infer_main("--model", "tiny", "--batch_input_json", batch)
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'ok' / 'a.png'}" in out and f"wrote {tmp_path / 'ok' / 'b.jpg'}" in out


def test_the_guardrail_refusing_the_only_prompt_is_one_line(tiny_model_dir, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise ValueError(f"{infer.UNSAFE_TEXT} in the prompt: {PROMPT}.")

    monkeypatch.setattr(infer, "generate", refuse)
    with pytest.raises(ValueError, match=f"{tmp_path / 'x.png'} not written: Cosmos Guardrail") as error:
        infer_main("--model", "tiny", "--prompt", PROMPT, "--save_path", tmp_path / "x.png")
    from cosmos_t2i.user_errors import UserError

    assert isinstance(error.value, UserError)
