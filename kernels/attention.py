"""Attention over the paged KV cache: one surface, Triton on CUDA, gather + SDPA on CPU.

Layout and conventions: see kernels/reference.py. The model runner builds one
AttentionMetadata per step (shared by every layer), then each layer calls
`store_kv` (write this step's K/V into their slots) and `paged_attention`.

CPU choice (measured by benchmarks/kernels.py, see BENCHMARKS.md): decode rows of all
sequences go through ONE scaled_dot_product_attention call over K/V gathered into a padded
[seqs, max_context] batch with a padding mask; prefill chunks run one SDPA call per sequence
(bottom-right causal mask when the chunk follows cached tokens). Gather indices are computed
once per step, not per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the cache and what each sequence attends to."""

    slot_mapping: torch.Tensor  # int64 [total_q]
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks]
    context_lens: torch.Tensor  # int32 [num_seqs], including this step's tokens
    cu_seqlens_q: torch.Tensor  # int32 [num_seqs + 1]
    query_lens: list[int]
    context_lens_list: list[int]
    block_size: int
    # CPU only, filled by build(): token-slot indices to gather, per decode batch / prefill seq.
    decode_rows: torch.Tensor | None = None  # int64 [n_decode]: rows of `query` that decode
    decode_slots: torch.Tensor | None = None  # int64 [n_decode, max_ctx]
    decode_mask: torch.Tensor | None = None  # bool [n_decode, 1, 1, max_ctx], True = attend
    prefill: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)  # (start, end, slots [ctx])

    @property
    def max_q_len(self) -> int:
        return max(self.query_lens)

    @property
    def max_context_len(self) -> int:
        return max(self.context_lens_list)

    @classmethod
    def build(cls, block_tables: list[list[int]], context_lens: list[int], query_lens: list[int], block_size: int, device: torch.device | str = "cpu") -> AttentionMetadata:
        """From plain lists (the scheduler's view). This step's tokens are the last q_len of each context."""
        width = max((len(t) for t in block_tables), default=0)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int64)
        ctx = torch.tensor(context_lens, dtype=torch.int64)
        q_lens = torch.tensor(query_lens, dtype=torch.int64)
        cu = torch.zeros(len(query_lens) + 1, dtype=torch.int64)
        torch.cumsum(q_lens, 0, out=cu[1:])
        seq_of_row = torch.repeat_interleave(torch.arange(len(query_lens)), q_lens)
        positions = torch.arange(int(cu[-1])) - cu[seq_of_row] + (ctx - q_lens)[seq_of_row]
        meta = cls(
            slot_mapping=_slots(tables[seq_of_row], positions.unsqueeze(1), block_size).squeeze(1).to(device),
            block_tables=tables.to(torch.int32).to(device),
            context_lens=ctx.to(torch.int32).to(device),
            cu_seqlens_q=cu.to(torch.int32).to(device),
            query_lens=list(query_lens),
            context_lens_list=list(context_lens),
            block_size=block_size,
        )
        if torch.device(device).type == "cpu":
            meta._plan_cpu(tables, cu.tolist())
        return meta

    def _plan_cpu(self, tables: torch.Tensor, cu: list[int]) -> None:
        decode = [i for i, q in enumerate(self.query_lens) if q == 1]
        if decode:
            ctx = self.context_lens[decode].long()
            positions = torch.arange(int(ctx.max()))
            self.decode_rows = torch.tensor([cu[i] for i in decode], dtype=torch.int64)
            self.decode_slots = _slots(tables[decode], positions.expand(len(decode), -1), self.block_size)
            self.decode_mask = (positions < ctx.unsqueeze(1)).view(len(decode), 1, 1, -1)
        for i, q_len in enumerate(self.query_lens):
            if q_len > 1:
                positions = torch.arange(self.context_lens_list[i])
                self.prefill.append((cu[i], cu[i + 1], _slots(tables[i], positions, self.block_size)))


def _slots(tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slot of each position, given the block table row(s) it belongs to (padded past the end)."""
    block_index = (positions // block_size).clamp(max=tables.shape[-1] - 1)
    return tables.gather(-1, block_index) * block_size + positions % block_size


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata) -> None:
    """Write this step's key/value [total_q, Hkv, D] into the cache slots (slot -1: skip)."""
    if key.is_cuda:
        from .triton_attention import store_kv as triton_store_kv

        triton_store_kv(key, value, k_cache, v_cache, meta.slot_mapping)
        return
    slots = meta.slot_mapping
    if slots.numel() and bool((slots < 0).any()):
        keep = slots >= 0
        key, value, slots = key[keep], value[keep], slots[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, key.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, value.to(v_cache.dtype))


def paged_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal GQA attention of query [total_q, H, D] over the paged cache -> [total_q, H, D] (into `out` if given)."""
    if query.is_cuda:
        from . import triton_attention

        if all(q == 1 for q in meta.query_lens):
            return triton_attention.paged_decode(query, k_cache, v_cache, meta.block_tables, meta.context_lens, scale, out=out)
        return triton_attention.paged_prefill(
            query, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.cu_seqlens_q, meta.max_q_len, scale, out=out
        )
    return _cpu_paged_attention(query, k_cache, v_cache, meta, scale, torch.empty_like(query) if out is None else out)


def _cpu_paged_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, out: torch.Tensor
) -> torch.Tensor:
    k_flat = k_cache.view(-1, *k_cache.shape[2:])  # [slots, Hkv, D]
    v_flat = v_cache.view(-1, *v_cache.shape[2:])
    if meta.decode_rows is not None:
        q = query[meta.decode_rows].unsqueeze(2)  # [n, H, 1, D]
        k = k_flat[meta.decode_slots].transpose(1, 2)  # [n, Hkv, max_ctx, D]
        v = v_flat[meta.decode_slots].transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=meta.decode_mask, scale=scale, enable_gqa=True)
        out[meta.decode_rows] = o.squeeze(2)
    for start, end, slots in meta.prefill:
        q = query[start:end].transpose(0, 1).unsqueeze(0)  # [1, H, q_len, D]
        k = k_flat[slots].transpose(0, 1).unsqueeze(0)  # [1, Hkv, ctx, D]
        v = v_flat[slots].transpose(0, 1).unsqueeze(0)
        q_len, ctx = end - start, slots.numel()
        if q_len == ctx:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:  # a chunk after cached tokens: query r sits at position ctx - q_len + r
            mask = torch.ones(q_len, ctx, dtype=torch.bool).tril(diagonal=ctx - q_len)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start:end] = o.squeeze(0).transpose(0, 1)
    return out
