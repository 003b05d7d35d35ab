"""lm-eval over quantkit's runtime: the same code path for the int4 artifact and the dense baseline.

`QuantkitLM` is an lm-eval model (registered as "quantkit"): log-likelihoods are computed by the
engine's `score` (runtime/scoring.py: batches of whole sequences, a shared context computed once),
generation by `LLM.generate`: public engine calls only, so the engine's block manager owns every
KV block. Tokenization mirrors lm-eval's Hugging Face backend (no special tokens, trailing
context spaces moved to the continuation, BOS/EOS as the context of an empty context, rolling
windows for perplexity), so numbers are comparable with `lm_eval --model hf`.

`evaluate_pair` runs baseline and candidate through the same tasks and builds the report that
`quantkit eval` prints, writes and gates (quantkit/gates.py). The candidate is a quantkit artifact
or a foreign AWQ GEMM checkpoint (AutoAWQ's export, quantkit/autoawq.py): the latter has no
manifest to name its source, gates or weights, so the report pins its weights by sha256 and
nothing is ever written into it (`open_candidate`, `record_in_manifest`).

`quantkit eval` and the Python API (`quantkit.evaluate`, which is this module, callable as
`run_evaluation`) share the steps: `plan_evaluation` checks everything that can be wrong before
any evaluation time is spent, `run_plan` evaluates, writes the report and records it.
"""

from __future__ import annotations

import inspect
import json
import math
import sys
import time
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval loads its own models only into an empty registry: before ours)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from quantkit.eval_tasks import QUANTKIT_TASKS
from quantkit.runtime import scoring
from quantkit.runtime.engine import LLM
from quantkit.runtime.sampling import SamplingParams

MiB = 1024**2


def runtime_device(device: str | None) -> str:
    """The runtime's device for QuantkitLM's `device`: quantkit's names ("auto", "cpu", "cuda") as
    they are; lm-eval's "cuda:N" (its command line passes --device, "cuda:0" when none is given) as
    its HF backend reads it: that GPU where there is one, else "auto", so the default runs anywhere."""
    if device is None:
        return "auto"
    index = device.removeprefix("cuda:")
    if index == device or not index.isdigit():
        return device  # anything else the runtime checks, naming the choices
    if int(index) >= torch.cuda.device_count():
        return "auto"
    if int(index) != 0:
        from quantkit.errors import QuantkitError

        raise QuantkitError(f"device {device}: quantkit runs on the first visible GPU; set CUDA_VISIBLE_DEVICES={index} and pass device cuda")
    return "cuda"


@register_model("quantkit")
class QuantkitLM(TemplateLM):
    """lm_eval --model quantkit --model_args pretrained=out/smollm2-awq,dtype=bfloat16"""

    def __init__(self, pretrained: str, dtype: str = "bfloat16", max_length: int = 2048, batch_tokens: int = 4096,
                 kv_cache_memory: int = 512 * MiB, batch_size: int | str | None = None, device: str = "auto",
                 activations: str = "bf16", **_ignored):
        super().__init__()
        # The dense output head, always: the measured difference is then only the artifact's own
        # quantization, and a score never depends on how many rows its batch had (the int8 head
        # serves calls of up to 64 rows only). batch_tokens bounds a scoring batch (engine.score)
        # as it bounds a step.
        self.llm = LLM(str(pretrained), dtype=dtype, kv_cache_memory=kv_cache_memory, enable_prefix_caching=False,
                       max_num_batched_tokens=batch_tokens, int8_head=False, device=runtime_device(device), activations=activations)
        self.engine = self.llm.engine
        self.tokenizer = self.engine.tokenizer
        self._max_length = min(max_length, self.engine.max_model_len)

    # ---- lm-eval's tokenization hooks
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # ---- scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        scored = []
        for i, (_, context, continuation) in enumerate(requests):
            # As lm-eval's HF backend: keep the last max_length + 1 tokens, the continuation intact
            # (unless it alone is longer than the window).
            continuation = continuation[-self.max_length :]
            whole = (context + continuation)[-(self.max_length + 1):]
            scored.append(scoring.ScoreRequest(whole[: len(whole) - len(continuation)], continuation))
        return [(s.logprob, s.greedy) for s in self.engine.score(scored)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1,
            )):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logprob
        return totals

    # ---- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        prompts, params = [], []
        for context, gen_kwargs in (req.args for req in requests):
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_tokens = int(gen_kwargs.get("max_gen_toks", 256))
            ids = self.tok_encode(context)[-max(1, self.max_length - max_tokens):]
            temperature = float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample") else 0.0
            prompts.append(ids)
            params.append(SamplingParams(temperature=temperature, max_tokens=max_tokens, stop=until, seed=0))
        return [out.text for out in self.llm.generate(prompts, params)]


