"""Specifications for quantkit's offline lm-eval tasks (eval/tasks/ and quantkit/eval_tasks.py).

The qk_* tasks must load with no network and render every example exactly as lm-eval 0.4.13's
standard task renders the same example: the checks below compare hand-written strings, and also
build lm-eval's own installed task definitions over the same rows (in hub format) and compare the
requests they produce with ours.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import datasets
import lm_eval  # a required dependency: if it is missing these tests must fail, not skip
import pytest
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks._yaml_loader import load_yaml

from quantkit import eval_tasks  # noqa: E402
from quantkit.errors import QuantkitError  # noqa: E402

STANDARD_TASKS_DIR = Path(lm_eval.__file__).parent / "tasks"
# qk task -> (lm-eval's own definition it mirrors, number of examples)
MIRRORS = {
    "qk_wikitext": ("wikitext/wikitext.yaml", 62),
    "qk_hellaswag": ("hellaswag/hellaswag.yaml", 10_042),
    "qk_piqa": ("piqa/piqa.yaml", 1_838),
    "qk_winogrande": ("winogrande/default.yaml", 1_267),
    "qk_lambada": ("lambada/lambada_standard.yaml", 5_153),
}
# Keys that say where the data comes from; everything else in a definition must match lm-eval's.
DATA_SOURCE_KEYS = {
    "task", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "custom_dataset",
    "training_split", "validation_split", "test_split",
}


@pytest.fixture(scope="module")
def qk_tasks() -> dict:
    manager = eval_tasks.task_manager(include_standard=False)
    return manager.load(list(MIRRORS))["tasks"]  # {task name: Task}


def _requests(task, doc) -> list[tuple]:
    ctx = task.fewshot_context(doc, 0)
    reqs = task.construct_requests(doc, ctx, metadata=(task.config.task, 0, 1))
    return [r.arguments for r in (reqs if isinstance(reqs, list) else [reqs])]


def _standard_task(qk_name: str, rows: list[dict]) -> ConfigurableTask:
    """lm-eval's own installed definition of the task, serving `rows` (hub format) on every split."""
    config = load_yaml(STANDARD_TASKS_DIR / MIRRORS[qk_name][0], resolve_func=True)
    splits = [config.get(k) for k in ("training_split", "validation_split", "test_split")]
    dataset = datasets.DatasetDict({s: datasets.Dataset.from_list(rows) for s in splits if s})
    return ConfigurableTask(config={**config, "custom_dataset": lambda **_: dataset})


def _is_function(value: object) -> bool:
    """A `!function` entry, as lm-eval's loader returns it without resolving: "<yaml dir>/module.name"."""
    return isinstance(value, str) and value.startswith((str(STANDARD_TASKS_DIR), str(eval_tasks.tasks_dir())))


def _evaluated_split(config) -> str:
    return "test" if config.test_split else "validation"


# --------------------------------------------------------------------------- loading


def test_every_task_loads_offline_with_all_examples(qk_tasks: dict) -> None:
    assert set(qk_tasks) == set(MIRRORS)
    for name, (_, count) in MIRRORS.items():
        assert len(qk_tasks[name].eval_docs) == count, name


def test_definitions_mirror_lm_evals_own_except_the_data_source(qk_tasks: dict) -> None:
    for name, (standard_yaml, _) in MIRRORS.items():
        ours = load_yaml(eval_tasks.tasks_dir() / f"{name}.yaml", resolve_func=False)
        theirs = load_yaml(STANDARD_TASKS_DIR / standard_yaml, resolve_func=False)
        ours_rest = {k: v for k, v in ours.items() if k not in DATA_SOURCE_KEYS}
        theirs_rest = {k: v for k, v in theirs.items() if k not in DATA_SOURCE_KEYS}
        assert ours_rest.keys() == theirs_rest.keys(), name
        for key, value in theirs_rest.items():
            if _is_function(value):  # behaviour compared on real rows below
                assert _is_function(ours_rest[key]), (name, key)
            else:
                assert ours_rest[key] == value, (name, key)
        std = _standard_task(name, [qk_tasks[name].eval_docs[0]] if name != "qk_hellaswag" else [_HELLASWAG_HUB_ROW])
        assert _evaluated_split(qk_tasks[name].config) == _evaluated_split(std.config), name
        assert qk_tasks[name].OUTPUT_TYPE == std.OUTPUT_TYPE
        assert qk_tasks[name].config.metric_list == std.config.metric_list
        assert qk_tasks[name].config.target_delimiter == std.config.target_delimiter


