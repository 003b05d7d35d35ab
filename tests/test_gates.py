"""Accuracy gates: the specification of what passes, what fails and what a breach says."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantkit.cli import main
from quantkit.errors import QuantkitError
from quantkit.gates import (
    KNOWN_GATES,
    NotJudged,
    check_gates,
    derived,
    format_breaches,
    format_markdown,
    format_table,
    format_verdict,
    gates_for_report,
    judge_gates,
    load_report,
    mean_retention,
    validate_gates,
)
from quantkit.recipe import load_recipe

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m.yaml"


def ppl(baseline, candidate, metric="word_perplexity"):
    return {"metric": metric, "higher_is_better": False, "baseline": baseline, "candidate": candidate}


def acc(baseline, candidate, metric="acc_norm"):
    return {"metric": metric, "higher_is_better": True, "baseline": baseline, "candidate": candidate}


def report(**results):
    return {
        "quantkit_version": "0.1.0",
        "lm_eval_version": "0.4.13",
        "date": "2026-11-24",
        "baseline": {"model": "smollm2-135m", "dtype": "bfloat16"},
        "candidate": {"model": "out/smollm2-awq", "dtype": "bfloat16"},
        "limit": None,
        "results": results,
    }


def good_report():
    return report(wikitext=ppl(20.1, 22.9), hellaswag=acc(0.431, 0.425), piqa=acc(0.68, 0.67))


# ---------------------------------------------------------------- passing


def test_the_smollm2_recipe_gates_pass_a_good_report():
    gates = load_recipe(RECIPE).gates
    assert gates == {
        "max_perplexity_increase_pct": 15.0,
        "min_task_retention_pct": 95.0,
        "min_mean_retention_pct": 98.0,
    }
    assert check_gates(good_report(), gates) == []


def test_no_gates_is_an_error_not_a_pass():
    # A CI step gating on a recipe without thresholds would otherwise succeed while checking nothing.
    with pytest.raises(QuantkitError, match="no gates to check.*'gates:'.*min_mean_retention_pct"):
        check_gates(good_report(), {})


def test_a_value_exactly_at_its_threshold_passes_despite_float_noise():
    # hellaswag drops (0.6 - 0.57) * 100 = 3.0000000000000027 points in floating point.
    r = report(wikitext=ppl(20.0, 23.0), hellaswag=acc(0.6, 0.57), piqa=acc(0.68, 0.655))
    gates = {
        "max_perplexity_increase_pct": 15.0,
        "min_task_retention_pct": 95.0,
        "max_task_drop_points": 3.0,
        "min_mean_retention_pct": (0.57 / 0.6 + 0.655 / 0.68) / 2 * 100,
    }
    assert check_gates(r, gates) == []


# ---------------------------------------------------------------- each gate failing


def test_perplexity_increase_beyond_the_threshold_fails():
    breaches = check_gates(report(wikitext=ppl(20.0, 23.4)), {"max_perplexity_increase_pct": 15.0})
    assert len(breaches) == 1
    b = breaches[0]
    assert (b.gate, b.task, b.threshold) == ("max_perplexity_increase_pct", "wikitext", 15.0)
    assert b.value == pytest.approx(17.0)
    assert b.message == "wikitext word_perplexity rises 17.0% > 15.0% (20 -> 23.4)"


def test_the_perplexity_gate_applies_to_every_lower_is_better_task():
    r = report(
        wikitext=ppl(20.0, 21.0),
        lambada=ppl(10.0, 12.0, metric="perplexity"),
        hellaswag=acc(0.4, 0.1),  # an accuracy task is never judged by the perplexity gate
    )
    breaches = check_gates(r, {"max_perplexity_increase_pct": 15.0})
    assert [(b.task, round(b.value, 6)) for b in breaches] == [("lambada", 20.0)]


def test_task_retention_below_the_threshold_fails():
    r = report(wikitext=ppl(20.0, 20.0), hellaswag=acc(0.5, 0.4655), piqa=acc(0.68, 0.67))
    breaches = check_gates(r, {"min_task_retention_pct": 95.0})
    assert len(breaches) == 1
    b = breaches[0]
    assert (b.gate, b.task, b.threshold) == ("min_task_retention_pct", "hellaswag", 95.0)
    assert b.value == pytest.approx(93.1)
    assert b.message == "hellaswag retains 93.1% < 95.0%"
    assert format_breaches(breaches) == "FAIL min_task_retention_pct: hellaswag retains 93.1% < 95.0%"


def test_mean_retention_below_the_threshold_fails():
    r = report(hellaswag=acc(0.5, 0.48), piqa=acc(0.5, 0.49))  # 96% and 98%: each >= 95, mean 97
    gates = {"min_task_retention_pct": 95.0, "min_mean_retention_pct": 98.0}
    breaches = check_gates(r, gates)
    assert len(breaches) == 1
    b = breaches[0]
    assert (b.gate, b.task, b.threshold) == ("min_mean_retention_pct", "mean", 98.0)
    assert b.value == pytest.approx(97.0)
    assert b.message == "mean retention over 2 tasks is 97.0% < 98.0%"


def test_mean_retention_is_over_accuracy_tasks_only():
    # Perplexity falling 50% would be a "retention" of 50% (or 200% inverted): it must not count.
    r = report(wikitext=ppl(20.0, 10.0), hellaswag=acc(0.5, 0.5), piqa=acc(0.5, 0.48))
    assert mean_retention(r) == pytest.approx(98.0)
    assert check_gates(r, {"min_mean_retention_pct": 98.0}) == []
    [b] = check_gates(r, {"min_mean_retention_pct": 98.5})
    assert b.value == pytest.approx(98.0) and "over 2 tasks" in b.message


def test_task_drop_in_points_beyond_the_threshold_fails():
    r = report(wikitext=ppl(20.0, 40.0), hellaswag=acc(0.431, 0.425), piqa=acc(0.68, 0.65))
    breaches = check_gates(r, {"max_task_drop_points": 2.0})
    assert len(breaches) == 1
    b = breaches[0]
    assert (b.gate, b.task, b.threshold) == ("max_task_drop_points", "piqa", 2.0)
    assert b.value == pytest.approx(3.0)
    assert b.message == "piqa drops 3.0 points > 2.0 (0.68 -> 0.65)"


def test_breaches_come_in_gate_order_then_task_order():
    r = report(wikitext=ppl(20.0, 30.0), hellaswag=acc(0.5, 0.4), piqa=acc(0.5, 0.3))
    gates = {"max_task_drop_points": 1.0, "max_perplexity_increase_pct": 15.0, "min_task_retention_pct": 95.0}
    assert [(b.gate, b.task) for b in check_gates(r, gates)] == [
        ("max_task_drop_points", "hellaswag"),
        ("max_task_drop_points", "piqa"),
        ("max_perplexity_increase_pct", "wikitext"),
        ("min_task_retention_pct", "hellaswag"),
        ("min_task_retention_pct", "piqa"),
    ]


def test_a_breach_shown_at_one_decimal_never_reads_as_equal_to_its_threshold():
    [b] = check_gates(report(hellaswag=acc(1.0, 0.9496)), {"min_task_retention_pct": 95.0})
    assert b.message == "hellaswag retains 94.96% < 95.00%"


# ---------------------------------------------------------------- gates that cannot be checked


@pytest.mark.parametrize("side", ["baseline", "candidate"])
def test_a_null_value_is_a_missing_metric_breach_for_every_gate_on_that_task(side):
    hellaswag = acc(0.431, 0.425)
    hellaswag[side] = None
    r = report(wikitext=ppl(20.1, 22.9), hellaswag=hellaswag, piqa=acc(0.68, 0.67))
    gates = {"min_task_retention_pct": 95.0, "max_task_drop_points": 2.0, "min_mean_retention_pct": 98.0}
    breaches = check_gates(r, gates)
    assert [(b.gate, b.task, b.value) for b in breaches] == [
        ("min_task_retention_pct", "hellaswag", None),
        ("max_task_drop_points", "hellaswag", None),
        ("min_mean_retention_pct", "mean", None),
    ]
    assert breaches[0].message == f"hellaswag acc_norm is missing (no {side} value): the gate cannot be checked"
    assert breaches[2].message == "cannot compute mean retention: retention missing for hellaswag"


@pytest.mark.parametrize("bad", [None, float("nan"), "0.42", True])
def test_a_null_nan_or_non_numeric_perplexity_is_missing(bad):
    [b] = check_gates(report(wikitext=ppl(20.1, bad)), {"max_perplexity_increase_pct": 15.0})
    assert b.task == "wikitext" and b.value is None and "missing" in b.message


def test_an_absent_value_key_is_missing():
    entry = {"metric": "acc_norm", "higher_is_better": True, "baseline": 0.43}  # no "candidate"
    [b] = check_gates(report(hellaswag=entry), {"min_task_retention_pct": 95.0})
    assert b.value is None and "missing (no candidate value)" in b.message


def test_a_zero_baseline_cannot_give_a_retention():
    r = report(hellaswag=acc(0.0, 0.25), piqa=acc(0.68, 0.67))
    breaches = check_gates(r, {"min_task_retention_pct": 95.0, "min_mean_retention_pct": 98.0})
    assert [(b.gate, b.task, b.value) for b in breaches] == [
        ("min_task_retention_pct", "hellaswag", None),
        ("min_mean_retention_pct", "mean", None),
    ]
    assert breaches[0].message == "hellaswag: cannot compute retention: baseline acc_norm is 0"
    # The drop in points needs no ratio, so it is still checked.
    assert check_gates(r, {"max_task_drop_points": 2.0}) == []


def test_a_zero_baseline_perplexity_cannot_give_an_increase():
    [b] = check_gates(report(wikitext=ppl(0.0, 22.9)), {"max_perplexity_increase_pct": 15.0})
    assert b.value is None and b.message == "wikitext: cannot compute increase: baseline word_perplexity is 0"


# ---------------------------------------------------------------- gates the report has no task for


def test_a_quick_run_on_a_task_subset_judges_what_it_can_and_lists_what_it_could_not():
    # piqa alone: the accuracy gates are judged over it, the perplexity gate has nothing to judge.
    verdict = judge_gates(report(piqa=acc(0.68, 0.67)), load_recipe(RECIPE).gates)
    assert verdict.passed and verdict.breaches == ()
    assert verdict.judged == ("min_task_retention_pct", "min_mean_retention_pct")
    assert verdict.not_judged == (NotJudged(
        "max_perplexity_increase_pct", 15.0,
        "no lower-is-better (perplexity) task in the report (it has piqa); evaluate wikitext to judge it"),)
    assert format_verdict(verdict) == (
        "not judged max_perplexity_increase_pct: no lower-is-better (perplexity) task in the report (it has piqa); "
        "evaluate wikitext to judge it\n"
        "judged gates passed (2 of 3); not judged: max_perplexity_increase_pct"
    )
    assert "all gates passed" not in format_verdict(verdict)


def test_a_breach_fails_the_verdict_and_the_gates_not_judged_are_still_listed():
    r, gates = report(wikitext=ppl(20.0, 30.0)), {"max_perplexity_increase_pct": 15.0, "max_task_drop_points": 2.0}
    verdict = judge_gates(r, gates)
    assert not verdict.passed
    assert [b.gate for b in verdict.breaches] == ["max_perplexity_increase_pct"]
    assert [n.gate for n in verdict.not_judged] == ["max_task_drop_points"]
    assert format_verdict(verdict).splitlines() == [
        "FAIL max_perplexity_increase_pct: wikitext word_perplexity rises 50.0% > 15.0% (20 -> 30)",
        "not judged max_task_drop_points: no higher-is-better (accuracy) task in the report (it has wikitext); "
        "evaluate hellaswag, piqa, winogrande or lambada to judge it",
        "gates failed (1 of 2); not judged: max_task_drop_points",
    ]
    assert check_gates(r, gates) == list(verdict.breaches)


def test_a_verdict_with_every_gate_judged_and_passing_says_all_gates_passed():
    verdict = judge_gates(good_report(), load_recipe(RECIPE).gates)
    assert verdict.not_judged == () and format_verdict(verdict) == "all gates passed"


def test_a_perplexity_gate_alone_over_a_report_without_perplexity_is_an_error_not_a_pass():
    r = report(hellaswag=acc(0.431, 0.425), piqa=acc(0.68, 0.67))
    with pytest.raises(QuantkitError, match=(
            r"no gate could be judged: max_perplexity_increase_pct: no lower-is-better \(perplexity\) task in the report "
            r"\(it has hellaswag, piqa\); evaluate wikitext to judge it\. Evaluate at least one task a gate applies to\.")):
        check_gates(r, {"max_perplexity_increase_pct": 15.0})


def test_accuracy_gates_over_a_report_without_accuracy_tasks_are_an_error_naming_each():
    gates = {"min_task_retention_pct": 95.0, "min_mean_retention_pct": 98.0, "max_task_drop_points": 2.0}
    with pytest.raises(QuantkitError, match="no gate could be judged") as err:
        judge_gates(report(wikitext=ppl(20.1, 22.9)), gates)
    assert all(f"{gate}: no higher-is-better (accuracy) task in the report (it has wikitext)" in str(err.value) for gate in gates)


def test_an_empty_report_judges_nothing_and_is_an_error():
    with pytest.raises(QuantkitError, match=r"no gate could be judged: .*\(it has no task\)"):
        judge_gates(report(), load_recipe(RECIPE).gates)


# ---------------------------------------------------------------- gate validation


def test_an_unknown_gate_name_is_an_error_listing_the_known_ones():
    with pytest.raises(QuantkitError, match="min_task_retension_pct") as err:
        check_gates(good_report(), {"min_task_retension_pct": 95.0})
    for name in KNOWN_GATES:
        assert name in str(err.value)


def test_the_known_gates_are_exactly_the_four_documented():
    assert set(KNOWN_GATES) == {
        "max_perplexity_increase_pct",
        "min_task_retention_pct",
        "min_mean_retention_pct",
        "max_task_drop_points",
    }


@pytest.mark.parametrize("bad", ["95", None, True, float("nan"), float("inf"), [95.0]])
def test_a_non_numeric_threshold_is_an_error(bad):
    with pytest.raises(QuantkitError, match="min_task_retention_pct.*finite number"):
        check_gates(good_report(), {"min_task_retention_pct": bad})


def test_integer_thresholds_are_accepted_as_floats():
    assert validate_gates({"max_task_drop_points": 2}) == {"max_task_drop_points": 2.0}


def test_a_task_without_a_direction_is_an_error_not_a_skipped_task():
    r = report(hellaswag={"metric": "acc_norm", "baseline": 0.431, "candidate": 0.2})
    with pytest.raises(QuantkitError, match="hellaswag.*higher_is_better"):
        check_gates(r, {"min_task_retention_pct": 95.0})


def test_breaches_are_immutable():
    [b] = check_gates(report(hellaswag=acc(0.5, 0.4)), {"min_task_retention_pct": 95.0})
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.value = 100.0  # type: ignore[misc]


# ---------------------------------------------------------------- derived figures


def test_derived_adds_delta_and_the_relative_change_per_task():
    d = derived(good_report())
    assert list(d) == ["wikitext", "hellaswag", "piqa"]
    w, h = d["wikitext"], d["hellaswag"]
    assert w["metric"] == "word_perplexity" and w["baseline"] == 20.1 and w["candidate"] == 22.9
    assert w["delta"] == pytest.approx(2.8)
    assert w["increase_pct"] == pytest.approx((22.9 / 20.1 - 1) * 100)
    assert w["retention_pct"] is None and w["drop_points"] is None
    assert h["delta"] == pytest.approx(-0.006)
    assert h["retention_pct"] == pytest.approx(0.425 / 0.431 * 100)
    assert h["drop_points"] == pytest.approx(0.6)
    assert h["increase_pct"] is None


def test_derived_leaves_the_report_untouched_and_marks_missing_values_none():
    r = report(hellaswag=acc(0.431, None))
    before = json.dumps(r)
    h = derived(r)["hellaswag"]
    assert json.dumps(r) == before
    assert h["delta"] is None and h["retention_pct"] is None and h["drop_points"] is None


# ---------------------------------------------------------------- formatting


def test_the_table_shows_every_number_in_aligned_columns():
    text = format_table(good_report())
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["task", "metric", "baseline", "int4", "delta"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows["wikitext"] == ["wikitext", "word_perplexity", "20.1", "22.9", "+2.8", "+13.9%"]
    assert rows["hellaswag"] == ["hellaswag", "acc_norm", "0.431", "0.425", "-0.006", "98.6%"]
    assert rows["piqa"] == ["piqa", "acc_norm", "0.68", "0.67", "-0.01", "98.5%"]
    assert rows["mean"][-1] == f"{(0.425 / 0.431 + 0.67 / 0.68) / 2 * 100:.1f}%"
    # Right-aligned last column: every line ends at the same position, columns start together.
    assert len({len(line) for line in lines}) == 1
    assert len({line.index(cells[1]) for line, cells in zip(lines[2:], rows.values())}) == 1


def test_the_table_shows_missing_values_as_na():
    text = format_table(report(hellaswag=acc(0.431, None)))
    row = next(line for line in text.splitlines() if line.startswith("hellaswag")).split()
    assert row == ["hellaswag", "acc_norm", "0.431", "n/a", "n/a", "n/a"]


def test_a_retention_with_a_paired_standard_error_shows_it_and_the_means():
    r = report(wikitext=ppl(20.1, 22.9), hellaswag={**acc(0.431, 0.425), "retention_se_pct": 3.0},
               piqa={**acc(0.68, 0.67), "retention_se_pct": 4.0})
    rows = {line.split()[0]: line.split() for line in format_table(r).splitlines()[2:]}
    assert rows["hellaswag"][-3:] == ["98.6%", "±", "3.0"]
    assert rows["wikitext"][-1] == "+13.9%"  # an increase has no retention error to show
    assert rows["mean"][-2:] == ["±", "2.5"]  # sqrt(3^2 + 4^2) / 2: the tasks' errors are independent
    # The gates still judge the measured value: the error is there for the reader.
    assert check_gates(r, {"min_task_retention_pct": 99.0})


def test_without_per_example_scores_a_retention_has_no_error_shown():
    r = report(hellaswag={**acc(0.431, 0.425), "retention_se_pct": None}, piqa={**acc(0.68, 0.67), "retention_se_pct": 4.0})
    rows = {line.split()[0]: line.split() for line in format_table(r).splitlines()[2:]}
    assert rows["hellaswag"][-1] == "98.6%"
    assert rows["mean"][-1].endswith("%")  # no mean error unless every task has one


def test_the_markdown_table_has_the_same_numbers():
    lines = format_markdown(good_report()).splitlines()
    assert lines[0].startswith("| task | metric | baseline | int4 | delta |")
    assert set(lines[1].replace("|", "").replace(":", "")) == {"-"}
    assert "| wikitext | word_perplexity | 20.1 | 22.9 | +2.8 | +13.9% |" in lines
    assert "| hellaswag | acc_norm | 0.431 | 0.425 | -0.006 | 98.6% |" in lines
    assert all(line.count("|") == 7 for line in lines)


def test_format_breaches_gives_one_line_per_breach():
    r = report(wikitext=ppl(20.0, 30.0), hellaswag=acc(0.5, 0.4))
    breaches = check_gates(r, {"max_perplexity_increase_pct": 15.0, "min_task_retention_pct": 95.0})
    assert format_breaches(breaches).splitlines() == [
        "FAIL max_perplexity_increase_pct: wikitext word_perplexity rises 50.0% > 15.0% (20 -> 30)",
        "FAIL min_task_retention_pct: hellaswag retains 80.0% < 95.0%",
    ]
    assert format_breaches([]) == ""


# ---------------------------------------------------------------- loading


def test_load_report_round_trips_a_written_report(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(good_report()))
    assert load_report(path) == good_report()
    assert load_report(str(path)) == good_report()


def test_load_report_missing_file(tmp_path):
    with pytest.raises(QuantkitError, match="missing.json not found"):
        load_report(tmp_path / "missing.json")


def test_load_report_invalid_json(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text('{"results": {')
    with pytest.raises(QuantkitError, match="not valid JSON"):
        load_report(path)


@pytest.mark.parametrize("content", [{"baseline": {}}, [], {"results": [1, 2]}])
def test_load_report_without_results(tmp_path, content):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(content))
    with pytest.raises(QuantkitError, match="eval.json.*no 'results'"):
        load_report(path)


def test_load_report_keeps_nan_as_a_missing_value(tmp_path):
    # Python's json writes NaN for a failed metric; it must read back as missing, not as passing.
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(report(hellaswag=acc(0.431, math.nan))))
    [b] = check_gates(load_report(path), {"min_task_retention_pct": 95.0})
    assert b.value is None and "missing" in b.message


# ---------------------------------------------------------------- where the gates come from


def fake_artifact(directory: Path, gates: dict, evaluations: list) -> Path:
    """A directory with the manifest `quantkit quantize` and `quantkit eval` leave (gates are read from
    the manifest alone, so no weights are needed)."""
    directory.mkdir(parents=True)
    manifest = {"files": {"config.json": "0" * 64}, "recipe": {"name": "r", "gates": gates}, "evaluations": evaluations}
    (directory / "quantkit.json").write_text(json.dumps(manifest))
    return directory


def evaluated(candidate: Path) -> dict:
    return {**good_report(), "candidate": {"model": str(candidate), "dtype": "bfloat16"}}


def test_gates_come_from_the_recipe_when_one_is_given(tmp_path):
    r = evaluated(fake_artifact(tmp_path / "art", {"max_task_drop_points": 1.0}, [good_report()]))
    gates, origin = gates_for_report(r, None, RECIPE)
    assert gates == load_recipe(RECIPE).gates and origin == f"recipe {RECIPE}"


def test_without_a_recipe_the_gates_come_from_the_manifest_of_the_evaluated_artifact(tmp_path):
    art = fake_artifact(tmp_path / "art", {"max_task_drop_points": 1}, [good_report()])
    gates, origin = gates_for_report(evaluated(art), tmp_path / "elsewhere" / "eval.json")
    assert gates == {"max_task_drop_points": 1.0} and origin == f"the recipe recorded in {art}/quantkit.json"


def test_a_report_inside_its_artifact_finds_it_when_the_recorded_path_no_longer_resolves(tmp_path):
    # `quantkit eval` writes the report into the artifact by default; the candidate path it
    # records is relative to wherever eval ran.
    art = fake_artifact(tmp_path / "art", {"min_task_retention_pct": 95.0}, [good_report()])
    r = {**good_report(), "candidate": {"model": "out/moved-away", "dtype": "bfloat16"}}
    assert gates_for_report(r, art / "eval-report.json")[0] == {"min_task_retention_pct": 95.0}


def test_an_artifact_whose_manifest_does_not_record_the_report_gives_no_gates(tmp_path):
    # Quantized again since (another recipe, perhaps): its gates are not the ones this report was for.
    art = fake_artifact(tmp_path / "art", {"min_task_retention_pct": 95.0}, [{**good_report(), "date": "2026-01-01"}])
    with pytest.raises(QuantkitError, match=f"no artifact's manifest records this report .*{art}.*pass --recipe FILE"):
        gates_for_report(evaluated(art), art / "eval-report.json")


def test_a_recorded_recipe_without_gates_is_refused_saying_what_to_pass(tmp_path):
    art = fake_artifact(tmp_path / "art", {}, [good_report()])
    with pytest.raises(QuantkitError, match=r"recorded in .*quantkit.json has no gates .*pass --recipe FILE"):
        gates_for_report(evaluated(art))


def test_a_report_on_an_autoawq_checkpoint_needs_a_recipe(tmp_path):
    r = {**good_report(), "candidate": {"model": "TheBloke/x-AWQ", "dtype": "bfloat16", "format": "autoawq"}}
    with pytest.raises(QuantkitError, match="AutoAWQ checkpoint, which records no recipe; pass --recipe FILE"):
        gates_for_report(r, tmp_path / "eval.json")


def test_the_match_to_a_recorded_evaluation_survives_a_nan_value(tmp_path):
    nan_report = report(hellaswag=acc(0.431, math.nan))
    art = fake_artifact(tmp_path / "art", {"min_task_retention_pct": 95.0}, [nan_report])
    path = art / "eval-report.json"
    path.write_text(json.dumps({**nan_report, "candidate": {"model": str(art)}}))
    assert gates_for_report(load_report(path), path)[0] == {"min_task_retention_pct": 95.0}


# ---------------------------------------------------------------- `quantkit gate`


def gate_cli(tmp_path, recipe_text: str):
    report_path, recipe_path = tmp_path / "eval.json", tmp_path / "r.yaml"
    report_path.write_text(json.dumps(good_report()))
    recipe_path.write_text(recipe_text)
    result = CliRunner().invoke(main, ["gate", str(report_path), "--recipe", str(recipe_path)])
    return result.exit_code, result.output


def test_gate_command_passes_a_good_report(tmp_path):
    code, output = gate_cli(tmp_path, RECIPE.read_text())
    assert code == 0 and "all gates passed" in output, output


@pytest.mark.parametrize("recipe_text", ["name: no-gates\n", "gates:\n", "gates: {}\n"])
def test_gate_command_refuses_a_recipe_without_gates(tmp_path, recipe_text):
    code, output = gate_cli(tmp_path, recipe_text)
    assert code == 2, output
    assert "no gates to check" in output and "all gates passed" not in output and "Traceback" not in output


def test_gate_command_refuses_a_boolean_threshold(tmp_path):
    code, output = gate_cli(tmp_path, "gates:\n  min_task_retention_pct: true\n")
    assert code == 2, output
    assert "min_task_retention_pct" in output and "got True" in output and "all gates passed" not in output
