"""W4A8 (kernels/w4a8.py): AWQ int4 weights times activations quantized per row to int8, on VNNI.

Up to the fp32 group scaling the kernel's arithmetic is exact integer arithmetic, so it must agree
with w4a8_reference (float64, the same int8 activations) to fp32 rounding, on fresh random inputs
of awkward shapes. Against the unquantized x @ W it differs by the activation quantization, which
is measured here and bounded. Zero, NaN and inf rows have their stated results and leave the other
rows bitwise as they are alone.
"""

from __future__ import annotations

import pytest
import torch

from quantkit.kernels import cpu_ext, w4a8
from quantkit.kernels.w4a8 import prepare_w4a8, quantize_rows_reference, w4a8_linear, w4a8_reference, w4a8_unpack
from quantkit.pack import dequantize_awq, pack_int4

# |kernel - reference| per entry, relative to the reference row's norm: the fp32 group scaling
# stays below 1.2e-7 (600 random shapes and scales), while one int8 activation off by one step moves
# some output of its row by 1.6e-4 of the row's norm or more (99% of them, at these sizes): a
# rounding mismatch cannot hide.
FP32_ROW_RTOL = 2e-6
BF16_RTOL = 2**-8  # the kernel rounds its fp32 result once to bf16, whose 8 significant bits move a value by up to 2^-8 of itself

needs_w4a8 = pytest.mark.skipif(
    not w4a8.w4a8_available(),
    reason=f"the W4A8 kernel is not available here: it needs a CPU with {' and '.join(cpu_ext.W4A8_CPU_FLAGS)} "
    f"(this one {'has' if w4a8.cpu_has_w4a8_instructions() else 'lacks'} them) and quantkit's C++ kernels built and enabled",
)

# (K, g): K = 64, 192, 320 with every group size dividing them, plus 128 and 256 (which divide none of those).
SHAPES_K_G = [(64, 32), (64, 64), (192, 32), (192, 64), (320, 32), (320, 64), (384, 128), (512, 256)]
ROWS = [1, 3, 17, 64, 200]  # 200: past one 96-row chunk of the kernel, with a remainder tile
COLUMNS = [72, 200, 96]  # 72, 200: not multiples of the kernel's 32-column block; 96 is


def random_awq(in_features: int, out_features: int, group_size: int, seed: int):
    """A random AWQ GEMM triplet (random codes, zero points, positive fp16 scales), plus its codes and zero points."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (in_features, out_features), generator=g, dtype=torch.int32)
    zeros = torch.randint(0, 16, (in_features // group_size, out_features), generator=g, dtype=torch.int32)
    scales = (torch.rand(in_features // group_size, out_features, generator=g) * 0.02 + 0.001).to(torch.float16)
    return pack_int4(codes), pack_int4(zeros), scales, codes, zeros


def gaussian(rows: int, cols: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_matches_reference(y: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32: within FP32_ROW_RTOL of each row's norm; bf16: also half a bf16 ulp of each entry."""
    err = (y.double() - ref).abs()
    allowed = FP32_ROW_RTOL * ref.norm(dim=-1, keepdim=True)
    if y.dtype == torch.bfloat16:
        allowed = allowed + BF16_RTOL * ref.abs()
    worst = float((err / allowed).max())
    assert worst <= 1, f"kernel differs from the reference by {worst:.2f}x the allowed error"


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm())


# ---------------------------------------------------------------------------- the kernel is there


def test_the_kernel_is_available_wherever_the_cpu_has_its_instructions():
    if not (cpu_ext.ENABLED and w4a8.cpu_has_w4a8_instructions()):
        pytest.skip(f"this CPU lacks {' or '.join(cpu_ext.W4A8_CPU_FLAGS)} (or the C++ kernels are switched off): nothing to build")
    assert cpu_ext.available(), "quantkit's C++ CPU kernels did not build on this machine (see the warning)"
    assert w4a8.w4a8_available(), "the CPU has AVX-512 BW and VNNI but the build lacks the W4A8 kernel"


# ---------------------------------------------------------------------------- layout


