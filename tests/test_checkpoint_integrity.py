"""Damaged checkpoints are refused on resume, naming the checkpoint, the file and the previous complete checkpoint;
a save that fails (a full disk) leaves the previous checkpoint as the latest and names the file; every file is on
disk before the checkpoint is named; a background save writes the same bytes as a synchronous one while training
goes on, and a process killed during it leaves the previous checkpoint as the latest."""

import errno
import logging
import os
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch
from train_helpers import make_dataset, pattern_image, train, weights

import train_text2image
from cosmos_t2i import checkpoint as ckpt
from cosmos_t2i import methods
from cosmos_t2i.checkpoint_integrity import verify_for_resume
from cosmos_t2i.recipe import linear_decay
from cosmos_t2i.user_errors import UnreadableInput, OutputFailed

WEIGHTS = "model/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def dataset(tiny_model_dir, tmp_path_factory):
    images = [(pattern_image(64, 64, 0), "An image of sks teal robot."), (pattern_image(64, 64, 1), "a red car")]
    return make_dataset(tmp_path_factory.mktemp("integrity") / "data", images, cache_latents=True)


def _flags(dataset, output_dir, *extra):
    return ["--model", "tiny", "--dataset_dir", dataset, "--output_dir", output_dir, "--max_iter", 2, "--save_iter", 1,
            "--learning_rate", "1e-3", "--dataloader_num_workers", 0, "--report_to", "none", "--mixed_precision", "no",
            *extra]


@pytest.fixture(scope="module")
def two_checkpoints(dataset, tmp_path_factory):
    """A run that saved iter_1 and iter_2; each test damages its own copy."""
    out = tmp_path_factory.mktemp("run") / "out"
    train(*_flags(dataset, out))
    return out


