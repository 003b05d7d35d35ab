"""Accuracy gates: compare an evaluation report's candidate (int4) against its baseline.

A report (written by `quantkit eval`) maps each task to its metric, direction and two values:

    {"results": {"wikitext": {"metric": "word_perplexity", "higher_is_better": false,
                              "baseline": 20.1, "candidate": 22.9}, ...}}

Everything here is pure: the CLI loads the report, calls `check_gates` and decides the exit code.
A gate that cannot be checked (missing value, no task it applies to, zero baseline) is a breach:
in CI a silently skipped gate is indistinguishable from a passing one.
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


_PER_TASK = {  # gate -> (derived key, applies to higher-is-better tasks, what the tasks are called)
    "max_perplexity_increase_pct": ("increase_pct", False, "lower-is-better (perplexity)"),
    "min_task_retention_pct": ("retention_pct", True, "higher-is-better (accuracy)"),
    "max_task_drop_points": ("drop_points", True, "higher-is-better (accuracy)"),
}


def check_gates(report: Mapping[str, Any], gates: Mapping[str, Any]) -> list[Breach]:
    """Every breach of `gates` by `report`, in gate order then task order; [] means all pass.

    No gates at all is an error, not a pass: a CI step gating on a recipe without thresholds
    would otherwise report success while checking nothing.
    """
    thresholds = validate_gates(gates)
    if not thresholds:
        raise QuantkitError(
            "no gates to check: the recipe's 'gates:' section is missing or empty. Add thresholds under "
            f"'gates:' (e.g. min_mean_retention_pct: 98.0); known gates: {sorted(KNOWN_GATES)}."
        )
    rows = derived(report)
    breaches: list[Breach] = []
    for gate, threshold in thresholds.items():
        if gate == "min_mean_retention_pct":
            breaches += _mean_breach(rows, threshold)
            continue
        key, hib, kind = _PER_TASK[gate]
        tasks = {t: d for t, d in rows.items() if d["higher_is_better"] is hib}
        if not tasks:
            breaches.append(Breach(gate, None, None, threshold,
                                   f"metric missing: no {kind} task in the report, so the gate cannot be checked"))
        for task, d in tasks.items():
            b = _task_breach(gate, task, d, key, threshold)
            if b is not None:
                breaches.append(b)
    return breaches


def _mean_breach(rows: Mapping[str, Mapping[str, Any]], threshold: float) -> list[Breach]:
    gate = "min_mean_retention_pct"
    rets = {t: d["retention_pct"] for t, d in rows.items() if d["higher_is_better"]}
    if not rets:
        msg = "metric missing: no higher-is-better (accuracy) task in the report, so the gate cannot be checked"
        return [Breach(gate, "mean", None, threshold, msg)]
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
