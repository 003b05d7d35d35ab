"""Decode steps replayed from CUDA graphs captured at bucketed batch sizes.

An eager decode step is a few hundred small kernel launches plus the Python that issues them, so
on a GPU it is bound by launches, not by the weights' bytes. A CUDA graph records one step's
launches once and replays them with one call (nano-vllm's model runner does the same).

A graph reads and writes fixed addresses, so each bucket's graph is captured over slices of
static input buffers, largest bucket first, all sharing one memory pool. A decode step of n
sequences copies its inputs into the first n rows, pads the bucket's other rows (slot -1: the KV
store skips them; context 1 over block 0: read and discarded), replays the smallest bucket that
holds n and returns the first n rows of its logits. Steps with a prefill chunk, or more sequences
than the largest bucket, run eagerly.

`emulated=True` keeps the buffers, padding and metadata but replays by running the network again:
the CPU tests check this bookkeeping against eager steps (tests/test_triton_engine.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from quantkit.kernels.attention import AttentionMetadata
from quantkit.kernels.backend import KernelBackend

# Batch sizes with a captured graph: fine steps where batches are small, every 16 above (as vLLM).
BATCH_BUCKETS = (1, 2, 4, 8, *range(16, 1025, 16))


def buckets_up_to(max_batch: int) -> list[int]:
    """The captured batch sizes for at most max_batch sequences: BATCH_BUCKETS below it, and max_batch itself."""
    return [b for b in BATCH_BUCKETS if b < max_batch] + [max_batch]


class DecodeGraphs:
    def __init__(self, model, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], backend: KernelBackend, block_size: int,
                 max_batch: int, max_blocks_per_seq: int, max_model_len: int, emulated: bool = False):
        if not backend.triton_attention:
            raise ValueError("decode graphs replay the Triton backend's kernels; the CPU attention plans each step on the host")
        self.buckets = buckets_up_to(max_batch)
        self.block_size = block_size
        size, device = self.buckets[-1], backend.device
        self.input_ids = torch.zeros(size, dtype=torch.long, device=device)
        self.positions = torch.zeros(size, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((size,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(size, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(size, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(size + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, _Graph] = {}
        pool = None
        for bs in reversed(self.buckets):  # largest first: the smaller graphs fit in its pool
            meta = AttentionMetadata(
                slot_mapping=self.slot_mapping[:bs], block_tables=self.block_tables[:bs], context_lens=self.context_lens[:bs],
                cu_seqlens_q=self.cu_seqlens_q[: bs + 1], query_lens=[1] * bs,
                # the longest context any replay may have, so a sliding window is never planned away at capture
                context_lens_list=[max_model_len] * bs, block_size=block_size, backend=backend)

            def step(bs=bs, meta=meta) -> torch.Tensor:
                return model.compute_logits(model(self.input_ids[:bs], self.positions[:bs], kv_caches, meta))

            graph = _Graph(emulated, pool)
            graph.capture(step)
            pool = graph.pool
            self.graphs[bs] = graph

    def run(self, token_ids: list[list[int]], starts: list[int], block_tables: list[list[int]], sample: list[bool]) -> torch.Tensor | None:
        """fp32 logits [n, vocab] of a decode-only step of n sequences, or None: not a step a graph serves."""
        n = len(token_ids)
        if not 0 < n <= self.buckets[-1] or not all(sample) or any(len(ids) != 1 for ids in token_ids):
            return None
        width = max(map(len, block_tables))
        if width > self.block_tables.shape[1]:
            return None
        bs = next(b for b in self.buckets if b >= n)
        bsz = self.block_size
        # one host tensor, one copy per buffer: ids, positions, slots, context lengths for the bucket's rows
        host = torch.empty(4, bs, dtype=torch.long)
        host[0, :n] = torch.tensor([ids[0] for ids in token_ids])
        host[1, :n] = torch.tensor(starts)
        host[2, :n] = torch.tensor([t[p // bsz] * bsz + p % bsz for t, p in zip(block_tables, starts)])
        host[3, :n] = host[1, :n] + 1
        host[0:2, n:], host[2, n:], host[3, n:] = 0, -1, 1
        tables = torch.zeros(bs, width, dtype=torch.int32)
        for i, t in enumerate(block_tables):
            tables[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        host = host.to(self.input_ids.device, non_blocking=True)
        self.input_ids[:bs].copy_(host[0])
        self.positions[:bs].copy_(host[1])
        self.slot_mapping[:bs].copy_(host[2])
        self.context_lens[:bs].copy_(host[3])
        self.block_tables[:bs, :width].copy_(tables.to(self.block_tables.device, non_blocking=True))
        return self.graphs[bs].replay()[:n]


class _Graph:
    """One captured step: a torch.cuda.CUDAGraph, or (emulated) the step itself, run again on replay."""

    def __init__(self, emulated: bool, pool):
        self.emulated, self.pool = emulated, pool
        self.step: Callable[[], torch.Tensor] | None = None
        self.output: torch.Tensor | None = None

    def capture(self, step: Callable[[], torch.Tensor]) -> None:
        self.step = step
        step()  # warm-up outside the capture: Triton compiles, cuBLAS picks its kernels
        if self.emulated:
            return
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=self.pool):
            self.output = step()
        self.pool = self.graph.pool()

    def replay(self) -> torch.Tensor:
        if self.emulated:
            return self.step()
        self.graph.replay()
        return self.output
