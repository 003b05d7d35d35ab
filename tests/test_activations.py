"""--activations int8 as a serving choice: the backend decides it once, batched steps' int4 linears
run W4A8 from the backend's row threshold, fewer rows keep the int4 kernels, and every report
says which ran."""

from __future__ import annotations

import pytest
import torch

from quantkit.kernels import w4a8
from quantkit.kernels.backend import W4A8_FROM_ROWS, resolve_activations, select_backend
from quantkit.kernels.linear import QuantLinear
from quantkit.runtime.engine import LLM
from quantkit.runtime.sampling import SamplingParams

needs_w4a8 = pytest.mark.skipif(not w4a8.w4a8_available(), reason="the W4A8 kernel needs quantkit's C++ kernels on a CPU with AVX-512 BW and VNNI")


@pytest.fixture(scope="module")
def tiny_int4(tiny_model_dir, tmp_path_factory):
    from quantkit.pipeline import quantize
    from quantkit.recipe import Recipe

    out = tmp_path_factory.mktemp("activations") / "tiny-rtn"
    quantize(str(tiny_model_dir), out, Recipe().with_overrides(method="rtn", group_size=32, compute_dtype="float32"), device="cpu")
    return out


def test_an_unknown_activation_choice_is_refused_naming_the_choices():
    from quantkit.errors import QuantkitError

    with pytest.raises(QuantkitError, match="choose one of bf16, int8"):
        select_backend("cpu", activations="fp8")


def test_int8_activations_on_the_triton_backend_fall_back_to_bf16_and_say_why():
    activations, why = resolve_activations("cuda", "int8")
    assert activations == "bf16" and "CPU path" in why
    with pytest.warns(RuntimeWarning, match="CPU path"):
        assert select_backend("cpu", triton=True, activations="int8").activations == "bf16"


@needs_w4a8
def test_batched_steps_run_w4a8_from_the_threshold_and_fewer_rows_keep_the_int4_kernels(tiny_int4, monkeypatch):
    import quantkit.kernels.linear as linear

    calls: list[int] = []
    real = linear.w4a8_linear
    monkeypatch.setattr(linear, "w4a8_linear", lambda x, *a, **kw: calls.append(x.shape[0]) or real(x, *a, **kw))
    llm = LLM(str(tiny_int4), dtype="float32", num_blocks=32, activations="int8")
    assert llm.engine.runner.backend.activations == "int8"
    assert all(m.w4a8 is not None for m in llm.engine.runner.model.modules() if isinstance(m, QuantLinear))
    prompt = list(range(5, 5 + 3 * W4A8_FROM_ROWS))  # a prefill well past the threshold, then 1-row decode steps
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert calls and min(calls) >= W4A8_FROM_ROWS  # the prefill's linears, never a decode row


@needs_w4a8
def test_int8_activations_change_logits_by_the_activation_rounding_only(tiny_int4):
    """Prompt logprobs of one prefill (every row through W4A8) against the bf16 path's: close, not equal."""
    prompt = torch.randint(5, 500, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=True, ignore_eos=True)
    scores = {}
    for activations in ("bf16", "int8"):
        out = LLM(str(tiny_int4), dtype="float32", num_blocks=32, max_num_batched_tokens=64, activations=activations).generate([prompt], params)[0]
        scores[activations] = torch.tensor(out.prompt_logprobs[1:])
    diff = (scores["int8"] - scores["bf16"]).abs()
    assert 0 < diff.max() < 0.1, diff.max()  # per-row int8 rounding: ~1% of an activation's scale


@needs_w4a8
def test_eval_scores_with_the_activations_serving_runs_and_its_report_says_so(tiny_int4):
    from quantkit.evaluate import QuantkitLM, describe_model

    lm = QuantkitLM(str(tiny_int4), dtype="float32", activations="int8")
    assert lm.engine.runner.backend.activations == "int8"  # the same backend choice as `quantkit serve --activations int8`
    assert describe_model(str(tiny_int4), "float32", "cpu", resolve_activations("cpu", "int8")[0])["activations"] == "int8"