# ---------------------------------------------------------------------------- baseline vs candidate
def run_tasks(
    model: str, tasks: list[str], limit: int | None, dtype: str, per_example: dict[str, dict[int, float]] | None = None,
    device: str = "auto", activations: str = "bf16",
) -> tuple[dict, float]:
    """lm-eval's per-task metrics for one model on `device` ("cpu", "cuda", "auto") with `activations`
    ("bf16", or "int8": W4A8 as serving runs it), and the wall time.

    With `per_example` (a dict to fill), each accuracy task's primary metric is also recorded per
    document ({task: {doc_id: 0.0 | 1.0}}), so that two models can be compared example by example.
    """
    from lm_eval import simple_evaluate

    from quantkit.eval_tasks import task_manager_for

    start = time.perf_counter()
    lm = QuantkitLM(model, dtype=dtype, device=device, activations=activations)
    out = simple_evaluate(
        model=lm, tasks=tasks, limit=limit, task_manager=task_manager_for(tasks), log_samples=per_example is not None, bootstrap_iters=0
    )
    if per_example is not None:
        for task, samples in out.get("samples", {}).items():
            metric = primary_metric(task, {})[0]
            values = {s["doc_id"]: s[metric] for s in samples if isinstance(s.get(metric), (int, float))}
            if values:
                per_example[task] = values
    return out["results"], time.perf_counter() - start


# Which lm-eval metric stands for each task in reports and gates: (metric, higher is better).
PRIMARY_METRICS = {
    "qk_wikitext": ("word_perplexity", False),
    "qk_hellaswag": ("acc_norm", True),
    "qk_piqa": ("acc_norm", True),
    "qk_winogrande": ("acc", True),
    "qk_lambada": ("acc", True),
}
_FALLBACK_METRICS = (("acc_norm", True), ("acc", True), ("word_perplexity", False), ("perplexity", False))


def primary_metric(task: str, metrics: dict) -> tuple[str, bool, float | None]:
    """The task's headline metric from lm-eval's result dict ("acc_norm,none": 0.43, ...)."""
    candidates = [PRIMARY_METRICS[task]] if task in PRIMARY_METRICS else list(_FALLBACK_METRICS)
    for name, higher in candidates:
        value = metrics.get(f"{name},none")
        if isinstance(value, (int, float)):
            return name, higher, float(value)
    name, higher = candidates[0]
    return name, higher, None


def short_name(task: str) -> str:
    return task.removeprefix("qk_")


def paired_difference(base: dict[int, float], other: dict[int, float]) -> dict:
    """Mean per-example difference (other - base) and its standard error over the shared examples.

    Both models answer the same examples, so the noise of their difference is far smaller than
    either score's own sampling error: it counts only the examples on which they disagree.
    """
    shared = sorted(base.keys() & other.keys())
    n = len(shared)
    diffs = [other[i] - base[i] for i in shared]
    mean = sum(diffs) / n if n else float("nan")
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else float("nan")
    return {"n": n, "diff": mean, "se": math.sqrt(var / n) if n > 1 else float("nan"),
            "flipped_to_right": sum(d > 0 for d in diffs), "flipped_to_wrong": sum(d < 0 for d in diffs)}


def retention_se_pct(pair: dict, base_score: float | None) -> float | None:
    """A task's retention error in percentage points, from its `paired_difference` (None without a score)."""
    return None if not base_score or math.isnan(pair["se"]) else 100 * pair["se"] / base_score


