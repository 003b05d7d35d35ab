"""The CPU kernels and the kernels' surface agree with the float64 references on fresh random inputs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from quantkit.kernels import cpu_ext, cpu_int4
from quantkit.kernels.attention import AttentionMetadata, cpu_layout, paged_attention, store_kv
from quantkit.kernels.linear import DenseLinear, QuantLinear, build_linear
from quantkit.kernels.reference import paged_attention_ref, store_kv_ref, w4a16_matmul_ref
from quantkit.pack import pack_int4

BF16_RTOL = 1e-2
FP32_RTOL = 1e-5

# The int4 GEMM, the bf16 GEMV and the bf16 prefill attention are written in AVX-512 BF16
# instructions; on other CPUs they are not compiled and the runtime takes PyTorch's ops, which the
# tests of the kernels' surface below check on every CPU. Their own tests need such a CPU.
needs_bf16_kernels = pytest.mark.skipif(
    not cpu_ext.cpu_has_bf16_instructions(),
    reason=f"this CPU lacks {' and '.join(cpu_ext.BF16_CPU_FLAGS)}: quantkit's bf16 kernels are not built for it",
)


def cpu_kernels():
    """torch.ops.quantkit_cpu: the portable C++ kernels build on every CPU with a compiler."""
    assert cpu_ext.available(), "quantkit's C++ CPU kernels did not build on this machine (see the warning)"
    return cpu_ext.ops()


def random_awq(in_features: int, out_features: int, group_size: int, seed: int, unit_scales: bool = False):
    """A random AWQ GEMM triplet: random codes, random zero points, random positive fp16 scales."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (in_features, out_features), generator=g, dtype=torch.int32)
    zeros = torch.randint(0, 16, (in_features // group_size, out_features), generator=g, dtype=torch.int32)
    if unit_scales:
        scales = torch.ones(in_features // group_size, out_features, dtype=torch.float16)
    else:
        scales = (torch.rand(in_features // group_size, out_features, generator=g) * 0.02 + 0.001).to(torch.float16)
    return pack_int4(codes), pack_int4(zeros), scales, codes, zeros


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm())


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_repack_keeps_every_code_and_zero_exactly(group_size):
    # With unit scales every weight is the integer q - z; the identity matrix reads W.T back
    # through the fused op, and integers this small are exact in bf16.
    qweight, qzeros, scales, codes, zeros = random_awq(256, 48, group_size, seed=group_size, unit_scales=True)
    weight = cpu_int4.prepare_torch_int4(qweight, qzeros, scales)
    eye = torch.eye(256, dtype=torch.bfloat16)
    w_t = cpu_int4.int4_matmul_fused(eye, weight)
    expected = codes - zeros.repeat_interleave(group_size, dim=0)
    assert torch.equal(w_t.float(), expected.float())


@pytest.fixture(params=["c++ kernel", "plain torch"])
def kernels_impl(request, monkeypatch):
    """Tests that take this run twice: on quantkit's C++ kernels and on the plain-torch fallbacks."""
    monkeypatch.setattr(cpu_ext, "ENABLED", request.param == "c++ kernel")
    if request.param == "c++ kernel":
        cpu_kernels()
    return request.param


@pytest.mark.parametrize("rows", [1, 3, 4, 17, 64, 300, 1030])  # 300, 1030: past the dense thresholds
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_matmul_bf16_matches_reference(rows, group_size, kernels_impl):
    qweight, qzeros, scales, _, _ = random_awq(384, 136, group_size, seed=rows * 1000 + group_size)
    weight = cpu_int4.prepare_cpu_int4(qweight, qzeros, scales)
    native = kernels_impl == "c++ kernel" and cpu_ext.cpu_has_bf16_instructions()
    assert isinstance(weight, cpu_int4.NativeInt4Weight) == native
    x = torch.randn(rows, 384, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    y = cpu_int4.int4_matmul(x, weight)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 136)
    assert rel_err(y, w4a16_matmul_ref(x, qweight, qzeros, scales)) < BF16_RTOL


@pytest.mark.parametrize("rows", [1, 17])
def test_int4_matmul_fp32_matches_reference_to_fp32_precision(rows, kernels_impl):
    qweight, qzeros, scales, _, _ = random_awq(256, 64, 64, seed=rows)
    weight = cpu_int4.prepare_cpu_int4(qweight, qzeros, scales)
    x = torch.randn(rows, 256)
    y = cpu_int4.int4_matmul(x, weight)
    assert y.dtype == torch.float32
    assert rel_err(y, w4a16_matmul_ref(x, qweight, qzeros, scales)) < FP32_RTOL


def test_fused_and_dense_paths_agree_on_the_same_rows():
    qweight, qzeros, scales, _, _ = random_awq(576, 192, 64, seed=7)
    weight = cpu_int4.prepare_torch_int4(qweight, qzeros, scales)
    x = torch.randn(4, 576).to(torch.bfloat16)
    fused = cpu_int4.int4_matmul_fused(x, weight)
    dense = torch.nn.functional.linear(x, cpu_int4.dequantize_cpu_int4(weight, torch.bfloat16))
    assert rel_err(fused, dense.double()) < BF16_RTOL


@pytest.fixture
def emulated_bf16(monkeypatch):
    """A CPU whose bf16 matmuls PyTorch emulates (AVX2 only): no C++ kernels, PyTorch's ops."""
    monkeypatch.setattr(cpu_ext, "ENABLED", False)
    monkeypatch.setattr(cpu_ext, "bf16_matmuls_are_native", lambda: False)


@pytest.mark.parametrize("rows", [511, 512, 1030])
def test_where_bf16_matmuls_are_emulated_large_int4_batches_compute_in_fp32(rows, emulated_bf16):
    qweight, qzeros, scales, _, _ = random_awq(384, 136, 64, seed=rows)
    weight = cpu_int4.prepare_cpu_int4(qweight, qzeros, scales)
    x = torch.randn(rows, 384, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    y = cpu_int4.int4_matmul(x, weight)
    if rows >= cpu_int4.EMULATED_BF16_FP32_FROM_ROWS:  # fp32 dequantize and matmul, rounded once
        expected = torch.nn.functional.linear(x.float(), cpu_int4.dequantize_cpu_int4(weight, torch.float32)).to(torch.bfloat16)
    else:  # fewer rows: the fused op, fast with bf16 on every CPU
        expected = cpu_int4.int4_matmul_fused(x, weight)
    assert y.dtype == torch.bfloat16 and torch.equal(y, expected)
    assert rel_err(y, w4a16_matmul_ref(x, qweight, qzeros, scales)) < BF16_RTOL


@pytest.mark.parametrize("rows", [63, 64, 300])
def test_where_bf16_matmuls_are_emulated_large_dense_batches_compute_in_fp32(rows, emulated_bf16):
    from quantkit.kernels.linear import EMULATED_BF16_FP32_FROM_ROWS, dense_linear

    g = torch.Generator().manual_seed(rows)
    x, weight, bias = (torch.randn(*shape, generator=g).to(torch.bfloat16) for shape in ((rows, 576), (136, 576), (136,)))
    y = dense_linear(x, weight, bias)
    if rows >= EMULATED_BF16_FP32_FROM_ROWS:
        expected = torch.nn.functional.linear(x.float(), weight.float(), bias.float()).to(torch.bfloat16)
    else:
        expected = torch.nn.functional.linear(x, weight, bias)
    assert y.dtype == torch.bfloat16 and torch.equal(y, expected)
    assert rel_err(y, x.double() @ weight.double().t() + bias.double()) < BF16_RTOL


def test_where_bf16_matmuls_are_emulated_decode_attention_weighs_values_in_fp32(emulated_bf16, monkeypatch):
    matmul_operands = []
    real_matmul = torch.matmul

    def recording_matmul(a, b):
        matmul_operands.append((a.dtype, b.dtype))
        return real_matmul(a, b)

    monkeypatch.setattr(torch, "matmul", recording_matmul)
    query, k_cache, v_cache, meta = random_paged_case([9, 40, 3, 17], [1, 1, 1, 1], 9, 3, 64, 16, torch.bfloat16, seed=12)
    out = torch.full_like(query, float("nan"))
    paged_attention(query, cpu_layout(k_cache), cpu_layout(v_cache), meta, scale=0.125, out=out)
    assert matmul_operands == [(torch.float32, torch.float32)] * 2  # Q.K and P.V, neither in emulated bf16
    expected = paged_attention_ref(query, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.cu_seqlens_q, 0.125)
    assert out.dtype == torch.bfloat16 and rel_err(out, expected) < BF16_RTOL


def test_where_bf16_matmuls_are_emulated_a_large_head_is_upcast_in_slices_with_the_same_result(emulated_bf16, monkeypatch):
    from quantkit.kernels import linear

    g = torch.Generator().manual_seed(5)
    x, weight, bias = (torch.randn(*shape, generator=g).to(torch.bfloat16) for shape in ((70, 192), (300, 192), (300,)))
    whole = linear.dense_linear(x, weight, bias)
    monkeypatch.setattr(linear, "EMULATED_UPCAST_ROWS", 128)  # 300 output rows: slices of 128, 128, 44
    sliced = linear.dense_linear(x, weight, bias)
    ulp = whole.float().abs().clamp_min(1e-3) * 2**-7
    assert sliced.shape == whole.shape and ((sliced.float() - whole.float()).abs() <= ulp).all()
    assert rel_err(sliced, x.double() @ weight.double().t() + bias.double()) < BF16_RTOL


def test_bf16_matmuls_count_as_native_with_the_instructions_unless_onednn_is_capped_below_them():
    native = cpu_ext.bf16_matmuls_are_native()
    assert native == (cpu_ext.cpu_has_bf16_instructions() and os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
                      not in cpu_ext.ONEDNN_ISAS_WITHOUT_BF16)
    code = "from quantkit.kernels import cpu_ext; print(cpu_ext.bf16_matmuls_are_native())"

    def answer(**env: str) -> str:
        run = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        return run.stdout.strip()

    assert answer(ONEDNN_MAX_CPU_ISA="AVX2") == "False"  # oneDNN held to AVX2 emulates bf16
    assert answer(DNNL_MAX_CPU_ISA="avx512_core") == "False"  # the older name, any case
    # ATEN_CPU_CAPABILITY picks PyTorch's own vector kernels; oneDNN's matmuls keep the CPU's bf16
    assert answer(ATEN_CPU_CAPABILITY="avx2") == str(cpu_ext.cpu_has_bf16_instructions())


def test_unsupported_group_size_is_rejected_with_the_sizes_that_work(kernels_impl):
    qweight, qzeros, scales, _, _ = random_awq(96, 16, 32, seed=1)
    with pytest.raises(ValueError, match="32, 64, 128, 256"):
        cpu_int4.prepare_cpu_int4(qweight, qzeros, scales[:2])  # 96 / 2 = 48


def test_quant_linear_keeps_leading_dims_and_adds_bias(kernels_impl):
    qweight, qzeros, scales, _, _ = random_awq(128, 40, 32, seed=3)
    bias = torch.randn(40)
    layer = QuantLinear(qweight, qzeros, scales, bias)
    x = torch.randn(2, 3, 128)
    y = layer(x)
    assert y.shape == (2, 3, 40)
    expected = w4a16_matmul_ref(x.reshape(6, 128), qweight, qzeros, scales) + bias.double()
    assert rel_err(y.reshape(6, 40), expected) < FP32_RTOL


def test_build_linear_picks_packed_or_dense_from_the_checkpoint():
    qweight, qzeros, scales, _, _ = random_awq(64, 16, 32, seed=4)
    tensors = {"a.qweight": qweight, "a.qzeros": qzeros, "a.scales": scales, "b.weight": torch.randn(16, 64)}
    assert isinstance(build_linear(tensors, "a", torch.bfloat16), QuantLinear)
    dense = build_linear(tensors, "b", torch.bfloat16)
    assert isinstance(dense, DenseLinear) and dense.weight.dtype == torch.bfloat16
    with pytest.raises(KeyError, match="c.qweight"):
        build_linear(tensors, "c", torch.float32)


# ---------------------------------------------------------------- quantkit's C++ int4 kernel


def native_ops():
    """The kernels written in AVX-512 BF16 (int4 GEMM, bf16 GEMV, bf16 prefill attention): a test of
    them is marked needs_bf16_kernels, and on a CPU that has those instructions they must be built."""
    ops = cpu_kernels()
    assert ops.bf16_available(), "this CPU has AVX-512 BF16 but quantkit's bf16 kernels were not compiled for it"
    return ops


@needs_bf16_kernels
@pytest.mark.parametrize("rows", [255, 256, 300])
def test_where_onednn_emulates_bf16_large_batches_on_quantkits_int4_layout_compute_in_fp32(rows, monkeypatch):
    native_ops()
    monkeypatch.setattr(cpu_ext, "bf16_matmuls_are_native", lambda: False)  # as under ONEDNN_MAX_CPU_ISA=AVX2
    qweight, qzeros, scales, _, _ = random_awq(384, 136, 64, seed=rows)
    weight = cpu_int4.prepare_native_int4(qweight, qzeros, scales)
    x = torch.randn(rows, 384, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    y = cpu_int4.int4_matmul(x, weight)
    if rows >= cpu_int4.NATIVE_DENSE_FROM_ROWS:  # past the kernel's rows: fp32, rounded once
        expected = (x.float() @ cpu_int4.dequantize_native_int4(weight, torch.float32)).to(torch.bfloat16)
    else:  # the kernel itself needs no oneDNN
        expected = cpu_int4.native_int4_linear(x, weight)
    assert y.dtype == torch.bfloat16 and torch.equal(y, expected)
    assert rel_err(y, w4a16_matmul_ref(x, qweight, qzeros, scales)) < BF16_RTOL


@needs_bf16_kernels
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_pack_and_dequantize_keep_every_code_and_zero_exactly(group_size, dtype):
    # Unit scales: every weight is the integer q - z, exact in bf16 and fp32. 200 columns: the
    # last 64-column block is partly padding, which must not leak into the output.
    native_ops()
    qweight, qzeros, scales, codes, zeros = random_awq(512, 200, group_size, seed=group_size, unit_scales=True)
    weight = cpu_int4.prepare_native_int4(qweight, qzeros, scales)
    w_t = cpu_int4.dequantize_native_int4(weight, dtype)
    assert w_t.shape == (512, 200) and w_t.dtype == dtype
    assert torch.equal(w_t.float(), (codes - zeros.repeat_interleave(group_size, dim=0)).float())


@needs_bf16_kernels
def test_native_dequantize_is_exact_in_fp32_with_real_scales():
    native_ops()
    qweight, qzeros, scales, _, _ = random_awq(256, 72, 64, seed=11)
    w_t = cpu_int4.dequantize_native_int4(cpu_int4.prepare_native_int4(qweight, qzeros, scales), torch.float32)
    from quantkit.pack import dequantize_awq

    assert torch.equal(w_t, dequantize_awq(qweight, qzeros, scales, torch.float64).t().float())


@needs_bf16_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 13, 127])  # every row-tile remainder of the kernel
@pytest.mark.parametrize("group_size", [32, 64, 256])
def test_native_int4_linear_matches_reference_for_every_row_tiling(rows, group_size):
    native_ops()
    qweight, qzeros, scales, _, _ = random_awq(512, 136, group_size, seed=rows + group_size)
    weight = cpu_int4.prepare_native_int4(qweight, qzeros, scales)
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    out = torch.full((rows, 136), float("nan"), dtype=torch.bfloat16)
    native_ops().int4_linear(x, weight.codes, weight.scales, weight.zeros, group_size, out)
    assert not out.isnan().any()
    assert rel_err(out, w4a16_matmul_ref(x, qweight, qzeros, scales)) < BF16_RTOL


@needs_bf16_kernels
def test_native_int4_linear_rows_do_not_depend_on_their_batch():
    # Batch invariance: a row's result is the same bits alone as among others (any row tile).
    qweight, qzeros, scales, _, _ = random_awq(576, 192, 32, seed=5)
    weight = cpu_int4.prepare_native_int4(qweight, qzeros, scales)
    native_ops()
    x = torch.randn(11, 576).to(torch.bfloat16)
    together = cpu_int4.native_int4_linear(x, weight)
    for i in range(11):
        assert torch.equal(cpu_int4.native_int4_linear(x[i : i + 1], weight)[0], together[i])


@needs_bf16_kernels
def test_native_kernel_rejects_mismatched_operands_with_a_message():
    ops = native_ops()
    qweight, qzeros, scales, _, _ = random_awq(128, 64, 32, seed=2)
    weight = cpu_int4.prepare_native_int4(qweight, qzeros, scales)
    with pytest.raises(RuntimeError, match="x must be contiguous bf16"):
        ops.int4_linear(torch.randn(2, 128), weight.codes, weight.scales, weight.zeros, 32, torch.empty(2, 64, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="packed codes do not match K"):
        ops.int4_linear(torch.randn(2, 96).bfloat16(), weight.codes, weight.scales, weight.zeros, 32, torch.empty(2, 64, dtype=torch.bfloat16))


# ---------------------------------------------------------------- paged attention (CPU path)




def random_paged_case(context_lens, query_lens, heads, kv_heads, head_dim, block_size, dtype, seed):
    """Random cache and queries with shuffled (non-contiguous) block tables."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables, used = [], 0
    for n in blocks_per_seq:
        tables.append(order[used : used + n])
        used += n
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    query = torch.randn(sum(query_lens), heads, head_dim, generator=g).to(dtype)
    meta = AttentionMetadata.build(tables, list(context_lens), list(query_lens), block_size)
    return query, k_cache, v_cache, meta


CASES = {
    "decode": ([1, 5, 16, 17, 40], [1, 1, 1, 1, 1]),
    "whole prompts": ([1, 5, 16, 17, 40], [1, 5, 16, 17, 40]),
    "chunks after cached tokens": ([20, 33, 48], [7, 33, 16]),
    "mixed decode and prefill": ([9, 40, 3, 17], [1, 12, 3, 1]),
    # beyond SHORT_PREFILL_CONTEXT a chunk gets its own SDPA call; shorter ones share padded ones
    "long and short prefill together": ([300, 40, 270, 2], [300, 12, 20, 1]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 2), (3, 3)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_cpu_paged_attention_matches_reference_fp32(case, heads, kv_heads, block_size, kernels_impl):
    context_lens, query_lens = CASES[case]
    query, k_cache, v_cache, meta = random_paged_case(context_lens, query_lens, heads, kv_heads, 32, block_size, torch.float32, seed=block_size + heads)
    out = torch.full_like(query, float("nan"))
    paged_attention(query, cpu_layout(k_cache), cpu_layout(v_cache), meta, scale=32**-0.5, out=out)
    expected = paged_attention_ref(query, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.cu_seqlens_q, 32**-0.5)
    assert not out.isnan().any()
    assert rel_err(out, expected) < FP32_RTOL


def test_short_prefill_chunks_split_into_several_padded_batches(monkeypatch, kernels_impl):
    import quantkit.kernels.attention as attention

    monkeypatch.setattr(attention, "SHORT_PREFILL_BATCH", 2)
    query, k_cache, v_cache, meta = random_paged_case([5, 30, 17, 2, 9], [5, 4, 17, 2, 1], 4, 2, 32, 16, torch.float32, seed=5)
    assert [b.n for b in meta.sdpa_prefill().short] == [2, 2]  # four prefill chunks, two per batch; one decode row
    out = torch.full_like(query, float("nan"))
    paged_attention(query, cpu_layout(k_cache), cpu_layout(v_cache), meta, scale=32**-0.5, out=out)
    expected = paged_attention_ref(query, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.cu_seqlens_q, 32**-0.5)
    assert not out.isnan().any()
    assert rel_err(out, expected) < FP32_RTOL


def test_cpu_paged_attention_matches_reference_bf16(kernels_impl):
    query, k_cache, v_cache, meta = random_paged_case([9, 40, 3, 17], [1, 12, 3, 1], 9, 3, 64, 16, torch.bfloat16, seed=11)
    out = torch.full_like(query, float("nan"))
    paged_attention(query, cpu_layout(k_cache), cpu_layout(v_cache), meta, scale=0.125, out=out)
    expected = paged_attention_ref(query, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.cu_seqlens_q, 0.125)
    assert rel_err(out, expected) < BF16_RTOL


def test_metadata_slots_follow_the_block_tables():
    meta = AttentionMetadata.build([[7, 2], [5]], context_lens=[20, 3], query_lens=[3, 1], block_size=16)
    # Sequence 0 computes positions 17..19 (block 2), sequence 1 position 2 (block 5).
    assert meta.slot_mapping.tolist() == [2 * 16 + 1, 2 * 16 + 2, 2 * 16 + 3, 5 * 16 + 2]
    assert meta.cu_seqlens_q.tolist() == [0, 3, 4]


def test_store_kv_writes_slots_and_skips_minus_one():
    g = torch.Generator().manual_seed(5)
    k_cache = torch.randn(4, 16, 2, 8, generator=g)
    v_cache = torch.randn(4, 16, 2, 8, generator=g)
    key, value = torch.randn(5, 2, 8, generator=g), torch.randn(5, 2, 8, generator=g)
    meta = AttentionMetadata.build([[3]], [5], [5], 16)
    meta.slot_mapping, meta.skips_slots = torch.tensor([48, -1, 50, 17, -1]), True
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    store_kv_ref(key, value, k_expected, v_expected, meta.slot_mapping)
    k_cpu, v_cpu = cpu_layout(k_cache), cpu_layout(v_cache)
    store_kv(key, value, k_cpu, v_cpu, meta)
    assert torch.equal(k_cpu, cpu_layout(k_expected)) and torch.equal(v_cpu, cpu_layout(v_expected))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("window", [1, 6, 30])
def test_cpu_sliding_window_attention_matches_reference(case, window, kernels_impl):
    context_lens, query_lens = CASES[case]
    query, k_cache, v_cache, meta = random_paged_case(context_lens, query_lens, 6, 2, 32, 16, torch.float32, seed=window)
    out = torch.full_like(query, float("nan"))
    paged_attention(query, cpu_layout(k_cache), cpu_layout(v_cache), meta, scale=0.2, out=out, window=window)
    expected = paged_attention_ref(query, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.cu_seqlens_q, 0.2, window)
    assert not out.isnan().any()
    assert rel_err(out, expected) < FP32_RTOL


def test_windowed_plans_gather_only_the_window_and_are_made_once_per_step(kernels_impl):
    query, k_cache, v_cache, meta = random_paged_case([9, 300, 40, 3], [1, 300, 1, 3], 9, 3, 64, 16, torch.bfloat16, seed=12)
    plan = meta.windowed(8)
    assert plan is meta.windowed(8) and meta.windowed(None) is meta and meta.windowed(300) is meta  # 300: no context is longer
    if kernels_impl == "plain torch":
        assert plan.decode_slots.shape == (2, 8) and plan.decode_mask is None  # both decoding sequences are past the window
    else:  # the kernel reads the block tables itself and gets the window as an argument
        assert plan.decode_slots is None and plan.decode_seqs.tolist() == [0, 2]
    (_, _, slots, mask), = plan.sdpa_prefill().long  # the 300-token prompt: keys from its first query's window on, all of them here
    assert slots.numel() == 300 and mask.shape == (300, 300) and int(mask.sum(1).max()) == 8
    out = paged_attention(query, cpu_layout(k_cache), cpu_layout(v_cache), meta, scale=0.125, window=8)
    expected = paged_attention_ref(query, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.cu_seqlens_q, 0.125, 8)
    assert rel_err(out, expected) < BF16_RTOL


# ---------------------------------------------------------------- the C++ decode kernel itself


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, FP32_RTOL), (torch.bfloat16, BF16_RTOL), (torch.float16, BF16_RTOL)])
@pytest.mark.parametrize("head_dim", [24, 64, 128])  # 24: the portable loops; 64/128: the AVX-512 path where the CPU has it
def test_cpp_decode_kernel_matches_reference_over_long_uneven_contexts(dtype, rtol, head_dim):
    assert cpu_ext.available(), "quantkit's C++ CPU kernels did not build on this machine (see the warning)"
    context_lens = [1, 15, 16, 17, 333, 700]
    query, k_cache, v_cache, meta = random_paged_case(context_lens, [1] * 6, 8, 2, head_dim, 16, dtype, seed=head_dim)
    out = torch.full_like(query, float("nan"))
    paged_attention(query, cpu_layout(k_cache), cpu_layout(v_cache), meta, scale=head_dim**-0.5, out=out)
    expected = paged_attention_ref(query, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.cu_seqlens_q, head_dim**-0.5)
    assert not out.isnan().any()
    assert rel_err(out, expected) < rtol


def test_cpp_decode_kernel_reads_strided_query_rows_and_writes_only_decode_rows():
    # The model hands it q as a view into the fused [T, H + Hkv, D] projection; prefill rows are
    # written by the SDPA path, so the kernel must leave them alone.
    assert cpu_ext.available()
    query, k_cache, v_cache, meta = random_paged_case([9, 40, 3, 17], [1, 12, 3, 1], 4, 2, 32, 16, torch.float32, seed=3)
    fused = torch.cat([query, torch.randn(query.shape[0], 2, 32)], dim=1)
    strided = fused[:, :4]
    assert not strided.is_contiguous()
    out = torch.full_like(query, float("nan"))
    cpu_ext.ops().paged_decode(strided, cpu_layout(k_cache), cpu_layout(v_cache), meta.block_tables, meta.context_lens,
                               meta.decode_rows, meta.decode_seqs, 16, 32**-0.5, 0, out)
    expected = paged_attention_ref(query, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.cu_seqlens_q, 32**-0.5)
    decode_rows = meta.decode_rows
    assert rel_err(out[decode_rows], expected[decode_rows]) < FP32_RTOL
    others = torch.ones(query.shape[0], dtype=torch.bool)
    others[decode_rows] = False
    assert out[others].isnan().all()


def test_cpp_decode_kernel_is_batch_invariant():
    # A sequence's output does not depend on which other sequences share the call, bit for bit.
    assert cpu_ext.available()
    query, k_cache, v_cache, meta = random_paged_case([50, 7, 300, 129], [1, 1, 1, 1], 9, 3, 64, 16, torch.bfloat16, seed=9)
    k_cpu, v_cpu = cpu_layout(k_cache), cpu_layout(v_cache)
    together = paged_attention(query, k_cpu, v_cpu, meta, scale=0.125)
    for i in range(4):
        alone_meta = AttentionMetadata.build([meta.block_tables[i].tolist()], [meta.context_lens_list[i]], [1], 16)
        alone = paged_attention(query[i : i + 1], k_cpu, v_cpu, alone_meta, scale=0.125)
        assert torch.equal(alone[0], together[i])


# ---------------------------------------------------------------- the C++ bf16 prefill kernel itself


def run_prefill_kernel(query, k_cache, v_cache, meta, scale, window=0, out=None):
    out = torch.full_like(query, float("nan")) if out is None else out
    cpu_ext.ops().paged_prefill(query, cpu_layout(k_cache), cpu_layout(v_cache), meta.block_tables, meta.context_lens, meta.prefill_starts,
                                meta.prefill_lens, meta.prefill_seqs, meta.block_size, scale, window, out)
    return out


PREFILL_CASES = {
    # query lengths around the kernel's 16-position tiles, contexts around its 32-key chunks and the blocks
    "whole prompts": ([2, 15, 16, 17, 31, 32, 33, 100], [2, 15, 16, 17, 31, 32, 33, 100]),
    "chunks after cached tokens": ([20, 47, 64, 65, 300], [3, 17, 32, 2, 129]),
    "prefill among decode rows": ([9, 40, 3, 17, 70], [1, 12, 3, 1, 70]),
}


@needs_bf16_kernels
@pytest.mark.parametrize("case", list(PREFILL_CASES))
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 64), (8, 2, 128)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_cpp_prefill_kernel_matches_reference(case, heads, kv_heads, head_dim, block_size):
    native_ops()
    context_lens, query_lens = PREFILL_CASES[case]
    query, k_cache, v_cache, meta = random_paged_case(context_lens, query_lens, heads, kv_heads, head_dim, block_size, torch.bfloat16,
                                                      seed=head_dim + block_size + heads)
    out = run_prefill_kernel(query, k_cache, v_cache, meta, head_dim**-0.5)
    expected = paged_attention_ref(query, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.cu_seqlens_q, head_dim**-0.5)
    prefill = torch.ones(query.shape[0], dtype=torch.bool)
    if meta.decode_rows is not None:
        prefill[meta.decode_rows] = False
    assert out[~prefill].isnan().all()  # decode rows belong to the decode kernel: left alone
    assert not out[prefill].isnan().any()
    assert rel_err(out[prefill], expected[prefill]) < BF16_RTOL


@needs_bf16_kernels
@pytest.mark.parametrize("window", [1, 5, 32, 45])
def test_cpp_prefill_kernel_sliding_window_matches_reference(window):
    native_ops()
    query, k_cache, v_cache, meta = random_paged_case([300, 70, 20], [300, 33, 20], 6, 2, 64, 16, torch.bfloat16, seed=window)
    out = run_prefill_kernel(query, k_cache, v_cache, meta, 0.125, window=window)
    expected = paged_attention_ref(query, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.cu_seqlens_q, 0.125, window)
    assert not out.isnan().any()
    assert rel_err(out, expected) < BF16_RTOL


@needs_bf16_kernels
def test_cpp_prefill_kernel_handles_large_logits_and_strided_query_rows():
    # Logits of several hundred (a query aligned with its keys) must not overflow the softmax, and
    # the model hands q over as a view into the fused [T, H + 2 Hkv, D] projection.
    native_ops()
    query, k_cache, v_cache, meta = random_paged_case([90, 40], [90, 40], 9, 3, 64, 16, torch.bfloat16, seed=21)
    query = (query.float() * 8).to(torch.bfloat16)
    fused = torch.cat([query, torch.randn(query.shape[0], 6, 64).to(torch.bfloat16)], dim=1)
    strided = fused[:, :9]
    assert not strided.is_contiguous()
    out = run_prefill_kernel(strided, k_cache, v_cache, meta, 1.0)
    expected = paged_attention_ref(query, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.cu_seqlens_q, 1.0)
    assert not out.isnan().any()
    assert rel_err(out, expected) < BF16_RTOL


@needs_bf16_kernels
def test_cpp_prefill_kernel_rows_do_not_depend_on_batch_or_chunking():
    # A prompt's rows are the same bit for bit alone, among other prompts, and computed as two
    # chunks (the second after cached tokens), as chunked prefill and continuous batching need.
    native_ops()
    query, k_cache, v_cache, meta = random_paged_case([77, 130, 5], [77, 130, 5], 9, 3, 64, 16, torch.bfloat16, seed=8)
    together = run_prefill_kernel(query, k_cache, v_cache, meta, 0.125)
    table, start = meta.block_tables[1].tolist(), meta.cu[1]
    alone_meta = AttentionMetadata.build([table], [130], [130], 16)
    alone = run_prefill_kernel(query[start : start + 130], k_cache, v_cache, alone_meta, 0.125)
    assert torch.equal(alone, together[start : start + 130])
    first = AttentionMetadata.build([table], [50], [50], 16)  # positions 0..49
    second = AttentionMetadata.build([table], [130], [80], 16)  # positions 50..129 over the cached 0..49
    chunked = torch.cat([run_prefill_kernel(query[start : start + 50], k_cache, v_cache, first, 0.125),
                         run_prefill_kernel(query[start + 50 : start + 130], k_cache, v_cache, second, 0.125)])
    assert torch.equal(chunked, together[start : start + 130])


@needs_bf16_kernels
def test_cpp_prefill_kernel_rejects_what_it_does_not_compute_with_a_message():
    native_ops()
    query, k_cache, v_cache, meta = random_paged_case([20], [20], 4, 2, 32, 16, torch.bfloat16, seed=2)
    with pytest.raises(RuntimeError, match="head dim 32 is not supported"):
        run_prefill_kernel(query, k_cache, v_cache, meta, 0.2)
    query, k_cache, v_cache, meta = random_paged_case([20], [20], 4, 2, 64, 16, torch.float32, seed=2)
    with pytest.raises(RuntimeError, match="must be bf16"):
        run_prefill_kernel(query, k_cache, v_cache, meta, 0.2)


def test_paged_attention_uses_the_prefill_kernel_for_bf16_and_sdpa_otherwise(monkeypatch):
    import quantkit.kernels.attention as attention

    calls, sdpa = [], attention.F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    # 24: a head dim the kernel is not compiled for; 64 takes the kernel where the CPU has it
    assert cpu_ext.bf16_available() == cpu_ext.cpu_has_bf16_instructions()
    for head_dim, sdpa_calls in [(64, 0 if cpu_ext.bf16_available() else 1), (24, 1)]:
        calls.clear()
        query, k_cache, v_cache, meta = random_paged_case([40], [40], 4, 2, head_dim, 16, torch.bfloat16, seed=4)
        out = paged_attention(query, cpu_layout(k_cache), cpu_layout(v_cache), meta, scale=0.125)
        expected = paged_attention_ref(query, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.cu_seqlens_q, 0.125)
        assert len(calls) == sdpa_calls and (meta._sdpa is None) == (sdpa_calls == 0)  # no SDPA plan is made for the kernel
        assert rel_err(out, expected) < BF16_RTOL


# ---------------------------------------------------------------- RMSNorm (kernels/norm.py)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, FP32_RTOL), (torch.bfloat16, BF16_RTOL), (torch.float16, BF16_RTOL)])
@pytest.mark.parametrize("rows", [1, 3, 300])
def test_rms_norm_and_add_rms_norm_match_reference(dtype, rtol, rows, kernels_impl):
    from quantkit.kernels.norm import add_rms_norm, rms_norm

    g = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 576, generator=g) * 3).to(dtype)
    residual = torch.randn(rows, 576, generator=g).to(dtype)
    weight = (torch.rand(576, generator=g) + 0.5).to(dtype)
    assert rel_err(rms_norm(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5)) < rtol

    expected_sum = (x.double() + residual.double()).to(dtype)  # the sum is rounded to the dtype, as an add would be
    normed, new_residual = add_rms_norm(x.clone(), residual.clone(), weight, 1e-5)
    assert torch.equal(new_residual, expected_sum)
    assert rel_err(normed, rms_norm_ref(expected_sum, weight, 1e-5)) < rtol
    first, passthrough = add_rms_norm(x, None, weight, 1e-5)  # block 0: no residual yet
    assert passthrough is x and rel_err(first, rms_norm_ref(x, weight, 1e-5)) < rtol


# ---------------------------------------------------------------- dense GEMV, RoPE + KV store


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5])  # 5: past GEMV_MAX_ROWS, oneDNN's matmul
@pytest.mark.parametrize("out_features", [37, 576])  # 37: not a multiple of the kernel's 4 rows
def test_dense_linear_bf16_matches_reference(rows, out_features):
    from quantkit.kernels.linear import dense_linear

    g = torch.Generator().manual_seed(rows * out_features)
    x = torch.randn(rows, 576, generator=g).to(torch.bfloat16)
    weight = torch.randn(out_features, 576, generator=g).to(torch.bfloat16)
    bias = torch.randn(out_features, generator=g).to(torch.bfloat16)
    y = dense_linear(x, weight, bias)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, out_features)
    assert rel_err(y, x.double() @ weight.double().t() + bias.double()) < BF16_RTOL


def rotate_ref(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    x, half = x.double(), x.shape[-1] // 2
    rotated = torch.cat([x[..., half:], x[..., :half]], dim=-1)  # roll by D/2; the sign is in signed_sin
    return x * cos.double() + rotated * signed_sin.double()


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, FP32_RTOL), (torch.bfloat16, BF16_RTOL)])
def test_rotate_and_store_kv_rotates_q_and_k_and_writes_the_cache(dtype, rtol, kernels_impl):
    from quantkit.kernels.attention import rotate_and_store_kv

    heads, kv_heads, dim, tokens = 6, 2, 32, 5
    g = torch.Generator().manual_seed(3)
    fused = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g).to(dtype)  # a q/k/v projection's output
    qk_flat, v_flat = fused.split([(heads + kv_heads) * dim, kv_heads * dim], dim=-1)
    qk, v = qk_flat.reshape(tokens, heads + kv_heads, dim), v_flat.reshape(tokens, kv_heads, dim)  # strided views
    angles = torch.rand(tokens, 1, dim // 2, generator=g) * 6
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(dtype)
    signed_sin = torch.cat([-angles.sin(), angles.sin()], -1).to(dtype)
    expected_qk = rotate_ref(qk, cos, signed_sin)
    expected_v = v.clone()
    k_cache = torch.full((kv_heads, 4 * 16, dim), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    meta = AttentionMetadata.build([[2, 0]], [21], [tokens], 16)  # positions 16..20: block 0 of the table, i.e. cache block 0
    meta.slot_mapping, meta.skips_slots = torch.tensor([5, -1, 40, 17, 63]), True
    rotated = rotate_and_store_kv(qk, v, cos, signed_sin, k_cache, v_cache, meta, heads)
    assert rel_err(rotated, expected_qk) < rtol
    for t, slot in enumerate(meta.slot_mapping.tolist()):
        if slot >= 0:
            assert rel_err(k_cache[:, slot], expected_qk[t, heads:]) < rtol
            assert torch.equal(v_cache[:, slot], expected_v[t])
    written = torch.zeros(64, dtype=torch.bool)
    written[[5, 40, 17, 63]] = True
    assert k_cache[:, ~written].isnan().all() and v_cache[:, ~written].isnan().all()  # slot -1: nothing written


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, FP32_RTOL), (torch.bfloat16, BF16_RTOL)])
def test_silu_and_mul_matches_reference_over_large_magnitudes(dtype, rtol, kernels_impl):
    from quantkit.kernels.norm import silu_and_mul

    g = torch.Generator().manual_seed(8)
    gate_up = (torch.randn(7, 2 * 1536, generator=g) * 20).to(dtype)  # |x| up to ~90: both tails of the sigmoid
    gate, up = gate_up.double().chunk(2, dim=-1)
    assert rel_err(silu_and_mul(gate_up), torch.nn.functional.silu(gate) * up) < rtol


def test_a_failed_kernel_build_is_reported_by_its_first_compiler_error():
    ninja_output = RuntimeError(
        "Error building extension 'quantkit_cpu_kernels': [1/5] c++ -MMD -c ops.cpp -o ops.o\n"
        "FAILED: ops.o\n/src/kernels/csrc/ops.cpp:35:1: error: expected declaration before '}' token\n"
        "ninja: build stopped: subcommand failed.")
    assert cpu_ext.build_failure_reason(ninja_output) == "/src/kernels/csrc/ops.cpp:35:1: error: expected declaration before '}' token"
    assert cpu_ext.build_failure_reason(FileNotFoundError("ninja not found\n")) == "ninja not found"
    assert cpu_ext.build_failure_reason(OSError()) == "OSError"


def test_the_switch_selects_the_plain_torch_paths(monkeypatch):
    monkeypatch.setattr(cpu_ext, "ENABLED", False)
    assert not cpu_ext.available() and cpu_ext.ops() is None
    qweight, qzeros, scales, _, _ = random_awq(128, 64, 32, seed=6)
    assert isinstance(cpu_int4.prepare_cpu_int4(qweight, qzeros, scales), cpu_int4.CpuInt4Weight)


@pytest.mark.parametrize("value,enabled", [("0", False), ("1", True)])
def test_the_switch_is_read_from_the_environment_at_import(value, enabled):
    code = "from quantkit.kernels import cpu_ext; print(cpu_ext.ENABLED)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, cpu_ext.SWITCH: value}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(enabled)


# ---------------------------------------------------------------- target log-probabilities (kernels/logprobs.py)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, FP32_RTOL), (torch.bfloat16, FP32_RTOL), (torch.float16, FP32_RTOL)])
@pytest.mark.parametrize("vocab", [7, 1000, 49152])  # 7: under one 16-wide vector; 1000: a tail after the vectors
def test_target_logprobs_match_a_float64_log_softmax(dtype, rtol, vocab, kernels_impl):
    from quantkit.kernels.logprobs import target_logprobs

    g = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(37, vocab, generator=g) * 8).to(dtype)  # wide logits: a peaked softmax, as a model's
    targets = torch.randint(0, vocab, (37,), generator=g)
    argmax = logits.double().argmax(-1)
    targets[::3] = argmax[::3]  # a third of the rows score their greedy token
    logprobs, greedy = target_logprobs(logits, targets)
    expected = logits.double().log_softmax(-1).gather(1, targets.unsqueeze(1)).squeeze(1)
    # The inputs are exact in every dtype, so only the fp32 arithmetic differs from the reference.
    assert logprobs.dtype == torch.float32 and rel_err(logprobs, expected) < rtol
    assert torch.equal(greedy, argmax == targets)


def test_target_logprobs_call_the_first_of_tied_maxima_greedy_as_argmax_does(kernels_impl):
    from quantkit.kernels.logprobs import target_logprobs

    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    logits[:, [5, 40, 99]] = 50.0  # three tied maxima per row, in different 16-lane vectors and the tail
    logprobs, greedy = target_logprobs(logits, torch.tensor([5, 40, 99]))
    assert greedy.tolist() == [True, False, False]
    expected = logits.double().log_softmax(-1)[0, 5]
    assert torch.allclose(logprobs, torch.full((3,), float(expected), dtype=torch.float32), rtol=FP32_RTOL)


def test_target_logprobs_read_strided_rows_without_copying_them(kernels_impl):
    from quantkit.kernels.logprobs import target_logprobs

    wide = torch.randn(8, 2 * 500, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    logits = wide[:, :500]  # rows 1,000 apart: the kernel reads them in place
    targets = torch.arange(8) * 60
    logprobs, _ = target_logprobs(logits, targets)
    expected = logits.double().log_softmax(-1).gather(1, targets.unsqueeze(1)).squeeze(1)
    assert rel_err(logprobs, expected) < FP32_RTOL


def test_target_logprobs_kernel_rejects_a_target_outside_the_vocabulary():
    cpu_kernels()
    logits = torch.randn(2, 32).to(torch.bfloat16)
    out, greedy = torch.empty(2), torch.empty(2, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="target 32 of row 1 is outside the vocabulary of 32"):
        torch.ops.quantkit_cpu.target_logprobs(logits, torch.tensor([0, 32]), out, greedy)


def test_int4_weights_take_quantkits_layout_exactly_where_the_cpu_has_bf16_instructions():
    # On an AVX2-only CPU the int4 kernel is not compiled: the weights go to PyTorch's fused op.
    qweight, qzeros, scales, _, _ = random_awq(128, 64, 32, seed=3)
    weight = cpu_int4.prepare_cpu_int4(qweight, qzeros, scales)
    expected = cpu_int4.NativeInt4Weight if cpu_ext.cpu_has_bf16_instructions() else cpu_int4.CpuInt4Weight
    assert type(weight) is expected
    x = torch.randn(3, 128).to(torch.bfloat16)
    assert rel_err(cpu_int4.int4_matmul(x, weight), w4a16_matmul_ref(x, qweight, qzeros, scales)) < BF16_RTOL


# ---------------------------------------------------------------- int8 output head

needs_int8_kernel = pytest.mark.skipif(
    not cpu_ext.cpu_has_int8_instructions(),
    reason=f"this CPU lacks {' and '.join(cpu_ext.INT8_CPU_FLAGS)}: quantkit's int8 GEMV is not built for it",
)


def q8_0_weight(out_features: int, in_features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A GGUF Q8_0-style weight: fp16 scale d and int8 codes per 32 inputs (one code at +-127 per
    group, as Q8_0's amax / 127 scale makes it), dequantized in fp32 as transformers does."""
    g = torch.Generator().manual_seed(seed)
    groups = in_features // 32
    codes = torch.randint(-127, 128, (out_features, groups, 32), generator=g, dtype=torch.int32)
    codes[:, :, 0] = torch.where(torch.rand(out_features, groups, generator=g) < 0.5, -127, 127)
    d = (torch.rand(out_features, groups, generator=g) * 1e-3 + 1e-5).to(torch.float16)
    weight = (codes.float() * d.float().unsqueeze(-1)).reshape(out_features, in_features)
    return weight, codes.reshape(out_features, in_features).to(torch.int8), d


@pytest.mark.parametrize("stored", [torch.float32, torch.float16])  # as dequantized, as an artifact keeps it
def test_int8_quantize_gives_a_q8_0_weight_its_own_codes_back(stored):
    from quantkit.kernels.linear import quantize_int8

    weight, codes, d = q8_0_weight(64, 576, seed=1)
    q = quantize_int8(weight.to(stored))
    assert torch.equal(q.codes, codes)
    if stored == torch.float32:
        assert torch.equal(q.scales, d)
    else:  # fp16 storage rounds d * 127 once: the scale may move by one fp16 step, never more
        steps = (q.scales.view(torch.int16).int() - d.view(torch.int16).int()).abs()
        assert int(steps.max()) <= 1


def test_int8_quantize_rounds_to_nearest_within_half_a_step_and_keeps_zero_groups_zero():
    from quantkit.kernels.linear import dequantize_int8, quantize_int8

    weight = torch.randn(40, 96, generator=torch.Generator().manual_seed(2)) * 0.05
    weight[3] = 0.0  # an all-zero row: zero scales, zero codes, no NaN
    q = quantize_int8(weight)
    error = (dequantize_int8(q, torch.float32) - weight).abs().view(40, 3, 32)
    step = q.scales.float().unsqueeze(-1)
    assert bool((error <= step / 2 + 1e-7).all())
    assert int(q.codes.abs().max()) == 127 and not q.codes[3].any() and not q.scales[3].any()
    with pytest.raises(ValueError, match="divisible by 32"):
        quantize_int8(torch.randn(4, 48))


def test_int8_quantize_and_its_error_ratio_give_the_same_answer_in_row_chunks(monkeypatch):
    from quantkit.kernels import linear

    weight = (torch.randn(50, 64, generator=torch.Generator().manual_seed(3)) * 0.05).to(torch.float16)
    whole = linear.quantize_int8(weight)
    ratio = linear.int8_error_ratio(weight, whole, torch.bfloat16)
    monkeypatch.setattr(linear, "INT8_CHUNK_ROWS", 7)  # 50 rows: 8 chunks, the last one short
    chunked = linear.quantize_int8(weight)
    assert torch.equal(chunked.codes, whole.codes) and torch.equal(chunked.scales, whole.scales)
    assert linear.int8_error_ratio(weight, chunked, torch.bfloat16) == pytest.approx(ratio, rel=1e-6)
    assert 2 < ratio < 5  # Gaussian fp16 weights: the int8 copy is about 3x further than bf16


@needs_int8_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])  # 5, 9: more than one tile of x
@pytest.mark.parametrize("out_features,in_features", [(37, 576), (260, 64), (16, 96), (2100, 64)])  # 37, 260: not multiples of 16; 2100: past one 64-block chunk per thread
def test_int8_gemv_matches_reference(rows, out_features, in_features):
    from quantkit.kernels.linear import int8_linear, pack_int8, quantize_int8
    from quantkit.kernels.reference import int8_matmul_ref

    g = torch.Generator().manual_seed(rows * out_features + in_features)
    q = quantize_int8(torch.randn(out_features, in_features, generator=g))
    x = torch.randn(rows, in_features, generator=g).to(torch.bfloat16)
    packed = pack_int8(q)
    out = torch.full((rows, out_features), float("nan"), dtype=torch.bfloat16)  # poisoned: every entry must be written
    cpu_ext.op("int8_gemv")(x, packed.codes, packed.scales, out)
    assert rel_err(out, int8_matmul_ref(x, q.codes, q.scales)) < BF16_RTOL
    assert torch.equal(int8_linear(x, packed), out)


@needs_int8_kernel
def test_int8_gemv_keeps_small_entries_next_to_a_massive_activation():
    # x goes onto a 16-bit grid scaled by its largest entry: next to a 4096, N(0, 1) entries keep
    # only their leading bits, yet no output moves by more than 2^-8 of the largest one, and
    # without the outlier the same entries compute within bf16 tolerance.
    from quantkit.kernels.linear import int8_linear, pack_int8, quantize_int8
    from quantkit.kernels.reference import int8_matmul_ref

    g = torch.Generator().manual_seed(5)
    q = quantize_int8(torch.randn(64, 576, generator=g))
    x = torch.randn(2, 576, generator=g)
    x[0, 17], x[1, 300] = 4096.0, -4096.0
    x = x.to(torch.bfloat16)
    exact = int8_matmul_ref(x, q.codes, q.scales)
    without_outlier = x.clone()
    without_outlier[0, 17] = without_outlier[1, 300] = 0
    small_part = int8_matmul_ref(without_outlier, q.codes, q.scales)  # what the small entries contribute
    error = (int8_linear(x, pack_int8(q)).double() - exact).abs()
    assert float(error.max()) < 2 ** -8 * float(exact.abs().max())
    assert rel_err(int8_linear(without_outlier, pack_int8(q)), small_part) < BF16_RTOL


@needs_int8_kernel
def test_int8_gemv_rejects_mismatched_operands_with_a_message():
    from quantkit.kernels.linear import pack_int8, quantize_int8

    packed = pack_int8(quantize_int8(torch.randn(32, 64)))
    with pytest.raises(RuntimeError, match="x and out must be bf16"):
        cpu_ext.op("int8_gemv")(torch.randn(1, 64), packed.codes, packed.scales, torch.empty(1, 32, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="shapes do not match"):
        cpu_ext.op("int8_gemv")(torch.randn(1, 96).bfloat16(), packed.codes, packed.scales, torch.empty(1, 32, dtype=torch.bfloat16))


def test_the_int8_kernel_is_built_exactly_where_the_cpu_has_its_instructions():
    assert cpu_ext.int8_available() == cpu_ext.cpu_has_int8_instructions()


@needs_int8_kernel
def test_output_head_reads_the_int8_copy_for_few_bf16_rows_and_the_dense_head_otherwise():
    from quantkit.kernels.linear import INT8_HEAD_MAX_ROWS, OutputHead, dense_linear, int8_linear, pack_int8, quantize_int8

    weight = torch.randn(100, 64, generator=torch.Generator().manual_seed(6))
    packed = pack_int8(quantize_int8(weight))
    head = OutputHead(weight.to(torch.bfloat16), packed)
    few, many = torch.randn(INT8_HEAD_MAX_ROWS, 64).bfloat16(), torch.randn(INT8_HEAD_MAX_ROWS + 1, 64).bfloat16()
    assert torch.equal(head(few), int8_linear(few, packed))
    assert torch.equal(head(many), dense_linear(many, head.weight))
    fp32_head = OutputHead(weight, packed)
    assert torch.equal(fp32_head(few.float()), dense_linear(few.float(), weight))  # the int8 copy is for bf16 only


@needs_int8_kernel
def test_int8_gemv_turns_a_row_with_nan_or_inf_into_nan_and_leaves_the_others():
    from quantkit.kernels.linear import int8_linear, pack_int8, quantize_int8
    from quantkit.kernels.reference import int8_matmul_ref

    q = quantize_int8(torch.randn(48, 64, generator=torch.Generator().manual_seed(8)))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    x[0, 5], x[2, 60] = float("nan"), float("inf")
    y = int8_linear(x, pack_int8(q))
    assert bool(y[0].isnan().all()) and bool(y[2].isnan().all())
    assert rel_err(y[1:2], int8_matmul_ref(x[1:2], q.codes, q.scales)) < BF16_RTOL


def test_heads_take_zero_rows():
    # A step where no sequence samples (a long prompt's first chunk) asks the head for no rows.
    from quantkit.kernels.linear import OutputHead, dense_linear, pack_int8, quantize_int8

    weight = torch.randn(40, 64).to(torch.bfloat16)
    assert dense_linear(torch.empty(0, 64, dtype=torch.bfloat16), weight).shape == (0, 40)
    if cpu_ext.cpu_has_int8_instructions():
        head = OutputHead(weight, pack_int8(quantize_int8(weight.float())))
        assert head(torch.empty(0, 64, dtype=torch.bfloat16)).shape == (0, 40)


def test_a_lock_left_by_an_interrupted_build_is_removed_and_a_fresh_one_kept(tmp_path):
    # torch's builder waits as long as the lock exists: a killed build must not hang every later process.
    stale, fresh = tmp_path / "stale", tmp_path / "fresh"
    stale.touch()
    fresh.touch()
    old = os.stat(stale).st_mtime - cpu_ext.STALE_LOCK_SECONDS - 1
    os.utime(stale, (old, old))
    with pytest.warns(RuntimeWarning, match="interrupted build"):
        cpu_ext._remove_stale_lock(stale)
    cpu_ext._remove_stale_lock(fresh)
    cpu_ext._remove_stale_lock(tmp_path / "absent")
    assert not stale.exists() and fresh.exists()


def test_two_checkouts_of_the_same_sources_build_in_different_directories(monkeypatch, tmp_path):
    import shutil

    copy = tmp_path / "csrc"
    shutil.copytree(cpu_ext.CSRC, copy)
    here = cpu_ext.build_directory()
    monkeypatch.setattr(cpu_ext, "CSRC", copy)
    assert cpu_ext.build_directory() != here
