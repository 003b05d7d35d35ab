"""Plain-torch references for every kernel, computed in float64. Tests compare kernels to these.

Shared conventions (the contract between the runtime and every kernel implementation):

Linear (AWQ GEMM layout, see quantkit/pack.py): x [M, in] @ W.T where W.T = (q - z) * s,
qweight int32 [in, out/8], qzeros int32 [in/g, out/8], scales fp16 [in/g, out].

Paged KV cache, one pair per layer:
  k_cache, v_cache  [num_blocks, block_size, num_kv_heads, head_dim]
  slot              block_id * block_size + offset_in_block; slot -1 means "do not write"
  block_tables      int32 [num_seqs, max_blocks_per_seq], row i lists sequence i's blocks in
                    order; entries past the sequence's last block are ignored (any value)
  context_lens      int32 [num_seqs], the number of cached tokens of each sequence *including*
                    the tokens of this step (they are written to the cache before attention)
  cu_seqlens_q      int32 [num_seqs + 1], prefix sums of the query lengths of this step; the
                    queries of sequence i are rows cu_seqlens_q[i]:cu_seqlens_q[i+1] of `query`
                    and sit at positions context_len - q_len ... context_len - 1
Attention is causal: the query at position p sees keys at positions 0..p. With a sliding window
w it sees only the last w of them, positions p - w + 1 .. p (itself included), which is
transformers' sliding_window_causal_mask (kv_idx > q_idx - sliding_window). Grouped-query
attention: query head h reads kv head h // (num_heads // num_kv_heads).
"""

from __future__ import annotations

import torch

from quantkit.pack import dequantize_awq


def w4a16_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, in] times the AWQ-packed weight, in float64 -> [M, out]."""
    weight = dequantize_awq(qweight, qzeros, scales, torch.float64)  # [out, in]
    return x.double() @ weight.t()


def int8_matmul_ref(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, in] times the int8 weight W[n, k] = codes[n, k] * scales[n, k // 32], in float64 -> [M, out]."""
    weight = codes.double() * scales.double().repeat_interleave(codes.shape[1] // scales.shape[1], dim=1)
    return x.double() @ weight.t()

def store_kv_ref(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key/value [N, num_kv_heads, head_dim] into their slots (in place); slot -1 is skipped."""
    block_size = k_cache.shape[1]
    for row, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        k_cache[slot // block_size, slot % block_size] = key[row]
        v_cache[slot // block_size, slot % block_size] = value[row]


def gather_sequence_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of one sequence: [length, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    n_blocks = -(-length // block_size)
    blocks = cache[block_table[:n_blocks].long()]  # [n_blocks, block_size, Hkv, D]
    return blocks.reshape(-1, *cache.shape[2:])[:length]


def paged_attention_ref(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Causal GQA attention of query [total_q, H, D] over the paged cache, in float64.

    `window`: attend to the last `window` positions only (None: all of them).
    """
    num_heads = query.shape[1]
    out = torch.empty(query.shape, dtype=torch.float64)
    for i, ctx in enumerate(context_lens.tolist()):
        start, end = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        q = query[start:end].double()  # [q_len, H, D]
        k = gather_sequence_kv(k_cache, block_tables[i], ctx).double()
        v = gather_sequence_kv(v_cache, block_tables[i], ctx).double()
        group = num_heads // k.shape[1]
        k = k.repeat_interleave(group, dim=1)  # [ctx, H, D]
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        q_pos = torch.arange(ctx - (end - start), ctx).unsqueeze(1)
        k_pos = torch.arange(ctx).unsqueeze(0)
        hidden = k_pos > q_pos
        if window is not None:
            hidden |= k_pos <= q_pos - window
        scores = scores.masked_fill(hidden, float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out


def paged_decode_ref(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Decode: one query token per sequence, query [num_seqs, H, D]."""
    cu = torch.arange(query.shape[0] + 1, dtype=torch.int32)
    return paged_attention_ref(query, k_cache, v_cache, block_tables, context_lens, cu, scale, window)
