"""Token ids as text with their true bytes: byte-level BPE, SentencePiece with byte fallback, added tokens."""

from __future__ import annotations

import random

import pytest

from quantkit.runtime.token_text import BYTE_LEVEL, DECODE, SENTENCEPIECE, TokenText, byte_level_alphabet

TEXT = " Paris café ✓ 日本\n\tx  end"


def test_the_byte_level_alphabet_spells_every_byte_once():
    alphabet = byte_level_alphabet()
    assert sorted(alphabet.values()) == list(range(256))
    assert alphabet["Ġ"] == ord(" ") and alphabet["Ċ"] == ord("\n") and alphabet["A"] == ord("A") and alphabet["é"] == 0xE9


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    from quantkit.sources import load_tokenizer

    return load_tokenizer(smollm2_dir)


def test_byte_level_tokens_are_text_and_partial_characters_keep_their_true_bytes(smollm2_tokenizer):
    tt = TokenText(smollm2_tokenizer)
    assert tt.spelling == BYTE_LEVEL
    ids = smollm2_tokenizer.encode(TEXT)
    pieces = [tt(i) for i in ids]
    assert pieces[0] == (" Paris", b" Paris")  # not "ĠParis"
    assert b"".join(raw for _, raw in pieces).decode() == TEXT
    partial = [(text, raw) for text, raw in pieces if "\ufffd" in text]  # ✓ and 日 span several tokens
    assert partial and all(raw.decode("utf-8", errors="replace") == text for text, raw in partial)
    im_end = smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tt(im_end) == ("<|im_end|>", b"<|im_end|>")


def test_byte_level_bytes_of_any_ids_decode_as_the_tokenizer_decodes(smollm2_tokenizer):
    tt, rng = TokenText(smollm2_tokenizer), random.Random(0)
    for _ in range(100):
        ids = [rng.randrange(len(smollm2_tokenizer)) for _ in range(12)]
        assert b"".join(tt(i)[1] for i in ids).decode("utf-8", errors="replace") == smollm2_tokenizer.decode(ids)


def sentencepiece_tokenizer():
    """A Llama-2-style tokenizer: '▁' for spaces, <0xXX> pieces for bytes without a piece of their own."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = [("<unk>", 0.0), *[(f"<0x{b:02X}>", -10.0) for b in range(256)], ("▁Paris", -1.0), ("▁", -2.0),
              *[(c, -3.0) for c in "Parisécafx日"]]
    tok = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_sentencepiece_spaces_and_byte_fallback_pieces_are_their_bytes():
    tokenizer = sentencepiece_tokenizer()
    tt = TokenText(tokenizer)
    assert tt.spelling == SENTENCEPIECE
    ids = tokenizer.encode("Paris café ✓", add_special_tokens=False)
    pieces = [tt(i) for i in ids]
    assert pieces[0] == (" Paris", b" Paris")
    assert ("\ufffd", b"\xe2") in pieces  # ✓ is three <0x..> pieces
    assert b"".join(raw for _, raw in pieces).decode() == " Paris café ✓"  # the decoder strips the first space only
    assert tokenizer.decode(ids) == "Paris café ✓"


def test_a_tokenizer_of_another_kind_decodes_each_token_alone():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tt = TokenText(PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]"))
    assert tt.spelling == DECODE and tt(2) == ("world", b"world")
