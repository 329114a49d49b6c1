"""The sampler's compiled blocks on a warm compile cache: a user's second run on the same machine.

With PyTorch 2.11 and Triton 3.6, inductor's multi-kernel graphs crashed when read back from its FX graph cache
(BENCHMARKS.md, seventh session); `speed.compile_transformer_blocks(multi_kernel=True)` turns that cache off.
Multi-kernel reductions exist only in Triton's GPU code, so this runs on a GPU:
    python -m pytest tests/test_compile_cache.py
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Two blocks of the real 2B config at 1360x768 (the model and shapes the crash was found with on the H200): their
# layer norms over 2048 channels are the long-row reductions multi-kernel writes twice. The blocks share one
# compiled graph, so two blocks compile what 28 would.
SCRIPT = """
import torch
from diffusers import CosmosTransformer3DModel
from cosmos_t2i import speed
from cosmos_t2i.models import PRESETS

with torch.device("cuda"):
    model = CosmosTransformer3DModel(**dict(PRESETS["2B"].transformer_config, num_layers=2)).to(torch.bfloat16)
speed.compile_transformer_blocks(model.eval(), multi_kernel=True)
with torch.no_grad():
    model(hidden_states=torch.randn(2, 16, 1, 96, 170, device="cuda", dtype=torch.bfloat16),
          timestep=torch.full((2,), 0.5, device="cuda", dtype=torch.bfloat16),
          encoder_hidden_states=torch.randn(2, 512, 1024, device="cuda", dtype=torch.bfloat16),
          padding_mask=torch.zeros(1, 1, 768, 1360, device="cuda", dtype=torch.bfloat16), return_dict=False)
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="multi-kernel reductions are Triton GPU code")
def test_compiled_blocks_load_again_from_a_warm_compile_cache(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    for run in ("cold cache", "warm cache"):
        result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{run}:\n{result.stderr[-3000:]}"