@pytest.fixture
def run(two_checkpoints, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(two_checkpoints, copy)
    return copy


def _overwrite(path: Path, start: int = 0) -> None:
    """Zeros over `path` from byte `start`, at the same size."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(bytes(size - start))


def _header_end(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def _refused(dataset, run, monkeypatch, *extra) -> str:
    for method in (methods.FullFineTune, methods.LoraFineTune):  # refused before any weights are loaded
        monkeypatch.setattr(method, "build", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(UnreadableInput) as error:
        train(*_flags(dataset, run, *extra))
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("start", ["file", "tensor data"])
def test_zeroed_weights_are_refused_naming_the_file_and_the_previous_checkpoint(dataset, run, monkeypatch, start):
    damaged = run / "checkpoints" / ckpt.iter_name(2)
    # The whole file, or only the tensors under an intact header: only the checksum tells that one.
    _overwrite(damaged / WEIGHTS, 0 if start == "file" else _header_end(damaged / WEIGHTS))
    message = _refused(dataset, run, monkeypatch)
    assert f"Checkpoint {damaged} is damaged: {damaged / WEIGHTS} " in message
    assert f"--resume_from_checkpoint {run.absolute() / 'checkpoints' / ckpt.iter_name(1)}" in message

    # The offered checkpoint resumes.
    monkeypatch.undo()
    resumed = train(*_flags(dataset, run, "--resume_from_checkpoint", run / "checkpoints" / ckpt.iter_name(1)))
    assert resumed == damaged and ckpt.latest_checkpoint(run) == damaged  # saved again, whole
    verify_for_resume(_OneProcess(), damaged)


@pytest.mark.parametrize("damage", ["truncated EMA", "state.json not JSON", "optimizer overwritten"])
@pytest.mark.parametrize("checksums", [True, False], ids=["checksums", "older checkpoint without checksums"])
def test_damaged_files_are_named_with_or_without_checksums(dataset, run, monkeypatch, caplog, damage, checksums):
    damaged = run / "checkpoints" / ckpt.iter_name(2)
    if not checksums:
        (damaged / "trainer" / "checksums.json").unlink(missing_ok=True)
    if damage == "truncated EMA":
        path = damaged / "model" / "ema" / "diffusion_pytorch_model.safetensors"
        os.truncate(path, path.stat().st_size // 2)
    elif damage == "state.json not JSON":
        path = damaged / "trainer" / "state.json"
        path.write_text(path.read_text()[:-1] + " ")  # the same size, without its closing brace
    else:
        path = damaged / "optim" / "optimizer.pt"
        _overwrite(path)
    message = _refused(dataset, run, monkeypatch)
    assert f"Checkpoint {damaged} is damaged: {path} " in message
    assert f"--resume_from_checkpoint {run.absolute() / 'checkpoints' / ckpt.iter_name(1)}" in message
    assert ("saved without checksums" in caplog.text) != checksums


def test_no_earlier_checkpoint_offers_starting_over(dataset, run, monkeypatch):
    shutil.rmtree(run / "checkpoints" / ckpt.iter_name(1))
    _overwrite(run / "checkpoints" / ckpt.iter_name(2) / WEIGHTS)
    assert "start over with --resume_from_checkpoint none" in _refused(dataset, run, monkeypatch)


def test_a_loader_names_what_it_cannot_read(run):
    checkpoint = run / "checkpoints" / ckpt.iter_name(2)
    (checkpoint / "trainer" / "config.json").write_text('{"model": ')
    with pytest.raises(UnreadableInput, match=f"{checkpoint}.*{checkpoint / 'trainer' / 'config.json'} cannot be read"):
        ckpt.read_config(checkpoint)


def _disk_full_at_second_optimizer_save(monkeypatch):
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt"):
            calls.append(f)
            if len(calls) == 2:
                Path(f).write_bytes(b"PK\x03\x04 half of it")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def _count_steps(monkeypatch) -> list:
    calls, loss = [], train_text2image.diffusion_loss
    monkeypatch.setattr(train_text2image, "diffusion_loss", lambda *a, **k: (calls.append(1), loss(*a, **k))[1])
    return calls


@pytest.mark.parametrize("mode", ["--async_save", "--no_async_save"])
def test_a_full_disk_while_writing_the_optimizer_keeps_the_previous_checkpoint(dataset, tmp_path, monkeypatch, mode):
    _disk_full_at_second_optimizer_save(monkeypatch)
    steps = _count_steps(monkeypatch)
    with pytest.raises(OutputFailed) as error:
        train(*_flags(dataset, tmp_path / "out", "--max_iter", 3, mode))
    message, root = str(error.value), tmp_path / "out" / "checkpoints"
    assert message.startswith(f"Could not save checkpoint {root / ckpt.iter_name(2)}: writing optim/optimizer.pt "
                              "failed (No space left on device)")
    assert f"{root / 'latest_checkpoint.txt'} still names {ckpt.iter_name(1)}" in message and "\n" not in message
    assert ckpt.latest_checkpoint(tmp_path / "out").name == ckpt.iter_name(1)
    assert sorted(p.name for p in root.iterdir()) == [ckpt.iter_name(1), "latest_checkpoint.txt"]  # no half-written
    # In the background, training went on to the next save, where the error was raised.
    assert len(steps) == (3 if mode == "--async_save" else 2)


def _files(checkpoint: Path) -> dict[str, bytes]:
    return {p.relative_to(checkpoint).as_posix(): p.read_bytes() for p in sorted(checkpoint.rglob("*")) if p.is_file()}


def test_background_saves_write_the_synchronous_bytes_and_resume_exactly(dataset, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cosmos_t2i.checkpoint")
    sync = train(*_flags(dataset, tmp_path / "sync", "--no_async_save")).parent
    assert "host memory" not in caplog.text
    background = train(*_flags(dataset, tmp_path / "background", "--async_save")).parent
    assert re.search(r"Background checkpoint saves: the state being written is held in \d+\.\d\d GiB of host memory",
                     caplog.text)  # the cost, said once
    assert caplog.text.count("written in the background") == 2
    for name in (ckpt.iter_name(1), ckpt.iter_name(2)):
        expected, got = _files(sync / name), _files(background / name)
        assert expected.keys() == got.keys() and "trainer/checksums.json" in got
        # config.json records the flag itself, and the checksums record config.json.
        differ = sorted(k for k in got if got[k] != expected[k])
        assert differ == ["trainer/checksums.json", "trainer/config.json"], name

    resumed = train(*_flags(dataset, tmp_path / "resumed", "--resume_from_checkpoint", background / ckpt.iter_name(1)))
    for name, tensor in weights(sync / ckpt.iter_name(2)).items():
        assert torch.equal(weights(resumed)[name], tensor), name
    assert _files(resumed)["optim/optimizer.pt"] == _files(sync / ckpt.iter_name(2))["optim/optimizer.pt"]


def test_killed_during_a_background_write_the_previous_checkpoint_stays_latest(dataset, tmp_path, monkeypatch):
    writing, release, seen = threading.Event(), threading.Event(), {}
    real_write, writes = methods.save_torch_state_dict, []

    def slow_write(*args, **kwargs):  # iteration 2's model/ is being written when the test looks
        writes.append(1)
        if len(writes) == 3:  # model/ and model/ema/ of iteration 1, then iteration 2's
            writing.set()
            release.wait(120)
        return real_write(*args, **kwargs)

    out, killed = tmp_path / "out", tmp_path / "killed"
    loss, steps = train_text2image.diffusion_loss, []

    def look_during_step_3(*args, **kwargs):
        steps.append(1)
        if len(steps) == 3:
            assert writing.wait(120)
            seen["latest"] = ckpt.latest_checkpoint(out).name
            seen["names"] = sorted(p.name for p in (out / "checkpoints").iterdir())
            shutil.copytree(out, killed)  # what a process killed now leaves on disk
            release.set()
        return loss(*args, **kwargs)

    monkeypatch.setattr(methods, "save_torch_state_dict", slow_write)
    monkeypatch.setattr(train_text2image, "diffusion_loss", look_during_step_3)
    final = train(*_flags(dataset, out, "--max_iter", 3))
    monkeypatch.undo()
    # Training ran step 3 while iteration 2 was being written, and latest still named iteration 1.
    assert seen == {"latest": ckpt.iter_name(1),
                    "names": [f".{ckpt.iter_name(2)}.tmp", ckpt.iter_name(1), "latest_checkpoint.txt"]}
    assert final.name == ckpt.iter_name(3) and ckpt.latest_checkpoint(out) == final
    assert (out / "checkpoints" / ckpt.iter_name(2) / "trainer" / "checksums.json").is_file()

    # The killed run's rerun resumes from iteration 1 and replaces the leftover.
    steps = _count_steps(monkeypatch)
    again = train(*_flags(dataset, killed, "--max_iter", 3))
    assert len(steps) == 2 and again.name == ckpt.iter_name(3)
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == [
        ckpt.iter_name(1), ckpt.iter_name(2), ckpt.iter_name(3), "latest_checkpoint.txt"]
    for name, tensor in weights(final).items():
        assert torch.equal(weights(again)[name], tensor), name


class _OneProcess:
    is_main_process, process_index, num_processes = True, 0, 1

    def __init__(self):
        from accelerate.utils import DistributedType

        self.distributed_type = DistributedType.NO

    def wait_for_everyone(self):
        pass


def _save(output_dir, iteration, total_limit=None):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_decay(10, 1.0))
    return ckpt.save_checkpoint(_OneProcess(), output_dir, iteration, model=model, optimizer=optimizer,
                                scheduler=scheduler, state={"data_position": iteration}, config={},
                                save_model=lambda d: (d.mkdir(), (d / "weights").write_text(str(iteration))),
                                total_limit=total_limit)


def test_every_file_and_folder_is_on_disk_before_the_checkpoint_is_named(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), real_replace(a, b)))
    final = _save(tmp_path, 2)
    monkeypatch.undo()
    root, staging = str(final.parent), str(final.parent / f".{final.name}.tmp")
    named = events.index(("replace", staging, str(final)))
    flushed = {path for kind, path, *_ in events[:named] if kind == "fsync"}
    inside = [p for p in [final, *final.rglob("*")]]
    assert {str(p).replace(str(final), staging) for p in inside} <= flushed  # files and folders, before the rename
    latest = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == f"{root}/latest_checkpoint.txt")
    assert ("fsync", root) in events[named:latest]  # the rename, before latest_checkpoint.txt names it
    assert ("fsync", root) in events[latest:]  # and that name too


def test_pruning_removes_complete_checkpoints_only(tmp_path):
    (tmp_path / "checkpoints" / ckpt.iter_name(0) / "model").mkdir(parents=True)  # no trainer/state.json
    for iteration in (1, 2, 3):
        _save(tmp_path, iteration, total_limit=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        ckpt.iter_name(0), ckpt.iter_name(2), ckpt.iter_name(3), "latest_checkpoint.txt"]


def test_pinned_snapshot_buffers_each_own_a_storage_so_safetensors_writes_them(tmp_path, monkeypatch):
    """On a CUDA machine background saves copy into page-locked buffers. Slices of one pinned block share a
    storage, which safetensors refuses to save (the first GPU run of bench_save.py failed so). Page-locking needs a
    GPU: here the pinned allocation is taken as ordinary memory, and the registration is recorded instead."""
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import load_file

    from cosmos_t2i import host_copy

    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: empty(*a, **k))
    registered = []
    monkeypatch.setattr(host_copy, "_register", registered.append, raising=False)
    copier = host_copy.HostCopier(reuse=True)
    copier.pin = True  # as on a CUDA machine
    live = {"a.weight": torch.randn(4, 3), "b.bias": torch.randn(5), "c.weight": torch.randn(2, 2).bfloat16()}
    copier.begin(list(live.values()))
    snapshot = copier(live)
    copier.end()

    save_torch_state_dict(snapshot, tmp_path)
    loaded = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(loaded[name], tensor) for name, tensor in live.items())
    assert len({t.untyped_storage().data_ptr() for t in snapshot.values()}) == len(live)
    assert len(registered) == len(live)


def test_a_background_snapshot_copies_the_unsharded_ema_only_through_the_copier(monkeypatch):
    """The EMA of a one-GPU or DDP run goes to the copier as the live tensors (pinned, asynchronous copies on a GPU),
    not through a synchronous `.cpu()` into fresh pageable memory first: that copy of 2B's 7.8 GB EMA stopped
    training for seconds at every background save."""
    from cosmos_t2i import host_copy
    from cosmos_t2i.ema import PowerEMA

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    ema = PowerEMA(model.named_parameters())
    cpu_calls = []
    cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: cpu_calls.append(1) or cpu(self, *a, **k))
    copier = host_copy.HostCopier(reuse=True)
    copier.begin([])
    copier.also_live(ema.shadow.values())
    snapshot = copier(ema.full_state_dict(keep=True), "ema")
    copier.end()

    assert cpu_calls == []
    for name, live in ema.shadow.items():
        assert torch.equal(snapshot[name], live)
        assert snapshot[name].data_ptr() != live.data_ptr()  # a copy: training goes on updating the live one


def test_init_from_damaged_weights_is_refused_and_only_the_weights_are_checked(dataset, run, tmp_path, monkeypatch):
    """--init_from reads model/ alone: a damaged optimizer there is no reason to refuse, zeroed weights are (before
    they are loaded and trained on), in one line naming the file and a checkpoint to start from instead."""
    source = run / "checkpoints" / ckpt.iter_name(2)
    _overwrite(source / "optim" / "optimizer.pt")
    new = train(*_flags(dataset, tmp_path / "new", "--init_from", source, "--max_iter", 1))
    assert new.name == ckpt.iter_name(1)

    _overwrite(source / WEIGHTS, _header_end(source / WEIGHTS))  # zeros under an intact header
    for method in (methods.FullFineTune, methods.LoraFineTune):
        monkeypatch.setattr(method, "build", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(UnreadableInput) as error:
        train(*_flags(dataset, tmp_path / "newer", "--init_from", source))
    message = str(error.value)
    assert "\n" not in message and f"Checkpoint {source} is damaged: {source / WEIGHTS} " in message
    assert f"--init_from {run.absolute() / 'checkpoints' / ckpt.iter_name(1)}" in message
