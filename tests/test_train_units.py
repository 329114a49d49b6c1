"""Pieces of training checked against their definitions: EMA, lr schedule, recipe, sampler, collate, checkpoints,
model card."""

import json
import os
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cosmos_t2i import checkpoint as ckpt
from cosmos_t2i import hub
from cosmos_t2i.ema import PowerEMA, gamma_from_sigma_rel
from cosmos_t2i.models import PRESETS
from cosmos_t2i.methods import TRANSFORMER_WEIGHTS, FullFineTune, LoraFineTune, read_transformer_weights
from cosmos_t2i.recipe import apply_defaults, config_differences, linear_decay
from cosmos_t2i.training_data import BucketBatchSampler, collate


def test_power_ema_gamma_is_the_root_of_nvidia_cubic():
    gamma = gamma_from_sigma_rel(0.1)
    s2 = 0.1**-2
    assert abs(gamma**3 + 7 * gamma**2 + (16 - s2) * gamma + (12 - s2)) < 1e-9
    assert gamma == pytest.approx(6.94, abs=0.005)
    # EDM2's relation: sigma_rel = sqrt((g + 1) / ((g + 2)^2 (g + 3))).
    assert math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) == pytest.approx(0.1, rel=1e-9)


def test_power_ema_update_follows_the_formula():
    param = torch.nn.Parameter(torch.zeros(3))
    ema = PowerEMA([("w", param)])
    gamma, expected = ema.gamma, torch.zeros(3, dtype=torch.float64)
    for it in range(6):
        with torch.no_grad():
            param.copy_(torch.tensor([1.0, -2.0, 0.5]) * (it + 1))
        ema.update(it)
        beta = (1 - 1 / (it + 1)) ** (gamma + 1)
        expected = beta * expected + (1 - beta) * param.detach().double()
        torch.testing.assert_close(ema.shadow["w"].double(), expected, rtol=1e-6, atol=1e-6)
    assert ema.beta(0) == 0.0  # the first update copies the weights, as NVIDIA's
    assert ema.shadow["w"].dtype == torch.float32


def test_ema_tracks_only_trainable_parameters_in_fp32():
    frozen = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16), requires_grad=False)
    adapter = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    ema = PowerEMA([("base", frozen), ("lora", adapter)])
    assert list(ema.shadow) == ["lora"] and ema.shadow["lora"].dtype == torch.float32


@pytest.mark.parametrize("model, peak", [("2B", 5.19e-6), ("14B", 1.73e-5)])
def test_nvidia_recipe_defaults(model, peak):
    args = SimpleNamespace(learning_rate=None, lr_start_factor=None, weight_decay=None, lora=False, rank=None,
                           lora_alpha=None)
    apply_defaults(args, PRESETS[model], FullFineTune())
    assert args.learning_rate * args.lr_start_factor == pytest.approx(peak, rel=3e-3)
    assert args.weight_decay == {"2B": 0.1, "14B": 0.2}[model]
    factor = linear_decay(1000, args.lr_start_factor)
    assert factor(0) == args.lr_start_factor and factor(500) == pytest.approx(args.lr_start_factor / 2)
    assert factor(1000) == 0

    lora = SimpleNamespace(**dict(vars(args), learning_rate=None, lr_start_factor=None, lora=True))
    apply_defaults(lora, PRESETS[model], LoraFineTune(16, 16))
    assert (lora.learning_rate, lora.lr_start_factor) == (1e-4, 1.0)


def test_config_differences_ignore_what_does_not_change_the_run():
    saved = {"model": "2B", "learning_rate": 1e-4, "output_dir": "a", "validation_prompt": ["x"]}
    assert config_differences(saved, dict(saved, output_dir="b", validation_prompt=None)) == []
    assert config_differences(saved, dict(saved, learning_rate=2e-4, seed=1)) == ["learning_rate", "seed"]


def test_sampler_batches_one_bucket_each_deterministic_and_resumable():
    buckets = ["1:1"] * 5 + ["16:9"] * 3 + ["9:16"]
    sampler = BucketBatchSampler(buckets, batch_size=2, seed=3)
    stream = [b for _, b in zip(range(40), sampler)]
    assert all(len(b) == 2 and len({buckets[i] for i in b}) == 1 for b in stream)
    assert stream == [b for _, b in zip(range(40), BucketBatchSampler(buckets, 2, seed=3))]
    assert stream != [b for _, b in zip(range(40), BucketBatchSampler(buckets, 2, seed=4))]
    # An epoch covers every image; resuming at a position continues the very same stream.
    per_epoch = sampler.batches_per_epoch
    assert set(sum(stream[:per_epoch], [])) == set(range(len(buckets)))
    assert [b for _, b in zip(range(10), BucketBatchSampler(buckets, 2, seed=3, start=17))] == stream[17:27]
    # Two ranks split the single-process stream between them.
    ranks = [BucketBatchSampler(buckets, 2, seed=3, num_replicas=2, rank=r) for r in range(2)]
    rank_streams = [[b for _, b in zip(range(20), s)] for s in ranks]
    assert rank_streams[0] == stream[0::2] and rank_streams[1] == stream[1::2]


