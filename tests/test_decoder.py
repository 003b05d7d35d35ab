"""The fused decode path (kernels/decoder.py): a decode step's layers in one C++ call.

It must be a faster way to run the same model, never another model: its logits and KV cache equal
the module-by-module path's bit for bit, for int4 artifacts and dense bf16 weights, one sequence
and batches (dense batches above the GEMV's rows take the bf16 matmul), full and sliding-window
attention, q/k/v biases (Qwen2) and q/k norms (Qwen3). It takes exactly the steps where that holds,
and builds only where its kernels run.
"""

from __future__ import annotations

import pytest
import torch
from test_architectures import build_tiny

from quantkit.kernels import cpu_ext, cpu_int4
from quantkit.kernels.attention import AttentionMetadata
from quantkit.kernels.decoder import FusedDecoder
from quantkit.runtime.model_runner import ModelRunner, StepInput
from quantkit.runtime.weights import load_weights

needs_bf16_kernels = pytest.mark.skipif(not cpu_ext.cpu_has_bf16_instructions(),
                                        reason="the fused decoder runs quantkit's bf16 kernels: this CPU lacks AVX-512 BF16")


def build_llama_head_dim_64(out, tokenizer_dir) -> None:
    """A tiny Llama with head_dim 64, the size the bf16 attention kernels are unrolled for (the
    architectures' tiny models have 16: the generic kernels)."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=512, initializer_range=0.2, tie_word_embeddings=True,
                         bos_token_id=None, pad_token_id=None, eos_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).float().save_pretrained(out, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)


@pytest.fixture(scope="module")
def tiny_models(tiny_model_dir, tmp_path_factory):
    """{(architecture, weights): model dir} for Llama, Mistral (window 8), Qwen2 (q/k/v biases, a
    sliding layer), Qwen3 (q/k norms, head_dim 32) and a Llama with head_dim 64, dense and RTN int4."""
    from quantkit.pipeline import quantize
    from quantkit.recipe import Recipe

    dirs = {}
    for arch in ("llama", "mistral", "qwen2", "qwen3", "llama-d64"):
        dense = tmp_path_factory.mktemp(arch)
        if arch == "llama-d64":
            build_llama_head_dim_64(dense, tiny_model_dir)
        else:
            build_tiny(arch, dense, tiny_model_dir)
        int4 = tmp_path_factory.mktemp(f"{arch}-int4")
        quantize(str(dense), int4, Recipe().with_overrides(method="rtn", group_size=32, samples=4, seqlen=32), force=True)
        dirs[arch, "dense"], dirs[arch, "int4"] = dense, int4
    return dirs


def runners(model_dir) -> tuple[ModelRunner, ModelRunner]:
    """Two bf16 runners of one model: the fused decoder on, and off (the layers as modules)."""
    fused, modules = (ModelRunner(load_weights(model_dir), torch.bfloat16, 16, num_blocks=64) for _ in range(2))  # 12 x 5 blocks used
    modules.model.fused_decoder = None
    return fused, modules


@needs_bf16_kernels
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "llama-d64"])
@pytest.mark.parametrize("weights", ["int4", "dense"])
def test_fused_decode_steps_equal_the_modules_bit_for_bit(tiny_models, arch, weights, monkeypatch):
    calls = []
    real_call = FusedDecoder.__call__
    monkeypatch.setattr(FusedDecoder, "__call__", lambda self, *a: calls.append(a[0].shape[0]) or real_call(self, *a))
    fused, modules = runners(tiny_models[arch, weights])
    assert fused.model.fused_decoder is not None
    g = torch.Generator().manual_seed(5)
    lengths = [3, 20, 9, 40, 1, 17, 5, 33, 2, 12, 26, 8]  # contexts inside and beyond the window (8), partial blocks
    prompts = [torch.randint(1, 500, (n,), generator=g).tolist() for n in lengths]
    tables = [list(range(5 * i, 5 * i + 5))[::-1] for i in range(len(prompts))]  # 80 tokens each, blocks out of order
    for runner in (fused, modules):
        runner.run(StepInput(prompts, [0] * len(prompts), tables, [True] * len(prompts)))  # prefill: the modules
    assert calls == []
    # 6 rows: dense takes the bf16 matmul, not the GEMV; 12 rows: two threads (kernels/threads.py)
    batches = [range(6), [2], [0, 3, 5], range(12), [4], [1, 2, 3, 4], range(6, 12)] * 2
    for step, batch in enumerate(batches):
        tokens = [[int(torch.randint(1, 500, (), generator=g))] for _ in batch]
        inputs = StepInput(tokens, [lengths[i] for i in batch], [tables[i] for i in batch], [True] * len(batch))
        got, expected = fused.run(inputs), modules.run(inputs)
        assert torch.equal(got, expected), f"step {step}: logits differ by up to {(got - expected).abs().max()}"
        for i in batch:
            lengths[i] += 1
    assert calls == [len(b) for b in batches]
    for (k1, v1), (k2, v2) in zip(fused.kv_caches, modules.kv_caches, strict=True):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
        assert k1.abs().sum() > 0  # the steps did write the cache


@needs_bf16_kernels
def test_only_all_decode_bf16_steps_with_few_enough_rows_take_it(tiny_models):
    fused, _ = runners(tiny_models["llama", "int4"])
    decoder = fused.model.fused_decoder
    hidden = fused.config.hidden_size

    def takes(query_lens: list[int], dtype=torch.bfloat16) -> bool:
        meta = AttentionMetadata.build([[i] for i in range(len(query_lens))], [q + 3 for q in query_lens], query_lens, 16)
        return decoder.takes(torch.zeros(sum(query_lens), hidden, dtype=dtype), meta)

    assert takes([1]) and takes([1] * 7)
    assert not takes([5])  # a prefill chunk
    assert not takes([1, 4, 1])  # decode rows mixed with a chunk
    assert not takes([1], dtype=torch.float32)
    rows = cpu_int4.NATIVE_DENSE_FROM_ROWS  # from here the int4 linears dequantize instead: not the int4 kernel
    assert takes([1] * (rows - 1)) and not takes([1] * rows)


@needs_bf16_kernels
def test_it_carries_each_architectures_layers_and_is_built_only_where_its_kernels_run(tiny_models, monkeypatch):
    def decoder(model_dir, dtype=torch.bfloat16):
        return ModelRunner(load_weights(model_dir), dtype, 16, num_blocks=8).model.fused_decoder

    assert decoder(tiny_models["mistral", "int4"]).windows == [8, 8]
    assert decoder(tiny_models["llama", "dense"]).groups == [0] * 8
    qwen2 = decoder(tiny_models["qwen2", "int4"])  # the q/k/v projection's bias, in each layer
    assert [qwen2.linears[4 * i + 3].numel() > 0 for i in range(8)] == [True, False, False, False] * 2
    qwen3 = decoder(tiny_models["qwen3", "dense"])
    assert [tuple(w.shape) for w in qwen3.qk_norms] == [(4 + 2, 32)] * 2  # q heads + kv heads, head_dim
    assert decoder(tiny_models["llama", "dense"], torch.float32) is None  # its kernels are bf16
    monkeypatch.setattr(cpu_ext, "ENABLED", False)  # QUANTKIT_CPU_KERNELS=0: the plain-torch paths only
    assert decoder(tiny_models["llama", "int4"]) is None


def test_small_steps_run_on_one_thread_except_for_dense_bf16_models(tiny_models, monkeypatch):
    from quantkit.kernels import threads

    assert [threads.threads_for_tokens(n, 2) for n in (1, 8, 9)] == [1, 1, 2]
    assert [threads.threads_for_tokens(n, 2, dense_bf16=True) for n in (1, 8, 9)] == [2, 2, 2]
    monkeypatch.setattr(threads, "DENSE_BF16_SMALL_STEPS_ON_ALL_THREADS", False)  # as benchmarks time them on one
    assert threads.threads_for_tokens(1, 2, dense_bf16=True) == 1

    def dense_bf16(model_dir, dtype=torch.bfloat16) -> bool:
        return ModelRunner(load_weights(model_dir), dtype, 16, num_blocks=8).dense_bf16

    assert dense_bf16(tiny_models["llama", "dense"])
    assert not dense_bf16(tiny_models["llama", "int4"])
    assert not dense_bf16(tiny_models["llama", "dense"], torch.float32)
