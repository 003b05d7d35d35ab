"""The WikiText-2 perplexity protocol used for every accuracy figure in BENCHMARKS.md."""

import math

import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.perplexity import perplexity, wikitext_windows
from quantkit.sources import load_model, load_tokenizer


def test_windows_are_the_first_non_overlapping_slices_of_the_test_set(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    windows = wikitext_windows(tokenizer, window=64, n_windows=3)
    assert windows.shape == (3, 64)
    two = wikitext_windows(tokenizer, window=64, n_windows=2)
    assert torch.equal(two, windows[:2])
    assert torch.equal(windows.flatten()[64:128], windows[1])


def test_perplexity_is_exp_of_the_mean_next_token_loss(tiny_model_dir):
    model = load_model(tiny_model_dir)
    windows = wikitext_windows(load_tokenizer(tiny_model_dir), window=32, n_windows=2)
    result = perplexity(model, windows)
    with torch.no_grad():
        # transformers' own causal-LM loss is the mean NLL of each window's 31 predictions.
        losses = [model(input_ids=w.view(1, -1), labels=w.view(1, -1)).loss.item() for w in windows]
    assert result.perplexity == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    assert result.tokens_scored == 2 * 31 and result.windows == 2


def test_a_missing_test_set_is_a_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(QuantkitError, match="WikiText-2 test file not found"):
        wikitext_windows(load_tokenizer(tiny_model_dir), path=tmp_path / "missing.raw")
