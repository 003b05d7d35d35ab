"""quantkit's offline lm-eval tasks: names, the TaskManager that finds them, data checks and hashes.

The tasks are lm-eval 0.4.13's standard ``wikitext``, ``hellaswag``, ``piqa``, ``winogrande`` and
``lambada_standard`` with the same prompts, preprocessing, output types and metrics, reading the
vendored files in ``eval/data/`` instead of the Hugging Face hub. They are named ``qk_*`` so they
never collide with lm-eval's own. Their definitions live in ``eval/tasks/`` of the source tree: one
YAML per task plus ``utils.py``, whose ``custom_dataset`` loaders resolve the YAMLs' relative
``data_files`` against ``eval/data/`` next to them, so no absolute path is written anywhere
(see ``eval/tasks/README.md``). Run them with::

    from lm_eval import simple_evaluate
    tasks = resolve_tasks(DEFAULT_TASKS)
    simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager_for(tasks))
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import QuantkitError

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

# eval/ of the source tree (editable or source install): <repo>/quantkit/eval_tasks.py -> <repo>/eval.
EVAL_DIR: Path = Path(__file__).resolve().parents[1] / "eval"

QUANTKIT_TASKS: dict[str, str] = {
    "wikitext": "qk_wikitext",
    "hellaswag": "qk_hellaswag",
    "piqa": "qk_piqa",
    "winogrande": "qk_winogrande",
    "lambada": "qk_lambada",
}
"""Short names users type -> the offline task names in eval/tasks/."""

DEFAULT_TASKS: list[str] = list(QUANTKIT_TASKS)
"""All five short names; ``resolve_tasks(DEFAULT_TASKS)`` gives the ``qk_*`` names."""

_HASH_FORMAT = "quantkit-eval-task-v1"


def _eval_dir() -> Path:
    tasks, data = EVAL_DIR / "tasks", EVAL_DIR / "data"
    if not tasks.is_dir() or not data.is_dir():
        raise QuantkitError(
            f"quantkit's evaluation tasks and data were not found at {EVAL_DIR} (expected eval/tasks/ and "
            "eval/data/). They ship in the quantkit source tree, not in a wheel: install quantkit from a "
            "checkout with `pip install -e .` and run from there."
        )
    return EVAL_DIR


def tasks_dir() -> Path:
    """The directory holding the ``qk_*`` task YAMLs (an lm-eval ``include_path``)."""
    return _eval_dir() / "tasks"


def task_manager(include_standard: bool = True) -> TaskManager:
    """An lm-eval TaskManager that knows the ``qk_*`` tasks.

    With ``include_standard`` (the default) it also indexes lm-eval's standard tasks, for users
    who are online; indexing them takes a few seconds. ``include_standard=False`` is quicker and
    knows only the ``qk_*`` tasks.
    """
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tasks_dir()), include_defaults=include_standard)


def task_manager_for(tasks: list[str]) -> TaskManager:
    """The quickest TaskManager that knows `tasks` (lm-eval task names, as resolve_tasks gives them).

    lm-eval's ~14,000 standard task YAMLs are indexed only when one of `tasks` is not a ``qk_*``
    task: that indexing took 4-5 s of every offline evaluation call.
    """
    return task_manager(include_standard=any(_qk_name(t) is None for t in tasks))


@lru_cache(maxsize=1)
def _standard_task_names() -> frozenset[str]:
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager().all_tasks)


def resolve_tasks(names: list[str]) -> list[str]:
    """Map the names a user typed to lm-eval task names, in order, without duplicates.

    Short names (``wikitext``, ``hellaswag``, ``piqa``, ``winogrande``, ``lambada``) become the offline
    ``qk_*`` tasks, and ``qk_*`` names are kept. Any other name that is one of lm-eval's standard
    tasks, groups or tags (e.g. ``arc_easy``) passes through unchanged: those download their data
    from the Hugging Face hub, so they need the network. Anything else raises QuantkitError.
    """
    resolved: list[str] = []
    for name in names:
        if name in QUANTKIT_TASKS:
            task = QUANTKIT_TASKS[name]
        elif name in QUANTKIT_TASKS.values() or name in _standard_task_names():
            task = name
        else:
            raise QuantkitError(
                f"unknown evaluation task {name!r}; the offline tasks are {', '.join(QUANTKIT_TASKS)} "
                "(any lm-eval task name also works when the Hugging Face hub is reachable)."
            )
        if task not in resolved:
            resolved.append(task)
    return resolved


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads a task YAML without importing anything: ``!function x.y`` stays the string ``x.y``."""


_TaskYamlLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _qk_name(task: str) -> str | None:
    return QUANTKIT_TASKS.get(task, task if task in QUANTKIT_TASKS.values() else None)


def _task_yaml(task: str) -> Path:
    return tasks_dir() / f"{task}.yaml"


def _data_files(task: str) -> list[Path]:
    """The vendored files a ``qk_*`` task reads: its YAML's ``dataset_kwargs.data_files``, under eval/data/."""
    config: dict[str, Any] = yaml.load(_task_yaml(task).read_text(encoding="utf-8"), Loader=_TaskYamlLoader)
    data_files: dict[str, str] = (config.get("dataset_kwargs") or {}).get("data_files") or {}
    return [_eval_dir() / "data" / rel for rel in sorted(set(data_files.values()))]


def check_task_data(tasks: list[str] | None = None) -> None:
    """Raise QuantkitError if a vendored file of the given tasks (default: all ``qk_*`` tasks) is missing.

    Names that are not quantkit tasks (lm-eval's standard ones) are skipped.
    """
    names = [QUANTKIT_TASKS[t] for t in DEFAULT_TASKS] if tasks is None else tasks
    for task in names:
        qk = _qk_name(task)
        if qk is None:
            continue
        yaml_path = _task_yaml(qk)
        if not yaml_path.is_file():
            raise QuantkitError(
                f"the definition of evaluation task {qk} is missing: {yaml_path}. Restore eval/tasks/ of the "
                "quantkit source tree with `git checkout -- eval/tasks`."
            )
        for path in _data_files(qk):
            if not path.is_file():
                raise QuantkitError(
                    f"vendored evaluation data missing for {qk}: {path}. The files live in eval/data/ of the "
                    "quantkit source tree: restore them with `git checkout -- eval/data` in your checkout, then "
                    "verify with `cd eval/data && sha256sum -c SHA256SUMS` (see eval/data/README.md)."
                )


def task_hashes(tasks: list[str]) -> dict[str, str]:
    """sha256 of each quantkit task's full definition, keyed by its ``qk_*`` name.

    The hash covers the task YAML, ``eval/tasks/utils.py`` and every data file the task reads, so
    a report that records it pins exactly what was evaluated. Short and ``qk_*`` names are accepted;
    lm-eval's standard tasks (data from the hub) are left out. Raises QuantkitError if a file is missing.
    """
    from .artifact import file_sha256  # the artifact's file hash; imported here: it loads torch

    check_task_data(tasks)
    utils_sha = file_sha256(tasks_dir() / "utils.py")
    data_dir = _eval_dir() / "data"
    hashes: dict[str, str] = {}
    for task in tasks:
        qk = _qk_name(task)
        if qk is None:
            continue
        lines = [_HASH_FORMAT, f"yaml {qk}.yaml {file_sha256(_task_yaml(qk))}", f"utils utils.py {utils_sha}"]
        lines += [f"data {path.relative_to(data_dir).as_posix()} {file_sha256(path)}" for path in _data_files(qk)]
        hashes[qk] = hashlib.sha256(("\n".join(lines) + "\n").encode()).hexdigest()
    return hashes