def build_report(baseline: dict, candidate: dict, results: dict[str, dict[str, dict]], limit: int | None, wall: dict[str, float],
                 hashes: dict[str, str], per_example: dict[str, dict[str, dict[int, float]]] | None = None) -> dict:
    """The report `quantkit eval` writes and `quantkit gate` re-checks (see quantkit/gates.py).

    With `per_example` ({"baseline"|"candidate": {task: {doc_id: score}}}), each accuracy task also
    gets `retention_se_pct`, the paired standard error of its retention, so a reader can tell a
    loss from the noise of a `--limit`."""
    import datetime

    import lm_eval

    import quantkit

    rows = {}
    for task in results["baseline"]:
        metric, higher, base = primary_metric(task, results["baseline"][task])
        _, _, cand = primary_metric(task, results["candidate"].get(task, {}))
        rows[short_name(task)] = {"task": task, "metric": metric, "higher_is_better": higher, "baseline": base, "candidate": cand}
        pair = [(per_example or {}).get(role, {}).get(task) for role in ("baseline", "candidate")]
        if higher and pair[0] and pair[1]:
            rows[short_name(task)]["retention_se_pct"] = retention_se_pct(paired_difference(pair[0], pair[1]), base)
    return {
        "quantkit_version": quantkit.__version__,
        "lm_eval_version": lm_eval.__version__,
        "date": datetime.date.today().isoformat(),
        "baseline": baseline,
        "candidate": candidate,
        "limit": limit,
        "wall_s": wall,
        "task_hashes": hashes,
        "results": rows,
        "all_metrics": results,
    }


def evaluate_pair(candidate: str, baseline: str, tasks: list[str], limit: int | None, dtype: str, echo=print,
                  device: str = "auto", activations: str = "bf16") -> dict:
    """Run baseline then candidate through the same tasks, the same runtime, dtype, device and
    activations (which change only int4 linears: the dense baseline computes the same either way)."""
    from quantkit.eval_tasks import task_hashes
    from quantkit.kernels.backend import resolve_activations, resolve_device

    device = resolve_device(runtime_device(device))  # the report says where the scores were computed
    ran = resolve_activations(device, activations)[0]  # and with which activations (int8 can be refused: the runtime warns)
    results, wall, per_example = {}, {}, {}
    for role, model in (("baseline", baseline), ("candidate", candidate)):
        echo(f"evaluating {role}: {model} ({', '.join(short_name(t) for t in tasks)}{'' if limit is None else f', limit {limit}'})")
        per_example[role] = {}
        results[role], wall[role] = run_tasks(model, tasks, limit, dtype, per_example=per_example[role], device=device,
                                               activations=activations)
        echo(f"  {wall[role]:.0f} s")
    return build_report(describe_model(baseline, dtype, device, ran), describe_model(candidate, dtype, device, ran), results, limit, wall, task_hashes(tasks), per_example)


def describe_model(model: str | Path, dtype: str, device: str = "cpu", activations: str = "bf16") -> dict:
    """A model's entry in the report. A foreign AWQ checkpoint has no manifest pinning its files,
    so the report records its weights' sha256 and its AWQ settings instead."""
    from quantkit.autoawq import is_autoawq_checkpoint, read_awq_settings
    from quantkit.sources import weights_sha256

    record = {"model": str(model), "dtype": dtype, "device": device, "activations": activations}
    if is_autoawq_checkpoint(model):
        record.update(format="autoawq", weights_sha256=weights_sha256(Path(model)), quantization=read_awq_settings(model).quantization_config())
    return record


@dataclass(frozen=True)
class Candidate:
    """What `quantkit eval` evaluates: a verified quantkit artifact or a validated AutoAWQ checkpoint."""

    path: Path
    manifest: dict | None  # None: a foreign checkpoint, which carries no manifest and is never written to

    @property
    def foreign(self) -> bool:
        return self.manifest is None

    @property
    def source_model(self) -> str | None:
        """The dense model it was quantized from, if recorded (the default baseline)."""
        return (self.manifest or {}).get("source", {}).get("spec")

    @property
    def gates(self) -> dict:
        """The gates of the recipe it was quantized with, if recorded."""
        from quantkit.gates import recorded_gates

        return recorded_gates(self.manifest)

    @property
    def report_path(self) -> Path:
        """Where the report goes by default: inside a quantkit artifact, else the working directory
        (a foreign checkpoint stays byte-identical to what its publisher shipped)."""
        return self.path / "eval-report.json" if self.manifest is not None else Path.cwd() / f"eval-report-{self.path.name}.json"


