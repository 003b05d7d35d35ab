"""Loaders and preprocessing for quantkit's offline copies of lm-eval's standard tasks.

The task YAMLs beside this file name their data with paths relative to ``eval/data/``
(``dataset_kwargs: {data_files: {split: path}}``); lm-eval calls the ``custom_dataset``
loaders below with those keyword arguments, and they resolve the paths against the data
directory next to this file, so the YAMLs hold no machine-specific path and work from any
working directory (``TaskManager(include_path="eval/tasks")`` or ``lm_eval --include_path``).

Everything that shapes a prompt is copied from lm-eval 0.4.13's own task code (named at
each function) so that the numbers are comparable with the standard tasks; the only new
logic adapts the vendored file formats to the fields those functions expect.
This module is standalone on purpose: it imports nothing from quantkit.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import datasets

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def _data_path(relative: str) -> Path:
    path = DATA_DIR / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"quantkit evaluation data file missing: {path}. The vendored files live in eval/data/ of "
            "the quantkit source tree; restore them with `git checkout -- eval/data` and verify with "
            "`cd eval/data && sha256sum -c SHA256SUMS` (see eval/data/README.md)."
        )
    return path


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_jsonl(data_files: dict[str, str], **_metadata: Any) -> datasets.DatasetDict:
    """``custom_dataset`` for the JSON-lines files: one split per ``data_files`` entry, rows as stored.

    lm-eval passes the task's metadata as keyword arguments too; they are ignored.
    """
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_list(_read_jsonl(_data_path(rel))) for split, rel in data_files.items()}
    )


# --------------------------------------------------------------------------- wikitext


def split_wikitext_documents(text: str) -> list[str]:
    """Split WikiText lines into whole articles, exactly as ``EleutherAI/wikitext_document_level`` does.

    That dataset's builder reads the raw file in text mode (so CRLF becomes ``\\n``), splits it
    on ``\\n`` and starts a new page at every top-level heading ``= Title =`` (after folding
    ``= = =`` and ``= =`` so that sub-headings never match); a page is the ``\\n``-join of its
    lines, empty pages are dropped, and the last page is kept as it is (it ends with ``\\n``).
    """
    pages: list[str] = []
    lines: list[str] = []
    for line in text.split("\n"):
        folded = line.replace("= = =", "===").replace("= =", "==").strip()
        if folded.startswith("= ") and folded.endswith(" ="):
            page = "\n".join(lines)
            if page.strip():
                pages.append(page)
            lines = []
        lines.append(line)
    pages.append("\n".join(lines))
    return pages


def load_wikitext_documents(data_files: dict[str, str], **_metadata: Any) -> datasets.DatasetDict:
    """``custom_dataset`` for ``wiki.test.raw``: one ``{"page": article}`` row per article (see above)."""
    out = {}
    for split, rel in data_files.items():
        # Text mode with universal newlines, like the hub dataset's builder: "\r\n" -> "\n".
        with open(_data_path(rel), encoding="utf-8") as f:
            out[split] = datasets.Dataset.from_dict({"page": split_wikitext_documents(f.read())})
    return datasets.DatasetDict(out)


def wikitext_detokenizer(doc: dict[str, Any]) -> str:
    """lm-eval 0.4.13 ``tasks/wikitext/preprocess_wikitext.py::wikitext_detokenizer``, unchanged."""
    string = doc["page"]
    # contractions
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    # number separators
    string = string.replace(" @-@ ", "-")
    string = string.replace(" @,@ ", ",")
    string = string.replace(" @.@ ", ".")
    # punctuation
    string = string.replace(" : ", ": ")
    string = string.replace(" ; ", "; ")
    string = string.replace(" . ", ". ")
    string = string.replace(" ! ", "! ")
    string = string.replace(" ? ", "? ")
    string = string.replace(" , ", ", ")
    # double brackets
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    # miscellaneous
    string = string.replace("= = = =", "====")
    string = string.replace("= = =", "===")
    string = string.replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n")
    string = string.replace("\n ", "\n")
    string = string.replace(" N ", " 1 ")
    string = string.replace(" 's", "'s")
    return string


def wikitext_process_results(doc: dict[str, Any], results: list[float]) -> dict[str, tuple[float, int]]:
    """lm-eval 0.4.13 ``preprocess_wikitext.process_results``: words and bytes of the *original* page."""
    (loglikelihood,) = results
    _words = len(re.split(r"\s+", doc["page"]))
    _bytes = len(doc["page"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, _words),
        "byte_perplexity": (loglikelihood, _bytes),
        "bits_per_byte": (loglikelihood, _bytes),
    }


# --------------------------------------------------------------------------- hellaswag


def hellaswag_preprocess(text: str) -> str:
    """lm-eval 0.4.13 ``tasks/hellaswag/utils.py::preprocess``, unchanged."""
    text = text.strip()
    # NOTE: Brackets are artifacts of the WikiHow dataset portion of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


_BRACKETS = re.compile(r"\[.*?\]")


def _finish_vendored(text: str) -> str:
    """Bring a vendored string to lm-eval's ``preprocess`` output.

    The vendored file already had the WikiHow markup tags (``[header]``, `` [title]`` -> ``. ``,
    ``[step]``, ``[substeps]``) handled the way lm-eval does, but it kept other bracketed spans
    (``[insert name]``, ``[www.kiddio.org]``: 2 queries and 12 endings) that lm-eval's regex
    deletes; those strings get lm-eval's full preprocess again. Strings without a bracketed span
    are left alone, since a second space-collapse would change them where lm-eval's single pass
    does not.
    """
    return hellaswag_preprocess(text) if _BRACKETS.search(text) else text


def hellaswag_query(query: str) -> str:
    """lm-eval's HellaSwag context from the vendored ``query`` (``activity_label + ": " + ctx``).

    lm-eval builds ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``. The
    vendored ``query`` holds the hub's ``ctx`` (``ctx_a + " " + ctx_b``) with ``ctx_b`` as stored,
    lower-case. ``ctx_b`` is non-empty only when the context ends in an incomplete noun phrase
    (ActivityNet examples, per the HellaSwag README): those contexts do not end with ``.`` and
    ``ctx_b`` is the tail after the last ``". "`` (``"... sitting on a roof. he"``), which is
    capitalized here as lm-eval does. Contexts that end with ``.`` (WikiHow) have an empty ``ctx_b``.
    """
    if not query.endswith("."):
        head, sep, tail = query.rpartition(". ")
        if sep:
            query = head + sep + tail.capitalize()
    return _finish_vendored(query)


def hellaswag_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """lm-eval 0.4.13 ``hellaswag/utils.py::process_docs`` fields (``query``, ``choices``, ``gold``) from the vendored rows."""

    def _process_doc(doc: dict[str, Any]) -> dict[str, Any]:
        return {
            "query": hellaswag_query(doc["query"]),
            "choices": [_finish_vendored(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(_process_doc)


# --------------------------------------------------------------------------- winogrande
# lm-eval 0.4.13 ``tasks/winogrande/preprocess_winogrande.py``, unchanged: the "partial
# evaluation" formulation scores the text after the blank given each option's prefix.


def winogrande_doc_to_text(doc: dict[str, Any]) -> int:
    answer_to_num = {"1": 0, "2": 1}
    return answer_to_num[doc["answer"]]


def winogrande_doc_to_target(doc: dict[str, Any]) -> str:
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc: dict[str, Any]) -> list[str]:
    idx = doc["sentence"].index("_")
    options = [doc["option1"], doc["option2"]]
    return [doc["sentence"][:idx] + opt for opt in options]
