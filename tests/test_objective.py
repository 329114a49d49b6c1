"""The objective against the formulas of cosmos_t2i/objective.py's docstring, written out independently here."""

import math

import torch

from cosmos_t2i import objective


class LinearDenoiser(torch.nn.Module):
    """F(x, t) = a * x + b * t: simple enough to compute the loss by hand."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, hidden_states, timestep, encoder_hidden_states, padding_mask, return_dict=False):
        self.calls.append(dict(x=hidden_states, t=timestep, text=encoder_hidden_states, mask=padding_mask))
        return (0.5 * hidden_states + 0.25 * timestep.view(-1, 1, 1, 1, 1),)


def test_preconditioning_matches_formulas():
    sigma = torch.tensor([0.002, 0.5, 1.0, 80.0])
    c_in, c_skip, c_out, t = objective.preconditioning(sigma)
    for i, s in enumerate(sigma.tolist()):
        expected_t = s / (1 + s)
        assert math.isclose(t[i].item(), expected_t, rel_tol=1e-6)
        assert math.isclose(c_in[i].item(), 1 - expected_t, rel_tol=1e-6)
        assert math.isclose(c_skip[i].item(), 1 - expected_t, rel_tol=1e-6)
        assert math.isclose(c_out[i].item(), -expected_t, rel_tol=1e-6)


def test_loss_by_hand_and_velocity_form():
    torch.manual_seed(0)
    x0 = torch.randn(3, 4, 1, 2, 2)
    text = torch.randn(3, 512, 8)
    model = LinearDenoiser()
    generator = torch.Generator().manual_seed(123)
    loss = objective.diffusion_loss(model, x0, text, generator=generator, text_dropout=0.0)

    # Replay the same random draws and compute everything by hand.
    generator = torch.Generator().manual_seed(123)
    sigma = torch.randn(3, generator=generator).exp()
    eps = torch.randn(x0.shape, generator=generator)
    s = sigma.view(-1, 1, 1, 1, 1)
    x_sigma = x0 + s * eps
    t = s / (1 + s)
    f = 0.5 * ((1 - t) * x_sigma) + 0.25 * t
    x0_pred = (1 - t) * x_sigma - t * f
    expected = 10 * ((x0 - x0_pred) ** 2 * (1 + s) ** 2 / s**2).mean()
    torch.testing.assert_close(loss, expected)

    # The same number as a uniformly weighted velocity MSE: F against (eps - x0).
    velocity = 10 * ((f - (eps - x0)) ** 2).mean()
    torch.testing.assert_close(loss, velocity, rtol=1e-4, atol=1e-5)

    # The transformer saw c_in * x_sigma, timestep t (not x1000), the text and a batch-1 zero padding mask.
    call = model.calls[0]
    torch.testing.assert_close(call["x"], (1 - t) * x_sigma)
    torch.testing.assert_close(call["t"], t.flatten())
    assert call["mask"].shape == (1, 1, 2, 2) and not call["mask"].any()
    torch.testing.assert_close(call["text"], text)


def test_sigma_is_lognormal():
    sigma = objective.sample_sigma(200_000, "cpu", torch.Generator().manual_seed(0))
    log_sigma = sigma.log()
    assert abs(log_sigma.mean().item()) < 0.01
    assert abs(log_sigma.std().item() - 1) < 0.01
    assert sigma.max() > 50  # no clamp: the tail is there


def test_text_dropout_zeroes_whole_embeddings_at_twenty_percent():
    text = torch.ones(20_000, 4, 3)
    dropped = objective.drop_text(text, generator=torch.Generator().manual_seed(0))
    per_sample = dropped.flatten(1)
    zeroed = (per_sample == 0).all(dim=1)
    assert ((per_sample == 1).all(dim=1) | zeroed).all()  # all or nothing per sample
    assert abs(zeroed.float().mean().item() - 0.2) < 0.01