def open_candidate(path: str | Path) -> Candidate:
    """Check the candidate before any evaluation time is spent: hashes of an artifact, settings
    and tensor layout of an AutoAWQ checkpoint (both refuse with the reason)."""
    from quantkit.artifact import MANIFEST_NAME, load_artifact
    from quantkit.autoawq import check_autoawq_checkpoint, declares_quantization
    from quantkit.errors import QuantkitError

    path = Path(path)
    if (path / MANIFEST_NAME).is_file():
        return Candidate(path, load_artifact(path).manifest)  # verifies every file's sha256
    if declares_quantization(path):
        check_autoawq_checkpoint(path)
        return Candidate(path, None)
    raise QuantkitError(
        f"{path} is neither a quantkit artifact (no {MANIFEST_NAME}) nor an AWQ checkpoint (no AWQ quantization_config "
        "in config.json, no quant_config.json); pass the output of `quantkit quantize` or an AutoAWQ GEMM export."
    )


def record_in_manifest(artifact_path, report: dict, report_path) -> bool:
    """Append the evaluation's summary to the artifact's quantkit.json (temp file + rename); the
    artifact's model card is re-rendered with it (quantkit/artifact.py). `report_path` is where the
    report was written, or None when it was not.

    Returns False, writing nothing, for a foreign AWQ checkpoint: it has no manifest of ours.
    """
    from quantkit.artifact import append_to_manifest
    from quantkit.autoawq import declares_quantization

    if declares_quantization(artifact_path):  # no quantkit.json: someone else's export, left untouched
        return False
    summary = {k: report[k] for k in ("date", "lm_eval_version", "baseline", "limit", "task_hashes", "results")}
    append_to_manifest(Path(artifact_path), "evaluations", {**summary, "report": None if report_path is None else str(report_path)})
    return True


# ---------------------------------------------------------------------------- the steps `quantkit eval` and the API share
DEFAULT_TASKS = tuple(QUANTKIT_TASKS)  # all five offline tasks, by their short names


@dataclass(frozen=True)
class EvaluationPlan:
    """An evaluation checked and ready to run: nothing in it can fail after the models have run."""

    candidate: Candidate
    baseline: str
    tasks: list[str]  # lm-eval task names (resolved: qk_piqa for piqa)
    gates: dict[str, float]  # the thresholds that apply ({} when none do)
    output: Path | None  # the report's JSON (a .md is written beside it); None: not written


def plan_evaluation(
    artifact: str | Path,
    tasks: str | Iterable[str] = DEFAULT_TASKS,
    baseline: str | Path | None = None,
    recipe: Any = None,
    gate: bool = False,
    output: str | Path | None = None,
    default_output: bool = False,
) -> EvaluationPlan:
    """Check an evaluation before any time is spent on it: the candidate's hashes (or AutoAWQ
    layout), that a baseline is known (default: the source the manifest names), the task names and
    their vendored data, the gates (from `recipe`, a path or a Recipe, else the artifact's recorded
    recipe; `gate` requires some) and that the report paths are not directories. `tasks` is a
    comma-separated string or a list. `default_output`: with no `output`, write the report where
    `quantkit eval` does (inside a quantkit artifact, else the working directory)."""
    from quantkit.errors import QuantkitError
    from quantkit.eval_tasks import check_task_data, resolve_tasks
    from quantkit.gates import recipe_gates, validate_gates

    candidate = open_candidate(artifact)  # verifies hashes / AWQ layout before spending time on it
    baseline = baseline or candidate.source_model
    if not baseline:
        why = "an AutoAWQ checkpoint has no quantkit manifest" if candidate.foreign else "its manifest names none"
        raise QuantkitError(f"{artifact} records no source model ({why}); pass --baseline MODEL (baseline= in Python).")
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    task_names = resolve_tasks([t.strip() for t in names if t.strip()])
    check_task_data()
    gates = recipe_gates(recipe) if recipe is not None else candidate.gates
    if gate and not gates:
        raise QuantkitError("--gate needs thresholds: pass --recipe FILE with a 'gates:' section (gate=FILE in Python).")
    gates = validate_gates(gates)  # an unknown gate name fails now, not after the evaluation
    output = Path(output) if output is not None else candidate.report_path if default_output else None
    for path in (output, output.with_suffix(".md")) if output is not None else ():  # checked now, not after the evaluation
        if path.is_dir():
            raise QuantkitError(f"-o {output}: {path} is a directory; give a file path such as {output / 'report.json'}.")
    return EvaluationPlan(candidate, str(baseline), task_names, gates, output)


