"""Accuracy gates: compare an evaluation report's candidate (int4) against its baseline.

A report (written by `quantkit eval`) maps each task to its metric, direction and two values:

    {"results": {"wikitext": {"metric": "word_perplexity", "higher_is_better": false,
                              "baseline": 20.1, "candidate": 22.9}, ...}}

Everything here is pure: the CLI loads the report, calls `judge_gates` and decides the exit code
(`gates_for_report` finds the thresholds; it is the one function here that reads files).

What a gate cannot check is never silently skipped (in CI a skipped gate reads like a passing one):
- a task the gate applies to whose value is missing, or whose baseline is <= 0, is a breach: the
  task ran and gave no usable number;
- a gate none of whose tasks are in the report (a perplexity gate over a run of piqa alone) is
  *not judged*: it is listed by name with the reason, and does not fail the verdict, so a quick run
  on a task subset judges what it can and says what it could not;
- a verdict that judged no gate at all is an error, not a pass.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import QuantkitError

KNOWN_GATES: dict[str, str] = {
    "max_perplexity_increase_pct": "every lower-is-better task: (candidate / baseline - 1) * 100 <= threshold",
    "min_task_retention_pct": "every higher-is-better task: candidate / baseline * 100 >= threshold",
    "min_mean_retention_pct": "mean retention over the higher-is-better tasks >= threshold",
    "max_task_drop_points": "every higher-is-better task: (baseline - candidate) * 100 <= threshold",
}

# A value exactly at its threshold passes; the slack keeps float noise from failing it
# ((0.68 - 0.655) * 100 is 2.500000000000002).
_SLACK = 1e-9


@dataclass(frozen=True)
class Breach:
    gate: str
    task: str | None  # a task name, "mean" for the mean gate, None when the gate applies to no task
    value: float | None  # the measured quantity (%, points); None when it cannot be computed
    threshold: float
    message: str  # reads after "FAIL <gate>: "


@dataclass(frozen=True)
class NotJudged:
    """A gate the report has no task for: listed, never counted as a pass or a breach."""

    gate: str
    threshold: float
    reason: str  # reads after "not judged <gate>: "


@dataclass(frozen=True)
class Verdict:
    """A report against a set of gates: every gate is either judged (passing or with breaches) or not judged."""

    judged: tuple[str, ...]
    breaches: tuple[Breach, ...]
    not_judged: tuple[NotJudged, ...]

    @property
    def passed(self) -> bool:
        """No breach among the judged gates (the not-judged ones are listed by `format_verdict`)."""
        return not self.breaches


class GatesBreached(QuantkitError):
    """Raised by `quantkit.evaluate(..., gate=...)` when a gate is breached; `verdict` holds them all,
    `report` the evaluation (already written and recorded, as `quantkit eval --gate` leaves it)."""

    def __init__(self, verdict: Verdict, report: Mapping[str, Any]):
        super().__init__(format_verdict(verdict))
        self.verdict = verdict
        self.report = report


# ---------------------------------------------------------------- validation


def validate_gates(gates: Mapping[str, Any]) -> dict[str, float]:
    """The gates as floats; a typo or a non-number raises rather than silently disabling a gate."""
    unknown = sorted(set(gates) - set(KNOWN_GATES))
    if unknown:
        raise QuantkitError(f"unknown gate(s) {unknown}; known gates: {sorted(KNOWN_GATES)}.")
    out: dict[str, float] = {}
    for name, threshold in gates.items():
        # bool is an int subclass, and NaN compares False both ways (so it would always pass).
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise QuantkitError(f"gate '{name}' needs a finite number as its threshold, got {threshold!r}.")
        out[name] = float(threshold)
    return out


def _results(report: Any) -> dict[str, dict[str, Any]]:
    """The report's task entries, checked for the fields every gate depends on."""
    if not isinstance(report, Mapping) or not isinstance(report.get("results"), Mapping):
        raise QuantkitError("the evaluation report has no 'results' mapping; produce it with `quantkit eval`.")
    results = report["results"]
    for task, entry in results.items():
        if not isinstance(entry, Mapping):
            raise QuantkitError(f"report task '{task}' must be a mapping, got {type(entry).__name__}.")
        # Without a direction a task would match no gate and be skipped silently.
        if not isinstance(entry.get("higher_is_better"), bool):
            raise QuantkitError(f"report task '{task}' needs 'higher_is_better': true or false.")
    return dict(results)


