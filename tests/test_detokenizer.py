"""The engine's incremental detokenizer: after every token, the same text as decoding the whole
output, at a cost per step that does not grow with the output's length."""

from __future__ import annotations

import pytest
import torch

from quantkit.runtime.detokenizer import IncrementalDetokenizer
from quantkit.sources import load_tokenizer


@pytest.fixture(scope="module", params=["smollm2", "tiny"])
def tokenizer(request, smollm2_dir, tiny_model_dir):
    return load_tokenizer(smollm2_dir if request.param == "smollm2" else tiny_model_dir)


def whole(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def token_streams(tokenizer, seed: int) -> list[list[int]]:
    """Real text (spaces, punctuation, accents, an emoji split over byte tokens, digits), random
    token ids (invalid UTF-8 in the middle, special tokens), and both mixed."""
    text = "Héllo, wörld! It's 3.14 — naïve café 🤖🎉 日本語のテキスト.\n  Indented  line\twith tabs; done."
    real = tokenizer.encode(text, add_special_tokens=False)
    gen = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    random_ids = torch.randint(0, vocab, (300,), generator=gen).tolist()
    special = [t for t in (tokenizer.eos_token_id, tokenizer.bos_token_id) if t is not None]
    mixed = real[:10] + random_ids[:20] + special + real[10:] + special + random_ids[20:40]
    return [real, random_ids, mixed]


@pytest.mark.parametrize("seed", [0, 1])
def test_after_every_token_the_text_is_what_decoding_the_whole_output_gives(tokenizer, seed):
    for ids in token_streams(tokenizer, seed):
        detok = IncrementalDetokenizer(tokenizer)
        for n, token in enumerate(ids, start=1):
            committed = detok.add([token])
            assert detok.full_text == whole(tokenizer, ids[:n]), (n, ids[:n])
            assert not detok.text.endswith("\ufffd")  # a partial character is pending, never committed
            assert detok.text.endswith(committed)


def test_a_character_split_over_byte_tokens_is_pending_until_its_last_byte(smollm2_dir):
    tokenizer = load_tokenizer(smollm2_dir)
    ids = tokenizer.encode("🤖", add_special_tokens=False)
    assert len(ids) > 1, "the emoji must span several byte tokens for this test to mean anything"
    detok = IncrementalDetokenizer(tokenizer)
    for token in ids[:-1]:
        assert detok.add([token]) == "" and detok.pending.endswith("\ufffd") and detok.text == ""
    assert detok.add([ids[-1]]) == "🤖" and detok.pending == ""


def test_a_4000_token_output_decodes_a_few_tokens_a_step_not_the_whole_output(smollm2_dir):
    """vLLM's incremental detokenizer's promise: per-step work constant in the output length."""
    tokenizer = load_tokenizer(smollm2_dir)
    from quantkit.calibration import load_calibration_texts

    texts, _ = load_calibration_texts(None)  # the bundled LAMBADA development passages
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(" " + text, add_special_tokens=False)
        if len(ids) >= 4000:
            break
    ids = ids[:4000]
    decoded_lengths: list[int] = []
    original = tokenizer.decode

    class Counting:
        def decode(self, token_ids, **kwargs):
            decoded_lengths.append(len(token_ids))
            return original(token_ids, **kwargs)

    detok = IncrementalDetokenizer(Counting())
    for token in ids:
        detok.add([token])
    assert detok.full_text == whole(tokenizer, ids)
    # two short windows a step (the committed tail and it plus the new tokens), whatever the length
    assert len(decoded_lengths) == 2 * len(ids)
    assert max(decoded_lengths) <= 8, max(decoded_lengths)
