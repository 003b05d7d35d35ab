"""The Triton W4A16 AWQ GEMM against the float64 reference (run in the Triton interpreter)."""

from __future__ import annotations

import pytest
import torch

import quantkit.kernels.triton_gemm as tg
from quantkit.kernels.reference import w4a16_matmul_ref
from quantkit.kernels.triton_gemm import SMALL_M_MAX, awq_dequantize, w4a16_gemm
from quantkit.pack import pack_awq, pack_int4, unpack_int4
from quantkit.quantizer import compute_qparams, quantize

KERNELS_UNDER_TEST = ("w4a16_gemm", "awq_dequantize")  # run on the GPU with QUANTKIT_TEST_DEVICE=cuda (tests/conftest.py)

# Relative-norm tolerance per activation dtype: bf16 keeps 8 mantissa bits, fp16 11.
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
GROUP_SIZES = (32, 64, 128)


def random_awq(k: int, n: int, group_size: int, seed: int) -> dict[str, torch.Tensor]:
    """Random codes and zero points over the full 0..15 range, random positive fp16 scales."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    zeros = torch.randint(0, 16, (k // group_size, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(k // group_size, n, generator=gen) * 0.02 + 0.005).half()
    return {"qweight": pack_int4(codes), "qzeros": pack_int4(zeros), "scales": scales}


def random_x(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)


def run(x: torch.Tensor, w: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
    """Call the kernel into a NaN-poisoned output, so any element it fails to write shows."""
    out = torch.full((x.shape[0], w["scales"].shape[1]), float("nan"), dtype=x.dtype)
    y = w4a16_gemm(x, w["qweight"], w["qzeros"], w["scales"], out=out, **kwargs)
    assert y.data_ptr() == out.data_ptr()
    return y


def assert_close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert y.dtype == dtype and y.shape == ref.shape
    assert torch.isfinite(y).all(), "kernel left unwritten (NaN) or non-finite outputs"
    diff = y.double() - ref
    rel = (diff.norm() / ref.norm()).item()
    assert rel < TOL[dtype], f"relative error {rel:.2e} >= {TOL[dtype]:.0e}"
    # Elementwise bound scaled to the output magnitude: catches a few wrong columns/rows that
    # the norm would average away.
    atol = 2 * TOL[dtype] * ref.abs().max().item()
    assert diff.abs().max().item() < atol, f"max abs error {diff.abs().max().item():.3g} >= {atol:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("m", [1, 3, SMALL_M_MAX, SMALL_M_MAX + 1, 40])
def test_matches_reference(m: int, group_size: int, dtype: torch.dtype) -> None:
    # N = 72 is a multiple of 8 but of neither BLOCK_N (64, 128): exercises the N mask.
    k, n = 256, 72
    w = random_awq(k, n, group_size, seed=m * 1000 + group_size)
    x = random_x(m, k, dtype, seed=m)
    assert_close(run(x, w), w4a16_matmul_ref(x, **w), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("m, split_k", [(3, 1), (3, 3), (17, 1)])
def test_rounds_like_the_gpu(m: int, split_k: int, dtype: torch.dtype) -> None:
    """Bit-level contract: dequantize (q - z) * s in x.dtype (one rounding of s to x.dtype, one
    of the product), exact products, fp32 sums, one final rounding. Only the fp32 summation
    order is free, so every output is within one ulp of this torch model of it."""
    k, n, g = 128, 72, 64
    w = random_awq(k, n, g, seed=21)
    x = random_x(m, k, dtype, seed=21)
    q = unpack_int4(w["qweight"])
    z = unpack_int4(w["qzeros"]).repeat_interleave(g, 0)
    s = w["scales"].to(dtype).repeat_interleave(g, 0)
    model = x.double() @ ((q - z).to(dtype) * s).double()
    y = run(x, w, split_k=split_k).double()
    ulp = torch.finfo(dtype).eps * model.abs()  # 1 to 2 ulps of each output
    assert ((y - model).abs() <= ulp + 1e-6).all()
    assert (y == model.to(dtype).double()).float().mean() > 0.95  # ties to the model's rounding


@pytest.mark.parametrize("m", [2, 70])  # 70: two M tiles of the large-M configuration
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_tile_multiple_shapes(m: int, group_size: int) -> None:
    k, n = 128, 64
    w = random_awq(k, n, group_size, seed=7 + group_size)
    x = random_x(m, k, torch.float16, seed=m)
    assert_close(run(x, w), w4a16_matmul_ref(x, **w), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("m", [3, 40])  # both configurations: split-K forced onto large M too
def test_split_k_matches_no_split(m: int, group_size: int, dtype: torch.dtype) -> None:
    k, n = 256, 72  # 2..8 K-tiles depending on group size and configuration
    w = random_awq(k, n, group_size, seed=11 + group_size)
    x = random_x(m, k, dtype, seed=m + 5)
    ref = w4a16_matmul_ref(x, **w)
    whole = run(x, w, split_k=1)
    split = run(x, w, split_k=4)
    many = run(x, w, split_k=1000)  # clamped to one K-tile per split
    default = run(x, w)
    for y in (whole, split, many, default):
        assert_close(y, ref, dtype)
    # Splits only reorder fp32 sums, so they agree with each other far tighter than with ref.
    scale = ref.abs().max().item()
    for y in (split, many, default):
        assert (y.double() - whole.double()).abs().max().item() <= TOL[dtype] * scale


def test_split_k_writes_every_partial(monkeypatch: pytest.MonkeyPatch) -> None:
    """Poison the split-K workspace too: a partial tile left unwritten would surface as NaN."""
    monkeypatch.setattr(tg, "_workspace", lambda s, m, n, device: torch.full((s, m, n), float("nan"), device=device))
    k, n, m = 256, 72, 3
    w = random_awq(k, n, 32, seed=3)
    x = random_x(m, k, torch.float16, seed=3)
    assert_close(run(x, w, split_k=3), w4a16_matmul_ref(x, **w), torch.float16)


def test_quantizer_weights_and_strided_x() -> None:
    """Realistic weights from the quantizer + pack_awq, and a non-contiguous (transposed) x."""
    k, n, g, m = 128, 64, 64, 5
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.05
    params = compute_qparams(weight, g)
    w = pack_awq(quantize(weight, params), params)
    x = torch.randn(k, m, generator=torch.Generator().manual_seed(1)).half().t()
    assert not x.is_contiguous()
    y = run(x, w)
    assert_close(y, w4a16_matmul_ref(x, **w), torch.float16)
    # And it is a faithful stand-in for the dense layer the codes came from.
    dense = x.double() @ weight.double().t()
    assert ((y.double() - dense).norm() / dense.norm()).item() < 0.1


def test_allocates_output_and_empty_m() -> None:
    w = random_awq(128, 64, 128, seed=5)
    x = random_x(2, 128, torch.bfloat16, seed=5)
    y = w4a16_gemm(x, w["qweight"], w["qzeros"], w["scales"])
    assert y.shape == (2, 64) and y.dtype == torch.bfloat16
    empty = w4a16_gemm(x[:0], w["qweight"], w["qzeros"], w["scales"])
    assert empty.shape == (0, 64)


def _bad(k: int = 128, n: int = 64, g: int = 32, m: int = 2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return random_x(m, k, torch.float16, seed=0), random_awq(k, n, g, seed=0)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda x, w: (x.reshape(1, *x.shape), w), "2-D"),
        (lambda x, w: (x[0], w), "2-D"),
        (lambda x, w: (x.float(), w), "float16 or bfloat16"),
        (lambda x, w: (x, {**w, "qweight": w["qweight"].to(torch.int64)}), "qweight must be torch.int32"),
        (lambda x, w: (x, {**w, "qzeros": w["qzeros"].to(torch.int16)}), "qzeros must be torch.int32"),
        (lambda x, w: (x, {**w, "scales": w["scales"].float()}), "scales must be torch.float16"),
        (lambda x, w: (x, {**w, "qweight": w["qweight"].to("meta")}), "device"),
        (lambda x, w: (x, {**w, "scales": w["scales"][:, :60]}), "multiple of 8"),
        (lambda x, w: (x[:, :96], w), "qweight shape"),
        (lambda x, w: (x, {**w, "scales": w["scales"][:3]}), "does not divide K"),
        (lambda x, w: (x, {**w, "scales": w["scales"].repeat(2, 1)}), "group size"),  # g = 16
        (lambda x, w: (x, {**w, "qzeros": w["qzeros"][:2]}), "qzeros shape"),
    ],
)
def test_validation_errors(mutate, message: str) -> None:
    x, w = mutate(*_bad())
    with pytest.raises(ValueError, match=message):
        w4a16_gemm(x, w["qweight"], w["qzeros"], w["scales"])


def test_validation_of_group_256_and_options() -> None:
    x, w = _bad(k=256, g=128)
    with pytest.raises(ValueError, match="group size"):  # g = 256 divides K but is unsupported
        w4a16_gemm(x, w["qweight"], w["qzeros"][:1], w["scales"][:1])
    with pytest.raises(ValueError, match="split_k"):
        w4a16_gemm(x, w["qweight"], w["qzeros"], w["scales"], split_k=0)
    with pytest.raises(ValueError, match="out must be"):
        w4a16_gemm(x, w["qweight"], w["qzeros"], w["scales"], out=torch.empty(2, 64, dtype=torch.bfloat16))


# ---------------------------------------------------------------------------- dequantize + dense matmul (large batches)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("groups, n", [(5, 136), (2, 64)])  # N = 136: not a multiple of the 128-column tile
def test_dequantize_kernel_equals_the_float64_weight_rounded_once(groups: int, n: int, group_size: int, dtype: torch.dtype) -> None:
    k = groups * group_size
    w = random_awq(k, n, group_size, seed=k + n + group_size)
    exact = tg_dequantize_ref(w)  # [K, N] float64
    got = awq_dequantize(w["qweight"], w["qzeros"], w["scales"], dtype)
    assert got.shape == (k, n) and got.dtype == dtype
    # (q - z) is exact and s is fp16; the product is rounded to dtype once, so it equals the
    # float64 product rounded to dtype except where the scale itself is not exact in bf16.
    if dtype == torch.float16:
        assert torch.equal(got, exact.to(dtype))
    else:
        assert torch.allclose(got.double(), exact, rtol=2 ** -7, atol=0)


def tg_dequantize_ref(w: dict[str, torch.Tensor]) -> torch.Tensor:
    from quantkit.pack import dequantize_awq

    return dequantize_awq(w["qweight"], w["qzeros"], w["scales"], torch.float64).t()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_a_triton_linear_takes_dequantize_and_matmul_from_its_backends_row_threshold(monkeypatch, test_device, dtype: torch.dtype) -> None:
    from quantkit.kernels.linear import QuantLinear

    w = random_awq(128, 64, 32, seed=7)
    packed = [w[name].to(test_device) for name in ("qweight", "qzeros", "scales")]
    linear = QuantLinear(*packed, triton=True, dense_from_rows=24)
    calls = []
    monkeypatch.setattr(tg, "w4a16_gemm", lambda *a, _f=tg.w4a16_gemm, **kw: calls.append("gemm") or _f(*a, **kw))
    monkeypatch.setattr(tg, "awq_dequantize", lambda *a, _f=tg.awq_dequantize, **kw: calls.append("dense") or _f(*a, **kw))
    for m, path in ((23, "gemm"), (24, "dense"), (40, "dense")):
        x = random_x(m, 128, dtype, seed=m)
        assert_close(linear(x.to(test_device)).cpu(), w4a16_matmul_ref(x, w["qweight"], w["qzeros"], w["scales"]), dtype)
        assert calls.pop() == path and not calls