def _value(x: Any) -> float | None:
    """A usable number, or None (null, non-numeric or NaN all mean the metric is missing)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


# ---------------------------------------------------------------- derived figures


def derived(report: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per task: the entry plus delta, retention_pct and drop_points (higher-is-better tasks)
    or increase_pct (lower-is-better tasks). Every key is present; None when not applicable or
    not computable (missing value, baseline <= 0)."""
    out: dict[str, dict[str, Any]] = {}
    for task, entry in _results(report).items():
        base, cand = _value(entry.get("baseline")), _value(entry.get("candidate"))
        both = base is not None and cand is not None
        ratio = cand / base if both and base > 0 else None  # a ratio to a zero/negative baseline means nothing
        hib = entry["higher_is_better"]
        out[task] = {
            **entry,
            "delta": cand - base if both else None,
            "retention_pct": ratio * 100 if hib and ratio is not None else None,
            "drop_points": (base - cand) * 100 if hib and both else None,
            "increase_pct": (ratio - 1) * 100 if not hib and ratio is not None else None,
        }
    return out


def mean_retention(report: Mapping[str, Any]) -> float | None:
    """Mean retention % over the higher-is-better tasks; None if any of them (or all) lack one,
    so a failed task cannot leave the mean looking healthy."""
    rets = [d["retention_pct"] for d in derived(report).values() if d["higher_is_better"]]
    if not rets or any(r is None for r in rets):
        return None
    return sum(rets) / len(rets)


def error_of_mean(errors: list[float]) -> float:
    """Standard error of the mean of independent estimates with these standard errors."""
    return math.sqrt(sum(e * e for e in errors)) / len(errors)


def mean_retention_se(report: Mapping[str, Any]) -> float | None:
    """Paired standard error of the mean retention (points), when every accuracy task has one."""
    ses = [_value(d.get("retention_se_pct")) for d in derived(report).values() if d["higher_is_better"]]
    if not ses or any(se is None for se in ses):
        return None
    return error_of_mean(ses)


def _with_se(percent: float, se: Any) -> str:
    se = _value(se)
    return f"{percent:.1f}%" + ("" if se is None else f" ± {se:.1f}")


# ---------------------------------------------------------------- gates


def _missing_reason(d: Mapping[str, Any]) -> str:
    which = [k for k in ("baseline", "candidate") if _value(d.get(k)) is None]
    return f"{d.get('metric', 'metric')} is missing (no {' or '.join(which)} value)"


def _task_breach(gate: str, task: str, d: Mapping[str, Any], key: str, threshold: float) -> Breach | None:
    """One task against one per-task gate; None when it passes."""
    metric = d.get("metric", "metric")
    value = d[key]
    if _value(d.get("baseline")) is None or _value(d.get("candidate")) is None:
        return Breach(gate, task, None, threshold, f"{task} {_missing_reason(d)}: the gate cannot be checked")
    if value is None:  # both values present, so the baseline is <= 0
        what = "retention" if key == "retention_pct" else "increase"
        return Breach(gate, task, None, threshold,
                      f"{task}: cannot compute {what}: baseline {metric} is {_num(d['baseline'])}")
    if key == "retention_pct" and value < threshold - _SLACK:
        v, t = _pcts(value, threshold)
        return Breach(gate, task, value, threshold, f"{task} retains {v}% < {t}%")
    if key == "increase_pct" and value > threshold + _SLACK:
        v, t = _pcts(value, threshold)
        return Breach(gate, task, value, threshold,
                      f"{task} {metric} rises {v}% > {t}% ({_num(d['baseline'])} -> {_num(d['candidate'])})")
    if key == "drop_points" and value > threshold + _SLACK:
        v, t = _pcts(value, threshold)
        return Breach(gate, task, value, threshold,
                      f"{task} drops {v} points > {t} ({_num(d['baseline'])} -> {_num(d['candidate'])})")
    return None


