"""The AWQ GEMM layout, checked against examples worked out by hand from the format's description."""

import torch

from quantkit.pack import AWQ_ORDER, dequantize_awq, pack_awq, pack_int4, unpack_awq, unpack_int4
from quantkit.quantizer import QuantParams, compute_qparams, dequantize, quantize


def test_nibbles_hold_columns_in_awq_order():
    # Slot i (bits 4i..4i+3) holds column AWQ_ORDER[i] = 0,2,4,6,1,3,5,7: reading the hex digits
    # from the top slot down gives columns 7,5,3,1,6,4,2,0.
    assert AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)
    codes = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]])
    assert pack_int4(codes).tolist() == [[0x75316420]]


def test_top_nibble_sets_the_sign_bit_of_the_int32():
    codes = torch.tensor([[15, 0, 0, 0, 0, 0, 0, 15]])  # column 7 lands in slot 7
    packed = pack_int4(codes)
    assert packed.dtype == torch.int32
    assert packed.item() == 0xF000000F - 2**32
    assert unpack_int4(packed).tolist() == codes.tolist()


def test_pack_awq_hand_worked_linear():
    # A linear with out=8, in=2 and one group: W.T is [in=2, out=8], so qweight is [2, 1].
    q = torch.tensor([[c, 15 - c] for c in range(8)], dtype=torch.int32)  # [out, in]
    params = QuantParams(scales=torch.full((8, 1), 0.5), zeros=torch.arange(8, dtype=torch.int32).view(8, 1), group_size=2)
    packed = pack_awq(q, params)
    assert packed["qweight"].shape == (2, 1) and packed["qzeros"].shape == (1, 1) and packed["scales"].shape == (1, 8)
    # Input row 0 holds codes 0..7 across columns, row 1 holds 15..8.
    assert packed["qweight"][0, 0].item() == 0x75316420
    assert packed["qweight"][1, 0].item() == 0x8ACE9BDF - 2**32
    assert packed["qzeros"][0, 0].item() == 0x75316420
    assert packed["scales"].dtype == torch.float16
    # Dequantized: W[o, k] = (q[o, k] - zero[o]) * 0.5
    expected = (q.float() - params.zeros.float()) * 0.5
    assert torch.equal(dequantize_awq(packed["qweight"], packed["qzeros"], packed["scales"]), expected)


def test_round_trip_on_random_weights():
    torch.manual_seed(0)
    w = torch.randn(96, 256)
    params = compute_qparams(w, 64)
    q = quantize(w, params)
    packed = pack_awq(q, params)
    assert packed["qweight"].shape == (256, 12) and packed["qzeros"].shape == (4, 12) and packed["scales"].shape == (4, 96)
    q2, params2 = unpack_awq(packed["qweight"], packed["qzeros"], packed["scales"])
    assert torch.equal(q2, q)
    assert torch.equal(params2.zeros, params.zeros)
    assert torch.equal(params2.scales, params.scales)  # scales are fp16-exact by construction
    assert params2.group_size == 64
    assert torch.equal(dequantize_awq(**packed), dequantize(q, params))