@needs_w4a8
@pytest.mark.parametrize("in_features, group_size", [(64, 32), (192, 64), (320, 64), (256, 128)])
@pytest.mark.parametrize("out_features", [8, 72, 200, 256])
def test_packing_keeps_every_code_zero_point_and_scale(in_features, out_features, group_size):
    qweight, qzeros, scales, codes, zeros = random_awq(in_features, out_features, group_size, seed=in_features + out_features)
    weight = prepare_w4a8(qweight, qzeros, scales)
    padded = -(-out_features // 32) * 32
    assert weight.codes.shape == (padded // 32, in_features // 8, 2, 64) and weight.codes.dtype == torch.uint8
    assert weight.nbytes() < in_features * padded * 0.6  # 4 bits a code, plus the group constants
    assert torch.equal(w4a8_unpack(weight.codes, in_features, out_features), codes)
    # padded columns hold code 0, zero point 0 and scale 0: they compute exact zeros
    assert torch.equal(w4a8_unpack(weight.codes, in_features, padded)[:, out_features:], torch.zeros(in_features, padded - out_features, dtype=torch.int32))
    assert torch.equal(weight.zeros[:, :out_features].int(), zeros) and not weight.zeros[:, out_features:].any()
    assert torch.equal(weight.scales[:, :out_features], scales) and not weight.scales[:, out_features:].any()
    assert (weight.group_size, weight.in_features, weight.out_features) == (group_size, in_features, out_features)


# ---------------------------------------------------------------------------- the activation quantization


def test_the_reference_quantizes_each_row_symmetrically_to_127_steps():
    x = gaussian(8, 192, seed=1) * torch.logspace(-3, 3, 8).unsqueeze(1)
    xq, scale = quantize_rows_reference(x)
    assert xq.dtype == torch.int8 and scale.dtype == torch.float32
    assert torch.equal(xq.abs().amax(dim=1), torch.full((8,), 127, dtype=torch.int8))  # each row's largest entry maps to +-127
    assert torch.allclose(scale, x.abs().amax(dim=1) / 127)
    assert bool(((xq.float() * scale[:, None] - x).abs() <= scale[:, None] * (0.5 + 1e-4)).all())  # rounding to the nearest step


@needs_w4a8
def test_the_kernel_quantizes_activations_exactly_as_the_reference():
    # With W the identity (q = 1 on the diagonal, z = 0, s = 1) the kernel returns scale_m * xq[m]:
    # its int8 activations, read back. Row 0 has amax 127, so 127 / amax = 1 and entries k + 0.5 are
    # exact ties: they must round half to even, as torch.round does.
    K = 192
    codes = torch.eye(K, dtype=torch.int32)
    qweight, qzeros, scales = pack_int4(codes), pack_int4(torch.zeros(K // 64, K, dtype=torch.int32)), torch.ones(K // 64, K, dtype=torch.float16)
    weight = prepare_w4a8(qweight, qzeros, scales)
    x = gaussian(5, K, seed=2) * torch.tensor([[1.0], [1e-3], [1e3], [0.1], [7.0]])
    x[0, 0] = 127.0
    x[0, 1:9] = torch.tensor([-3.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5])
    xq, scale = quantize_rows_reference(x)
    assert xq[0, 1:9].tolist() == [-4, -2, -2, 0, 0, 2, 2, 4]  # half to even
    y = w4a8_linear(x, weight)
    assert torch.equal(y, xq.float() * scale[:, None])


# ---------------------------------------------------------------------------- agreement with the reference


@needs_w4a8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("out_features", COLUMNS)
@pytest.mark.parametrize("in_features, group_size", SHAPES_K_G)
@pytest.mark.parametrize("rows", ROWS)
def test_kernel_matches_the_float64_reference(rows, in_features, group_size, out_features, dtype):
    seed = rows * 100_000 + in_features * 100 + out_features + group_size
    qweight, qzeros, scales, _, _ = random_awq(in_features, out_features, group_size, seed=seed)
    x = gaussian(rows, in_features, seed=seed, dtype=dtype)
    y = w4a8_linear(x, prepare_w4a8(qweight, qzeros, scales))
    assert y.dtype == dtype and y.shape == (rows, out_features)
    assert_matches_reference(y, w4a8_reference(x, qweight, qzeros, scales))


@needs_w4a8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_outlier_columns_still_match_the_reference_and_cost_accuracy(dtype):
    # A few input columns 100x larger (as LLM activations have) set each row's step: the kernel still
    # computes exactly what the reference does, but the other columns keep few bits.
    K, N, g = 320, 200, 64
    qweight, qzeros, scales, _, _ = random_awq(K, N, g, seed=5)
    weight = prepare_w4a8(qweight, qzeros, scales)
    exact_w_t = dequantize_awq(qweight, qzeros, scales, torch.float64).t()
    plain = gaussian(64, K, seed=6)
    outliers = plain.clone()
    outliers[:, [3, 100, 257]] *= 100
    errors = {}
    for name, x in (("gaussian", plain), ("outliers", outliers)):
        x = x.to(dtype)
        y = w4a8_linear(x, weight)
        assert_matches_reference(y, w4a8_reference(x, qweight, qzeros, scales))
        errors[name] = rel_err(y, x.double() @ exact_w_t)
    assert errors["gaussian"] < 2e-2
    assert errors["gaussian"] < errors["outliers"] < 0.2, errors


@needs_w4a8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("in_features, group_size", [(192, 32), (320, 64), (512, 128)])
def test_activation_quantization_error_against_unquantized_x_is_small(in_features, group_size, dtype):
    # Per-row int8 on Gaussian x: a step of ~3 sigma / 127, so ~0.7% relative error. A wrong scale
    # (or codes read from the wrong rows) is far outside the bound.
    qweight, qzeros, scales, _, _ = random_awq(in_features, 136, group_size, seed=in_features)
    x = gaussian(64, in_features, seed=in_features + 1, dtype=dtype)
    y = w4a8_linear(x, prepare_w4a8(qweight, qzeros, scales))
    err = rel_err(y, x.double() @ dequantize_awq(qweight, qzeros, scales, torch.float64).t())
    assert 1e-4 < err < 2e-2, f"relative error {err:.2e} against the unquantized activations"


# ---------------------------------------------------------------------------- zero, tiny, NaN and inf rows


@needs_w4a8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_zero_and_non_finite_rows_give_zeros_and_nan_and_leave_other_rows_alone(dtype):
    # Chosen behaviour: a zero row (or one so small that 127 / amax overflows fp32) gives zeros; a row
    # holding NaN or inf gives NaN in every column (a dense matmul gives NaN for NaN and for inf
    # times weights of both signs). The other rows are bitwise what they are computed alone.
    K, N, g = 192, 72, 64
    qweight, qzeros, scales, _, _ = random_awq(K, N, g, seed=7)
    weight = prepare_w4a8(qweight, qzeros, scales)
    x = gaussian(9, K, seed=8)
    x[1] = 0
    x[3, 17] = float("nan")
    x[5, 0] = float("inf")
    x[6, 100] = -float("inf")
    x[7] = 1e-38  # tiny: 127 / 1e-38 overflows fp32
    x = x.to(dtype)
    y = w4a8_linear(x, weight)
    for row in (1, 7):
        assert torch.equal(y[row], torch.zeros(N, dtype=dtype))
    for row in (3, 5, 6):
        assert bool(y[row].isnan().all()), f"row {row} holds NaN or inf: its output must be NaN"
    clean = [0, 2, 4, 8]
    assert torch.equal(y[clean], w4a8_linear(x[clean], weight))
    ref = w4a8_reference(x, qweight, qzeros, scales)
    assert torch.equal(ref.isnan(), y.isnan()) and bool((ref[1] == 0).all() and (ref[7] == 0).all())
    assert_matches_reference(y[clean], ref[clean])
    bias = torch.randn(N).to(dtype)
    assert torch.equal(w4a8_linear(x, weight, bias)[1], bias)


# ---------------------------------------------------------------------------- the Python surface


@needs_w4a8
def test_bias_and_leading_dimensions():
    qweight, qzeros, scales, _, _ = random_awq(192, 72, 64, seed=9)
    weight = prepare_w4a8(qweight, qzeros, scales)
    x = gaussian(10, 192, seed=10).view(2, 5, 192)
    bias = torch.randn(72)
    y = w4a8_linear(x, weight, bias)
    assert y.shape == (2, 5, 72)
    assert torch.equal(y, (w4a8_linear(x.reshape(10, 192), weight) + bias).view(2, 5, 72))
    assert torch.equal(w4a8_linear(x[:, ::2].transpose(0, 1), weight), w4a8_linear(x[:, ::2].transpose(0, 1).contiguous(), weight))


@needs_w4a8
def test_results_do_not_depend_on_the_thread_count():
    qweight, qzeros, scales, _, _ = random_awq(320, 200, 64, seed=11)
    weight = prepare_w4a8(qweight, qzeros, scales)
    x = gaussian(37, 320, seed=12)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = w4a8_linear(x, weight)
        torch.set_num_threads(max(2, threads))
        assert torch.equal(w4a8_linear(x, weight), one)
    finally:
        torch.set_num_threads(threads)


@needs_w4a8
def test_no_rows_give_an_empty_result():
    qweight, qzeros, scales, _, _ = random_awq(64, 72, 32, seed=13)
    assert w4a8_linear(torch.empty(0, 64), prepare_w4a8(qweight, qzeros, scales)).shape == (0, 72)


# ---------------------------------------------------------------------------- bad inputs


@needs_w4a8
def test_bad_weights_are_refused_with_the_reason():
    qweight, qzeros, scales, _, _ = random_awq(192, 72, 64, seed=14)
    with pytest.raises(ValueError, match="must be 2-D int32"):
        prepare_w4a8(qweight.long(), qzeros, scales)
    with pytest.raises(ValueError, match="not the AWQ GEMM shapes"):
        prepare_w4a8(qweight, qzeros, scales[:, :64])
    with pytest.raises(ValueError, match="group size 192/1 is not one of 32, 64, 128, 256"):  # one group of 192
        prepare_w4a8(qweight, qzeros[:1], scales[:1])
    with pytest.raises(ValueError, match="group size 100/3 is not one of 32, 64, 128, 256 dividing in_features=100"):  # K no multiple of g
        prepare_w4a8(qweight[:100], qzeros[:3], scales[:3])


@needs_w4a8
def test_bad_activations_are_refused_with_the_reason():
    qweight, qzeros, scales, _, _ = random_awq(192, 72, 64, seed=15)
    weight = prepare_w4a8(qweight, qzeros, scales)
    with pytest.raises(TypeError, match="bf16 or fp32 activations, got torch.float16"):
        w4a8_linear(torch.randn(3, 192).half(), weight)
    with pytest.raises(ValueError, match="x has 128 features, the weight takes 192"):
        w4a8_linear(torch.randn(3, 128), weight)


@needs_w4a8
def test_the_ops_check_their_arguments():
    ops = torch.ops.quantkit_cpu
    qweight, qzeros, scales, codes, _ = random_awq(192, 72, 64, seed=16)
    w = prepare_w4a8(qweight, qzeros, scales)
    x, out = torch.randn(3, 192), torch.empty(3, 72)
    with pytest.raises(RuntimeError, match="x must be contiguous bf16 or fp32"):
        ops.w4a8_linear(x.half(), w.codes, w.scales, w.zeros, 64, out)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        ops.w4a8_linear(torch.randn(192, 3).t(), w.codes, w.scales, w.zeros, 64, out)
    with pytest.raises(RuntimeError, match="out must be contiguous .M, N. in x's dtype"):
        ops.w4a8_linear(x, w.codes, w.scales, w.zeros, 64, out.bfloat16())
    with pytest.raises(RuntimeError, match="group size must be a multiple of 16, at most 256, dividing K .K = 192, group size 128"):
        ops.w4a8_linear(x, w.codes, w.scales, w.zeros, 128, out)
    with pytest.raises(RuntimeError, match="packed codes must be w4a8_pack's .* for K = 128"):
        ops.w4a8_linear(x[:, :128].contiguous(), w.codes, w.scales[:2], w.zeros[:2], 64, out)
    with pytest.raises(RuntimeError, match="scales .fp16. and zeros .uint8. must be"):
        ops.w4a8_linear(x, w.codes, w.scales.float(), w.zeros, 64, out)
    with pytest.raises(RuntimeError, match="out has 40 columns but the packed weight has 96"):
        ops.w4a8_linear(x, w.codes, w.scales, w.zeros, 64, torch.empty(3, 40))
    with pytest.raises(RuntimeError, match="codes must lie in 0..15"):
        ops.w4a8_pack(codes + 1)
    with pytest.raises(RuntimeError, match="K must be a multiple of 8"):
        ops.w4a8_pack(codes[:100])
    with pytest.raises(RuntimeError, match="codes must be int32"):
        ops.w4a8_pack(codes.long())
