"""Triton kernels for the paged KV cache: store_kv, paged_decode and paged_prefill.

The layout contract (cache shape, slots, block tables, context_lens, cu_seqlens_q, causal GQA)
is documented in kernels/reference.py; these kernels implement exactly that contract.

Design
------
store_kv       grid (num_tokens,). One program writes one token: a [Hkv, D] tile of K and one
               of V (heads padded to a power of two and masked) into row `slot` of the cache;
               a program whose slot is -1 exits at once.
paged_decode   grid (num_seqs, num_kv_heads). One program serves the whole query-head group of
               one kv head, so each K/V tile is read once per group, not once per query head.
               The group rows are padded to >= 16 so that q @ K^T is a tensor-core tl.dot on
               every Triton version (padding rows load zeros and are never stored).
paged_prefill  grid (cdiv(max_q_len, BLOCK_M), num_heads, num_seqs), BLOCK_M = 64. One program
               owns BLOCK_M query rows of one head of one sequence; tiles past that sequence's
               q_len exit at once. Row r sits at position context_len - q_len + r, which covers
               whole prompts and chunks after cached tokens (chunked prefill, prefix cache).
               KV tiles past the tile's last position are never visited.
Sliding window (USE_WINDOW, `window` w): the query at position p sees p - w + 1 .. p only. Decode
               starts its KV loop at ctx - w; a prefill tile starts at its first row's window
               start and masks keys before each row's own. Every valid row of a prefill tile
               sees at least one key of the first KV tile (BLOCK_M <= BLOCK_N), so no running
               max stays -inf. USE_WINDOW is a constexpr: without a window its code is compiled out.

Memory access: both attention kernels walk a sequence's keys in tiles of BLOCK_N (>= 64) tokens
and gather each token's cache row through the block table (block_tables[t // block_size]), so
the tile is independent of the cache block size and blocks may sit anywhere in the cache. A
token row of one kv head is D contiguous elements: K is loaded directly as K^T [D, BLOCK_N] and
V as [BLOCK_N, D], both as D-wide vectors; tokens past the end (tail of the last partial block)
are masked out of the loads, block-table entries past the last block are never read. Addresses
are formed in int64 (block id * block stride can exceed 2^31 for large caches).

Softmax: online (flash) form in fp32 and base 2: running max m, running sum l, accumulator
rescaled by 2^(m_old - m_new); masked scores are -inf. fp32 inputs use an "ieee" dot (no tf32);
fp16/bf16 feed P to P @ V in the input dtype, like flash attention. Output in the query dtype.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# The interpreter multiplies bf16 tiles as raw uint16 bits in tl.dot, so there the dot operands
# are widened to fp32 after the same rounding the GPU path applies. Decided at import, like
# @triton.jit itself.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


@triton.jit
def _store_kv_kernel(
    key, value, k_cache, v_cache, slot_mapping,
    s_kn, s_kh, s_kd, s_vn, s_vh, s_vd,  # key / value strides
    s_cb, s_ct, s_ch, s_cd,  # cache strides (shared by k_cache and v_cache)
    NUM_KV_HEADS: tl.constexpr, HKV_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    tok = tl.program_id(0)
    slot = tl.load(slot_mapping + tok).to(tl.int64)
    if slot < 0:  # padding token: nothing to write
        return
    offs_h = tl.arange(0, HKV_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = offs_h[:, None] < NUM_KV_HEADS  # heads padded to a power of two
    dst = (slot // BLOCK_SIZE) * s_cb + (slot % BLOCK_SIZE) * s_ct + offs_h[:, None] * s_ch + offs_d[None, :] * s_cd
    k = tl.load(key + tok * s_kn + offs_h[:, None] * s_kh + offs_d[None, :] * s_kd, mask=mask)
    v = tl.load(value + tok * s_vn + offs_h[:, None] * s_vh + offs_d[None, :] * s_vd, mask=mask)
    tl.store(k_cache + dst, k, mask=mask)
    tl.store(v_cache + dst, v, mask=mask)


@triton.jit
def _load_kv_tile(k_cache, v_cache, bt_row, start, end, kvh, s_cb, s_ct, s_ch, s_cd,
                  BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """K^T [D, BLOCK_N], V [BLOCK_N, D] and the validity of tokens start..start+BLOCK_N-1 (< end)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    valid = offs_n < end
    # Entries past the sequence's last block may be garbage: the masked load never reads them.
    block = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    row = block * s_cb + (offs_n % BLOCK_SIZE) * s_ct + kvh * s_ch
    k_t = tl.load(k_cache + row[None, :] + offs_d[:, None] * s_cd, mask=valid[None, :], other=0.0)
    v = tl.load(v_cache + row[:, None] + offs_d[None, :] * s_cd, mask=valid[:, None], other=0.0)
    return k_t, v, offs_n, valid


