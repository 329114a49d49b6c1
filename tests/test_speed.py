"""The speed levers leave the math alone: same loss and gradients as the plain model."""

import pytest
import torch
from diffusers import CosmosTransformer3DModel

from cosmos_t2i import speed
from cosmos_t2i.objective import diffusion_loss
from cosmos_t2i.presets import PRESETS


def _loss_and_grads(transformer):
    torch.manual_seed(0)
    x0 = torch.randn(2, 16, 1, 8, 8)
    text = torch.randn(2, 512, PRESETS["tiny"].transformer_config["text_embed_dim"])
    loss = diffusion_loss(transformer, x0, text, generator=torch.Generator().manual_seed(1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in transformer.named_parameters()}


@pytest.mark.parametrize("compile_blocks", [False, True])
def test_checkpointed_and_compiled_blocks_match_plain(compile_blocks):
    torch.manual_seed(0)
    plain = CosmosTransformer3DModel(**PRESETS["tiny"].transformer_config)
    fast = CosmosTransformer3DModel(**PRESETS["tiny"].transformer_config)
    fast.load_state_dict(plain.state_dict())
    assert speed.checkpoint_blocks(fast, 0.5) == 1
    if compile_blocks:
        speed.compile_transformer_blocks(fast)
    assert list(fast.state_dict()) == list(plain.state_dict())  # checkpoints keep their key names
    loss, grads = _loss_and_grads(plain)
    fast_loss, fast_grads = _loss_and_grads(fast)
    torch.testing.assert_close(fast_loss, loss, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_unknown_attention_backend_is_refused():
    with pytest.raises(ValueError, match="cudnn"):
        speed.attention_backend("fastest")
