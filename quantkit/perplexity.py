"""The perplexity protocol of the AWQ/GPTQ papers, on the vendored WikiText-2 raw test set.

Protocol: the whole test file is tokenized as one string (no special tokens), cut into
non-overlapping windows of `window` tokens (2048), and the first `n_windows` windows are
scored; perplexity = exp(mean next-token negative log-likelihood over every predicted token,
window by window, each window starting with an empty context). Computed in fp32.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import QuantkitError

WIKITEXT_FILE = Path(__file__).resolve().parent.parent / "eval" / "data" / "wikitext-2-raw" / "wiki.test.raw"


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    windows: int
    window: int
    tokens_scored: int
    seconds: float


def wikitext_windows(tokenizer, window: int = 2048, n_windows: int | None = 16, path: Path = WIKITEXT_FILE) -> torch.Tensor:
    """LongTensor [n_windows, window] of the test set's first windows."""
    if not path.is_file():
        raise QuantkitError(f"WikiText-2 test file not found at {path}; it ships in eval/data of the source tree.")
    # verbose=False: the whole test set is longer than the model's context on purpose (it is cut below).
    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False, return_tensors="pt", verbose=False).input_ids[0]
    available = len(ids) // window
    n = available if n_windows is None else min(n_windows, available)
    if n < 1:
        raise QuantkitError(f"{path} has {len(ids)} tokens, fewer than one {window}-token window.")
    return ids[: n * window].view(n, window)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> PerplexityResult:
    """exp(mean NLL) of `model` (a causal LM returning .logits) over the windows, one at a time."""
    start = time.perf_counter()
    total_nll, count = 0.0, 0
    for row in windows:
        logits = model(input_ids=row.view(1, -1)).logits[0, :-1].float()
        total_nll += float(torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum"))
        count += len(row) - 1
    return PerplexityResult(
        perplexity=math.exp(total_nll / count),
        windows=len(windows),
        window=windows.shape[1],
        tokens_scored=count,
        seconds=time.perf_counter() - start,
    )
