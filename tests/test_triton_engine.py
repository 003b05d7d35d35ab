"""The wiring proof a machine without a GPU can give (issue 27, item 5): the engine end to end on
the Triton kernels (W4A16 GEMM, KV store, paged prefill and decode, block-major cache), run by
Triton's interpreter on CPU tensors, gives the CPU backend's greedy tokens.

The Triton backend is forced through the one place the runner picks kernels (select_backend);
tests/conftest.py sets TRITON_INTERPRET=1 before Triton is imported. Tiny shapes and few tokens:
the interpreter is slow. fp16 runs the W4A16 GEMM (it computes in fp16/bf16 only); fp32 runs the
Triton attention exactly and the int4 weights dequantized at load (the backend's "torch" path).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import quantkit.runtime.model_runner as model_runner
from quantkit.errors import QuantkitError
from quantkit.kernels.attention import allocate_kv_cache
from quantkit.kernels.backend import select_backend
from quantkit.runtime.engine import LLM
from quantkit.runtime.sampling import SamplingParams

# On CPU, Triton's interpreter runs the kernels (TRITON_INTERPRET=1, set by tests/conftest.py);
# with QUANTKIT_TEST_DEVICE=cuda the same tests run them compiled on the GPU.
needs_interpreted_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None
    or (os.environ.get("TRITON_INTERPRET") != "1" and os.environ.get("QUANTKIT_TEST_DEVICE") != "cuda"),
    reason="needs Triton (the dev extra) run by its interpreter (TRITON_INTERPRET=1, set by tests/conftest.py) or on a GPU "
           "(QUANTKIT_TEST_DEVICE=cuda)")

# 37 tokens span 3 blocks of 16; with 24 tokens a step its prefill is chunked beside the others'
# decode rows, so steps are prefill-only, mixed (prefill kernel after cached tokens) and decode-only.
PROMPTS = [list(range(5, 42)), [7, 3, 99, 250, 11], [300, 301, 2, 17, 64, 128, 9, 1]]
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_int4(tiny_model_dir, tmp_path_factory):
    from quantkit.pipeline import quantize
    from quantkit.recipe import Recipe

    out = tmp_path_factory.mktemp("triton-engine") / "tiny-rtn"
    quantize(str(tiny_model_dir), out, Recipe().with_overrides(method="rtn", group_size=32, compute_dtype="float32"))
    return out


def generate(model, dtype: str, device: str = "cpu") -> list[list[int]]:
    llm = LLM(str(model), dtype=dtype, num_blocks=16, max_num_batched_tokens=24, device=device)
    return [out.token_ids for out in llm.generate(PROMPTS, GREEDY)]


@needs_interpreted_triton
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_the_engine_on_the_triton_kernels_gives_the_cpu_backends_greedy_tokens(tiny_int4, monkeypatch, test_device, dtype):
    import quantkit.kernels.triton_attention as triton_attention
    import quantkit.kernels.triton_gemm as triton_gemm

    cpu_tokens = generate(tiny_int4, dtype)

    calls = {"w4a16_gemm": 0, "paged_prefill": 0, "paged_decode": 0}
    for module, name in ((triton_gemm, "w4a16_gemm"), (triton_attention, "paged_prefill"), (triton_attention, "paged_decode")):
        kernel = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _k=kernel, _n=name, **kw: calls.__setitem__(_n, calls[_n] + 1) or _k(*a, **kw))
    monkeypatch.setattr(model_runner, "select_backend", lambda device, **options: select_backend(device, triton=True, **options))
    triton_tokens = generate(tiny_int4, dtype, test_device)

    # every Triton kernel meant for this dtype ran: the wiring, not a fallback, made these tokens
    assert calls["paged_prefill"] and calls["paged_decode"] and bool(calls["w4a16_gemm"]) == (dtype == "float16"), calls
    assert triton_tokens == cpu_tokens


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_without_cuda_auto_is_the_cpu_backend_and_cuda_is_refused():
    backend = select_backend("auto")
    assert (backend.device, backend.linear, backend.attention, backend.kv_layout) == ("cpu", "cpu", "cpu", "head")
    with pytest.raises(QuantkitError, match="no CUDA device is visible"):
        select_backend("cuda")
    with pytest.raises(QuantkitError, match="choose one of auto, cpu, cuda"):
        select_backend("tpu")


def test_the_triton_backend_reads_a_block_major_cache_and_its_gemm_dtypes():
    backend = select_backend("cpu", triton=True)
    k, _ = allocate_kv_cache(1, 3, 16, 2, 8, torch.float32, backend)[0]
    assert k.shape == (3, 16, 2, 8) and not backend.cpu_kernels and not backend.fused_decoder
    assert [backend.int4_linear(d) for d in (torch.bfloat16, torch.float16, torch.float32)] == ["triton", "triton", "torch"]


# ---------------------------------------------------------------------------- CUDA graphs' bookkeeping
@needs_interpreted_triton
def test_decode_steps_through_the_graph_buffers_give_the_eager_steps_greedy_tokens(tiny_int4, monkeypatch, test_device):
    """The graphs' static buffers, bucket padding (3 sequences replay the bucket of 4: a padded row
    writes no slot and reads block 0) and per-bucket metadata, replayed eagerly (no GPU here):
    what a CUDA graph would replay must produce the eager steps' tokens."""
    import functools

    import quantkit.runtime.cuda_graphs as cuda_graphs
    import quantkit.runtime.engine as engine

    monkeypatch.setattr(model_runner, "select_backend", lambda device, **options: select_backend(device, triton=True, **options))
    eager_limits = functools.partial(model_runner.RunnerLimits, enforce_eager=True)  # on a GPU too: no graphs for the reference
    monkeypatch.setattr(engine, "RunnerLimits", eager_limits)
    eager = generate(tiny_int4, "float16", test_device)

    replays = []
    # CPU: the graphs' buffers replayed eagerly; on a GPU the real CUDA graphs
    graphs = "emulated" if test_device == "cpu" else "cuda"
    monkeypatch.setattr(engine, "RunnerLimits", functools.partial(model_runner.RunnerLimits, decode_graphs=graphs))
    original_run = cuda_graphs.DecodeGraphs.run
    monkeypatch.setattr(cuda_graphs.DecodeGraphs, "run", lambda self, ids, *a: replays.append((len(ids), original_run(self, ids, *a))) or replays[-1][1])
    graphed = generate(tiny_int4, "float16", test_device)

    served = [n for n, logits in replays if logits is not None]
    assert 3 in served, replays  # the three-sequence decode steps came from the bucket of 4
    assert any(logits is None for _, logits in replays)  # prefill steps ran eagerly
    assert graphed == eager


