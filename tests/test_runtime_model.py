"""The runtime's network computes what transformers computes, over the paged cache, for dense and packed weights."""

from __future__ import annotations

import pytest
import torch

from quantkit.kernels import cpu_ext
from quantkit.runtime.model_runner import ModelRunner, StepInput
from quantkit.runtime.weights import load_weights


def hf_logits(model_dir, token_ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].double()


def runner_for(model_dir, num_blocks: int = 32, block_size: int = 16, dtype=torch.float32) -> ModelRunner:
    return ModelRunner(load_weights(model_dir), dtype, block_size, num_blocks=num_blocks)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


def test_prefill_logits_equal_transformers_fp32(tiny_model_dir):
    tokens = torch.randint(0, 500, (37,), generator=torch.Generator().manual_seed(0)).tolist()
    runner = runner_for(tiny_model_dir)
    logits = runner.score(StepInput([tokens], [0], [[5, 2, 9]], [True]))
    assert rel_err(logits, hf_logits(tiny_model_dir, tokens)) < 1e-5


def test_chunked_and_token_by_token_decoding_over_the_cache_equal_one_prefill(tiny_model_dir):
    tokens = torch.randint(0, 500, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    expected = hf_logits(tiny_model_dir, tokens)
    runner = runner_for(tiny_model_dir)
    table = [7, 3, 11]  # shuffled blocks
    got = [runner.score(StepInput([tokens[:13]], [0], [table], [True]))]  # a chunk, then another
    got.append(runner.score(StepInput([tokens[13:30]], [13], [table], [True])))
    for p in range(30, 40):  # then one token at a time
        got.append(runner.run(StepInput([[tokens[p]]], [p], [table], [True])))
    assert rel_err(torch.cat(got), expected) < 1e-5


def test_a_batch_of_sequences_equals_each_alone(tiny_model_dir):
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 500, (n,), generator=g).tolist() for n in (3, 17, 33)]
    runner = runner_for(tiny_model_dir)
    tables = [[0], [1, 2], [3, 4, 5]]
    batched = runner.run(StepInput(prompts, [0, 0, 0], tables, [True, True, True]))
    for i, prompt in enumerate(prompts):
        assert rel_err(batched[i : i + 1], hf_logits(tiny_model_dir, prompt)[-1:]) < 1e-5


def test_packed_artifact_runs_the_dequantized_network(tiny_model_dir, tmp_path):
    from quantkit.artifact import load_artifact, load_dequantized_model
    from quantkit.pipeline import quantize
    from quantkit.recipe import Recipe

    out = tmp_path / "rtn"
    quantize(str(tiny_model_dir), out, Recipe().with_overrides(method="rtn", group_size=32, samples=4, seqlen=32))
    tokens = torch.randint(0, 500, (21,), generator=torch.Generator().manual_seed(3)).tolist()
    reference = load_dequantized_model(load_artifact(out), torch.float32)
    with torch.no_grad():
        expected = reference(torch.tensor([tokens])).logits[0].double()
    fp32 = runner_for(out).score(StepInput([tokens], [0], [[1, 0]], [True]))
    assert rel_err(fp32, expected) < 1e-5
    bf16 = runner_for(out, dtype=torch.bfloat16).score(StepInput([tokens], [0], [[1, 0]], [True]))
    assert rel_err(bf16, expected) < 3e-2


def test_kv_budget_smaller_than_one_block_is_a_clear_error(tiny_model_dir):
    from quantkit.errors import QuantkitError

    with pytest.raises(QuantkitError, match="kv-cache-memory"):
        ModelRunner(load_weights(tiny_model_dir), torch.float32, 16, kv_cache_memory=100)


@pytest.mark.skipif(not cpu_ext.cpu_has_int8_instructions(),
                    reason="this CPU lacks AVX-512 BF16 and VNNI: the int8 output head is not built for it")
def test_int8_head_decodes_within_int8_rounding_of_the_dense_head(tiny_model_dir):
    tokens = torch.randint(0, 500, (30,), generator=torch.Generator().manual_seed(7)).tolist()
    dense = ModelRunner(load_weights(tiny_model_dir), torch.bfloat16, 16, num_blocks=8)
    int8 = ModelRunner(load_weights(tiny_model_dir), torch.bfloat16, 16, num_blocks=8, int8_head=True)
    assert int8.int8_head and int8.model.lm_head.int8 is not None and dense.model.lm_head.int8 is None
    expected = hf_logits(tiny_model_dir, tokens)
    got = {}
    for name, runner in (("dense", dense), ("int8", int8)):
        runner.fill_cache(StepInput([tokens[:20]], [0], [[1, 0]], [False]))
        got[name] = torch.cat([runner.run(StepInput([[tokens[p]]], [p], [[1, 0]], [True])) for p in range(20, 30)])  # decode: 1 row
    # int8 with one scale per 32 inputs moves a logit by a few tenths of a percent, like bf16 rounding.
    assert rel_err(got["int8"], expected[20:]) < 2 * rel_err(got["dense"], expected[20:]) + 5e-3
    assert rel_err(got["int8"], got["dense"].double()) < 2e-2


def test_int8_head_is_refused_with_a_warning_outside_bf16(tiny_model_dir):
    with pytest.warns(RuntimeWarning, match="int8 output head needs dtype bfloat16"):
        runner = ModelRunner(load_weights(tiny_model_dir), torch.float32, 16, num_blocks=4, int8_head=True)
    assert not runner.int8_head and runner.model.lm_head.int8 is None


def test_int8_head_is_refused_with_a_warning_without_its_kernel(tiny_model_dir, monkeypatch):
    from quantkit.kernels import cpu_ext  # the backend reads the kernel's availability from it

    monkeypatch.setattr(cpu_ext, "int8_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="AVX-512 BF16 and VNNI"):
        runner = ModelRunner(load_weights(tiny_model_dir), torch.bfloat16, 16, num_blocks=4, int8_head=True)
    assert not runner.int8_head and runner.model.lm_head.int8 is None


def test_by_default_the_int8_head_is_kept_only_where_it_is_no_further_from_the_checkpoint():
    from quantkit.runtime.models.llama import output_head

    g = torch.Generator().manual_seed(4)
    codes = torch.randint(-127, 128, (64, 3, 32), generator=g).float()
    codes[:, :, 0] = 127  # Q8_0: each group's scale is its amax / 127
    scales = (torch.rand(64, 3, 1, generator=g) * 1e-3 + 1e-5).to(torch.float16).float()
    born_int8 = (codes * scales).reshape(64, 96).to(torch.float16)  # a GGUF Q8_0 head, stored in fp16
    gaussian = (torch.randn(64, 96, generator=g) * 0.02).to(torch.float16)
    for weight, kept in ((born_int8, True), (gaussian, False)):
        tensors = {"model.embed_tokens.weight": weight}
        assert (output_head(tensors, weight.to(torch.bfloat16), True, torch.bfloat16, int8=None).int8 is not None) is kept
        assert output_head(tensors, weight.to(torch.bfloat16), True, torch.bfloat16, int8=True).int8 is not None  # asked for: always


def test_the_automatic_int8_head_stays_quiet_where_it_cannot_run(tiny_model_dir, recwarn):
    runner = ModelRunner(load_weights(tiny_model_dir), torch.float32, 16, num_blocks=4)
    assert not runner.int8_head and not [w for w in recwarn if "int8" in str(w.message)]
