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

needs_interpreted_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs Triton (the dev extra) run by its interpreter (TRITON_INTERPRET=1, set by tests/conftest.py): the wiring proof on CPU tensors")

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


def generate(model, dtype: str) -> list[list[int]]:
    llm = LLM(str(model), dtype=dtype, num_blocks=16, max_num_batched_tokens=24)
    return [out.token_ids for out in llm.generate(PROMPTS, GREEDY)]


@needs_interpreted_triton
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_the_engine_on_the_triton_kernels_gives_the_cpu_backends_greedy_tokens(tiny_int4, monkeypatch, dtype):
    import quantkit.kernels.triton_attention as triton_attention
    import quantkit.kernels.triton_gemm as triton_gemm

    cpu_tokens = generate(tiny_int4, dtype)

    calls = {"w4a16_gemm": 0, "paged_prefill": 0, "paged_decode": 0}
    for module, name in ((triton_gemm, "w4a16_gemm"), (triton_attention, "paged_prefill"), (triton_attention, "paged_decode")):
        kernel = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _k=kernel, _n=name, **kw: calls.__setitem__(_n, calls[_n] + 1) or _k(*a, **kw))
    monkeypatch.setattr(model_runner, "select_backend", lambda device: select_backend(device, triton=True))
    triton_tokens = generate(tiny_int4, dtype)

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
