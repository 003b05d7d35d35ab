"""lm-eval's `local-completions` model (what a vLLM user points at a server) scores through the
server exactly as `quantkit eval` scores through the engine directly: the same accuracies and, per
request, the same log-likelihood and greedy flag. Its payload is echo=True, logprobs=1,
max_tokens=1, temperature 0, the prompts as token ids (several per request with batch_size > 1);
the log-likelihood is the sum of the prompt's echoed token_logprobs over the continuation, and
the greedy flag compares each with the best of its top_logprobs."""

from __future__ import annotations

import math

import pytest
from conftest import serving

from quantkit.eval_tasks import resolve_tasks, task_manager_for
from quantkit.evaluate import QuantkitLM
from quantkit.runtime.engine import EngineConfig, LLMEngine
from quantkit.runtime.server import create_app


TASKS = ["lambada", "piqa"]  # lambada's accuracy is the greedy flag: it needs top_logprobs right
LIMIT = 12


def evaluate(model, model_args=None) -> dict:
    from lm_eval import simple_evaluate

    tasks = resolve_tasks(TASKS)
    return simple_evaluate(model=model, model_args=model_args, tasks=tasks, limit=LIMIT, task_manager=task_manager_for(tasks),
                           log_samples=True, bootstrap_iters=0)


def responses(out: dict) -> dict[tuple[str, int], list[tuple[float, bool]]]:
    """(task, doc_id) -> the (log-likelihood, greedy) of each of its requests."""
    return {(task, s["doc_id"]): [tuple(r[0]) for r in s["resps"]] for task, samples in out["samples"].items() for s in samples}


def test_lm_eval_local_completions_through_the_server_scores_as_quantkit_eval(smollm2_dir):
    direct = evaluate(QuantkitLM(str(smollm2_dir), dtype="float32", kv_cache_memory=64 * 1024**2))
    engine = LLMEngine(EngineConfig(model=str(smollm2_dir), dtype="float32", kv_cache_memory=64 * 1024**2))
    with serving(create_app(engine, model_name="smollm2")) as url:
        served = evaluate("local-completions", {"base_url": url + "/v1/completions", "model": "smollm2", "tokenizer_backend": "huggingface",
                                                "tokenizer": str(smollm2_dir), "batch_size": 4, "max_retries": 1})
    for task in resolve_tasks(TASKS):
        assert served["results"][task]["acc,none"] == direct["results"][task]["acc,none"], task
    ours, theirs = responses(direct), responses(served)
    greedy = [g for resps in ours.values() for _, g in resps]
    assert any(greedy) and not all(greedy)  # both answers occur: the flag is really compared
    assert ours.keys() == theirs.keys() and len(ours) == LIMIT * len(TASKS)
    for key, expected in ours.items():
        got = theirs[key]
        assert [g for _, g in got] == [g for _, g in expected], key
        assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in expected], abs=1e-4), key
    total = sum(ll for resps in ours.values() for ll, _ in resps)
    assert math.isclose(sum(ll for resps in theirs.values() for ll, _ in resps), total, rel_tol=1e-6)
