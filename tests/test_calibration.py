"""Calibration data: which texts are accepted and how they become a reproducible token block."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from quantkit.calibration import (
    DEFAULT_CALIBRATION,
    build_calibration_set,
    calibration_sha256,
    load_calibration_texts,
    unread_documents,
)
from quantkit.errors import QuantkitError
from quantkit.sources import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def default_texts() -> list[str]:
    return load_calibration_texts(None)[0]


# --- choosing the text --------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [None, "default", DEFAULT_CALIBRATION, "LAMBADA-DEV"])
def test_default_is_the_bundled_lambada_development_text(spec: str | None) -> None:
    docs, description = load_calibration_texts(spec)
    assert len(docs) == 4869
    assert all(d and d == d.strip() for d in docs)
    assert "LAMBADA" in description and "CC BY 4.0" in description


def test_txt_file_gives_one_document_per_non_empty_line(tmp_path: Path) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("first document\n\n   \nsecond document\n")
    docs, description = load_calibration_texts(str(f))
    assert docs == ["first document", "second document"]
    assert str(f) in description


def test_jsonl_file_reads_the_text_field(tmp_path: Path) -> None:
    f = tmp_path / "docs.jsonl"
    f.write_text(json.dumps({"text": "one", "id": 1}) + "\n\n" + json.dumps({"text": "two", "id": 2}) + "\n")
    assert load_calibration_texts(str(f))[0] == ["one", "two"]


def test_jsonl_field_can_be_chosen_with_a_colon_suffix(tmp_path: Path) -> None:
    f = tmp_path / "qa.jsonl"
    f.write_text(json.dumps({"question": "why?", "text": "ignored"}) + "\n")
    docs, description = load_calibration_texts(f"{f}:question")
    assert docs == ["why?"]
    assert "'question'" in description


def test_jsonl_without_the_field_names_the_fields_it_has(tmp_path: Path) -> None:
    f = tmp_path / "qa.jsonl"
    f.write_text(json.dumps({"question": "why?"}) + "\n")
    with pytest.raises(QuantkitError, match=r"no field 'text'.*question"):
        load_calibration_texts(str(f))


def test_broken_jsonl_line_is_reported_with_its_line_number(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(QuantkitError, match=r"bad\.jsonl:2 is not valid JSON"):
        load_calibration_texts(str(f))


def test_missing_file_is_refused_naming_the_accepted_forms(tmp_path: Path) -> None:
    with pytest.raises(QuantkitError, match="not found") as err:
        load_calibration_texts(str(tmp_path / "absent.txt"))
    assert ".jsonl" in str(err.value) and DEFAULT_CALIBRATION in str(err.value)


def test_unknown_extension_is_refused_listing_what_is_accepted(tmp_path: Path) -> None:
    f = tmp_path / "data.csv"
    f.write_text("a,b\n")
    with pytest.raises(QuantkitError, match="unsupported calibration file type '.csv'") as err:
        load_calibration_texts(str(f))
    assert ".txt" in str(err.value) and ".jsonl" in str(err.value) and "hf:" in str(err.value)


@pytest.mark.parametrize("name, content", [("empty.txt", ""), ("blank.txt", "\n  \n"), ("empty.jsonl", "\n")])
def test_file_without_documents_is_refused(tmp_path: Path, name: str, content: str) -> None:
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(QuantkitError, match="no non-empty"):
        load_calibration_texts(str(f))


@pytest.mark.parametrize("spec", ["hf:only-a-name", "hf:a:b", "hf:a:b:c:d:e", "hf:a::split:col"])
def test_malformed_hf_spec_shows_the_expected_format(spec: str) -> None:
    with pytest.raises(QuantkitError, match=r"hf:NAME\[:CONFIG\]:SPLIT:COLUMN"):
        load_calibration_texts(spec)


def test_hf_spec_without_datasets_installed_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(QuantkitError, match="pip install datasets"):
        load_calibration_texts("hf:wikitext:wikitext-2-raw-v1:train[:100]:text")


# --- building the token block -------------------------------------------------------------------


def test_block_has_the_requested_shape_and_dtype(default_texts: list[str], tokenizer) -> None:
    ids = build_calibration_set(default_texts, tokenizer, n_samples=4, seqlen=32)
    assert ids.shape == (4, 32) and ids.dtype == torch.long


def test_same_seed_gives_the_same_block_and_another_seed_a_different_one(default_texts, tokenizer) -> None:
    a = build_calibration_set(default_texts, tokenizer, n_samples=8, seqlen=64, seed=0)
    b = build_calibration_set(default_texts, tokenizer, n_samples=8, seqlen=64, seed=0)
    c = build_calibration_set(default_texts, tokenizer, n_samples=8, seqlen=64, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert calibration_sha256(a) == calibration_sha256(b) != calibration_sha256(c)


def test_documents_are_joined_by_eos_without_other_special_tokens(tokenizer) -> None:
    texts = ["alpha beta", "gamma delta"]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    ids = build_calibration_set(texts, tokenizer, n_samples=1, seqlen=sum(lengths) + 1)[0].tolist()
    eos_at = ids.index(tokenizer.eos_token_id)
    assert {tokenizer.decode(ids[:eos_at]), tokenizer.decode(ids[eos_at + 1 :])} == set(texts)


def test_only_as_many_documents_as_needed_are_tokenized(default_texts: list[str], tokenizer) -> None:
    calls: list[int] = []

    def counting_tokenizer(batch, **kwargs):
        calls.append(len(batch))
        return tokenizer(batch, **kwargs)

    counting_tokenizer.eos_token_id = tokenizer.eos_token_id
    build_calibration_set(default_texts, counting_tokenizer, n_samples=2, seqlen=64)
    assert sum(calls) < len(default_texts) // 10


def test_too_little_text_reports_tokens_available_and_needed(tokenizer) -> None:
    available = len(tokenizer("a short text", add_special_tokens=False)["input_ids"])
    with pytest.raises(QuantkitError) as err:
        build_calibration_set(["a short text"], tokenizer, n_samples=2, seqlen=100)
    message = str(err.value)
    assert f"has {available} tokens" in message and "need 200" in message
    assert "--samples" in message and "--seqlen" in message


@pytest.mark.parametrize("n_samples, seqlen", [(0, 16), (4, 0), (-1, 16)])
def test_non_positive_sizes_are_refused(default_texts, tokenizer, n_samples: int, seqlen: int) -> None:
    with pytest.raises(QuantkitError, match="at least 1"):
        build_calibration_set(default_texts, tokenizer, n_samples=n_samples, seqlen=seqlen)


def test_calibration_hash_covers_shape_as_well_as_ids() -> None:
    ids = torch.arange(12, dtype=torch.long)
    assert calibration_sha256(ids.view(3, 4)) != calibration_sha256(ids.view(4, 3))
    assert calibration_sha256(ids.view(3, 4)) == calibration_sha256(ids.view(3, 4).to(torch.int32))


def test_unread_documents_are_the_shuffled_rest_after_what_the_calibration_set_reads(tokenizer, default_texts) -> None:
    unread = unread_documents(default_texts, tokenizer, n_samples=4, seqlen=64, seed=0)
    assert 0 < len(unread) < len(default_texts)
    ids = build_calibration_set(default_texts, tokenizer, n_samples=4, seqlen=64, seed=0)
    calibration_text = tokenizer.decode(ids.flatten().tolist())
    assert not [doc for doc in unread if doc[:60] in calibration_text]
    # and the rest is what it reads: every document but the last one read (which may be cut short) is in it
    read = [doc for doc in default_texts if doc not in set(unread)]
    assert len(read) + len(unread) == len(default_texts)
    assert sum(doc[:60] in calibration_text for doc in read) >= len(read) - 1