def test_graph_buckets_cover_every_batch_up_to_the_largest():
    from quantkit.runtime.cuda_graphs import buckets_up_to

    assert buckets_up_to(1) == [1]
    assert buckets_up_to(20) == [1, 2, 4, 8, 16, 20]
    assert buckets_up_to(64) == [1, 2, 4, 8, 16, 32, 48, 64]


def test_the_cuda_kv_budget_keeps_the_engine_within_its_share_of_the_gpu():
    from quantkit.runtime.model_runner import CUDA_HEADROOM, kv_budget_from_gpu_memory

    GiB = 2**30
    # 80 GiB card, 16 GiB held (weights), a 2 GiB peak step: 0.9 x 80 - 16 - 2 - headroom
    assert kv_budget_from_gpu_memory(64 * GiB, 80 * GiB, 0.9, 2 * GiB) == int(0.9 * 80 * GiB) - 18 * GiB - CUDA_HEADROOM
    with pytest.raises(QuantkitError, match="raise --gpu-memory-utilization"):
        kv_budget_from_gpu_memory(10 * GiB, 80 * GiB, 0.9, 2 * GiB)  # another process holds most of it
    with pytest.raises(QuantkitError, match=r"give a fraction in \(0, 1\]"):
        kv_budget_from_gpu_memory(64 * GiB, 80 * GiB, 1.5, 0)


@needs_interpreted_triton
def test_the_triton_backend_never_builds_or_asks_for_the_cpu_kernels(tiny_int4, monkeypatch, test_device):
    """On a GPU machine the C++ CPU build is skipped: nothing on the Triton path reaches for it."""
    from quantkit.kernels import cpu_ext

    def refuse(*_args):
        raise AssertionError("the Triton backend asked for the CPU kernels")

    monkeypatch.setattr(model_runner, "select_backend", lambda device, **options: select_backend(device, triton=True, **options))
    for probe in ("available", "bf16_available", "int8_available", "bf16_matmuls_are_native"):
        monkeypatch.setattr(cpu_ext, probe, refuse)
    assert all(len(tokens) == GREEDY.max_tokens for tokens in generate(tiny_int4, "float16", test_device))
