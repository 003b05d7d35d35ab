"""Triton paged-attention kernels against the float64 references of kernels/reference.py.

Every test uses fresh random data, shuffled (non-contiguous) block tables whose unused entries
point at real but wrong blocks, and an output buffer poisoned with NaN, so a kernel that assumes
contiguous blocks, reads past a sequence's last block or leaves a row unwritten fails.
Runs in the Triton interpreter here (tests/conftest.py sets TRITON_INTERPRET=1): shapes are small.
"""

from __future__ import annotations

import math

import pytest
import torch

from quantkit.kernels.reference import paged_attention_ref, paged_decode_ref, store_kv_ref
from quantkit.kernels.triton_attention import paged_decode, paged_prefill, store_kv

KERNELS_UNDER_TEST = ("paged_decode", "paged_prefill", "store_kv")  # run on the GPU with QUANTKIT_TEST_DEVICE=cuda (tests/conftest.py)

# Relative/absolute tolerance against float64: fp32 accumulates in fp32 (ieee dot); 16-bit
# inputs also round P to the input dtype for P @ V and round the output.
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def make_cache(lens: list[int], block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, spare: int = 3):
    """Random K/V caches and a block table giving each sequence a shuffled set of blocks."""
    gen = torch.Generator().manual_seed(sum(lens) * 7 + block_size)
    per_seq = [-(-n // block_size) for n in lens]
    num_blocks = sum(per_seq) + spare
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen)
    if torch.equal(perm, torch.arange(num_blocks)):
        perm = perm.flip(0)  # never the identity: blocks must not be contiguous
    width = max(per_seq) + 1  # at least one unused entry per row
    # Unused entries hold real block ids: reading them gives wrong numbers instead of a crash.
    tables = torch.randint(0, num_blocks, (len(lens), width), generator=gen, dtype=torch.int32)
    used = 0
    for i, n in enumerate(per_seq):
        tables[i, :n] = perm[used : used + n].to(torch.int32)
        used += n
    return k_cache, v_cache, tables


def assert_matches(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert not out.isnan().any(), "rows left unwritten (NaN poison survived)"
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


# --------------------------------------------------------------------------- store_kv


@pytest.mark.parametrize(
    "dtype,num_kv_heads,block_size",
    [(torch.float32, 2, 16), (torch.float16, 3, 32), (torch.bfloat16, 1, 16)],
)
def test_store_kv_writes_slots_and_skips_minus_one(dtype, num_kv_heads, block_size):
    head_dim, num_blocks, n = 32, 4, 20
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim).to(dtype)
    v_cache = torch.randn_like(k_cache)
    # Keys are a strided view (as when K/V are slices of a fused QKV projection).
    qkv = torch.randn(n, 3, num_kv_heads, head_dim).to(dtype)
    key, value = qkv[:, 1], qkv[:, 2]
    slots = torch.randperm(num_blocks * block_size)[:n]
    slots[::3] = -1
    k_old, v_old = k_cache.clone(), v_cache.clone()
    k_ref, v_ref = k_cache.clone(), v_cache.clone()

    store_kv(key, value, k_cache, v_cache, slots.to(torch.int32))
    store_kv_ref(key, value, k_ref, v_ref, slots)

    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    flat_k, flat_v = k_cache.view(-1, num_kv_heads, head_dim), v_cache.view(-1, num_kv_heads, head_dim)
    assert torch.equal(flat_k[~written], k_old.view(-1, num_kv_heads, head_dim)[~written])
    assert torch.equal(flat_v[~written], v_old.view(-1, num_kv_heads, head_dim)[~written])
    assert torch.equal(flat_k[slots[slots >= 0]], key[slots >= 0])


# --------------------------------------------------------------------------- paged_decode

DECODE_CASES = [
    # dtype, heads, kv_heads, head_dim, block_size, context lengths
    (torch.float32, 4, 2, 64, 16, [1, 5, 16, 17, 40, 130]),
    (torch.float16, 6, 2, 64, 32, [1, 17, 40, 64]),
    (torch.bfloat16, 4, 4, 32, 16, [5, 16, 33]),
    (torch.float16, 8, 1, 128, 32, [3, 32, 70]),
]


@pytest.mark.parametrize("dtype,num_heads,num_kv_heads,head_dim,block_size,lens", DECODE_CASES)
def test_paged_decode_matches_reference(dtype, num_heads, num_kv_heads, head_dim, block_size, lens):
    k_cache, v_cache, tables = make_cache(lens, block_size, num_kv_heads, head_dim, dtype)
    query = torch.randn(len(lens), num_heads, head_dim).to(dtype)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    scale = 1 / math.sqrt(head_dim)
    out = torch.full_like(query, float("nan"))

    result = paged_decode(query, k_cache, v_cache, tables, context_lens, scale, out=out)

    assert result is out
    assert_matches(out, paged_decode_ref(query, k_cache, v_cache, tables, context_lens, scale), dtype)


# --------------------------------------------------------------------------- paged_prefill

PREFILL_CASES = [
    # dtype, heads, kv_heads, head_dim, block_size, (context_len, q_len) per sequence
    # whole prompts (q_len == context_len), incl. one longer than the 64-row query tile
    (torch.float32, 4, 2, 64, 16, [(1, 1), (5, 5), (16, 16), (17, 17), (40, 40), (70, 70)]),
    # chunks after cached tokens (chunked prefill / prefix cache), a decode-like row and an empty one
    (torch.float32, 6, 2, 32, 32, [(40, 7), (100, 70), (17, 1), (64, 64), (9, 0)]),
    (torch.float16, 4, 4, 64, 32, [(5, 5), (50, 13), (33, 20)]),
    (torch.bfloat16, 6, 2, 64, 16, [(17, 17), (40, 25), (1, 1)]),
]


@pytest.mark.parametrize("dtype,num_heads,num_kv_heads,head_dim,block_size,seqs", PREFILL_CASES)
def test_paged_prefill_matches_reference(dtype, num_heads, num_kv_heads, head_dim, block_size, seqs):
    ctx_lens = [c for c, _ in seqs]
    q_lens = [q for _, q in seqs]
    k_cache, v_cache, tables = make_cache(ctx_lens, block_size, num_kv_heads, head_dim, dtype)
    query = torch.randn(sum(q_lens), num_heads, head_dim).to(dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    context_lens = torch.tensor(ctx_lens, dtype=torch.int32)
    scale = 1 / math.sqrt(head_dim)
    out = torch.full_like(query, float("nan"))

    result = paged_prefill(query, k_cache, v_cache, tables, context_lens, cu, max(q_lens), scale, out=out)

    assert result is out
    assert_matches(out, paged_attention_ref(query, k_cache, v_cache, tables, context_lens, cu, scale), dtype)


def test_prefill_with_oversized_max_q_len_and_strided_query():
    """Extra query tiles exit without writing; query/out may be strided views."""
    lens = [20, 9]
    k_cache, v_cache, tables = make_cache(lens, 16, 2, 32, torch.float32)
    qkv = torch.randn(sum(lens), 3, 4, 32)
    query = qkv[:, 0]  # non-contiguous
    cu = torch.tensor([0, 20, 29], dtype=torch.int32)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    out = torch.full((sum(lens), 2, 4, 32), float("nan"))[:, 1]  # strided output rows

    paged_prefill(query, k_cache, v_cache, tables, context_lens, cu, 200, 0.2, out=out)

    assert_matches(out, paged_attention_ref(query, k_cache, v_cache, tables, context_lens, cu, 0.2), torch.float32)


def test_store_then_prefill_then_decode_equals_causal_attention():
    """End to end through the cache, checked against torch's own causal GQA attention."""
    num_heads, num_kv_heads, head_dim, block_size, n = 4, 2, 32, 16, 37
    q, k, v = torch.randn(n, num_heads, head_dim), torch.randn(n, num_kv_heads, head_dim), torch.randn(n, num_kv_heads, head_dim)
    k_cache = torch.randn(5, block_size, num_kv_heads, head_dim)
    v_cache = torch.randn_like(k_cache)
    table = torch.tensor([[3, 0, 4, 1]], dtype=torch.int32)
    slots = table[0, torch.arange(n) // block_size] * block_size + torch.arange(n) % block_size
    store_kv(k, v, k_cache, v_cache, slots.to(torch.int32))
    scale = 1 / math.sqrt(head_dim)

    # the prompt in two chunks (30 + 6 tokens), then one decode step
    out = torch.full_like(q, float("nan"))
    for lo, hi, fn in [(0, 30, "prefill"), (30, 36, "prefill"), (36, 37, "decode")]:
        ctx_now = torch.tensor([hi], dtype=torch.int32)
        if fn == "prefill":
            cu = torch.tensor([0, hi - lo], dtype=torch.int32)
            paged_prefill(q[lo:hi], k_cache, v_cache, table, ctx_now, cu, hi - lo, scale, out=out[lo:hi])
        else:
            paged_decode(q[lo:hi], k_cache, v_cache, table, ctx_now, scale, out=out[lo:hi])

    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=scale, enable_gqa=True
    ).transpose(0, 1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_size", [8, 16, 24, 32, 64])
@pytest.mark.parametrize("kernel", ["decode", "prefill"])
def test_any_block_size_and_default_out(kernel, block_size):
    """K/V rows are gathered per token, so the cache block size is free (even not a power of two)."""
    seqs = [(1, 1), (block_size, block_size), (block_size + 1, 3), (90, 70)]
    ctx_lens, q_lens = [c for c, _ in seqs], [q if kernel == "prefill" else 1 for _, q in seqs]
    k_cache, v_cache, tables = make_cache(ctx_lens, block_size, 2, 16, torch.float32)
    query = torch.randn(sum(q_lens), 6, 16)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    context_lens = torch.tensor(ctx_lens, dtype=torch.int32)

    if kernel == "decode":
        out = paged_decode(query, k_cache, v_cache, tables, context_lens, 0.25)
    else:
        out = paged_prefill(query, k_cache, v_cache, tables, context_lens, cu, max(q_lens), 0.25)

    assert out.dtype == query.dtype and out.shape == query.shape
    assert_matches(out, paged_attention_ref(query, k_cache, v_cache, tables, context_lens, cu, 0.25), torch.float32)


def test_empty_batches_are_no_ops():
    k_cache = torch.randn(2, 16, 2, 32)
    v_cache, before = torch.randn_like(k_cache), k_cache.clone()
    store_kv(torch.zeros(0, 2, 32), torch.zeros(0, 2, 32), k_cache, v_cache, torch.zeros(0, dtype=torch.int32))
    assert torch.equal(k_cache, before)
    empty_tables, empty_lens = torch.zeros(0, 1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)
    assert paged_decode(torch.zeros(0, 4, 32), k_cache, v_cache, empty_tables, empty_lens, 0.1).shape == (0, 4, 32)
    cu = torch.zeros(1, dtype=torch.int32)
    assert paged_prefill(torch.zeros(0, 4, 32), k_cache, v_cache, empty_tables, empty_lens, cu, 0, 0.1).shape == (0, 4, 32)


# --------------------------------------------------------------------------- validation


def _inputs(dtype=torch.float32, num_heads=4, num_kv_heads=2, head_dim=32):
    k_cache = torch.zeros(4, 16, num_kv_heads, head_dim, dtype=dtype)
    return dict(
        query=torch.zeros(2, num_heads, head_dim, dtype=dtype),
        k_cache=k_cache,
        v_cache=torch.zeros_like(k_cache),
        block_tables=torch.zeros(2, 2, dtype=torch.int32),
        context_lens=torch.ones(2, dtype=torch.int32),
    )


def _decode(**over):
    args = {**_inputs(), **over}
    return paged_decode(args["query"], args["k_cache"], args["v_cache"], args["block_tables"], args["context_lens"], 0.1, out=args.get("out"))


def _prefill(**over):
    args = {**_inputs(), "cu": torch.tensor([0, 1, 2], dtype=torch.int32), **over}
    return paged_prefill(args["query"], args["k_cache"], args["v_cache"], args["block_tables"], args["context_lens"], args["cu"], 1, 0.1)


def _store(**over):
    base = _inputs()
    args = {"key": torch.zeros(3, 2, 32), "value": torch.zeros(3, 2, 32), "slots": torch.zeros(3, dtype=torch.int32), **base, **over}
    return store_kv(args["key"], args["value"], args["k_cache"], args["v_cache"], args["slots"])


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: _decode(**_inputs(num_heads=6, num_kv_heads=4)), "not a multiple of num_kv_heads"),
        (lambda: _decode(query=torch.zeros(2, 4, 32, dtype=torch.float16)), "differs from cache dtype"),
        (lambda: _decode(**_inputs(dtype=torch.float64)), "cache dtype must be one of"),
        (lambda: _decode(**_inputs(head_dim=48)), "power of two"),
        (lambda: _decode(query=torch.zeros(2, 4, 64)), "query must be"),
        (lambda: _decode(v_cache=torch.zeros(4, 32, 2, 32)), "k_cache and v_cache must both be"),
        (lambda: _decode(block_tables=torch.zeros(2, 2, dtype=torch.int64)), "block_tables must be int32"),
        (lambda: _decode(block_tables=torch.zeros(3, 2, dtype=torch.int32)), "block_tables must be int32"),
        (lambda: _decode(context_lens=torch.ones(3, dtype=torch.int32)), "context_lens must be int32"),
        (lambda: _decode(out=torch.zeros(2, 4, 32, dtype=torch.float16)), "out must be"),
        (lambda: _decode(context_lens=torch.ones(2, dtype=torch.int32, device="meta")), "one device"),
        (lambda: _prefill(cu=torch.tensor([0, 1, 2], dtype=torch.int64)), "cu_seqlens_q must be int32"),
        (lambda: _prefill(cu=torch.tensor([0, 2], dtype=torch.int32)), "block_tables must be int32"),
        (lambda: _store(key=torch.zeros(3, 4, 32)), "key and value must be"),
        (lambda: _store(value=torch.zeros(3, 2, 32, dtype=torch.float16)), "must equal the cache dtype"),
        (lambda: _store(slots=torch.zeros(3)), "slot_mapping must be int32/int64"),
        (lambda: _store(slots=torch.zeros(2, dtype=torch.int32)), "slot_mapping must be int32/int64"),
    ],
)
def test_invalid_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------- sliding window


