"""The speed levers leave the math alone: same loss and gradients as the plain model."""

import pytest
import torch
from diffusers import CosmosTransformer3DModel

from cosmos_t2i import speed
from cosmos_t2i.objective import diffusion_loss
from cosmos_t2i.models import PRESETS


def _loss_and_grads(transformer):
    torch.manual_seed(0)
    x0 = torch.randn(2, 16, 1, 8, 8)
    text = torch.randn(2, 512, PRESETS["tiny"].transformer_config["text_embed_dim"])
    loss = diffusion_loss(transformer, x0, text, generator=torch.Generator().manual_seed(1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in transformer.named_parameters()}


@pytest.mark.parametrize("compile_blocks, memory_budget", [(False, 1.0), (True, 1.0), (True, 0.5)])
def test_checkpointed_and_compiled_blocks_match_plain(compile_blocks, memory_budget):
    torch._dynamo.reset()  # dynamo would reuse another case's graph (same block code), compiled with its budget
    torch.manual_seed(0)
    plain = CosmosTransformer3DModel(**PRESETS["tiny"].transformer_config)
    fast = CosmosTransformer3DModel(**PRESETS["tiny"].transformer_config)
    fast.load_state_dict(plain.state_dict())
    assert speed.checkpoint_blocks(fast, 0.5) == 1
    if compile_blocks:  # budget < 1: the compiler recomputes activations in the backward instead of saving them
        speed.compile_transformer_blocks(fast, activation_memory_budget=memory_budget)
    assert list(fast.state_dict()) == list(plain.state_dict())  # checkpoints keep their key names
    loss, grads = _loss_and_grads(plain)
    fast_loss, fast_grads = _loss_and_grads(fast)
    torch.testing.assert_close(fast_loss, loss, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_activation_memory_budget_saves_fewer_activations():
    def saved_bytes(budget: float) -> int:
        torch._dynamo.reset()
        torch.manual_seed(0)
        transformer = CosmosTransformer3DModel(**PRESETS["tiny"].transformer_config)
        speed.compile_transformer_blocks(transformer, activation_memory_budget=budget)
        saved = []

        def pack(tensor):
            saved.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            _loss_and_grads(transformer)
        return sum(saved)

    # Measured on the tiny model: 5.95 MB saved for the backward at 1.0, 3.53 MB at 0.5 (blocks and the rest).
    assert saved_bytes(0.5) < 0.8 * saved_bytes(1.0)


def test_unknown_attention_backend_is_refused():
    with pytest.raises(ValueError, match="cudnn"):
        speed.attention_backend("fastest")


def test_single_frame_vae_convs_give_the_3d_convs_results():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    stock = AutoencoderKLWan(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1).eval()
    fast = AutoencoderKLWan(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1).eval()
    fast.load_state_dict(stock.state_dict())
    assert speed.single_frame_vae_convs(fast) > 20
    image = torch.rand(1, 3, 1, 64, 96) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(fast.encode(image).latent_dist.mean, stock.encode(image).latent_dist.mean,
                                   rtol=1e-5, atol=1e-5)
        latents = torch.randn(1, 16, 1, 8, 12)
        torch.testing.assert_close(fast.decode(latents).sample, stock.decode(latents).sample, rtol=1e-5, atol=1e-5)
        video = torch.randn(1, 16, 3, 8, 12)  # later frames use the feature cache: the original path
        torch.testing.assert_close(fast.decode(video).sample, stock.decode(video).sample, rtol=1e-5, atol=1e-5)


def test_clip_in_fused_adamw_step_gives_clip_grad_norms_update():
    """The trainer's clip inside fused AdamW: the same norm, update and clipped .grad as clip_grad_norm_ followed by
    the step, on steps below and far above the clip threshold; refused where AdamW would ignore it."""
    import copy

    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    reference = copy.deepcopy(ours)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, fused=True) for m in (ours, reference)]
    norms = []
    for input_scale in (0.001, 10.0, 0.001):  # a norm below 5 (no clip), ~1000 (clipped 200x), then back
        x = torch.randn(8, 16) * input_scale
        for model in (ours, reference):
            model(x).pow(2).sum().backward()
        norm = speed.clip_grad_norm_in_fused_adamw(optimizers[0], list(ours.parameters()), 5.0)
        expected = torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 5.0)
        torch.testing.assert_close(norm, expected)
        norms.append(norm.item())
        for optimizer in optimizers:
            optimizer.step()
        for a, b in zip(ours.parameters(), reference.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-8)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # Adam amplifies a rounding at its first steps
        for optimizer in optimizers:
            optimizer.zero_grad()
    assert norms[0] < 5 < 100 < norms[1]  # both paths covered: no clip, then a hard clip
    with pytest.raises(ValueError, match="fused=True"):
        speed.clip_grad_norm_in_fused_adamw(torch.optim.AdamW(ours.parameters(), foreach=True), [], 1.0)