def test_collate_pads_t5_to_512_with_zeros():
    items = [{"t5": torch.ones(n, 8, dtype=torch.float16), "latents": torch.randn(16, 1, 4, 6)} for n in (3, 7)]
    batch = collate(items)
    assert batch["text_embeds"].shape == (2, 512, 8) and batch["latents"].shape == (2, 16, 1, 4, 6)
    assert batch["text_embeds"][0, :3].eq(1).all() and batch["text_embeds"][0, 3:].eq(0).all()
    assert batch["text_embeds"][1, :7].eq(1).all() and batch["text_embeds"][1, 7:].eq(0).all()


class OneProcess:
    """The parts of an Accelerator that save_checkpoint uses, for one process."""

    is_main_process = True
    process_index = 0
    num_processes = 1

    def __init__(self):
        from accelerate.utils import DistributedType

        self.distributed_type = DistributedType.NO

    def wait_for_everyone(self):
        pass


def _save(output_dir, iteration, save_model=None, total_limit=None):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_decay(10, 1.0))
    save_model = save_model or (lambda d: (d.mkdir(), (d / "weights").write_text(str(iteration))))
    return ckpt.save_checkpoint(OneProcess(), output_dir, iteration, save_model=save_model, model=model,
                                optimizer=optimizer, scheduler=scheduler, state={"data_position": iteration},
                                config={"model": "tiny"}, total_limit=total_limit)


def test_checkpoint_layout_and_keep_last_n(tmp_path):
    for iteration in (1, 2, 3):
        _save(tmp_path, iteration, total_limit=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["iter_000000002", "iter_000000003", "latest_checkpoint.txt"]
    assert (root / "latest_checkpoint.txt").read_text().strip() == "iter_000000003"
    latest = ckpt.latest_checkpoint(tmp_path)
    assert sorted(p.name for p in latest.iterdir()) == ["model", "optim", "scheduler", "trainer"]
    assert json.loads((latest / "trainer" / "config.json").read_text()) == {"model": "tiny"}
    assert ckpt.read_state(latest) == {"data_position": 3, "iteration": 3}


def test_crash_mid_save_leaves_the_previous_checkpoint_in_charge(tmp_path):
    _save(tmp_path, 1)

    def crash(directory):
        directory.mkdir()
        (directory / "half_written").write_text("...")
        raise OSError("disk full")

    with pytest.raises(OSError):
        _save(tmp_path, 2, save_model=crash)
    assert ckpt.latest_checkpoint(tmp_path).name == "iter_000000001"
    assert not (tmp_path / "checkpoints" / "iter_000000002").exists()
    _save(tmp_path, 3)  # the next save clears the leftover
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "iter_000000001", "iter_000000003", "latest_checkpoint.txt"]


@pytest.mark.parametrize("moved", [False, True], ids=["before-first-rename", "after-first-rename"])
def test_saving_the_same_iteration_again_never_leaves_latest_naming_nothing(tmp_path, monkeypatch, moved):
    _save(tmp_path, 1, save_model=lambda d: (d.mkdir(), (d / "weights").write_text("old")))
    real_replace = os.replace

    def killed(src, dst):  # the process dies at the first rename of the finished checkpoint
        if moved:
            real_replace(src, dst)
        raise OSError("killed")

    monkeypatch.setattr(os, "replace", killed)  # in atomic.replace_folder
    with pytest.raises(OSError, match="killed"):
        _save(tmp_path, 1, save_model=lambda d: (d.mkdir(), (d / "weights").write_text("new")))
    monkeypatch.undo()
    survivor = ckpt.latest_checkpoint(tmp_path)  # still the complete old copy, wherever it is
    assert (survivor / "model" / "weights").read_text() == "old"
    again = _save(tmp_path, 1)  # a rerun puts the new one in place and tidies up
    assert again.name == "iter_000000001" and ckpt.latest_checkpoint(tmp_path) == again
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter_000000001", "latest_checkpoint.txt"]


def test_transformer_weights_read_each_tensor_from_its_shard_file(tmp_path):
    from huggingface_hub import save_torch_state_dict

    tensors = {f"block_{i}.weight": torch.randn(64, 64) for i in range(4)}
    save_torch_state_dict(tensors, tmp_path, filename_pattern=TRANSFORMER_WEIGHTS, max_shard_size="40KB")
    assert len(list(tmp_path.glob("diffusion_pytorch_model-*.safetensors"))) == 2  # two 16 KB tensors a file
    read = read_transformer_weights(tmp_path)
    assert sorted(read) == sorted(tensors) and len(read) == 4
    for name, tensor in tensors.items():
        assert torch.equal(read[name], tensor)
    with pytest.raises(KeyError):
        read["missing.weight"]


