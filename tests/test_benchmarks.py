"""The benchmark scripts run end to end (tiny model, CPU: a smoke test, not a measurement) and their tables hold
what BENCHMARKS.md quotes: the fast path's first loss and final latents next to the plain path's."""

import json

from benchmarks import bench_caption, bench_infer, bench_save, bench_scaling, bench_train


def test_bench_train_compares_the_fast_path_with_the_plain_one(tmp_path):
    out = tmp_path / "train.md"
    bench_train.main(["--model", "tiny", "--device", "cpu", "--height", "64", "--width", "64", "--steps", "1",
                      "--warmup", "1", "--variants", "2", "--out", str(out)])
    plain, fast = json.loads(out.with_suffix(".json").read_text())
    assert plain["variant"].startswith("plain") and "fused AdamW" in fast["variant"]
    # Same weights, inputs and noise: only bf16 rounding differs (1.4e-4 on an AMD EPYC, under 1e-4 elsewhere; one
    # bf16 rounding is 3.9e-3, a change of the math moves the loss by far more).
    assert float(fast["loss_vs_plain"]) < 1e-3
    assert "| compiled + fused AdamW | 2 |" in out.read_text()


def test_bench_infer_reports_decode_time_and_the_fp8_error(tmp_path):
    out = tmp_path / "infer.md"
    bench_infer.main(["--model", "tiny", "--device", "cpu", "--height", "128", "--width", "128", "--num_steps", "2",
                      "--runs", "1", "--variants", "4", "--out", str(out)])
    plain, fp8 = json.loads(out.with_suffix(".json").read_text())
    assert plain["latent_rel_err_vs_plain"] == "0.0e+00" and "fp8" in fp8["variant"]
    assert 0 < float(fp8["latent_rel_err_vs_plain"]) < 0.1
    assert 0 < fp8["decode_s"] < fp8["s_per_image"]


def test_bench_scaling_reads_the_training_scripts_throughput(tiny_model_dir, tmp_path):
    """Through card_limited.py as --card_gib runs it (on the CPU it limits nothing, but runs the trainer whole)."""
    out = tmp_path / "scaling.md"
    bench_scaling.main(["--workload", "14B_lora_ddp", "--model", "tiny", "--gpus", "1", "--steps", "4",
                        "--height", "64", "--width", "64", "--card_gib", "24", "--out", str(out), "--",
                        "--dataloader_num_workers", "0"])
    [row] = json.loads(out.with_suffix(".json").read_text())
    assert "error" not in row, (tmp_path / "14B_lora_ddp_1gpu.log").read_text()[-3000:]
    assert row["gpus"] == 1 and row["config"] == "single_gpu.yaml" and row["scaling"] == "100.0%"
    assert row["samples_per_s"] > 0 and row["per_gpu"] == row["samples_per_s"] and row["card_gib"] == 24
    assert 0.2 < row["host_peak_gib"] < 20  # the trainer's process, not this one's or none


def test_bench_caption_times_full_length_captions(tmp_path, monkeypatch):
    monkeypatch.setenv("COSMOS_T2I_TINY_VLM_DIR", str(tmp_path / "tiny-vlm"))
    out = tmp_path / "caption.md"
    bench_caption.main(["--model", "tiny", "--device", "cpu", "--batch_sizes", "2", "--runs", "1", "--width", "64",
                        "--height", "64", "--max_words", "5", "--out", str(out)])
    [row] = json.loads(out.with_suffix(".json").read_text())
    assert row["batch"] == 2 and row["new_tokens"] == 18 and row["captions_per_s"] > 0


def test_bench_save_times_synchronous_and_background_saves(tmp_path):
    out = tmp_path / "save.md"
    bench_save.main(["--model", "tiny", "--device", "cpu", "--height", "64", "--width", "64", "--batch_size", "1",
                     "--steps", "4", "--save_every", "2", "--warmup", "1", "--save_dir", str(tmp_path / "ckpts"),
                     "--out", str(out)])
    none, sync, background = json.loads(out.with_suffix(".json").read_text())
    assert [none["mode"], sync["mode"], background["mode"]] == ["none", "sync", "async"]
    assert sync["saves"] == background["saves"] == 2 and sync["checkpoint_gb"] == background["checkpoint_gb"] > 0
    assert background["host_gib"] > 0 and sync["host_gib"] == 0  # the copy that a background save writes from
    assert not any((tmp_path / "ckpts").iterdir())  # the benchmark's checkpoints are removed


def test_bench_scaling_reads_the_peak_the_trainer_reports(monkeypatch, caplog):
    """The trainer's own throughput line on a GPU (its peak and the GPU's size faked: the CPU has neither)."""
    import logging
    import types

    from accelerate.state import PartialState

    import train_text2image

    PartialState()  # the trainer logs through accelerate's logger
    monkeypatch.setattr(train_text2image.memory, "peak", lambda device: int(14.5 * 2**30))
    monkeypatch.setattr(train_text2image.torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(total_memory=140 * 2**30))
    with caplog.at_level(logging.INFO, logger=train_text2image.logger.name):
        train_text2image._report_speed([9.0, 1.0, 1.0, 0.5, 0.5], 16, "cuda")
    [(samples_per_s, step_ms, peak)] = bench_scaling.THROUGHPUT.findall(caplog.text)
    assert (float(samples_per_s), float(step_ms), float(peak)) == (32.0, 500.0, 14.5)
