"""The lm-eval model class computes exactly the model's log-likelihoods, and `quantkit eval` gates offline."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from quantkit.evaluate import QuantkitLM, primary_metric
from quantkit.runtime import scoring


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return QuantkitLM(str(tiny_model_dir), dtype="float32", max_length=64, batch_tokens=256)


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def direct_logprob(hf, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = hf(ids).logits[0].double().log_softmax(-1)
    rows = range(len(context) - 1, len(context) + len(continuation) - 1)
    total = sum(float(logp[r, t]) for r, t in zip(rows, continuation))
    greedy = all(int(logp[r].argmax()) == t for r, t in zip(rows, continuation))
    return total, greedy


def requests(*args):
    return [SimpleNamespace(args=a) for a in args]


def test_loglikelihoods_equal_a_direct_computation_with_the_same_weights(lm, hf):
    pairs = [("The cat sat on the", " mat"), ("Once upon a time", " there was a king who ruled"), ("A", " b c d"), ("", "Hello world")]
    got = lm.loglikelihood(requests(*pairs))
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        if context:
            ctx, cont = lm._encode_pair(context, continuation)
        else:
            ctx, cont = [lm.prefix_token_id], lm.tok_encode(continuation)
        expected, expected_greedy = direct_logprob(hf, ctx, cont)
        assert logprob == pytest.approx(expected, rel=1e-5, abs=1e-4)
        assert greedy == expected_greedy


def test_continuations_of_one_context_share_its_blocks_and_score_as_if_alone(lm, hf):
    """Multiple-choice requests compute their shared context once; the results must not change."""
    block = lm.engine.config.block_size
    vocab = lm.engine.runner.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    reqs = []
    for context_len in (1, block - 1, block, block + 1, 2 * block + 5):  # around block edges
        context = torch.randint(0, vocab, (context_len,), generator=gen).tolist()
        for cont_len in (1, 3, 7):
            reqs.append((None, context, torch.randint(0, vocab, (cont_len,), generator=gen).tolist()))
    planned = [scoring.ScoreRequest(c, t) for _, c, t in reqs]
    groups = [[planned[i] for i in g] for g in scoring.context_groups(planned, block, lm.engine.score_budget)]
    assert [scoring.shared_len(g, block) for g in groups] == [0, 0, 0, block, 2 * block]  # the context's whole blocks, less its last token
    got = lm._loglikelihood_tokens(reqs)
    for (_, context, continuation), (logprob, greedy) in zip(reqs, got):
        expected, expected_greedy = direct_logprob(hf, context, continuation)
        assert logprob == pytest.approx(expected, rel=1e-5, abs=1e-4)
        assert greedy == expected_greedy


def test_a_context_longer_than_max_length_keeps_its_last_tokens(lm, hf):
    context = " ".join(f"word{i}" for i in range(80))
    (logprob, _), = lm.loglikelihood(requests((context, " end")))
    ctx, cont = lm._encode_pair(context, " end")
    whole = (ctx + cont)[-(lm.max_length + 1):]
    expected, _ = direct_logprob(hf, whole[: len(whole) - len(cont)], cont)
    assert logprob == pytest.approx(expected, rel=1e-5, abs=1e-4)


def test_rolling_loglikelihood_sums_disjoint_windows_over_the_whole_text(lm, hf):
    text = " ".join(f"token{i}" for i in range(60))  # longer than the 64-token window
    (total,) = lm.loglikelihood_rolling(requests((text,)))
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    windows = map(make_disjoint_window, get_rolling_token_windows(lm.tok_encode(text), lm.prefix_token_id, lm.max_length, 1))
    expected = sum(direct_logprob(hf, ctx, cont)[0] for ctx, cont in windows)
    assert len(lm.tok_encode(text)) > lm.max_length
    assert total == pytest.approx(expected, rel=1e-5)


def test_generate_until_stops_at_the_first_stop_string(lm):
    free = lm.generate_until(requests(("The story", {"until": [], "max_gen_toks": 12})))[0]
    stop = free[len(free) // 2 :][:2]
    assert stop.strip(), f"the fixed tiny model's free text {free!r} gives no usable stop string"
    cut = lm.generate_until(requests(("The story", {"until": [stop], "max_gen_toks": 12})))[0]
    assert stop not in cut and free.startswith(cut)


def test_the_paired_standard_error_counts_only_the_examples_the_models_disagree_on():
    from quantkit.evaluate import paired_difference, retention_se_pct

    base = {i: 1.0 if i < 50 else 0.0 for i in range(100)}  # 50 of 100 right
    same = paired_difference(base, dict(base))
    assert same["diff"] == 0.0 and same["se"] == 0.0 and same["n"] == 100
    other = {**base, 0: 0.0, 1: 0.0, 60: 1.0}  # loses two, gains one
    pair = paired_difference(base, other)
    assert (pair["flipped_to_wrong"], pair["flipped_to_right"]) == (2, 1)
    diffs = [-1.0, -1.0, 1.0] + [0.0] * 97
    mean = sum(diffs) / 100
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 99 / 100)
    assert pair["diff"] == pytest.approx(-0.01) and pair["se"] == pytest.approx(se)
    assert retention_se_pct(pair, 0.5) == pytest.approx(100 * se / 0.5)
    assert retention_se_pct(pair, 0.0) is None


def test_primary_metrics_pick_the_standard_headline_numbers():
    assert primary_metric("qk_hellaswag", {"acc,none": 0.3, "acc_norm,none": 0.4}) == ("acc_norm", True, 0.4)
    assert primary_metric("qk_wikitext", {"word_perplexity,none": 21.5}) == ("word_perplexity", False, 21.5)
    assert primary_metric("arc_easy", {"acc,none": 0.5}) == ("acc", True, 0.5)
    assert primary_metric("qk_piqa", {}) == ("acc_norm", True, None)


# ---------------------------------------------------------------------------- quantkit eval / gate, end to end offline


@pytest.fixture(scope="module")
def tiny_artifact(tiny_model_dir, tmp_path_factory):
    from quantkit.pipeline import quantize
    from quantkit.recipe import Recipe

    out = tmp_path_factory.mktemp("eval") / "tiny-rtn"
    quantize(str(tiny_model_dir), out, Recipe().with_overrides(method="rtn", group_size=32))
    return out


def run_cli(*args):
    from click.testing import CliRunner

    from quantkit.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes else "")


def write_recipe(path, gates: dict) -> str:
    import yaml

    path.write_text(yaml.safe_dump({"name": "t", "gates": gates}))
    return str(path)


def test_eval_runs_baseline_and_artifact_offline_writes_reports_and_records_them(tiny_model_dir, tiny_artifact, tmp_path):
    report = tmp_path / "report.json"
    recipe = write_recipe(tmp_path / "ok.yaml", {"min_task_retention_pct": 1.0})
    code, out = run_cli("eval", tiny_artifact, "--baseline", tiny_model_dir, "--tasks", "piqa,winogrande,wikitext",
                        "--limit", "4", "--dtype", "float32", "-o", report, "--recipe", recipe, "--gate")
    assert code == 0, out
    data = json.loads(report.read_text())
    assert set(data["results"]) == {"piqa", "winogrande", "wikitext"}
    for row in data["results"].values():
        assert isinstance(row["baseline"], float) and isinstance(row["candidate"], float)
    # Both models answered the same examples: each accuracy retention carries its paired error.
    assert all("retention_se_pct" in data["results"][task] for task in ("piqa", "winogrande"))
    assert "retention_se_pct" not in data["results"]["wikitext"]
    assert report.with_suffix(".md").is_file() and "piqa" in report.with_suffix(".md").read_text()
    manifest = json.loads((tiny_artifact / "quantkit.json").read_text())
    assert manifest["evaluations"][-1]["results"] == data["results"]
    assert "all gates passed" in out
    # The manifest changed but the artifact still verifies (quantkit.json is not a hashed file).
    from quantkit.artifact import load_artifact

    load_artifact(tiny_artifact)
    # `quantkit gate` re-checks the saved report: an impossible threshold is a breach, exit 1.
    strict = write_recipe(tmp_path / "strict.yaml", {"min_task_retention_pct": 1000.0})
    code, out = run_cli("gate", report, "--recipe", strict)
    assert code == 1 and "FAIL min_task_retention_pct" in out


def test_eval_bad_input_is_a_clear_error(tiny_model_dir, tiny_artifact, tmp_path):
    code, out = run_cli("eval", tiny_artifact, "--baseline", tiny_model_dir, "--tasks", "nosuchtask")
    assert code == 2 and "nosuchtask" in out and "hellaswag" in out
    code, out = run_cli("eval", tiny_artifact, "--baseline", tiny_model_dir, "--recipe", write_recipe(tmp_path / "bad.yaml", {"min_accuracy": 1}))
    assert code == 2 and "min_accuracy" in out
    damaged = tmp_path / "damaged"
    import shutil

    shutil.copytree(tiny_artifact, damaged)
    weights = sorted(damaged.glob("*.safetensors"))[-1]  # a decoder block's shard
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    code, out = run_cli("eval", damaged, "--baseline", tiny_model_dir)
    assert code == 2 and "sha256" in out
    (tmp_path / "reports").mkdir()  # -o naming a directory: refused before the evaluation runs
    code, out = run_cli("eval", tiny_artifact, "--baseline", tiny_model_dir, "-o", tmp_path / "reports")
    assert code == 2 and "is a directory" in out and "Traceback" not in out


def test_registering_quantkit_keeps_lm_evals_own_models():
    """lm-eval fills its registry lazily only when it is empty; ours must not hide 'hf'."""
    from lm_eval.api.registry import get_model

    assert get_model("quantkit") is QuantkitLM
    assert get_model("hf").__name__ == "HFLM"


def test_evaluation_scores_with_the_dense_head_even_where_serving_would_take_the_int8_one(smollm2_dir):
    # The default model's head gets an int8 copy by default when served; scores must not depend
    # on it (nor on how many rows a scoring batch had), so the evaluation keeps the dense head.
    assert QuantkitLM(str(smollm2_dir), kv_cache_memory=32 * 1024**2).engine.runner.model.lm_head.int8 is None


def test_the_device_and_activations_reach_the_engine_through_every_step_of_an_evaluation(tiny_model_dir, tiny_artifact, monkeypatch):
    import quantkit.evaluate as evaluate

    assert QuantkitLM(str(tiny_model_dir), dtype="float32", device="cpu").engine.config.device == "cpu"

    class Reached(Exception):
        pass

    def recording_lm(model, **options):  # stands in for the model: run_evaluation -> run_plan -> evaluate_pair -> run_tasks
        raise Reached(model, options)

    monkeypatch.setattr(evaluate, "QuantkitLM", recording_lm)
    with pytest.raises(Reached) as reached:
        evaluate.run_evaluation(tiny_artifact, "piqa", baseline=tiny_model_dir, dtype="float32", device="cpu", activations="int8",
                                progress=False)
    # the baseline runs first, with the same activations (they change only int4 linears: none in a dense model)
    assert reached.value.args == (str(tiny_model_dir), {"dtype": "float32", "device": "cpu", "activations": "int8"})


def test_lm_evals_device_names_map_onto_the_runtimes_as_its_hf_backend_reads_them(monkeypatch):
    from quantkit.errors import QuantkitError
    from quantkit.evaluate import runtime_device

    assert [runtime_device(d) for d in ("auto", "cpu", "cuda", None)] == ["auto", "cpu", "cuda", "auto"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert runtime_device("cuda:0") == "auto"  # lm-eval's default --device on a machine without a GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert runtime_device("cuda:0") == "cuda"
    with pytest.raises(QuantkitError, match="CUDA_VISIBLE_DEVICES=1"):
        runtime_device("cuda:1")
    assert runtime_device("mps") == "mps"  # left to the runtime, which refuses it naming the choices


def test_lm_evals_command_line_default_device_still_runs_on_a_machine_without_a_gpu(tiny_model_dir):
    # lm-eval's CLI hands every model device="cuda:0" unless told otherwise (create_from_arg_string).
    lm = QuantkitLM.create_from_arg_string(f"pretrained={tiny_model_dir},dtype=float32", {"device": "cuda:0", "batch_size": None})
    assert lm.engine.runner.backend.device == ("cuda" if torch.cuda.is_available() else "cpu")
