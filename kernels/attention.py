"""Attention over the paged KV cache: one surface, Triton or quantkit's C++ kernels (or SDPA) as the backend says.

Layout and conventions: see kernels/reference.py. The model runner builds one
AttentionMetadata per step (shared by every layer; it carries the KernelBackend the functions
here read, kernels/backend.py), then each layer calls
`rotate_and_store_kv` (RoPE on q and k, this step's K/V into their slots; `store_kv` alone
without RoPE) and `paged_attention`.

CPU choice (measured by benchmarks/kernel_speed.py, see BENCHMARKS.md): the cache is head-major
(see allocate_kv_cache). The decode rows of all sequences are answered by quantkit's C++ kernel
(kernels/csrc/attention.cpp), which reads each sequence's K/V rows in place, 3.5-8x faster than
the plain-torch fallback: two grouped-query matmuls over K/V gathered into a padded
[seqs, max_context] batch with a padding mask (itself faster than one masked SDPA call or one
SDPA call per sequence). Prefill chunks in bf16 are answered by quantkit's C++ flash-style kernel
(kernels/csrc/prefill.cpp), 3.5-5.5x faster than PyTorch's CPU SDPA (40-65 GFLOP/s here). Other
dtypes, head dims and machines without AVX-512 BF16 use SDPA: short prefill chunks as padded
batches of one masked call each, long ones one call per sequence (bottom-right causal mask when
the chunk follows cached tokens), planned only when that path runs. Gather indices are computed
once per step, not per layer; index_select gathers ~7x faster than indexing.

Sliding-window layers (Mistral, Gemma3's local layers) pass `window`: the query at position p
sees only positions p - window + 1 .. p. On CPU the step's plan is made once more for each
distinct window (AttentionMetadata.windowed): decode reads (or, in the fallback, gathers) only
the last `window` positions of each sequence, prefill masks (and trims) its keys. window=None
runs the plain causal plan.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import cpu_ext
from .backend import CPU, KernelBackend


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
    backend: KernelBackend = CPU  # which kernels answer this step (and so which plan build() makes)
    # CPU only, filled by build(): token-slot indices to gather, per decode batch / prefill seq.
    decode_rows: torch.Tensor | None = None  # int64 [n_decode]: rows of `query` that decode
    decode_seqs: torch.Tensor | None = None  # int64 [n_decode]: their sequences (C++ kernel only)
    decode_slots: torch.Tensor | None = None  # int64 [n_decode, max_ctx]
    decode_mask: torch.Tensor | None = None  # bool [n_decode, 1, 1, max_ctx], True = attend; None = no padding
    all_decode: bool = False  # every row decodes: no row gather / scatter needed
    skips_slots: bool = False  # some slot is -1
    # Prefill chunks (query length > 1) for the C++ kernel: their sequences, first query rows and lengths.
    prefill_seqs: torch.Tensor | None = None  # int64 [n_prefill]
    prefill_starts: torch.Tensor | None = None
    prefill_lens: torch.Tensor | None = None
    tables: torch.Tensor | None = None  # int64 block tables and query offsets kept to plan windows
    cu: list[int] | None = None
    window: int | None = None  # the window this plan was made for
    window_plans: dict[int, AttentionMetadata] = field(default_factory=dict)
    _sdpa: SdpaPrefill | None = None  # the SDPA plan of the prefill chunks, made on first use

    @property
    def max_q_len(self) -> int:
        return max(self.query_lens)

    @property
    def max_context_len(self) -> int:
        return max(self.context_lens_list)

    @classmethod
    def build(cls, block_tables: list[list[int]], context_lens: list[int], query_lens: list[int], block_size: int, backend: KernelBackend = CPU) -> AttentionMetadata:
        """From plain lists (the scheduler's view). This step's tokens are the last q_len of each context."""
        width = max((len(t) for t in block_tables), default=0)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int64)
        ctx = torch.tensor(context_lens, dtype=torch.int64)
        q_lens = torch.tensor(query_lens, dtype=torch.int64)
        cu = torch.zeros(len(query_lens) + 1, dtype=torch.int64)
        torch.cumsum(q_lens, 0, out=cu[1:])
        seq_of_row = torch.repeat_interleave(torch.arange(len(query_lens)), q_lens)
        positions = torch.arange(int(cu[-1])) - cu[seq_of_row] + (ctx - q_lens)[seq_of_row]
        device = backend.device
        meta = cls(
            slot_mapping=_slots(tables[seq_of_row], positions.unsqueeze(1), block_size).squeeze(1).to(device),
            block_tables=tables.to(torch.int32).to(device),
            context_lens=ctx.to(torch.int32).to(device),
            cu_seqlens_q=cu.to(torch.int32).to(device),
            query_lens=list(query_lens),
            context_lens_list=list(context_lens),
            block_size=block_size,
            backend=backend,
        )
        meta.skips_slots = bool((meta.slot_mapping < 0).any()) if meta.slot_mapping.numel() else False
        if not backend.triton_attention:
            meta.tables, meta.cu = tables, cu.tolist()
            meta._plan_cpu(tables, meta.cu)
        return meta

    def windowed(self, window: int | None) -> AttentionMetadata:
        """The CPU plan of this step for a layer with a sliding window (made once per step and window).

        A window no shorter than every context changes nothing: the plain plan is returned.
        """
        if window is None or window >= self.max_context_len:
            return self
        if window not in self.window_plans:
            plan = dataclasses.replace(self, decode_rows=None, decode_seqs=None, decode_slots=None, decode_mask=None, all_decode=False,
                                       window_plans={}, _sdpa=None)
            plan._plan_cpu(self.tables, self.cu, window)
            self.window_plans[window] = plan
        return self.window_plans[window]

    def _plan_cpu(self, tables: torch.Tensor, cu: list[int], window: int | None = None) -> None:
        decode = [i for i, q in enumerate(self.query_lens) if q == 1]
        if decode:
            self.decode_rows = torch.tensor([cu[i] for i in decode], dtype=torch.int64)
            self.all_decode = len(decode) == len(self.query_lens)
        if decode and cpu_ext.available():  # the kernel reads the block tables itself
            self.decode_seqs = torch.tensor(decode, dtype=torch.int64)
        elif decode:
            ctx = self.context_lens[decode].long()
            # A windowed sequence gathers its last `window` positions only: from first = ctx - window.
            first = None if window is None else (ctx - window).clamp(min=0)
            seen = ctx if first is None else ctx - first  # keys each sequence attends to
            offsets = torch.arange(int(seen.max()))
            positions = offsets if first is None else first.unsqueeze(1) + offsets
            self.decode_slots = _slots(tables[decode], positions.expand(len(decode), -1), self.block_size)
            if bool((seen < offsets.numel()).any()):
                self.decode_mask = (offsets < seen.unsqueeze(1)).view(len(decode), 1, 1, -1)
        self.window = window
        prefill = [i for i, q in enumerate(self.query_lens) if q > 1]
        if prefill:
            self.prefill_seqs = torch.tensor(prefill, dtype=torch.int64)
            self.prefill_starts = torch.tensor([cu[i] for i in prefill], dtype=torch.int64)
            self.prefill_lens = torch.tensor([self.query_lens[i] for i in prefill], dtype=torch.int64)

    def sdpa_prefill(self) -> SdpaPrefill:
        """The prefill chunks as SDPA calls: short ones in padded batches, long ones one call each."""
        if self._sdpa is not None:
            return self._sdpa
        plan, short = SdpaPrefill(), []
        for i, q_len in enumerate(self.query_lens):
            ctx = self.context_lens_list[i]
            if q_len > 1 and ctx <= SHORT_PREFILL_CONTEXT:
                short.append(i)
            elif q_len > 1:
                # Keys before the first query's window are never seen: not gathered.
                first = 0 if self.window is None else max(0, ctx - q_len - self.window + 1)
                positions = torch.arange(first, ctx)
                mask = None if self.window is None else _causal_mask(torch.arange(ctx - q_len, ctx).unsqueeze(1), positions.unsqueeze(0), self.window)
                plan.long.append((self.cu[i], self.cu[i + 1], _slots(self.tables[i], positions, self.block_size), mask))
        short.sort(key=lambda i: self.context_lens_list[i])  # similar lengths together: little padding
        for first in range(0, len(short), SHORT_PREFILL_BATCH):
            group = short[first : first + SHORT_PREFILL_BATCH]
            plan.short.append(PaddedPrefill.plan(self.tables[group], [self.cu[i] for i in group], [self.query_lens[i] for i in group],
                                                 [self.context_lens_list[i] for i in group], self.block_size, self.window))
        self._sdpa = plan
        return plan


@dataclass
class SdpaPrefill:
    """Prefill chunks planned as SDPA calls (the path without quantkit's bf16 prefill kernel)."""

    # Long chunks, one call each: (start, end, slots of the keys [keys], bool mask [q_len, keys] or
    # None for the plain causal mask).
    long: list[tuple[int, int, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    short: list[PaddedPrefill] = field(default_factory=list)  # short chunks, batched


# Prefill chunks with at most this much context are answered SHORT_PREFILL_BATCH at a time by one
# padded SDPA call: one call per short sequence costs more in overhead than its arithmetic
# (scoring many ~100-token requests spent a third of its time there). Longer ones: one call each.
SHORT_PREFILL_CONTEXT = 256
SHORT_PREFILL_BATCH = 64
PREFILL_KERNEL_HEAD_DIMS = (64, 128)  # what quantkit's bf16 prefill kernel is compiled for


def cpu_prefill_kernel_applies(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether CPU prefill runs quantkit's bf16 flash kernel (else PyTorch's SDPA)."""
    return dtype == torch.bfloat16 and head_dim in PREFILL_KERNEL_HEAD_DIMS and cpu_ext.bf16_available()


def attention_kernels(backend: KernelBackend, dtype: torch.dtype, head_dim: int) -> str:
    """What computes attention for this backend, dtype and head size, in words (the server's banner)."""
    if backend.triton_attention:
        return "decode Triton paged decode, prefill Triton paged prefill"
    decode = "quantkit C++ paged decode" if cpu_ext.available() else "PyTorch grouped matmuls"
    prefill = "quantkit C++ flash prefill" if cpu_prefill_kernel_applies(dtype, head_dim) else "PyTorch SDPA"
    return f"decode {decode}, prefill {prefill}"


@dataclass
class PaddedPrefill:
    """Several short prefill chunks as one padded batch [n, heads, max_q, D] over [n, Hkv, max_ctx, D]."""

    query_rows: torch.Tensor  # int64 [n * max_q]: row of `query` for each padded position (0 for padding)
    out_rows: torch.Tensor  # int64 [valid]: where the valid positions' results go
    valid: torch.Tensor  # bool [n * max_q]
    slots: torch.Tensor  # int64 [n * max_ctx] (slot 0 for padding)
    mask: torch.Tensor  # bool [n, 1, max_q, max_ctx], True = attend
    n: int
    max_q: int
    max_ctx: int

    @classmethod
    def plan(cls, tables: torch.Tensor, starts: list[int], q_lens: list[int], ctx_lens: list[int], block_size: int,
             window: int | None = None) -> PaddedPrefill:
        n, max_q, max_ctx = len(q_lens), max(q_lens), max(ctx_lens)
        q = torch.tensor(q_lens).unsqueeze(1)
        ctx = torch.tensor(ctx_lens).unsqueeze(1)
        row = torch.arange(max_q).unsqueeze(0)
        valid = row < q  # [n, max_q]
        query_rows = torch.where(valid, torch.tensor(starts).unsqueeze(1) + row, 0)
        key = torch.arange(max_ctx)
        slots = torch.where(key < ctx, _slots(tables, key.expand(n, -1), block_size), 0)
        # Query r of a chunk sits at position ctx - q_len + r and sees keys up to there.
        mask = _causal_mask((ctx - q + row).unsqueeze(-1), key.view(1, 1, -1), window)
        mask |= ~valid.unsqueeze(-1) & (key == 0)  # padding rows see one key: no all -inf row
        return cls(query_rows.reshape(-1), query_rows[valid], valid.reshape(-1), slots.reshape(-1), mask.unsqueeze(1), n, max_q, max_ctx)


def _causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """True where the query at position q_pos sees the key at k_pos (broadcast, e.g. [q, 1] against [1, k])."""
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def _slots(tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slot of each position, given the block table row(s) it belongs to (padded past the end)."""
    block_index = (positions // block_size).clamp(max=tables.shape[-1] - 1)
    return tables.gather(-1, block_index) * block_size + positions % block_size


def allocate_kv_cache(
    num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype, backend: KernelBackend = CPU
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zeroed (K, V) caches, one pair per layer, on the backend's device in the layout its kernels read.

    Triton: [num_blocks, block_size, Hkv, D] (kernels/reference.py). CPU kernels: head-major
    [Hkv, num_blocks * block_size, D], so a gather of any sequence's slots is already the
    [Hkv, ctx, D] operand of the attention matmuls; with the token-major layout the transposing
    copy cost more than the gather itself.
    """
    shape = (num_blocks, block_size, kv_heads, head_dim) if backend.kv_layout == "block" else (kv_heads, num_blocks * block_size, head_dim)
    cache = torch.zeros(num_layers, 2, *shape, dtype=dtype, device=backend.device)
    return [(cache[i, 0], cache[i, 1]) for i in range(num_layers)]


def cpu_layout(cache: torch.Tensor) -> torch.Tensor:
    """A reference-layout cache [num_blocks, block_size, Hkv, D] in the CPU kernels' layout."""
    return cache.permute(2, 0, 1, 3).reshape(cache.shape[2], -1, cache.shape[3]).contiguous()


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata) -> None:
    """Write this step's key/value [total_q, Hkv, D] into the cache slots (slot -1: skip)."""
    if meta.backend.triton_attention:
        from .triton_attention import store_kv as triton_store_kv

        triton_store_kv(key, value, k_cache, v_cache, meta.slot_mapping)
        return
    slots = meta.slot_mapping
    if meta.skips_slots:
        keep = slots >= 0
        key, value, slots = key[keep], value[keep], slots[keep]
    k_cache.index_copy_(1, slots, key.transpose(0, 1).to(k_cache.dtype))
    v_cache.index_copy_(1, slots, value.transpose(0, 1).to(v_cache.dtype))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformers' x * cos + rotate_half(x) * sin, where rotate_half(x) = roll(x, D/2) * [-1, 1]."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


def rotate_and_store_kv(qk: torch.Tensor, value: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, meta: AttentionMetadata, num_heads: int) -> torch.Tensor:
    """RoPE on q and k (qk [T, H + Hkv, D], cos/signed_sin [T, 1, D]), then k and value into the cache.

    Returns the rotated qk (on CPU with quantkit's kernels: qk itself, rotated in place in one pass
    per token together with the cache write).
    """
    if (not meta.backend.triton_attention and cpu_ext.handles(qk, value, cos, signed_sin, k_cache, v_cache)
            and qk.stride(-1) == 1 and qk.stride(-2) == qk.shape[-1] and value.stride(-1) == 1 and value.stride(-2) == value.shape[-1]):
        cpu_ext.op("rope_store")(qk, value, cos, signed_sin, k_cache, v_cache, meta.slot_mapping, num_heads)
        return qk
    qk = apply_rotary(qk, cos, signed_sin)
    store_kv(qk[:, num_heads:], value, k_cache, v_cache, meta)
    return qk


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Causal GQA attention of query [total_q, H, D] over the paged cache -> [total_q, H, D] (into `out` if given).

    `window`: a sliding-window layer's window (the query at p sees p - window + 1 .. p); None: all.
    """
    if window is not None and window >= meta.max_context_len:
        window = None  # no sequence is longer than the window: plain causal attention
    if meta.backend.triton_attention:
        from . import triton_attention

        if all(q == 1 for q in meta.query_lens):
            return triton_attention.paged_decode(query, k_cache, v_cache, meta.block_tables, meta.context_lens, scale, out=out, window=window)
        return triton_attention.paged_prefill(
            query, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.cu_seqlens_q, meta.max_q_len, scale, out=out, window=window
        )
    out = torch.empty(query.shape, dtype=query.dtype) if out is None else out
    return _cpu_paged_attention(query, k_cache, v_cache, meta.windowed(window), scale, out, window)


def _cpu_paged_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, out: torch.Tensor,
    window: int | None,
) -> torch.Tensor:
    if meta.decode_seqs is not None:
        cpu_ext.op("paged_decode")(query, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.decode_rows, meta.decode_seqs,
                                   meta.block_size, scale, window or 0, out)
    elif meta.all_decode:
        out.copy_(_cpu_decode(query, k_cache, v_cache, meta.decode_slots, meta.decode_mask, scale))
    elif meta.decode_rows is not None:
        out[meta.decode_rows] = _cpu_decode(query[meta.decode_rows], k_cache, v_cache, meta.decode_slots, meta.decode_mask, scale)
    if meta.prefill_seqs is None:
        return out
    if k_cache.dtype == torch.bfloat16 and cpu_prefill_kernel_applies(query.dtype, query.shape[-1]):
        cpu_ext.op("paged_prefill")(query, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.prefill_starts, meta.prefill_lens,
                                    meta.prefill_seqs, meta.block_size, scale, window or 0, out)
        return out
    sdpa = meta.sdpa_prefill()
    for batch in sdpa.short:
        heads, dim = query.shape[1:]
        kv_heads = k_cache.shape[0]
        q = query.index_select(0, batch.query_rows).view(batch.n, batch.max_q, heads, dim).transpose(1, 2)
        k = k_cache.index_select(1, batch.slots).view(kv_heads, batch.n, batch.max_ctx, dim).transpose(0, 1)
        v = v_cache.index_select(1, batch.slots).view(kv_heads, batch.n, batch.max_ctx, dim).transpose(0, 1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.mask, scale=scale, enable_gqa=True)
        out[batch.out_rows] = o.transpose(1, 2).reshape(-1, heads, dim)[batch.valid]
    for start, end, slots, mask in sdpa.long:
        q = query[start:end].transpose(0, 1).unsqueeze(0)  # [1, H, q_len, D]
        k = k_cache.index_select(1, slots).unsqueeze(0)  # [1, Hkv, ctx, D]
        v = v_cache.index_select(1, slots).unsqueeze(0)
        q_len, ctx = end - start, slots.numel()
        if mask is None and q_len == ctx:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:  # a chunk after cached tokens (query r sits at position ctx - q_len + r) or a window
            if mask is None:
                mask = torch.ones(q_len, ctx, dtype=torch.bool).tril(diagonal=ctx - q_len)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start:end] = o.squeeze(0).transpose(0, 1)
    return out


def _cpu_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """One query per sequence: grouped-query matmuls over K/V gathered to [Hkv, n, max_ctx, D].

    The query heads that share a KV head form the rows of one matmul, so K/V are never repeated
    per query head (SDPA with a mask and enable_gqa expands them). Scores are kept in fp32, as a
    flash kernel does: bf16 scores would round logits of ~10 by ~0.05.
    """
    n, heads, dim = q.shape
    kv_heads = k_cache.shape[0]
    k = k_cache.index_select(1, slots.reshape(-1)).view(kv_heads, n, -1, dim)  # [Hkv, n, max_ctx, D]
    v = v_cache.index_select(1, slots.reshape(-1)).view(kv_heads, n, -1, dim)
    q = q.view(n, kv_heads, heads // kv_heads, dim).transpose(0, 1).float()  # [Hkv, n, G, D]
    scores = torch.matmul(q, k.float().transpose(-1, -2)).mul_(scale)  # [Hkv, n, G, max_ctx]
    if mask is not None:
        scores.masked_fill_(~mask.view(1, n, 1, -1), float("-inf"))
    probs = scores.softmax(dim=-1)
    if v.dtype == torch.bfloat16 and not cpu_ext.bf16_matmuls_are_native():
        # emulated bf16: P.V in fp32 is faster (16 x 512 tokens: 2.4-2.5 vs 4.7-5.6 ms; emulated_bf16.log)
        return torch.matmul(probs, v.float()).to(v.dtype).transpose(0, 1).reshape(n, heads, dim)
    return torch.matmul(probs.to(v.dtype), v).transpose(0, 1).reshape(n, heads, dim)
