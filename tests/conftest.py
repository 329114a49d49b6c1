"""Shared fixtures: the tiny pipeline is built once per test session into a temporary folder."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Path of the tiny pipeline saved as a diffusers folder; `--model tiny` resolves to it in this session."""
    from cosmos_t2i.presets import build_tiny_pipeline

    path = tmp_path_factory.getbasetemp() / "tiny-pipeline"
    if not (path / "model_index.json").is_file():
        build_tiny_pipeline(path)
    os.environ["COSMOS_T2I_TINY_DIR"] = str(path)
    return path
