"""Turns a scheduled batch into model inputs, runs the network, returns logits of the sampling rows
(and, when asked, the logprobs of given tokens at other rows: prompt logprobs, scoring).

Owns the network and the paged KV cache tensors. The cache size comes from a memory budget:
one block holds K and V of `block_size` tokens for every layer. The budget is given in bytes, or
is the device's default: DEFAULT_CPU_KV_CACHE_MEMORY on CPU; on CUDA what a share of the GPU's
memory leaves after the weights and a measured peak step (vLLM's --gpu-memory-utilization). The
KernelBackend it selects once (kernels/backend.py) puts weights, cache, step inputs and RoPE
tables on its device and decides every kernel; the layers and the attention metadata carry it.
On CUDA, decode steps replay CUDA graphs (runtime/cuda_graphs.py) unless limits.enforce_eager.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from quantkit.errors import QuantkitError
from quantkit.kernels.attention import AttentionMetadata, allocate_kv_cache
from quantkit.kernels.backend import KernelBackend, select_backend
from quantkit.kernels.linear import QuantLinear
from quantkit.kernels.logprobs import target_logprobs
from quantkit.kernels.threads import cpu_threads, threads_for_tokens

from .cuda_graphs import DecodeGraphs
from .models import MODEL_CLASSES
from .weights import ModelWeights

MiB = 1024**2
DEFAULT_CPU_KV_CACHE_MEMORY = 256 * MiB  # the KV budget of a CPU engine given none


@dataclass(frozen=True)
class RunnerLimits:
    """What the engine will ask of the runner: sizes the CUDA graphs, the CUDA KV budget's peak step."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    activations: str = "bf16"  # "int8": batched steps' int4 linears run W4A8 where the CPU can (kernels/backend.py)
    decode_graphs: str = "cuda"  # "cuda": captured where the device is CUDA; "emulated": the same buffers, replayed eagerly (CPU tests)


@dataclass(frozen=True)
class StepInput:
    """One step's flattened tokens: seqs[i] computes query_lens[i] tokens starting at starts[i]."""

    token_ids: list[list[int]]  # per sequence, the tokens computed this step
    starts: list[int]  # position of each sequence's first computed token
    block_tables: list[list[int]]
    sample: list[bool]  # whether the sequence's last computed token produces a next token


@dataclass(frozen=True)
class RowLogprobs:
    """Scores of chosen rows: log p(target) and whether the target is the argmax, per row; with
    top_k, also the top_k most likely tokens and their logprobs [rows, top_k], most likely first."""

    logprobs: torch.Tensor
    greedy: torch.Tensor
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


def kv_block_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one KV block: K and V of block_size tokens in every layer."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


# Headroom outside the measured step: cuBLAS and Triton workspaces, the CUDA graphs' pool, the
# allocator's fragmentation. vLLM keeps a similar margin outside its profile run.
CUDA_HEADROOM = 512 * MiB


def kv_budget_from_gpu_memory(free: int, total: int, utilization: float, peak_step: int) -> int:
    """The KV bytes that keep everything this process and others hold (total - free: the weights
    among it) plus the peak step and CUDA_HEADROOM within utilization x total; refused if none."""
    if not 0 < utilization <= 1:
        raise QuantkitError(f"--gpu-memory-utilization {utilization}: give a fraction in (0, 1], e.g. 0.9")
    budget = int(utilization * total) - (total - free) - peak_step - CUDA_HEADROOM
    if budget <= 0:
        raise QuantkitError(
            f"no GPU memory is left for the KV cache: {utilization:.0%} of {total / 2**30:.1f} GiB is "
            f"{utilization * total / 2**30:.1f} GiB, and {(total - free) / 2**30:.1f} GiB is in use (the weights among it), "
            f"{peak_step / 2**30:.2f} GiB is the largest step's peak and {CUDA_HEADROOM // MiB} MiB headroom: raise "
            f"--gpu-memory-utilization, lower --max-num-batched-tokens, or give --kv-cache-memory")
    return budget


def _int8_head_usable(dtype: torch.dtype, asked: bool, backend: KernelBackend) -> bool:
    """The int8 output head runs on quantkit's int8 kernel with bf16 activations; where it cannot,
    a request for it (asked, not the automatic choice) is told why it is off."""
    if not asked:
        return dtype == torch.bfloat16 and backend.int8_head
    if dtype != torch.bfloat16:
        warnings.warn(f"the int8 output head needs dtype bfloat16 (got {dtype}); using the dense head", RuntimeWarning, stacklevel=3)
        return False
    if not backend.int8_head:
        warnings.warn("the int8 output head needs quantkit's C++ kernels (built, not switched off) on a CPU with AVX-512 BF16 and "
                      "VNNI; using the dense head", RuntimeWarning, stacklevel=3)
        return False
    return True


