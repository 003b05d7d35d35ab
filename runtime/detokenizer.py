"""A sequence's output text, decoded a few tokens at a time (as vLLM's incremental detokenizer).

Decoding the whole output on every step costs time in its length, so a long generation spends
a quadratic total on text. Here each step decodes a short window instead: the tokens from
`prefix` (where the last committed text began) to the end, against the same window without the
new tokens; what the longer one adds is the new text. Decoding a window rather than the new
tokens alone keeps what a token's text depends on its neighbours (SentencePiece's leading space,
a character whose UTF-8 bytes span tokens).

The new text is committed only when it does not end in U+FFFD, the mark of a character whose
bytes are not all generated yet; until then it is `pending` (shown at the end of the text, never
read for stop strings, and kept as it is if the sequence finishes there, as a full decode would).
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []  # the output tokens given so far
        self.text = ""  # the committed text: what a decode of ids[:read] gives
        self.prefix = 0  # ids[prefix:read] decode to the end of the committed text
        self.read = 0  # ids before this are committed
        self.pending = ""  # text of ids[read:] not committed yet (ends in U+FFFD)

    def add(self, token_ids: list[int]) -> str:
        """Take the next output tokens; return the text they commit (possibly empty)."""
        self.ids.extend(token_ids)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = decode(self.ids[self.prefix :], skip_special_tokens=True)
        new = after[len(before):]  # `after` extends `before`: tests/test_detokenizer.py checks it against whole decodes
        if new.endswith("\ufffd"):
            self.pending = new
            return ""
        self.prefix, self.read, self.pending = self.read, len(self.ids), ""
        self.text += new
        return new

    @property
    def full_text(self) -> str:
        """What a decode of every token given so far gives: the committed text and the pending tail."""
        return self.text + self.pending