_PER_TASK = {  # gate -> (derived key, applies to higher-is-better tasks)
    "max_perplexity_increase_pct": ("increase_pct", False),
    "min_task_retention_pct": ("retention_pct", True),
    "max_task_drop_points": ("drop_points", True),
}
# What the tasks of each direction are called, and the offline tasks of that kind (quantkit/eval_tasks.py).
_KINDS = {
    False: ("lower-is-better (perplexity)", "wikitext"),
    True: ("higher-is-better (accuracy)", "hellaswag, piqa, winogrande or lambada"),
}


def _not_judged(gate: str, threshold: float, hib: bool, rows: Mapping[str, Any]) -> NotJudged:
    kind, examples = _KINDS[hib]
    has = f"it has {', '.join(rows)}" if rows else "it has no task"
    return NotJudged(gate, threshold, f"no {kind} task in the report ({has}); evaluate {examples} to judge it")


def judge_gates(report: Mapping[str, Any], gates: Mapping[str, Any]) -> Verdict:
    """Judge `report` against `gates`: breaches in gate order then task order, and the gates the
    report has no task for.

    A gate with none of its tasks in the report is not judged: listed (`Verdict.not_judged`, shown
    by `format_verdict`) but not a breach, so that a quick run on a task subset judges the gates it
    can. A task the gate applies to whose value is missing or unusable is a breach: that task was
    evaluated and failed to give a number. No gates at all, or gates none of which could be judged,
    is an error, not a pass: a CI step would otherwise report success while checking nothing.
    """
    thresholds = validate_gates(gates)
    if not thresholds:
        raise QuantkitError(
            "no gates to check: the recipe's 'gates:' section is missing or empty. Add thresholds under "
            f"'gates:' (e.g. min_mean_retention_pct: 98.0); known gates: {sorted(KNOWN_GATES)}."
        )
    rows = derived(report)
    judged: list[str] = []
    breaches: list[Breach] = []
    not_judged: list[NotJudged] = []
    for gate, threshold in thresholds.items():
        hib = True if gate == "min_mean_retention_pct" else _PER_TASK[gate][1]
        tasks = {t: d for t, d in rows.items() if d["higher_is_better"] is hib}
        if not tasks:
            not_judged.append(_not_judged(gate, threshold, hib, rows))
            continue
        judged.append(gate)
        if gate == "min_mean_retention_pct":
            breaches += _mean_breach(tasks, threshold)
            continue
        for task, d in tasks.items():
            b = _task_breach(gate, task, d, _PER_TASK[gate][0], threshold)
            if b is not None:
                breaches.append(b)
    if not judged:
        raise QuantkitError(
            "no gate could be judged: " + "; ".join(f"{n.gate}: {n.reason}" for n in not_judged)
            + ". Evaluate at least one task a gate applies to."
        )
    return Verdict(tuple(judged), tuple(breaches), tuple(not_judged))


def check_gates(report: Mapping[str, Any], gates: Mapping[str, Any]) -> list[Breach]:
    """The breaches of `judge_gates(report, gates)` ([] when every judged gate passes); the gates it
    could not judge are left out, so show them with `format_verdict(judge_gates(...))`."""
    return list(judge_gates(report, gates).breaches)


def _mean_breach(accuracy_rows: Mapping[str, Mapping[str, Any]], threshold: float) -> list[Breach]:
    gate = "min_mean_retention_pct"
    rets = {t: d["retention_pct"] for t, d in accuracy_rows.items()}
    lacking = [t for t, r in rets.items() if r is None]
    if lacking:
        return [Breach(gate, "mean", None, threshold,
                       f"cannot compute mean retention: retention missing for {', '.join(lacking)}")]
    mean = sum(rets.values()) / len(rets)
    if mean < threshold - _SLACK:
        v, t = _pcts(mean, threshold)
        return [Breach(gate, "mean", mean, threshold, f"mean retention over {len(rets)} tasks is {v}% < {t}%")]
    return []


# ---------------------------------------------------------------- formatting