@triton.jit
def _attend_tile(q, k_t, v, allowed, m_i, l_i, acc, qk_scale,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One online-softmax step of q [M, D] against a KV tile; returns the updated (m, l, acc)."""
    if UPCAST:  # interpreter only, see _INTERPRET
        s = tl.dot(q.to(tl.float32), k_t.to(tl.float32), input_precision=PRECISION)
    else:
        s = tl.dot(q, k_t, input_precision=PRECISION)
    s = tl.where(allowed, s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    p = p.to(v.dtype)  # P @ V in the cache dtype, as flash attention does on tensor cores
    if UPCAST:
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.float32), v.to(tl.float32), input_precision=PRECISION)
    else:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _paged_decode_kernel(
    query, k_cache, v_cache, block_tables, context_lens, out, qk_scale, window,
    s_qn, s_qh, s_qd, s_on, s_oh, s_od, s_bt,
    s_cb, s_ct, s_ch, s_cd,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, USE_WINDOW: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    ctx = tl.load(context_lens + seq)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + offs_g
    g_mask = offs_g[:, None] < GROUP
    # Padding rows load zeros: finite scores, never stored.
    q = tl.load(query + seq * s_qn + heads[:, None] * s_qh + offs_d[None, :] * s_qd, mask=g_mask, other=0.0)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    bt_row = block_tables + seq.to(tl.int64) * s_bt
    kv_start = 0
    if USE_WINDOW:  # the last `window` positions only
        kv_start = tl.maximum(ctx - window, 0)
    for start in range(kv_start, ctx, BLOCK_N):
        k_t, v, offs_n, valid = _load_kv_tile(k_cache, v_cache, bt_row, start, ctx, kvh, s_cb, s_ct, s_ch, s_cd,
                                              BLOCK_SIZE, BLOCK_N, HEAD_DIM)
        m_i, l_i, acc = _attend_tile(q, k_t, v, valid[None, :], m_i, l_i, acc, qk_scale, PRECISION, UPCAST)
    o = acc / l_i[:, None]
    tl.store(out + seq * s_on + heads[:, None] * s_oh + offs_d[None, :] * s_od, o.to(out.dtype.element_ty), mask=g_mask)


@triton.jit
def _paged_prefill_kernel(
    query, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, out, qk_scale, window,
    s_qn, s_qh, s_qd, s_on, s_oh, s_od, s_bt,
    s_cb, s_ct, s_ch, s_cd,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    USE_WINDOW: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q + seq)
    q_len = tl.load(cu_seqlens_q + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:  # the grid is sized for the longest sequence
        return
    ctx = tl.load(context_lens + seq)
    kvh = head // GROUP
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m[:, None] < q_len
    q_pos = ctx - q_len + offs_m  # absolute position of each query row
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(query + rows[:, None] * s_qn + head * s_qh + offs_d[None, :] * s_qd, mask=row_ok, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    bt_row = block_tables + seq.to(tl.int64) * s_bt
    # Causality: no row of this tile sees a key past its last valid row's position.
    kv_end = ctx - q_len + tl.minimum((tile + 1) * BLOCK_M, q_len)
    kv_start = 0
    if USE_WINDOW:  # no row of this tile sees a key before its first row's window
        tl.static_assert(BLOCK_M <= BLOCK_N)
        kv_start = tl.maximum(ctx - q_len + tile * BLOCK_M - window + 1, 0)
    for start in range(kv_start, kv_end, BLOCK_N):
        k_t, v, offs_n, valid = _load_kv_tile(k_cache, v_cache, bt_row, start, kv_end, kvh, s_cb, s_ct, s_ch, s_cd,
                                              BLOCK_SIZE, BLOCK_N, HEAD_DIM)
        # Key 0 is visible to every row (padding rows included), so no row's max stays -inf.
        allowed = valid[None, :] & (offs_n[None, :] <= q_pos[:, None])
        if USE_WINDOW:  # padding rows keep every key: they must not be left without one
            allowed = allowed & ((offs_n[None, :] > q_pos[:, None] - window) | (offs_m[:, None] >= q_len))
        m_i, l_i, acc = _attend_tile(q, k_t, v, allowed, m_i, l_i, acc, qk_scale, PRECISION, UPCAST)
    o = acc / l_i[:, None]
    tl.store(out + rows[:, None] * s_on + head * s_oh + offs_d[None, :] * s_od, o.to(out.dtype.element_ty), mask=row_ok)


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must have the same strides")
    if k_cache.dtype not in _DTYPES or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"cache dtype must be one of {_DTYPES} and equal for K and V, got {k_cache.dtype}/{v_cache.dtype}")
    d = k_cache.shape[3]
    if d < 16 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {d}")
    if k_cache.shape[1] < 1:
        raise ValueError("block_size must be positive")


def _check_same_device(*tensors: torch.Tensor) -> None:
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        raise ValueError(f"all tensors must be on one device, got {sorted({str(t.device) for t in tensors})}")
    if device.type == "cpu" and not _INTERPRET:
        raise ValueError("CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 before importing triton)")


def _check_int32(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if t.dtype != torch.int32 or tuple(t.shape) != shape:
        raise ValueError(f"{name} must be int32 of shape {shape}, got {t.dtype} {tuple(t.shape)}")


def _check_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, num_seqs: int, out: torch.Tensor | None) -> torch.Tensor:
    _check_cache(k_cache, v_cache)
    if query.dim() != 3 or query.shape[2] != k_cache.shape[3]:
        raise ValueError(f"query must be [tokens, num_heads, {k_cache.shape[3]}], got {tuple(query.shape)}")
    if query.dtype != k_cache.dtype:
        raise ValueError(f"query dtype {query.dtype} differs from cache dtype {k_cache.dtype}")
    if query.shape[1] % k_cache.shape[2]:
        raise ValueError(f"num_heads {query.shape[1]} is not a multiple of num_kv_heads {k_cache.shape[2]}")
    if block_tables.dim() != 2 or block_tables.dtype != torch.int32 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must be int32 [{num_seqs}, max_blocks], got {block_tables.dtype} {tuple(block_tables.shape)}")
    _check_int32("context_lens", context_lens, (num_seqs,))
    if out is None:
        out = torch.empty_like(query)
    elif out.shape != query.shape or out.dtype != query.dtype:
        raise ValueError(f"out must be {query.dtype} {tuple(query.shape)}, got {out.dtype} {tuple(out.shape)}")
    _check_same_device(query, k_cache, v_cache, block_tables, context_lens, out)
    return out


def _launch_options(dtype: torch.dtype, window: int | None) -> dict:
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    # fp32 inputs must not silently drop to tf32 on tensor cores.
    return {"PRECISION": "ieee" if dtype == torch.float32 else "tf32",
            "UPCAST": _INTERPRET and dtype == torch.bfloat16, "USE_WINDOW": window is not None}


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write key/value [N, num_kv_heads, head_dim] into their cache slots in place; slot -1 is skipped."""
    _check_cache(k_cache, v_cache)
    expected = (key.shape[0], *k_cache.shape[2:])
    if key.shape != value.shape or tuple(key.shape) != expected:
        raise ValueError(f"key and value must be {expected}, got {tuple(key.shape)} and {tuple(value.shape)}")
    if key.dtype != k_cache.dtype or value.dtype != k_cache.dtype:
        raise ValueError(f"key/value dtype ({key.dtype}/{value.dtype}) must equal the cache dtype {k_cache.dtype}")
    if slot_mapping.dtype not in (torch.int32, torch.int64) or tuple(slot_mapping.shape) != (key.shape[0],):
        raise ValueError(f"slot_mapping must be int32/int64 of shape ({key.shape[0]},), got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    _check_same_device(key, value, k_cache, v_cache, slot_mapping)
    if key.shape[0] == 0:
        return
    hkv, d = k_cache.shape[2:]
    _store_kv_kernel[(key.shape[0],)](
        key, value, k_cache, v_cache, slot_mapping, *key.stride(), *value.stride(), *k_cache.stride(),
        NUM_KV_HEADS=hkv, HKV_PAD=triton.next_power_of_2(hkv), HEAD_DIM=d, BLOCK_SIZE=k_cache.shape[1],
    )


def paged_decode(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float, out: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """Decode attention, one query token per sequence: query [num_seqs, H, D] -> [num_seqs, H, D].

    Every context_len must be >= 1 (this step's token is already in the cache). `window`: attend to
    the last `window` positions only (sliding-window layers); None: to all.
    """
    num_seqs = query.shape[0] if query.dim() == 3 else -1
    out = _check_attention(query, k_cache, v_cache, block_tables, context_lens, num_seqs, out)
    options = _launch_options(query.dtype, window)
    if num_seqs == 0:
        return out
    num_heads, num_kv_heads, block_size = query.shape[1], k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    _paged_decode_kernel[(num_seqs, num_kv_heads)](
        query, k_cache, v_cache, block_tables, context_lens, out, float(scale) * _LOG2E, window or 0,
        *query.stride(), *out.stride(), block_tables.stride(0), *k_cache.stride(),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=query.shape[2],
        BLOCK_SIZE=block_size, BLOCK_N=max(64, triton.next_power_of_2(block_size)), **options,
    )
    return out


def paged_prefill(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, max_q_len: int, scale: float,
                  out: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """Varlen causal attention of query [total_q, H, D] over the paged cache -> [total_q, H, D].

    max_q_len must be >= every q_len (it sizes the grid; it is not read back from the device),
    and q_len <= context_len for every sequence. `window`: each query attends to the last
    `window` positions up to its own only (sliding-window layers); None: to all.
    """
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape[0] < 1:
        raise ValueError(f"cu_seqlens_q must be int32 [num_seqs + 1], got shape {tuple(cu_seqlens_q.shape)}")
    num_seqs = cu_seqlens_q.shape[0] - 1
    _check_int32("cu_seqlens_q", cu_seqlens_q, (num_seqs + 1,))
    out = _check_attention(query, k_cache, v_cache, block_tables, context_lens, num_seqs, out)
    _check_same_device(query, cu_seqlens_q)
    if not isinstance(max_q_len, int) or max_q_len < 0:
        raise ValueError(f"max_q_len must be a non-negative int, got {max_q_len!r}")
    options = _launch_options(query.dtype, window)
    if num_seqs == 0 or max_q_len == 0 or query.shape[0] == 0:
        return out
    num_heads, num_kv_heads, block_size = query.shape[1], k_cache.shape[2], k_cache.shape[1]
    block_m = 64
    grid = (triton.cdiv(max_q_len, block_m), num_heads, num_seqs)
    _paged_prefill_kernel[grid](
        query, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, out, float(scale) * _LOG2E, window or 0,
        *query.stride(), *out.stride(), block_tables.stride(0), *k_cache.stride(),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=query.shape[2], BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=max(64, triton.next_power_of_2(block_size)), **options,
    )
    return out