# --------------------------------------------------------------------------- first examples, by hand


def test_wikitext_first_article(qk_tasks: dict) -> None:
    task = qk_tasks["qk_wikitext"]
    doc = task.eval_docs[0]
    assert doc["page"].startswith(" = Robert Boulter = \n Robert Boulter is an English film , television")
    ((target,),) = _requests(task, doc)
    assert target.startswith(
        " = Robert Boulter =\nRobert Boulter is an English film, television and theatre actor. He had a "
        "guest-starring role on the television series The Bill in 2000. This was followed by"
    )
    assert "\n= = Career = =" not in target and "\n== Career ==\n" in target
    assert task.process_results(doc, [-100.0]) == {
        "word_perplexity": (-100.0, 1093),
        "byte_perplexity": (-100.0, 5633),
        "bits_per_byte": (-100.0, 5633),
    }
    # One document per article: each starts at a top-level " = Title = " heading.
    titles = [d["page"].split("\n", 1)[0] for d in task.eval_docs]
    assert titles[:3] == [" = Robert Boulter = ", " = Du Fu = ", " = Kiss You ( One Direction song ) = "]
    assert all(re.fullmatch(r" = [^=].* = ", t) for t in titles)
    # Nothing lost or added: the articles rejoin to the file as read in text mode ("\r\n" -> "\n").
    text = (eval_tasks.EVAL_DIR / "data" / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    assert "\n".join(d["page"] for d in task.eval_docs) == text


def test_hellaswag_first_example(qk_tasks: dict) -> None:
    task = qk_tasks["qk_hellaswag"]
    docs = task.eval_docs
    doc = docs[0]
    context = "Roof shingle removal: A man is sitting on a roof. He"  # lm-eval capitalizes ctx_b "he"
    assert _requests(task, doc) == [
        (context, " is using wrap to wrap a pair of skis."),
        (context, " is ripping level tiles off."),
        (context, " is holding a rubik's cube."),
        (context, " starts pulling up roofing on a roof."),
    ]
    assert task.doc_to_target(doc) == 3
    assert task.doc_to_text(docs[1]) == (
        "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. The lady"
    )


def test_piqa_first_example(qk_tasks: dict) -> None:
    task = qk_tasks["qk_piqa"]
    doc = task.eval_docs[0]
    context = "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert _requests(task, doc) == [
        (context, " Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, "
                  "you will also need to supply it with a water bottle and a food dish."),
        (context, " Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material, "
                  "you will also need to supply it with a water bottle and a food dish."),
    ]
    assert task.doc_to_target(doc) == 0


def test_winogrande_first_example(qk_tasks: dict) -> None:
    task = qk_tasks["qk_winogrande"]
    doc = task.eval_docs[0]
    # Partial evaluation: each option completes the prefix; the shared continuation is scored.
    assert _requests(task, doc) == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    ]
    assert task.doc_to_text(doc) == 1  # answer "2": the gold context is the second one


def test_lambada_first_example(qk_tasks: dict) -> None:
    task = qk_tasks["qk_lambada"]
    [(context, continuation)] = _requests(task, task.eval_docs[0])
    assert context.startswith("in my palm is a clear stone , and inside it is a small ivory statuette .")
    assert context.endswith("his mouth curved in a confident grin , i do n't care about")
    assert continuation == " signs"


# --------------------------------------------------------------------------- same requests as lm-eval's own tasks

# Rowan/hellaswag validation row 0 as the hub stores it (the HellaSwag README's example item).
_HELLASWAG_HUB_ROW = {
    "ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
    "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": "3",
    "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
                "starts pulling up roofing on a roof."],
    "source_id": "activitynet~v_-JhWjGDPHMY",
}