def _num(x: Any) -> str:
    """A report value compactly (0.431, 20.1); 'n/a' when missing."""
    v = _value(x)
    if v is None:
        return "n/a"
    s = f"{v:.4f}".rstrip("0").rstrip(".")
    return "0" if s == "-0" else s


def _pcts(value: float, threshold: float) -> tuple[str, str]:
    """Value and threshold at 1 decimal, more if needed so a breach never reads '95.0% < 95.0%'."""
    for digits in (1, 2, 3, 4):
        v, t = f"{value:.{digits}f}", f"{threshold:.{digits}f}"
        if v != t:
            return v, t
    return f"{value:.6g}", f"{threshold:.6g}"


# The last column is retention for higher-is-better tasks and the signed increase for
# lower-is-better ones (a perplexity "retention" of 114% would read as an improvement). A retention
# carries "± SE" (its paired standard error, in points) when the report has one.
_HEADER = ("task", "metric", "baseline", "int4", "delta", "retention / increase")


def _rows(report: Mapping[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    table = derived(report)
    for task, d in table.items():
        delta = "n/a" if d["delta"] is None else ("+" if d["delta"] > 0 else "") + _num(d["delta"])
        if d["higher_is_better"]:
            change = "n/a" if d["retention_pct"] is None else _with_se(d["retention_pct"], d.get("retention_se_pct"))
        else:  # lower-is-better: a retention of perplexity reads backwards, show the increase
            change = "n/a" if d["increase_pct"] is None else f"{d['increase_pct']:+.1f}%"
        rows.append((task, str(d.get("metric", "")), _num(d.get("baseline")), _num(d.get("candidate")), delta, change))
    if any(d["higher_is_better"] for d in table.values()):
        mean = mean_retention(report)
        rows.append(("mean", "retention", "", "", "", "n/a" if mean is None else _with_se(mean, mean_retention_se(report))))
    return rows


def format_table(report: Mapping[str, Any]) -> str:
    """A plain-text table, one row per task plus the mean retention; text left, numbers right."""
    rows = [_HEADER, *_rows(report)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_HEADER))]

    def line(r: tuple[str, ...]) -> str:
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        return "  ".join(cells).rstrip()

    return "\n".join([line(rows[0]), "  ".join("-" * w for w in widths), *map(line, rows[1:])])


