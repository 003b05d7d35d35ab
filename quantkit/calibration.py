"""Calibration data: which text AWQ looks at, turned into a fixed, reproducible block of token ids."""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import random
from pathlib import Path
from typing import Iterator

import torch

from quantkit.errors import QuantkitError

DEFAULT_CALIBRATION = "lambada-dev"
_DEFAULT_ALIASES = frozenset({"default", DEFAULT_CALIBRATION})
_BUNDLED_FILE = "lambada_development_plain_text.txt"
_BUNDLED_DESCRIPTION = "lambada-dev: LAMBADA development passages (Paperno et al. 2016, CC BY 4.0), bundled"
_HF_FORMAT = "hf:NAME[:CONFIG]:SPLIT:COLUMN"
_ACCEPTED = (
    f"a .txt file (one document per line), a .jsonl file (field 'text', or path.jsonl:FIELD), "
    f"'{_HF_FORMAT}', or '{DEFAULT_CALIBRATION}' (the bundled default)"
)
# Documents are tokenized in batches (fast tokenizers parallelise a batch) until enough tokens exist.
_TOKENIZE_BATCH = 64


def load_calibration_texts(spec: str | None) -> tuple[list[str], str]:
    """Return (documents, description) for a calibration spec; see _ACCEPTED for the forms."""
    if spec is None or str(spec).strip().lower() in _DEFAULT_ALIASES:
        docs = _read_txt_lines(_bundled_text(), DEFAULT_CALIBRATION)
        return docs, f"{_BUNDLED_DESCRIPTION}, {len(docs)} documents"
    spec = str(spec)
    if spec.startswith("hf:"):
        return _load_hf_dataset(spec)
    path, field = _split_path_and_field(spec)
    if not path.exists():
        raise QuantkitError(f"calibration file not found: {path}. Pass {_ACCEPTED}.")
    if not path.is_file():
        raise QuantkitError(f"calibration path is not a file: {path}. Pass {_ACCEPTED}.")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        docs, desc = _read_txt_lines(_read_text(path), str(path)), f"{path} (txt, one document per line)"
    elif suffix == ".jsonl":
        field = field or "text"
        docs, desc = _read_jsonl_field(path, field), f"{path} (jsonl field {field!r})"
    else:
        raise QuantkitError(f"unsupported calibration file type {suffix or '(none)'!r}: {path}. Pass {_ACCEPTED}.")
    return docs, f"{desc}, {len(docs)} documents"


def build_calibration_set(
    texts: list[str], tokenizer, n_samples: int = 128, seqlen: int = 512, seed: int = 0
) -> torch.Tensor:
    """A LongTensor [n_samples, seqlen] cut from shuffled, eos-joined documents; deterministic per seed.

    Samples may span document boundaries: AWQ only needs representative activations, and packing
    wastes no text.
    """
    if n_samples < 1 or seqlen < 1:
        raise QuantkitError(
            f"calibration needs at least 1 sample of at least 1 token, got samples={n_samples}, "
            f"seqlen={seqlen}. Pass positive --samples and --seqlen."
        )
    if not texts:
        raise QuantkitError(f"no calibration documents were given. Pass {_ACCEPTED}.")
    needed = n_samples * seqlen
    ids, _ = _collect_tokens(_shuffled(texts, seed), tokenizer, needed)
    if len(ids) < needed:
        raise QuantkitError(
            f"calibration text has {len(ids)} tokens but {n_samples} samples x {seqlen} tokens need "
            f"{needed}. Pass fewer --samples, a shorter --seqlen, or more calibration text."
        )
    return torch.tensor(ids[:needed], dtype=torch.long).view(n_samples, seqlen)


def unread_documents(texts: list[str], tokenizer, n_samples: int = 128, seqlen: int = 512, seed: int = 0) -> list[str]:
    """The documents a calibration set built with these settings never reads, in its shuffled order:
    text for checking a quantization on something it was not fitted to."""
    docs = _shuffled(texts, seed)
    _, read = _collect_tokens(docs, tokenizer, n_samples * seqlen)
    return docs[read:]


def calibration_sha256(ids: torch.Tensor) -> str:
    """sha256 over the shape and the little-endian int64 token ids, so a manifest pins the exact set."""
    data = ids.detach().to(device="cpu", dtype=torch.int64).contiguous().numpy().astype("<i8", copy=False)
    h = hashlib.sha256()
    h.update(("shape=" + "x".join(str(d) for d in ids.shape) + ";").encode())
    h.update(data.tobytes())
    return h.hexdigest()


# --- building ----------------------------------------------------------------------------------


def _shuffled(texts: list[str], seed: int) -> list[str]:
    order = list(texts)
    random.Random(seed).shuffle(order)
    return order


