"""Every supported architecture, end to end on tiny random models: runtime == transformers, quantized too.

For Llama, Mistral (sliding window), Qwen2 (q/k/v bias, sliding layers), Qwen3 (q/k norm, head_dim
!= hidden / heads) and Gemma3 (four (1 + w) norms, GeGLU, local/global layers with their own RoPE,
query_pre_attn_scalar, logit soft-capping): the runtime's network gives transformers' fp32 logits
and greedy tokens, through the engine with batched decode, chunked and whole prefills (prompts
longer than the windows, one past the short-prefill limit); RTN and AWQ artifacts run in the
runtime exactly as transformers runs their dequantized weights; the sliding-window attention
kernels (CPU and Triton in its interpreter) equal the float64 reference.

Weights are drawn with initializer_range 0.2 (norm weights and biases randomized too), so logits
spread over several units and greedy tokens are a meaningful comparison.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import hf_greedy

from quantkit.runtime.engine import LLM
from quantkit.runtime.model_runner import ModelRunner, StepInput
from quantkit.runtime.sampling import SamplingParams
from quantkit.runtime.weights import load_weights

WINDOW = 8
COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, initializer_range=0.2, bos_token_id=None, pad_token_id=None, eos_token_id=0)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_hidden_layers=2, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_hidden_layers=2, sliding_window=WINDOW, tie_word_embeddings=False)),
    # layer 0 full attention, layer 1 sliding (transformers: the layers from max_window_layers on);
    # no grouped-query attention, so AWQ's v -> o group folds scales into v's bias too
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_hidden_layers=2, use_sliding_window=True, sliding_window=WINDOW,
                                                      max_window_layers=1, tie_word_embeddings=False, num_key_value_heads=4)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_hidden_layers=2, head_dim=32, tie_word_embeddings=True)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_hidden_layers=3, head_dim=32, query_pre_attn_scalar=24, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0}},
        final_logit_softcapping=30.0)),
}
SUPPORTED = ["Gemma3ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]


def build_tiny(arch: str, out, tokenizer_dir):
    import transformers

    config_name, model_name, extra = ARCHS[arch]
    config = getattr(transformers, config_name)(**{**COMMON, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).float().eval()
    with torch.no_grad():  # norms init to ones (zeros for Gemma's 1 + w) and biases to zeros: randomize them
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.3)
            elif name.endswith(".bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(out, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return model


@pytest.fixture(scope="module", params=list(ARCHS))
def tiny(request, tiny_model_dir, tmp_path_factory):
    """(architecture, model dir, the transformers model) for each architecture."""
    out = tmp_path_factory.mktemp(request.param)
    return request.param, out, build_tiny(request.param, out, tiny_model_dir)


def prompts(lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 500, (n,), generator=g).tolist() for n in lengths]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def check_scores(model_dir, model, tokens: list[int], tol: float = 1e-5) -> None:
    """Logits of every position, in one prefill and in chunks + decode steps, equal transformers'."""
    with torch.no_grad():
        expected = model(torch.tensor([tokens])).logits[0].double()
    assert float(expected.std(-1).mean()) > 0.5  # not near-uniform: token comparisons mean something
    runner = ModelRunner(load_weights(model_dir), torch.float32, 16, num_blocks=64)
    table = list(range(40, 20, -1))  # shuffled-looking, non-contiguous enough: descending blocks
    whole = runner.score(StepInput([tokens], [0], [table], [True]))
    assert rel_err(whole, expected) < tol
    n = len(tokens)
    got = [runner.score(StepInput([tokens[:5]], [0], [table], [True])), runner.score(StepInput([tokens[5 : n - 4]], [5], [table], [True]))]
    got += [runner.run(StepInput([[tokens[p]]], [p], [table], [True])) for p in range(n - 4, n)]
    assert rel_err(torch.cat(got), expected) < tol


# --------------------------------------------------------------------------- runtime vs transformers


def test_runtime_equals_transformers_fp32(tiny):
    arch, model_dir, model = tiny
    short, long = prompts([37], seed=1)[0], prompts([300], seed=2)[0]  # 300 > the short-prefill limit (256)
    check_scores(model_dir, model, short)
    check_scores(model_dir, model, long)
    batch = prompts([3, 29, 50, 12], seed=3) + [long[:270]]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = [hf_greedy(model, p, 6) for p in batch]
    # a 24-token budget prefills the long prompts in chunks while the others decode together
    chunked = LLM(str(model_dir), dtype="float32", num_blocks=64, max_num_batched_tokens=24).generate(batch, greedy)
    assert [o.token_ids for o in chunked] == expected
    whole = LLM(str(model_dir), dtype="float32", num_blocks=64, chunked_prefill=False).generate(batch, greedy)
    assert [o.token_ids for o in whole] == expected


# --------------------------------------------------------------------------- quantized end to end


