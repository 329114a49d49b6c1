"""fp8 sampling (opt-in --fp8): real fp8 numbers through torch._scaled_mm, close to bf16, in the right layers, with
each shared input quantized once when compiled, and end to end through infer_text2image.py."""

import copy

import numpy as np
import torch
from infer_helpers import PROMPT, tiny_transformer
from PIL import Image

import infer_text2image as infer
from cosmos_t2i import fp8, speed


def _relative_error(value, reference):
    return ((value.float() - reference.float()).norm() / reference.float().norm()).item()


def test_float8_linear_stores_fp8_and_stays_close_to_the_layer():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96, bias=True).to(torch.bfloat16)
    quantized = fp8.Float8Linear(linear)
    assert quantized.weight_fp8.dtype == torch.float8_e4m3fn and quantized.weight_scale.shape == (1, 96)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    x[0, 0] = 0  # an all-zero token must not divide by zero
    out = quantized(x)
    assert out.shape == (3, 5, 96) and out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    error = _relative_error(out, linear(x))
    assert 1e-3 < error < 0.06  # fp8 rounding (e4m3: 3 mantissa bits; 0.035 here), not bf16's, and not more


def test_only_the_token_wise_layers_of_the_blocks_are_quantized_and_the_output_stays_close():
    model = tiny_transformer().to(torch.bfloat16).eval()
    quantized = copy.deepcopy(model)
    assert fp8.quantize_transformer_blocks(quantized) == 10 * len(model.transformer_blocks)
    block = quantized.transformer_blocks[0]
    assert isinstance(block.attn1.to_q, fp8.Float8Linear) and isinstance(block.ff, fp8.Float8GeluFeedForward)
    assert type(block.norm1.linear_1) is torch.nn.Linear and type(quantized.proj_out) is torch.nn.Linear
    inputs = dict(hidden_states=torch.randn(2, 16, 1, 16, 16, dtype=torch.bfloat16),
                  timestep=torch.tensor([0.5, 0.5], dtype=torch.bfloat16),
                  encoder_hidden_states=torch.randn(2, 512, 32, dtype=torch.bfloat16),
                  padding_mask=torch.zeros(1, 1, 128, 128, dtype=torch.bfloat16), return_dict=False)
    with torch.no_grad():
        reference = model(**inputs)[0]
        eager = quantized(**inputs)[0]
        fp8.deduplicate_compiled_computations()
        try:
            speed.compile_transformer_blocks(quantized)
            compiled = quantized(**inputs)[0]
        finally:
            fp8.deduplicate_compiled_computations(enable=False)
    assert 1e-3 < _relative_error(eager, reference) < 0.05
    assert _relative_error(compiled, eager) < 0.03  # the compiled kernels round fp32 intermediates differently


def test_gelu_amax_from_the_input_range_is_the_max_over_gelus_outputs():
    """The feed-forward's second matmul scales each row by max |GELU(h)| computed from min(h) and max(h): it must
    be that max, exactly, on rows of every kind (all positive, all negative on either side of GELU's minimum,
    spanning it), and never below it where the row's values cannot reach it (a scale too small would clip)."""
    torch.manual_seed(0)
    rows = [torch.randn(256) * 3, -torch.rand(256) * 0.5, -1 - torch.rand(256) * 4, torch.randn(256) - 1,
            torch.linspace(-6, 0.2, 256), torch.zeros(256)]
    h = torch.stack(rows).to(torch.bfloat16)
    lo, hi = torch.aminmax(h, dim=-1, keepdim=True)
    ours = fp8.gelu_amax_from_range(lo, hi)
    exact = torch.nn.functional.gelu(h).abs().amax(dim=-1, keepdim=True)
    assert ours.dtype == exact.dtype and (ours >= exact).all()
    reaches_the_minimum_exactly = ((lo < fp8.GELU_ARGMIN) & (hi < 0.28)).flatten()
    assert torch.equal(ours[~reaches_the_minimum_exactly], exact[~reaches_the_minimum_exactly])
    assert ((ours - exact) / exact)[reaches_the_minimum_exactly].max() < 0.01


def test_fp8_feed_forward_matches_its_two_layers_quantized_apart():
    from diffusers.models.attention import FeedForward

    torch.manual_seed(0)
    ff = FeedForward(64, mult=4, activation_fn="gelu", bias=False).to(torch.bfloat16).eval()
    x = torch.randn(2, 7, 64, dtype=torch.bfloat16) * 3
    fused = fp8.Float8GeluFeedForward(ff)
    apart = fp8.Float8Linear(ff.net[2])(torch.nn.functional.gelu(fp8.Float8Linear(ff.net[0].proj)(x)))
    with torch.no_grad():
        ours = fused(x)
        assert torch.equal(ours, apart)  # these rows reach above GELU's minimum: the same scales
        assert 1e-3 < _relative_error(ours, ff(x)) < 0.06


def test_shared_inputs_are_quantized_once_after_deduplication():
    from torch.fx.experimental.proxy_tensor import make_fx

    torch.manual_seed(0)
    q, k, v = (fp8.Float8Linear(torch.nn.Linear(32, 32, bias=False)) for _ in range(3))

    def attention_inputs(x):  # what the attention processor does: three projections of one input
        return q(x) + k(x) * v(x)

    x = torch.randn(8, 32)
    graph_module = make_fx(attention_inputs)(x)  # the aten-level graph inductor's post-grad passes see

    def amax_count():
        return sum(node.target is torch.ops.aten.amax.default for node in graph_module.graph.nodes)

    assert amax_count() == 3  # the weights were quantized once, at construction: these are x's, three times over
    fp8._DeduplicateComputations()(graph_module.graph)
    graph_module.recompile()
    assert amax_count() == 1
    torch.testing.assert_close(graph_module(x), attention_inputs(x))


def test_infer_script_with_fp8(tiny_model_dir, tmp_path):
    common = ["--model", "tiny", "--num_steps", "2", "--prompt", PROMPT, "--compile", "off"]
    infer.main(infer.parse_args([*common, "--save_path", str(tmp_path / "bf16.png")]))
    infer.main(infer.parse_args([*common, "--fp8", "--save_path", str(tmp_path / "fp8.png")]))
    bf16, quantized = (np.asarray(Image.open(tmp_path / name), dtype=np.float32) for name in ("bf16.png", "fp8.png"))
    assert not np.array_equal(bf16, quantized)
    assert np.abs(bf16 - quantized).mean() < 3.0  # out of 255: the same picture
    sidecar = (tmp_path / "fp8.json").read_text()
    assert '"fp8": true' in sidecar and "--fp8" in sidecar