def _assert_same_requests(ours, std, n: int | None = None) -> None:
    ours_docs, std_docs = ours.eval_docs, std.eval_docs
    n = len(std_docs) if n is None else n
    for i in range(n):
        assert _requests(ours, ours_docs[i]) == _requests(std, std_docs[i]), i
        assert ours.doc_to_target(ours_docs[i]) == std.doc_to_target(std_docs[i]), i


@pytest.mark.parametrize("name", ["qk_piqa", "qk_winogrande", "qk_lambada"])
def test_same_requests_as_lm_eval_on_the_same_rows(qk_tasks: dict, name: str) -> None:
    # The vendored rows are the hub's rows for these three.
    ours = qk_tasks[name]
    std = _standard_task(name, list(ours.eval_docs))
    _assert_same_requests(ours, std, n=400)


def test_wikitext_same_requests_and_counts_as_lm_eval(qk_tasks: dict) -> None:
    ours = qk_tasks["qk_wikitext"]
    std = _standard_task("qk_wikitext", list(ours.eval_docs))
    _assert_same_requests(ours, std)
    for doc in ours.eval_docs:
        assert ours.process_results(doc, [-1.0]) == std.process_results(doc, [-1.0])


def test_hellaswag_same_requests_as_lm_eval(qk_tasks: dict) -> None:
    ours = qk_tasks["qk_hellaswag"]
    docs = ours.eval_docs  # processed on each access: keep one
    std = _standard_task("qk_hellaswag", [_HELLASWAG_HUB_ROW])
    assert _requests(ours, docs[0]) == _requests(std, std.eval_docs[0])
    assert ours.doc_to_target(docs[0]) == std.doc_to_target(std.eval_docs[0]) == 3
    # A WikiHow row (empty ctx_b) with a bracketed span that is not WikiHow markup: lm-eval's
    # preprocess deletes it; the vendored query kept it.
    raw = _vendored_row("hellaswag/hellaswag_val.jsonl", 3505)
    assert "[www.kiddio.org]" in raw["query"]
    label, ctx = raw["query"].split(": ", 1)
    hub_row = {**_HELLASWAG_HUB_ROW, "activity_label": label, "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
               "endings": raw["endings"], "label": str(raw["label"])}
    std = _standard_task("qk_hellaswag", [hub_row])
    assert _requests(ours, docs[3505]) == _requests(std, std.eval_docs[0])
    assert ours.doc_to_text(docs[3505]).startswith(
        "Family Life: How to entertain a toddler. Ask the toddler what he or she would like to do instead of doing "
        "what you would like to do.. Visit a site like to find loads of creative activities"
    )
    assert ours.doc_to_target(docs[3505]) == 1


def _vendored_row(relative: str, index: int) -> dict:
    with open(eval_tasks.EVAL_DIR / "data" / relative, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i == index:
                return json.loads(line)
    raise IndexError(index)


# --------------------------------------------------------------------------- names


def test_short_names_map_to_the_offline_tasks() -> None:
    assert eval_tasks.DEFAULT_TASKS == ["wikitext", "hellaswag", "piqa", "winogrande", "lambada"]
    assert eval_tasks.resolve_tasks(eval_tasks.DEFAULT_TASKS) == list(MIRRORS)
    # qk_ names are kept, duplicates dropped, order kept.
    assert eval_tasks.resolve_tasks(["piqa", "qk_lambada", "qk_piqa", "piqa"]) == ["qk_piqa", "qk_lambada"]


def test_standard_lm_eval_tasks_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    # Indexing lm-eval's installed tasks takes seconds: do it once, for both checks. Nothing is downloaded.
    manager = eval_tasks.task_manager()
    assert {"qk_hellaswag", "hellaswag", "arc_easy", "mmlu"} <= set(manager.all_tasks)
    monkeypatch.setattr(eval_tasks, "_standard_task_names", lambda: frozenset(manager.all_tasks))
    assert eval_tasks.resolve_tasks(["arc_easy", "wikitext", "mmlu"]) == ["arc_easy", "qk_wikitext", "mmlu"]


def test_offline_tasks_get_a_task_manager_that_skips_indexing_the_standard_ones() -> None:
    offline = eval_tasks.task_manager_for(["qk_piqa", "qk_wikitext"])
    assert set(MIRRORS) <= set(offline.all_tasks) and "arc_easy" not in offline.all_tasks
    mixed = eval_tasks.task_manager_for(["qk_piqa", "arc_easy"])
    assert {"qk_piqa", "arc_easy"} <= set(mixed.all_tasks)


def test_unknown_task_names_the_available_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eval_tasks, "_standard_task_names", lambda: frozenset({"arc_easy"}))
    with pytest.raises(QuantkitError) as err:
        eval_tasks.resolve_tasks(["piqa", "hellaswagg"])
    message = str(err.value)
    assert "'hellaswagg'" in message
    assert "wikitext, hellaswag, piqa, winogrande, lambada" in message