class ModelRunner:
    def __init__(self, weights: ModelWeights, dtype: torch.dtype, block_size: int, kv_cache_memory: int | None = None, num_blocks: int | None = None,
                 int8_head: bool | None = None, device: str = "auto", limits: RunnerLimits = RunnerLimits()):
        if weights.architecture not in MODEL_CLASSES:
            raise QuantkitError(
                f"architecture {weights.architecture} is not supported by the runtime (supported: {', '.join(sorted(MODEL_CLASSES))})."
            )
        config_cls, network = MODEL_CLASSES[weights.architecture]
        try:
            self.config = config_cls.from_hf(weights.config)
        except ValueError as e:
            raise QuantkitError(f"{weights.path}/config.json: {e}") from None
        self.dtype, self.block_size = dtype, block_size
        self.max_threads = torch.get_num_threads()
        self.backend = select_backend(device, activations=limits.activations)  # on CPU: builds or loads the C++ kernels now, not inside the first request
        tensors = weights.tensors
        if self.backend.device != "cpu":
            tensors = {name: t.to(self.backend.device) for name, t in tensors.items()}
        with torch.inference_mode():
            # int8_head None: the model's head decides (output_head keeps an int8 copy no less faithful than the dense one)
            usable = int8_head is not False and _int8_head_usable(dtype, int8_head is True, self.backend)
            self.model = network(self.config, tensors, dtype, int8_head=int8_head if usable else False, backend=self.backend)
        self.int8_head = self.model.lm_head.int8 is not None
        # dense bf16 linears take every thread even for small steps (kernels/threads.py)
        self.dense_bf16 = dtype == torch.bfloat16 and not any(isinstance(m, QuantLinear) for m in self.model.modules())
        c = self.config
        self.decode_graphs: DecodeGraphs | None = None  # captured once the cache exists (below)
        self.block_bytes = kv_block_bytes(c.num_layers, block_size, c.num_kv_heads, c.head_dim, dtype)
        if num_blocks is None:
            if kv_cache_memory is None:
                kv_cache_memory = self._cuda_kv_budget(limits) if self.backend.device == "cuda" else DEFAULT_CPU_KV_CACHE_MEMORY
            num_blocks = kv_cache_memory // self.block_bytes
        if num_blocks < 1:
            raise QuantkitError(
                f"KV cache budget {kv_cache_memory} bytes is less than one block ({self.block_bytes} bytes for "
                f"{block_size} tokens); raise --kv-cache-memory."
            )
        self.num_blocks = num_blocks
        self.kv_caches = allocate_kv_cache(c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim, dtype, self.backend)
        # graphs replay the Triton kernels' launches; the CPU kernels plan each step on the host
        if self.backend.triton_attention and not limits.enforce_eager and (self.backend.device == "cuda" or limits.decode_graphs == "emulated"):
            max_len = min(limits.max_model_len or self.max_model_len, self.max_model_len)
            with torch.inference_mode():
                self.decode_graphs = DecodeGraphs(self.model, self.kv_caches, self.backend, block_size, min(limits.max_num_seqs, num_blocks),
                                                  -(-max_len // block_size), max_len, emulated=limits.decode_graphs == "emulated")

    def _cuda_kv_budget(self, limits: RunnerLimits) -> int:
        """Bytes of KV cache that keep the engine within limits.gpu_memory_utilization of the GPU:
        the weights are resident now; the peak of the largest step is measured by running one
        (vLLM's profile run) over a throwaway cache just big enough for it."""
        tokens = limits.max_num_batched_tokens
        blocks = -(-tokens // self.block_size)
        c = self.config
        probe_cache = allocate_kv_cache(c.num_layers, blocks, self.block_size, c.num_kv_heads, c.head_dim, self.dtype, self.backend)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step = StepInput([[0] * tokens], [0], [list(range(blocks))], [True])
        self.kv_caches = probe_cache
        try:
            self.run(step)
        finally:
            del self.kv_caches
        torch.cuda.synchronize()
        peak_step = torch.cuda.max_memory_allocated() - before
        del probe_cache
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        return kv_budget_from_gpu_memory(free, total, limits.gpu_memory_utilization, peak_step)

    @property
    def max_model_len(self) -> int:
        return self.config.max_position_embeddings

    def _forward(self, step: StepInput) -> tuple[torch.Tensor, AttentionMetadata]:
        device = self.backend.device
        input_ids = torch.tensor([t for ids in step.token_ids for t in ids], dtype=torch.long, device=device)
        positions = torch.cat([torch.arange(s, s + len(ids)) for s, ids in zip(step.starts, step.token_ids)]).to(device)
        query_lens = [len(ids) for ids in step.token_ids]
        context_lens = [s + q for s, q in zip(step.starts, query_lens)]
        meta = AttentionMetadata.build(step.block_tables, context_lens, query_lens, self.block_size, self.backend)
        with cpu_threads(threads_for_tokens(len(input_ids), self.max_threads, self.dense_bf16)):
            return self.model(input_ids, positions, self.kv_caches, meta), meta

    @torch.inference_mode()
    def run(self, step: StepInput) -> torch.Tensor:
        """fp32 logits [number of sampling sequences, vocab], in the order of the batch."""
        if self.decode_graphs is not None:
            logits = self.decode_graphs.run(step.token_ids, step.starts, step.block_tables, step.sample)
            if logits is not None:
                return logits
        hidden, meta = self._forward(step)
        return self._sampling_logits(step, hidden, meta)

    @torch.inference_mode()
    def run_and_score(self, step: StepInput, rows: torch.Tensor, targets: torch.Tensor, top_k: int = 0) -> tuple[torch.Tensor, RowLogprobs]:
        """run()'s logits and, from the same forward, token_logprobs' scores of targets at rows
        with the top_k most likely tokens there (prompt logprobs)."""
        hidden, meta = self._forward(step)
        return self._sampling_logits(step, hidden, meta), self._score_rows(hidden, rows, targets, top_k)

    @torch.inference_mode()
    def fill_cache(self, step: StepInput) -> None:
        """Compute the step's tokens into the KV cache only (shared prefixes for later steps)."""
        self._forward(step)

    @torch.inference_mode()
    def token_logprobs(self, step: StepInput, rows: torch.Tensor, targets: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(targets[i] | prefix) at flattened token rows[i], and whether it is the argmax."""
        hidden, _ = self._forward(step)
        scored = self._score_rows(hidden, rows, targets, chunk=chunk)
        return scored.logprobs, scored.greedy

    def _sampling_logits(self, step: StepInput, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        last_rows = (meta.cu_seqlens_q[1:].long() - 1)[torch.tensor(step.sample, dtype=torch.bool, device=self.backend.device)]
        with cpu_threads(self.max_threads):  # the lm_head is one big matmul: all threads
            return self.model.compute_logits(hidden[last_rows])

    def _score_rows(self, hidden: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, top_k: int = 0, chunk: int = 256) -> RowLogprobs:
        """The vocabulary-sized logits exist only for `chunk` rows at a time (2048 rows x 49k
        vocab in fp32 would be 400 MB)."""
        rows, targets = rows.to(self.backend.device), targets.to(self.backend.device)  # the engine's are CPU tensors
        logprobs, greedy, top_ids, top_logprobs = [], [], [], []
        with cpu_threads(self.max_threads):
            for i in range(0, rows.numel(), chunk):
                logits = self.model.compute_logits(hidden[rows[i : i + chunk]], upcast=False)
                target = targets[i : i + chunk]
                if top_k:  # the alternatives need the whole log_softmax: the target's logprob comes from it too, so they agree
                    row_logprobs = logits.float().log_softmax(-1)
                    values, ids = row_logprobs.topk(min(top_k, logits.shape[-1]), dim=-1)
                    top_logprobs.append(values)
                    top_ids.append(ids)
                    chosen, is_greedy = row_logprobs.gather(-1, target[:, None]).squeeze(-1), row_logprobs.argmax(-1) == target
                else:
                    chosen, is_greedy = target_logprobs(logits, target, self.backend.cpu_kernels)
                logprobs.append(chosen)
                greedy.append(is_greedy)
        tops = (torch.cat(top_ids), torch.cat(top_logprobs)) if top_k else (None, None)
        return RowLogprobs(torch.cat(logprobs), torch.cat(greedy), *tops)

    @torch.inference_mode()
    def score(self, step: StepInput) -> torch.Tensor:
        """fp32 logits of every computed token [total tokens, vocab] (for log-likelihoods)."""
        hidden, _ = self._forward(step)
        return self.model.compute_logits(hidden)
