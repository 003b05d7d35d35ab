"""Benchmark workloads: a list of (prompt, max_tokens), from a JSONL file or synthesized.

A synthesized workload cuts prompts of the drawn token lengths from bundled WikiText-2 text, so
every run with the same seed and tokenizer sends exactly the same requests to every engine.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from quantkit.errors import QuantkitError

DEFAULT_PROMPT_TOKENS = (32, 512)
DEFAULT_OUTPUT_TOKENS = (32, 256)


@dataclass(frozen=True)
class BenchRequest:
    prompt: str
    max_tokens: int
    prompt_ids: tuple[int, ...] | None = None  # exact tokens when synthesized (offline engines use them)


def load_jsonl(path: Path) -> list[BenchRequest]:
    """One JSON object per line: {"prompt": str, "max_tokens": int}."""
    if not path.is_file():
        raise QuantkitError(f"workload file {path} does not exist; give a JSONL file with one "
                            '{"prompt": ..., "max_tokens": ...} object per line.')
    requests = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise QuantkitError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object.") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"]:
            raise QuantkitError(f'{where}: needs a non-empty string "prompt".')
        max_tokens = item.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise QuantkitError(f'{where}: needs an integer "max_tokens" >= 1 (got {max_tokens!r}).')
        requests.append(BenchRequest(item["prompt"], max_tokens))
    if not requests:
        raise QuantkitError(f"workload file {path} has no requests.")
    return requests


def synthesize(tokenizer, corpus: str, n: int, seed: int,
               prompt_tokens: tuple[int, int] = DEFAULT_PROMPT_TOKENS,
               output_tokens: tuple[int, int] = DEFAULT_OUTPUT_TOKENS) -> list[BenchRequest]:
    """n requests with prompt and output lengths drawn uniformly from the (inclusive) ranges."""
    for name, (low, high) in (("prompt", prompt_tokens), ("output", output_tokens)):
        if not 1 <= low <= high:
            raise QuantkitError(f"{name} token range {low}-{high} is empty; give LOW-HIGH with 1 <= LOW <= HIGH.")
    if n < 1:
        raise QuantkitError(f"a workload needs at least one request (got {n}).")
    ids = tokenizer.encode(corpus, add_special_tokens=False)
    if len(ids) <= prompt_tokens[1]:
        raise QuantkitError(f"the corpus has {len(ids)} tokens, fewer than the longest prompt ({prompt_tokens[1]}).")
    rng = random.Random(seed)
    requests = []
    for _ in range(n):
        length = rng.randint(*prompt_tokens)
        start = rng.randrange(0, len(ids) - length)
        prompt_ids = tuple(ids[start : start + length])
        requests.append(BenchRequest(tokenizer.decode(prompt_ids), rng.randint(*output_tokens), prompt_ids))
    return requests


def bundled_corpus(max_chars: int = 2_000_000) -> str:
    """WikiText-2 raw test text vendored in eval/data (CC BY-SA 3.0)."""
    from quantkit.eval_tasks import EVAL_DIR

    path = EVAL_DIR / "data" / "wikitext-2-raw" / "wiki.test.raw"
    if not path.is_file():
        raise QuantkitError(f"bundled text {path} is missing (it ships in the source tree); pass --workload FILE.jsonl instead.")
    return path.read_text(encoding="utf-8")[:max_chars]


def parse_range(text: str) -> tuple[int, int]:
    """'32-512' -> (32, 512)."""
    low, sep, high = text.partition("-")
    try:
        return (int(low), int(high)) if sep else (int(low), int(low))
    except ValueError:
        raise QuantkitError(f"length range {text!r} is not LOW-HIGH (for example 32-512).") from None