def test_model_card_and_upload_folder(tmp_path):
    model_dir = tmp_path / "iter_000000100" / "model"
    (model_dir / "ema").mkdir(parents=True)
    (model_dir / "pytorch_lora_weights.safetensors").write_bytes(b"w")
    (model_dir / "ema" / "pytorch_lora_weights.safetensors").write_bytes(b"e")
    image = tmp_path / "iter_000000100_0.jpg"
    image.write_bytes(b"jpg")
    card = hub.model_card(repo_id="me/robot-lora", base_model="nvidia/Cosmos-Predict2-2B-Text2Image", method=LoraFineTune(16, 16),
                          instance_prompt="An image of sks teal robot.", recipe={"learning rate": "1e-4 peak"},
                          images=[("images/iter_000000100_0.jpg", "An image of sks teal robot.")])
    front = card.split("---")[1]
    assert "base_model: nvidia/Cosmos-Predict2-2B-Text2Image" in front and "license: other" in front
    assert "license_name: nvidia-open-model-license" in front and "- lora" in front
    assert 'instance_prompt: "An image of sks teal robot."' in front
    assert "url: images/iter_000000100_0.jpg" in front
    assert "| learning rate | 1e-4 peak |" in card and "load_lora_adapter(\"me/robot-lora\"" in card
    assert "NVIDIA Open Model License" in card

    folder = hub.prepare_upload(model_dir, tmp_path / "upload", card, {"images/iter_000000100_0.jpg": image})
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == ["README.md", "ema/pytorch_lora_weights.safetensors", "images/iter_000000100_0.jpg",
                     "pytorch_lora_weights.safetensors"]


def test_push_to_hub_without_token_fails_before_training(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(PermissionError, match="hf auth login"):
        hub.require_token()


def test_lora_targets_every_block_attention_and_mlp(tiny_model_dir):
    from diffusers import CosmosTransformer3DModel

    from cosmos_t2i.lora import lora_config

    transformer = CosmosTransformer3DModel.from_pretrained(tiny_model_dir, subfolder="transformer")
    transformer.add_adapter(lora_config())
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in transformer.named_parameters() if ".lora_A." in n}
    expected = {f"transformer_blocks.{i}.{attn}.{m}" for i in range(len(transformer.transformer_blocks))
                for attn in ("attn1", "attn2") for m in ("to_q", "to_k", "to_v", "to_out.0")}
    expected |= {f"transformer_blocks.{i}.ff.net.{m}" for i in range(len(transformer.transformer_blocks))
                 for m in ("0.proj", "2")}
    assert adapted == expected
    assert all(p.eq(0).all() for n, p in transformer.named_parameters() if ".lora_B." in n)  # B = 0
    assert transformer.peft_config["default"].r == 16 and transformer.peft_config["default"].lora_alpha == 16


@pytest.mark.parametrize("name, expected", [
    ("single_gpu", {}),
    ("ddp_8gpu", {}),
    ("fsdp2_8gpu", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
                    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
                    "FSDP_TRANSFORMER_CLS_TO_WRAP": "CosmosTransformerBlock",
                    "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}),
    # Everything but the running block in host memory: 2B full fine-tune on a 24 GB card.
    ("fsdp2_offload", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true",
                       "FSDP_TRANSFORMER_CLS_TO_WRAP": "CosmosTransformerBlock",
                       "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"}),
])
def test_accelerate_configs_launch_as_intended(name, expected):
    """What `accelerate launch --config_file` hands the training processes (no GPU needed to check)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    argv = ["--config_file", f"accelerate_configs/{name}.yaml", "train_text2image.py"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    one_gpu = name in ("single_gpu", "fsdp2_offload")
    assert args.mixed_precision == "bf16" and args.num_processes == (1 if one_gpu else 8)
    if expected:
        env = prepare_multi_gpu_env(args)
        assert {k: env.get(k) for k in expected} == expected


def test_a_model_whose_weights_arrive_later_is_built_without_reading_or_touching_them():
    """What FSDP's non-main processes build (fsdp2_8gpu.yaml): the whole 2B structure, in host memory not touched."""

    def resident_gib():
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30

    before = resident_gib()
    transformer = FullFineTune().build("no/such-model", PRESETS["2B"].transformer_config, random_init=False,
                                       device="cpu", weights_arrive_later=True)
    params = list(transformer.parameters())
    assert sum(p.numel() for p in params) > 1.9e9 and {(p.device.type, p.dtype) for p in params} == {
        ("cpu", torch.float32)}
    assert resident_gib() - before < 1.0  # of 7.3 GiB of fp32 weights
    # accelerate maps the optimizer's parameters to FSDP's by data pointer: they must be distinct (not meta).
    assert len({p.data_ptr() for p in params}) == len(params)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs(stage):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(f"accelerate_configs/deepspeed_zero{stage}.yaml")
    assert config.distributed_type == "DEEPSPEED" and config.mixed_precision == "bf16"
    assert config.deepspeed_config["zero_stage"] == stage and config.deepspeed_config["gradient_clipping"] == 1.0
    assert config.deepspeed_config.get("zero3_save_16bit_model", False) == (stage == 3)
