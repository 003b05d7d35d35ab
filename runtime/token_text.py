"""Token ids as the text and bytes a client sees in logprobs.

A vocabulary entry is a spelling, not text: byte-level BPE (GPT-2, Llama 3, SmolLM2) writes each
byte as one printable character ("Ġ" is the space byte), SentencePiece (Llama 2, Mistral) marks
a space as "▁" and writes a byte it has no piece for as "<0x0A>". TokenText undoes the spelling:
each token's true bytes and, as its text, those bytes decoded as UTF-8 with errors="replace". So a
token that holds only part of a character ("✓" is three byte-level tokens) has text "\ufffd", as
in vLLM's output, and its true bytes, which join with its neighbours' into the character (OpenAI's
reason for the `bytes` field). Added and special tokens ("</s>", "<|im_end|>") are their content.
A tokenizer of neither kind falls back to decoding each token alone (its bytes those of the text).
"""

from __future__ import annotations

import json
import re

BYTE_LEVEL, SENTENCEPIECE, DECODE = "byte-level", "sentencepiece", "decode"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def byte_level_alphabet() -> dict[str, int]:
    """Character -> byte of the byte-level alphabet: the 188 bytes that print as themselves keep
    their character, the other 68 (controls, space, ...) take U+0100 onwards in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in chars)
    chars.update((b, chr(256 + i)) for i, b in enumerate(shifted))
    return {c: b for b, c in chars.items()}


def spelling(tokenizer) -> str:
    """How the tokenizer spells bytes in its vocabulary, read from its decoder."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow tokenizer: SentencePiece's own model, or something else
        return SENTENCEPIECE if hasattr(tokenizer, "sp_model") else DECODE
    decoder = json.loads(backend.decoder.__getstate__()) if backend.decoder is not None else {}
    steps = decoder.get("decoders") or [decoder]  # a Sequence, or one decoder
    kinds = {step.get("type") for step in steps}
    if "ByteLevel" in kinds:
        return BYTE_LEVEL
    if kinds & {"ByteFallback", "Metaspace"} or any(step.get("pattern", {}).get("String") == "▁" for step in steps):
        return SENTENCEPIECE
    return DECODE


class TokenText:
    """token id -> (text, bytes), computed once per id."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.spelling = spelling(tokenizer)
        self._alphabet = byte_level_alphabet() if self.spelling == BYTE_LEVEL else {}
        self._added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        found = self._cache.get(token_id)
        if found is None:
            raw = self._bytes(token_id)
            found = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), raw)
        return found

    def text(self, token_id: int) -> str:
        return self(token_id)[0]

    def _bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode()
        if self.spelling == DECODE:
            return self.tokenizer.decode([token_id]).encode()
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if self.spelling == BYTE_LEVEL:
            return b"".join(bytes([self._alphabet[c]]) if c in self._alphabet else c.encode() for c in piece)
        byte = _BYTE_PIECE.fullmatch(piece)
        return bytes([int(byte.group(1), 16)]) if byte else piece.replace("▁", " ").encode()