def test_folding_scales_into_every_group_keeps_the_function(tiny):
    """The adapter's groups: s divides `prev`'s output (Gemma: (1 + w) / s - 1) and multiplies the linears' inputs."""
    import copy

    from quantkit.models import get_adapter

    arch, _, original = tiny
    model, adapter = copy.deepcopy(original), get_adapter(original.config.model_type)
    tokens = torch.tensor(prompts([40], seed=6))
    with torch.no_grad():
        expected = model(tokens).logits
        g = torch.Generator().manual_seed(0)
        for block in adapter.blocks(model):
            groups = adapter.scaling_groups(block)
            # every quantized linear is scaled once; o_proj only when v -> o is possible (no GQA)
            v_to_o = any(group.prev == "self_attn.v_proj" for group in groups)
            scaled = sorted(n for group in groups for n in group.linears)
            assert scaled == sorted(set(adapter.quantized_linears(block)) - (set() if v_to_o else {"self_attn.o_proj"}))
            for group in groups:
                scales = torch.rand(block.get_submodule(group.linears[0]).in_features, generator=g) * 1.5 + 0.25
                adapter.fold_into_prev(block.get_submodule(group.prev), scales)
                for name in group.linears:
                    block.get_submodule(name).weight.mul_(scales)
        assert rel_err(model(tokens).logits, expected) < 1e-5
    assert v_to_o == (arch == "qwen2")  # Qwen2 here has no GQA: v's bias is divided by the scales too


@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_quantized_artifact_runs_as_its_dequantized_weights(tiny, method, tmp_path):
    from quantkit.artifact import load_artifact, load_dequantized_model
    from quantkit.pipeline import quantize
    from quantkit.recipe import Recipe

    arch, model_dir, model = tiny
    out = tmp_path / method
    recipe = Recipe().with_overrides(method=method, group_size=32, samples=4, seqlen=32, search_samples=2, n_grid=5, compute_dtype="float32")
    quantize(str(model_dir), out, recipe)
    artifact = load_artifact(out)
    tensors = artifact.tensors()
    assert "model.layers.0.mlp.down_proj.qweight" in tensors and "model.layers.0.mlp.down_proj.weight" not in tensors
    if arch == "qwen2":  # biases travel with the packed linears, untouched by input scales (v's: by v -> o's)
        for proj in ("q_proj", "k_proj", "v_proj"):
            original = getattr(model.model.layers[1].self_attn, proj).bias
            stored = tensors[f"model.layers.1.self_attn.{proj}.bias"]
            assert torch.equal(stored, original.half()) or (method == "awq" and proj == "v_proj" and stored.abs().sum() > 0)
    reference = load_dequantized_model(artifact, torch.float32)
    check_scores(out, reference, prompts([40], seed=4)[0])
    batch = prompts([5, 33, 20], seed=5)
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    got = LLM(str(out), dtype="float32", num_blocks=32, max_num_batched_tokens=16).generate(batch, greedy)
    assert [o.token_ids for o in got] == [hf_greedy(reference, p, 5) for p in batch]


# --------------------------------------------------------------------------- support and refusals


def test_unsupported_architectures_are_refused_with_the_supported_list(tiny_model_dir, tmp_path):
    import json

    from quantkit.errors import QuantkitError
    from quantkit.models import get_adapter, supported_model_types
    from quantkit.runtime.models import MODEL_CLASSES

    assert sorted(MODEL_CLASSES) == SUPPORTED
    assert supported_model_types() == ["gemma3_text", "llama", "mistral", "qwen2", "qwen3"]
    with pytest.raises(QuantkitError, match="'gpt2' is not supported; supported model types: gemma3_text, llama, mistral, qwen2, qwen3"):
        get_adapter("gpt2")
    model_dir = tmp_path / "gpt2"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(QuantkitError, match="GPT2LMHeadModel is not supported by the runtime \\(supported: " + ", ".join(SUPPORTED)):
        ModelRunner(load_weights(model_dir), torch.float32, 16, num_blocks=4)


@pytest.mark.parametrize("change,match", [
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"layer_types": ["chunked_attention"] * 3}, "layer types \\['chunked_attention'\\] are not supported"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 4.0}}}, "RoPE type 'yarn' is not supported"),
])
def test_gemma3_features_outside_the_runtime_are_refused(change, match):
    from quantkit.runtime.models.gemma3 import Gemma3Config

    config = {**COMMON, **ARCHS["gemma3"][2], **change}
    with pytest.raises(ValueError, match=match):
        Gemma3Config.from_hf(config)


