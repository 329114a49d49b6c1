"""Shared fixtures: the tiny pipeline is built once per test session into a temporary folder."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models on a small CPU: thread start-up costs more than the work (10x slower with 2 threads here), and
# pytest-xdist already runs one test per core. Subprocesses (accelerate launch) inherit the variable.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Path of the tiny pipeline saved as a diffusers folder; `--model tiny` resolves to it in this session."""
    from cosmos_t2i.tiny_pipeline import build_tiny_pipeline

    path = tmp_path_factory.getbasetemp() / "tiny-pipeline"
    if not (path / "model_index.json").is_file():
        build_tiny_pipeline(path)
    os.environ["COSMOS_T2I_TINY_DIR"] = str(path)
    return path