def _collect_tokens(docs: list[str], tokenizer, needed: int) -> tuple[list[int], int]:
    """Token ids of docs concatenated (eos between documents when the tokenizer has one) until
    `needed`, and how many documents that read."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    read = 0
    for doc_ids in _tokenize_lazily(docs, tokenizer):
        if ids and eos is not None:
            ids.append(eos)
        ids.extend(doc_ids)
        read += 1
        if len(ids) >= needed:
            break
    return ids, read


def _tokenize_lazily(docs: list[str], tokenizer) -> Iterator[list[int]]:
    for start in range(0, len(docs), _TOKENIZE_BATCH):
        batch = docs[start : start + _TOKENIZE_BATCH]
        # verbose=False: long documents are fine here; we cut them ourselves, so the length warning is noise.
        yield from tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]


# --- reading -----------------------------------------------------------------------------------


def _bundled_text() -> str:
    return (importlib.resources.files("quantkit") / "data" / _BUNDLED_FILE).read_text(encoding="utf-8")


def _split_path_and_field(spec: str) -> tuple[Path, str | None]:
    """'x.jsonl:field' -> (x.jsonl, 'field'); an existing path wins, so 'C:\\x.txt' stays whole."""
    path = Path(spec).expanduser()
    if path.exists() or ":" not in spec:
        return path, None
    head, field = spec.rsplit(":", 1)
    if head.lower().endswith(".jsonl") and field:
        return Path(head).expanduser(), field
    return path, None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise QuantkitError(f"calibration file is not UTF-8 text: {path} ({exc}). Re-encode it as UTF-8.") from exc


def _read_txt_lines(text: str, origin: str) -> list[str]:
    docs = [line.strip() for line in text.splitlines() if line.strip()]
    if not docs:
        raise QuantkitError(f"calibration text {origin} has no non-empty lines. Pass a file with one document per line.")
    return docs


def _read_jsonl_field(path: Path, field: str) -> list[str]:
    docs: list[str] = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QuantkitError(f"{path}:{lineno} is not valid JSON ({exc.msg}). Fix the line or remove it.") from exc
        if not isinstance(row, dict) or field not in row:
            keys = sorted(row) if isinstance(row, dict) else []
            raise QuantkitError(
                f"{path}:{lineno} has no field {field!r} (fields: {keys}). Choose the field with {path}:FIELD."
            )
        value = row[field]
        if not isinstance(value, str):
            raise QuantkitError(
                f"{path}:{lineno} field {field!r} is {type(value).__name__}, not text. Choose a text field with {path}:FIELD."
            )
        if value.strip():
            docs.append(value)
    if not docs:
        raise QuantkitError(f"calibration file {path} has no non-empty {field!r} values. Pass a file with text in it.")
    return docs


def _split_hf_spec(body: str) -> list[str]:
    """Split on ':' except inside [...], so split slices like 'train[:1000]' survive."""
    parts, depth, current = [], 0, []
    for ch in body:
        depth += ch == "["
        depth -= ch == "]"
        if ch == ":" and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _load_hf_dataset(spec: str) -> tuple[list[str], str]:
    parts = _split_hf_spec(spec[len("hf:") :])
    if len(parts) not in (3, 4) or not all(parts):
        raise QuantkitError(
            f"cannot parse calibration spec {spec!r}. Use {_HF_FORMAT}, e.g. hf:wikitext:wikitext-2-raw-v1:train:text."
        )
    name, config, split, column = parts if len(parts) == 4 else (parts[0], None, parts[1], parts[2])
    try:
        import datasets
    except ImportError as exc:
        raise QuantkitError(
            "hf: calibration specs need the optional 'datasets' package. Run: pip install datasets "
            "(or pip install 'quantkit[datasets]'), or pass a local .txt/.jsonl file."
        ) from exc
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # offline, unknown name, bad split: datasets raises many types
        raise QuantkitError(
            f"could not load dataset {name!r} (config {config!r}, split {split!r}): "
            f"{type(exc).__name__}: {exc}. Check the name/config/split, or, offline, pass a local "
            f".txt/.jsonl file or '{DEFAULT_CALIBRATION}'."
        ) from exc
    if column not in ds.column_names:
        raise QuantkitError(
            f"dataset {name!r} has no column {column!r} (columns: {ds.column_names}). Use {_HF_FORMAT}."
        )
    docs = [t for t in ds[column] if isinstance(t, str) and t.strip()]
    if not docs:
        raise QuantkitError(f"dataset {name!r} column {column!r} has no text. Choose a text column.")
    return docs, f"hf:{name}{':' + config if config else ''}:{split}:{column}, {len(docs)} documents"