def format_markdown(report: Mapping[str, Any]) -> str:
    """The same table as GitHub Markdown (numbers right-aligned)."""
    out = ["| " + " | ".join(_HEADER) + " |", "|---|---|---:|---:|---:|---:|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in _rows(report)]
    return "\n".join(out)


def format_breaches(breaches: list[Breach]) -> str:
    """One line per breach ("FAIL min_task_retention_pct: hellaswag retains 93.1% < 95.0%"); '' if none."""
    return "\n".join(f"FAIL {b.gate}: {b.message}" for b in breaches)


def format_verdict(verdict: Verdict) -> str:
    """One FAIL line per breach, one "not judged" line per gate the report had no task for, then a
    summary; "all gates passed" only when every gate was judged and passed."""
    lines = [format_breaches(list(verdict.breaches))] if verdict.breaches else []
    lines += [f"not judged {n.gate}: {n.reason}" for n in verdict.not_judged]
    total = len(verdict.judged) + len(verdict.not_judged)
    unjudged = f"; not judged: {', '.join(n.gate for n in verdict.not_judged)}" if verdict.not_judged else ""
    if verdict.breaches:
        lines.append(f"gates failed ({len({b.gate for b in verdict.breaches})} of {total}){unjudged}")
    elif verdict.not_judged:
        lines.append(f"judged gates passed ({len(verdict.judged)} of {total}){unjudged}")
    else:
        lines.append("all gates passed")
    return "\n".join(lines)


# ---------------------------------------------------------------- loading


def load_report(path: str | Path) -> dict[str, Any]:
    """The report JSON at `path`, checked for a usable 'results' mapping."""
    path = Path(path)
    if not path.is_file():
        raise QuantkitError(f"evaluation report {path} not found; produce it with `quantkit eval`.")
    try:
        report = json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise QuantkitError(f"evaluation report {path} is not valid JSON: {e}") from None
    try:
        _results(report)
    except QuantkitError as e:
        raise QuantkitError(f"evaluation report {path}: {e}") from None
    return report


# ---------------------------------------------------------------- where the thresholds come from


def recorded_gates(manifest: Mapping[str, Any] | None) -> dict[str, Any]:
    """The gates of the recipe an artifact was quantized with, as its manifest records them ({} if none)."""
    recipe = (manifest or {}).get("recipe")
    gates = recipe.get("gates") if isinstance(recipe, Mapping) else None
    return dict(gates) if isinstance(gates, Mapping) else {}


def recipe_gates(recipe: Any) -> dict[str, float]:
    """The gates of a recipe: a Recipe, or the path of a recipe YAML (schema-checked as always)."""
    from .recipe import Recipe, load_recipe  # recipe.py imports this module

    return dict((recipe if isinstance(recipe, Recipe) else load_recipe(recipe)).gates)


def _same_evaluation(entry: Any, report: Mapping[str, Any]) -> bool:
    """Whether a manifest's evaluation entry records this report (compared as JSON, so NaN equals NaN)."""
    if not isinstance(entry, Mapping):
        return False
    return all(json.dumps(entry.get(k), sort_keys=True) == json.dumps(report.get(k), sort_keys=True) for k in ("date", "results"))


def report_artifact(report: Mapping[str, Any], report_path: str | Path | None = None) -> Path | None:
    """The quantkit artifact whose manifest records `report`: the candidate the report names (a path
    as `quantkit eval` was given it, so relative to where that ran), else the directory holding the
    report (`quantkit eval` writes it inside the artifact by default). None if neither records it."""
    from .artifact import MANIFEST_NAME, read_manifest

    candidate = report.get("candidate")
    places = [Path(candidate["model"])] if isinstance(candidate, Mapping) and isinstance(candidate.get("model"), str) else []
    places += [Path(report_path).parent] if report_path is not None else []
    for place in places:
        if (place / MANIFEST_NAME).is_file() and any(_same_evaluation(e, report) for e in read_manifest(place).get("evaluations") or []):
            return place
    return None


def gates_for_report(report: Mapping[str, Any], report_path: str | Path | None = None, recipe: Any = None) -> tuple[dict[str, float], str]:
    """The gates `report` is checked against and where they came from: `recipe` (a path or a Recipe)
    when given, else the recipe recorded in the manifest of the artifact the report evaluated (as
    `quantkit eval` does without --recipe). Refuses, saying what to pass, when neither gives gates."""
    if recipe is not None:
        return recipe_gates(recipe), f"recipe {recipe}" if isinstance(recipe, (str, Path)) else f"recipe {recipe.name}"
    candidate = report.get("candidate") if isinstance(report.get("candidate"), Mapping) else {}
    if candidate.get("format") == "autoawq":
        raise QuantkitError(f"the report's candidate {candidate.get('model')} is an AutoAWQ checkpoint, which records no recipe; "
                            "pass --recipe FILE with a 'gates:' section.")
    artifact = report_artifact(report, report_path)
    if artifact is None:
        raise QuantkitError(
            f"no --recipe given, and no artifact's manifest records this report (looked in {candidate.get('model', 'its candidate')!s}"
            + (f" and {Path(report_path).parent}" if report_path is not None else "")
            + "; run from the directory `quantkit eval` ran in, or the artifact was moved or quantized again since); "
            "pass --recipe FILE with a 'gates:' section."
        )
    from .artifact import MANIFEST_NAME, read_manifest

    where = artifact / MANIFEST_NAME
    gates = recorded_gates(read_manifest(artifact))
    if not gates:
        raise QuantkitError(f"no --recipe given, and the recipe recorded in {where} has no gates (it was quantized without a "
                            "recipe 'gates:' section); pass --recipe FILE with one.")
    try:
        return validate_gates(gates), f"the recipe recorded in {where}"
    except QuantkitError as e:
        raise QuantkitError(f"{where}: recorded gates: {e}") from None
