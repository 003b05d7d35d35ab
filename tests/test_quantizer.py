"""Group-wise asymmetric int4: ranges, rounding and the errors users see for bad group sizes."""

import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.quantizer import check_group_size, compute_qparams, dequantize, fake_quantize, quantize


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
