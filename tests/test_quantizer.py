"""Group-wise asymmetric int4: ranges, rounding and the errors users see for bad group sizes."""

import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.quantizer import check_group_size, compute_qparams, dequantize, fake_quantize, gptq_quantize, quantize


def test_codes_zeros_and_scales_stay_in_range():
    torch.manual_seed(1)
    w = torch.randn(64, 128) * torch.logspace(-3, 1, 128)  # very different column magnitudes
    params = compute_qparams(w, 32)
    q = quantize(w, params)
    assert q.dtype == torch.int32 and q.min() >= 0 and q.max() <= 15
    assert params.zeros.min() >= 0 and params.zeros.max() <= 15
    assert torch.equal(params.scales, params.scales.half().float())  # stored as fp16 losslessly
    assert (params.scales > 0).all()


def test_hand_worked_group():
    # A group spanning [-1, 2]: scale = 3/15 = 0.2 (nearest fp16: 0.199951171875), zero = round(1/0.19995) = 5.
    w = torch.linspace(-1, 2, 32).view(1, 32)
    params = compute_qparams(w, 32)
    assert params.scales.item() == pytest.approx(0.199951171875, abs=0)
    assert params.zeros.item() == 5
    q = quantize(w, params)
    assert q[0, 0].item() == 0 and q[0, -1].item() == 15
    # Round-to-nearest: every weight inside the range is within half a step.
    assert (dequantize(q, params) - w).abs().max() <= params.scales.item() / 2 + 1e-6


def test_constant_group_does_not_divide_by_zero():
    w = torch.full((2, 64), 0.25)
    out = fake_quantize(w, 64)
    assert torch.isfinite(out).all()
    assert (out - w).abs().max() < 1e-3


def test_error_shrinks_with_smaller_groups():
    torch.manual_seed(2)
    w = torch.randn(128, 512)
    errors = [(fake_quantize(w, g) - w).pow(2).mean().item() for g in (128, 64, 32)]
    assert errors[0] > errors[1] > errors[2]


def test_group_size_that_does_not_divide_names_the_layer_and_the_fix():
    with pytest.raises(QuantkitError) as e:
        check_group_size(576, 128, "model.layers.0.self_attn.q_proj")
    message = str(e.value)
    assert "model.layers.0.self_attn.q_proj" in message and "576" in message and "[32, 64]" in message


def test_unsupported_group_size_is_refused():
    with pytest.raises(QuantkitError, match="group size 48 is not supported"):
        check_group_size(576, 48)


def correlated_inputs(tokens: int, features: int, seed: int) -> torch.Tensor:
    """Inputs whose channels are correlated, as real activations are (GPTQ has nothing to exploit otherwise)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.eye(features) + 0.15 * torch.randn(features, features, generator=g)
    return torch.randn(tokens, features, generator=g) @ mixing


def test_gptq_rounding_lowers_the_output_error_on_the_same_grid():
    torch.manual_seed(11)
    w = torch.randn(96, 256)
    x = correlated_inputs(2048, 256, seed=12)
    held_out = correlated_inputs(2048, 256, seed=12)[1024:]  # same distribution, other tokens
    params = compute_qparams(w, 32)
    nearest = quantize(w, params)
    gptq = gptq_quantize(w, x[:1024].t() @ x[:1024], params)
    assert gptq.dtype == torch.int32 and gptq.min() >= 0 and gptq.max() <= 15

    def output_error(codes):
        return ((held_out @ dequantize(codes, params).t() - held_out @ w.t()).pow(2).sum() / (held_out @ w.t()).pow(2).sum()).item()

    assert output_error(gptq) < 0.75 * output_error(nearest), (output_error(gptq), output_error(nearest))
    # It trades per-weight error for output error: the weights themselves move further.
    assert (dequantize(gptq, params) - w).pow(2).mean() > (dequantize(nearest, params) - w).pow(2).mean()


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    torch.manual_seed(13)
    w = torch.randn(16, 128)
    params = compute_qparams(w, 64)
    diagonal = torch.diag(torch.rand(128) + 0.5)
    assert torch.equal(gptq_quantize(w, diagonal, params), quantize(w, params))


def test_gptq_act_order_rounds_large_input_channels_first_and_cuts_their_error():
    """Outlier channels (as LLM activations have) rounded last leave no columns to absorb their error."""
    torch.manual_seed(16)
    w = torch.randn(96, 256)
    x = correlated_inputs(4096, 256, seed=17)
    x[:, -16:] *= 10  # the largest inputs come last in the natural column order
    fit, held_out = x[:2048], x[2048:]
    params = compute_qparams(w, 32)

    def output_error(codes):
        return ((held_out @ dequantize(codes, params).t() - held_out @ w.t()).pow(2).sum() / (held_out @ w.t()).pow(2).sum()).item()

    plain = gptq_quantize(w, fit.t() @ fit, params)
    act_order = gptq_quantize(w, fit.t() @ fit, params, act_order=True)
    assert act_order.dtype == torch.int32 and act_order.min() >= 0 and act_order.max() <= 15
    assert output_error(act_order) < 0.5 * output_error(plain), (output_error(act_order), output_error(plain))


def test_gptq_act_order_keeps_the_grid_and_with_uncorrelated_inputs_is_round_to_nearest():
    torch.manual_seed(18)
    w = torch.randn(16, 128)
    params = compute_qparams(w, 64)
    diagonal = torch.diag(torch.rand(128) + 0.5)  # a shuffled order, but nothing to pass on
    assert torch.equal(gptq_quantize(w, diagonal, params, act_order=True), quantize(w, params))


def test_gptq_ignores_inputs_that_were_always_zero():
    torch.manual_seed(14)
    w = torch.randn(8, 64)
    x = correlated_inputs(512, 64, seed=15)
    x[:, 7] = 0.0  # a dead channel: its Hessian row and column are zero, and the inverse must still exist
    params = compute_qparams(w, 32)
    codes = gptq_quantize(w, x.t() @ x, params)
    assert codes.min() >= 0 and codes.max() <= 15
    assert torch.isfinite(dequantize(codes, params)).all()