@pytest.mark.parametrize("dtype,window", [(torch.float32, 1), (torch.float16, 16), (torch.bfloat16, 50)])
def test_sliding_window_prefill_and_decode_match_reference(dtype, window):
    """Each query sees the last `window` positions up to its own (transformers' sliding_window)."""
    seqs = [(1, 1), (40, 40), (100, 70), (17, 1), (130, 3)]  # incl. a 70-row chunk over two query tiles
    ctx_lens, q_lens = [c for c, _ in seqs], [q for _, q in seqs]
    k_cache, v_cache, tables = make_cache(ctx_lens, 16, 2, 32, dtype)
    query = torch.randn(sum(q_lens), 4, 32).to(dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    context_lens = torch.tensor(ctx_lens, dtype=torch.int32)

    out = torch.full_like(query, float("nan"))
    paged_prefill(query, k_cache, v_cache, tables, context_lens, cu, max(q_lens), 0.2, out=out, window=window)
    assert_matches(out, paged_attention_ref(query, k_cache, v_cache, tables, context_lens, cu, 0.2, window), dtype)

    decode_q = torch.randn(len(seqs), 4, 32).to(dtype)
    out = torch.full_like(decode_q, float("nan"))
    paged_decode(decode_q, k_cache, v_cache, tables, context_lens, 0.2, out=out, window=window)
    assert_matches(out, paged_decode_ref(decode_q, k_cache, v_cache, tables, context_lens, 0.2, window), dtype)


@pytest.mark.parametrize("window", [0, -3, 2.5])
def test_a_window_that_is_not_a_positive_int_is_refused(window):
    with pytest.raises(ValueError, match="window must be a positive int"):
        paged_decode(**_inputs(), scale=0.1, window=window)