def test_layer_windows_follow_the_transformers_rules():
    from quantkit.runtime.models.gemma3 import Gemma3Config
    from quantkit.runtime.models.llama import LlamaConfig, MistralConfig, Qwen2Config

    base = {**COMMON, "num_hidden_layers": 4}
    assert MistralConfig.from_hf({**base, "sliding_window": 8}).layer_windows == (8, 8, 8, 8)
    assert MistralConfig.from_hf({**base, "sliding_window": None}).layer_windows == (None,) * 4
    assert MistralConfig.from_hf({**base, "sliding_window": 4096}).layer_windows == (None,) * 4  # >= the context: no effect
    assert LlamaConfig.from_hf({**base, "sliding_window": 8}).layer_windows == (None,) * 4
    # Qwen2 configs of transformers 4 (no layer_types): the window needs use_sliding_window
    qwen = {**base, "sliding_window": 8, "max_window_layers": 2}
    assert Qwen2Config.from_hf({**qwen, "use_sliding_window": True}).layer_windows == (None, None, 8, 8)
    assert Qwen2Config.from_hf({**qwen, "use_sliding_window": False}).layer_windows == (None,) * 4
    # Gemma3 of transformers 4: every 6th layer global, rope_local_base_freq for the others
    gemma = Gemma3Config.from_hf({**base, "num_hidden_layers": 7, "sliding_window": 8, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
                                  "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    assert gemma.layer_windows == (8, 8, 8, 8, 8, None, 8)
    assert gemma.global_rope == (1e6, {"rope_type": "linear", "factor": 8.0}) and gemma.local_rope == (1e4, None)


# --------------------------------------------------------------------------- sliding-window kernels


def random_paged(ctx_lens: list[int], q_lens: list[int], block_size: int, seed: int, heads: int = 6, kv_heads: int = 2, dim: int = 32):
    """Fresh random caches [num_blocks, block_size, Hkv, D], shuffled block tables, queries."""
    g = torch.Generator().manual_seed(seed)
    per_seq = [-(-c // block_size) for c in ctx_lens]
    order = torch.randperm(sum(per_seq) + 2, generator=g).tolist()
    tables, used = [], 0
    for n in per_seq:
        tables.append(order[used : used + n])
        used += n
    k = torch.randn(len(order), block_size, kv_heads, dim, generator=g)
    v = torch.randn(len(order), block_size, kv_heads, dim, generator=g)
    return torch.randn(sum(q_lens), heads, dim, generator=g), k, v, tables


# decode rows, whole prompts, chunks after cached tokens, one past SHORT_PREFILL_CONTEXT, mixed
KERNEL_CASES = [([1, 5, 9, 40, 70], [1, 1, 1, 1, 1]), ([3, 8, 9, 33, 70], [3, 8, 9, 33, 70]),
                ([20, 45, 300, 9], [7, 1, 40, 1]), ([280, 16], [280, 16])]


@pytest.mark.parametrize("window", [1, 8, 33])
@pytest.mark.parametrize("case", range(len(KERNEL_CASES)))
def test_cpu_sliding_window_attention_matches_reference(case, window):
    from quantkit.kernels.attention import AttentionMetadata, cpu_layout, paged_attention
    from quantkit.kernels.reference import paged_attention_ref

    ctx_lens, q_lens = KERNEL_CASES[case]
    query, k, v, tables = random_paged(ctx_lens, q_lens, 16, seed=case * 10 + window)
    meta = AttentionMetadata.build(tables, ctx_lens, q_lens, 16)
    out = torch.full_like(query, float("nan"))
    paged_attention(query, cpu_layout(k), cpu_layout(v), meta, 0.2, out=out, window=window)
    expected = paged_attention_ref(query, k, v, meta.block_tables, meta.context_lens, meta.cu_seqlens_q, 0.2, window)
    assert rel_err(out, expected) < 1e-5
    assert rel_err(out, paged_attention_ref(query, k, v, meta.block_tables, meta.context_lens, meta.cu_seqlens_q, 0.2)) > 1e-2


@pytest.mark.parametrize("window", [1, 8, 70])
def test_triton_sliding_window_attention_matches_reference(window):
    from quantkit.kernels.reference import paged_attention_ref, paged_decode_ref
    from quantkit.kernels.triton_attention import paged_decode, paged_prefill

    ctx_lens, q_lens = [1, 9, 40, 100, 130, 17], [1, 9, 13, 70, 130, 1]  # chunks after cached tokens, > 64-row tiles
    query, k, v, tables = random_paged(ctx_lens, q_lens, 16, seed=window)
    width = max(len(t) for t in tables)
    tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    out = paged_prefill(query, k, v, tables, ctx, cu, max(q_lens), 0.2, window=window)
    torch.testing.assert_close(out.double(), paged_attention_ref(query, k, v, tables, ctx, cu, 0.2, window), rtol=1e-5, atol=1e-5)
    q1 = query[: len(ctx_lens)]
    out = paged_decode(q1, k, v, tables, ctx, 0.2, window=window)
    torch.testing.assert_close(out.double(), paged_decode_ref(q1, k, v, tables, ctx, 0.2, window), rtol=1e-5, atol=1e-5)