def write_report(report: dict, output: Path) -> tuple[Path, Path]:
    """The report as JSON at `output` and as a Markdown table beside it, each replaced in one step."""
    from quantkit.gates import format_markdown

    output.parent.mkdir(parents=True, exist_ok=True)
    markdown = output.with_suffix(".md")
    for path, text in ((output, json.dumps(report, indent=2)), (markdown, format_markdown(report))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return output, markdown


def run_plan(plan: EvaluationPlan, limit: int | None = None, dtype: str = "bfloat16", echo: Callable[[str], Any] = print,
             device: str = "auto", activations: str = "bf16") -> dict:
    """Evaluate as planned on `device` ("cpu", "cuda", "auto": cuda where torch sees a GPU), print
    the table, write the report (if the plan has a path) and record it in the artifact's manifest
    (a foreign checkpoint is left untouched); returns the report."""
    from quantkit.gates import format_table

    report = evaluate_pair(str(plan.candidate.path), plan.baseline, plan.tasks, limit, dtype, echo=echo, device=device,
                           activations=activations)
    echo(format_table(report))
    if plan.output is not None:
        write_report(report, plan.output)
    if not record_in_manifest(plan.candidate.path, report, plan.output):
        echo(f"{plan.candidate.path} is a foreign checkpoint: left untouched")
    if plan.output is not None:
        echo(f"wrote {plan.output} and {plan.output.with_suffix('.md')}")
    return report


def run_evaluation(
    artifact: str | Path,
    tasks: str | Iterable[str] = DEFAULT_TASKS,
    *,
    baseline: str | Path | None = None,
    limit: int | None = None,
    dtype: str = "bfloat16",
    device: str = "auto",
    activations: str = "bf16",
    gate: Any = False,
    output: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate `artifact` against its FP16 baseline and return the report; this is `quantkit.evaluate`.

    As `quantkit eval`: baseline and artifact run through the same lm-eval tasks, runtime and dtype
    (`baseline` defaults to the source model the manifest names) and the report is recorded in the
    artifact's manifest and model card. `limit`: the first N examples of each task. `device`: where
    both run ("cpu", "cuda", or "auto": cuda where torch sees a GPU). `activations`: "int8" scores
    the W4A8 path serving runs with --activations int8. `output`: also
    write the report there as JSON and Markdown (nothing is written by default). `gate`: True checks
    the gates of the artifact's recorded recipe, a recipe path or Recipe checks that one's; a breach
    raises gates.GatesBreached (holding the verdict and the report, already recorded), and gates the
    report has no task for are listed as not judged. `progress`: print the steps and the table.
    """
    from quantkit.gates import GatesBreached, format_verdict, judge_gates

    gating = gate is not None and gate is not False
    recipe = None if isinstance(gate, bool) or gate is None else gate
    echo = print if progress else (lambda _text: None)
    plan = plan_evaluation(artifact, tasks, baseline, recipe, gating, output)
    report = run_plan(plan, limit, dtype, echo, device=device, activations=activations)
    if gating:
        verdict = judge_gates(report, plan.gates)
        if not verdict.passed:
            raise GatesBreached(verdict, report)
        echo(format_verdict(verdict))
    return report


class _CallableModule(types.ModuleType):
    """`quantkit.evaluate` names this module (the import system sets a package's attribute to its
    submodule), so the module itself is the API's function: quantkit.evaluate(...) = run_evaluation(...)."""

    def __call__(self, *args, **kwargs) -> dict:
        return run_evaluation(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
__signature__ = inspect.signature(run_evaluation)  # what help() and inspect show for quantkit.evaluate