# --------------------------------------------------------------------------- data checks and hashes


def _copy_eval(tmp_path: Path, data_files: list[str]) -> Path:
    """A copy of eval/tasks and the given eval/data files under tmp_path/eval."""
    root = tmp_path / "eval"
    shutil.copytree(eval_tasks.EVAL_DIR / "tasks", root / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    for rel in data_files:
        (root / "data" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(eval_tasks.EVAL_DIR / "data" / rel, root / "data" / rel)
    return root


def test_check_task_data_passes_on_the_source_tree() -> None:
    eval_tasks.check_task_data()
    eval_tasks.check_task_data(["piqa", "qk_lambada", "arc_easy"])


def test_check_task_data_names_a_missing_file_and_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eval_tasks, "EVAL_DIR", _copy_eval(tmp_path, ["piqa/valid_labeled.jsonl"]))
    eval_tasks.check_task_data(["piqa"])  # only piqa's file is there
    with pytest.raises(QuantkitError) as err:
        eval_tasks.check_task_data()
    message = str(err.value)
    assert str(tmp_path / "eval" / "data" / "wikitext-2-raw" / "wiki.test.raw") in message
    assert "git checkout -- eval/data" in message and "eval/data/README.md" in message


def test_missing_eval_directory_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eval_tasks, "EVAL_DIR", tmp_path / "eval")
    with pytest.raises(QuantkitError, match="pip install -e"):
        eval_tasks.task_manager(include_standard=False)
    with pytest.raises(QuantkitError, match="eval/tasks/ and eval/data/"):
        eval_tasks.task_hashes(["piqa"])


def test_task_hashes_are_stable_and_cover_every_task() -> None:
    first = eval_tasks.task_hashes(eval_tasks.resolve_tasks(eval_tasks.DEFAULT_TASKS))
    assert list(first) == list(MIRRORS)
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in first.values())
    assert len(set(first.values())) == len(first)
    assert eval_tasks.task_hashes(list(MIRRORS)) == first
    # Short names are accepted; lm-eval's standard tasks (hub data) are left out.
    assert eval_tasks.task_hashes(["piqa", "arc_easy"]) == {"qk_piqa": first["qk_piqa"]}


def test_task_hashes_change_with_the_yaml_the_utils_or_the_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = eval_tasks.task_hashes(["piqa"])["qk_piqa"]
    root = _copy_eval(tmp_path, ["piqa/valid_labeled.jsonl"])
    monkeypatch.setattr(eval_tasks, "EVAL_DIR", root)
    assert eval_tasks.task_hashes(["piqa"])["qk_piqa"] == original  # content, not location

    seen = {original}
    for path, edit in (
        (root / "data" / "piqa" / "valid_labeled.jsonl", lambda b: b.replace(b'"label": 0', b'"label": 1', 1)),
        (root / "tasks" / "qk_piqa.yaml", lambda b: b.replace(b"Answer:", b"Answer :")),
        (root / "tasks" / "utils.py", lambda b: b + b"\n# edited\n"),
    ):
        before = path.read_bytes()
        path.write_bytes(edit(before))
        assert path.read_bytes() != before
        changed = eval_tasks.task_hashes(["piqa"])["qk_piqa"]
        assert changed not in seen, path.name
        seen.add(changed)
