"""Paged-KV bookkeeping: which cache blocks each sequence owns, shares and frees.

Pure integers: the K/V tensors live in the model runner, which writes token p of a sequence to
slot block_table[p // block_size] * block_size + p % block_size.

Prefix caching: a block that is full of computed tokens is named by a chained hash of (previous
block's hash, its token ids), so equal names mean equal whole prefixes and hence equal K/V. A
later sequence whose leading full blocks have known names shares those blocks (ref count + 1)
instead of recomputing them. A freed named block keeps its name while it sits in the free list
and is a cache hit until the free list hands it out for other use.

Blocks can also be lent to no sequence (allocate_blocks / release_blocks): the scratch K/V of
LLMEngine.score, anonymous, and counted by check_invariants like a sequence's.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence as Seq

from .sequence import Sequence


def block_hash(parent: bytes, tokens: Seq[int]) -> bytes:
    # A cryptographic digest rather than Python's hash(): a collision here would silently serve
    # another prompt's K/V, and 128 bits of blake2b cost about a microsecond per block.
    h = hashlib.blake2b(parent, digest_size=16)
    for t in tokens:
        h.update(t.to_bytes(8, "little", signed=True))
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.hashes: list[bytes | None] = [None] * num_blocks  # name of a registered block
        self.hash_to_block: dict[bytes, int] = {}
        # The free list: handed out from the front. An OrderedDict rather than a deque because a
        # cache hit on a free block must take it out of the middle in O(1).
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        # Blocks lent outside any sequence (allocate_blocks): scoring's scratch K/V.
        self.lent_blocks: set[int] = set()

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self.free_blocks)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        return max(0, seq.num_blocks(self.block_size, seq.num_computed_tokens + num_new_tokens) - len(seq.block_table))

    def reads_prefix_cache(self, seq: Sequence) -> bool:
        """Whether admitting seq looks its prefix up: not while it owes prompt logprobs, whose rows
        it must compute itself (it still names its blocks for later sequences)."""
        return self.enable_prefix_caching and not seq.owes_prompt_logprobs

    def allocate_prompt(self, seq: Sequence) -> int:
        """On admission (first or after preemption): share the longest cached prefix; return its length.

        Only full blocks of token_ids[:-1] may hit: the last token must be computed to get logits.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0, f"allocate_prompt on a sequence that holds blocks: {seq}"
        if self.reads_prefix_cache(seq):
            bs, parent = self.block_size, b""
            for i in range((seq.num_tokens - 1) // bs):
                h = block_hash(parent, seq.token_ids[i * bs : (i + 1) * bs])
                block = self.hash_to_block.get(h)
                if block is None:
                    break
                if self.ref_counts[block] == 0:
                    del self.free_blocks[block]
                self.ref_counts[block] += 1
                seq.block_table.append(block)
                seq.block_hashes.append(h)
                parent = h
        seq.num_computed_tokens = seq.num_cached_tokens = len(seq.block_table) * self.block_size
        return seq.num_cached_tokens

    def ensure_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow the table to hold num_computed_tokens + num_new_tokens tokens; False (and no change) if short."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > len(self.free_blocks):
            return False
        seq.block_table.extend(self._take_free() for _ in range(needed))
        return True

    def _take_free(self) -> int:
        """The free list's front block, referenced once and anonymous."""
        block, _ = self.free_blocks.popitem(last=False)
        h = self.hashes[block]
        if h is not None:  # evict: the block is about to hold other tokens
            del self.hash_to_block[h]
            self.hashes[block] = None
        self.ref_counts[block] = 1
        return block

    def allocate_blocks(self, n: int) -> list[int]:
        """Lend n free blocks that no sequence owns (scratch K/V: LLMEngine.score); give them back
        with release_blocks. Taken as ensure_slots takes them, so a free block still named for a
        prefix loses its name (its K/V is about to be overwritten) and no owned block is touched."""
        if n > len(self.free_blocks):
            raise ValueError(f"{n} blocks asked for, {len(self.free_blocks)} free")
        blocks = [self._take_free() for _ in range(n)]
        self.lent_blocks.update(blocks)
        return blocks

    def release_blocks(self, blocks: Iterable[int]) -> None:
        """Take back blocks lent by allocate_blocks: anonymous, so to the front of the free list."""
        for block in blocks:
            if block not in self.lent_blocks:
                raise ValueError(f"block {block} was not lent by allocate_blocks")
            self.lent_blocks.remove(block)
            self.ref_counts[block] = 0
            self.free_blocks[block] = None
            self.free_blocks.move_to_end(block, last=False)

    def mark_computed(self, seq: Sequence) -> None:
        """Name the blocks that became full of computed tokens, so later sequences can share them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            parent = seq.block_hashes[-1] if seq.block_hashes else b""
            h = block_hash(parent, seq.token_ids[i * bs : (i + 1) * bs])
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            # Two sequences may compute the same block in parallel: the first name wins, the
            # duplicate stays anonymous and returns to the front of the free list when freed.
            if h not in self.hash_to_block:
                self.hash_to_block[h] = block
                self.hashes[block] = h

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references (its K/V is gone: num_computed_tokens = 0)."""
        # Tail first: named blocks go to the back of the free list, so a prefix's later blocks
        # end up before its earlier ones and are evicted first (a tail without its head is useless).
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
                if self.hashes[block] is None:  # worthless once freed: hand it out first
                    self.free_blocks.move_to_end(block, last=False)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def check_invariants(self, seqs: Iterable[Sequence]) -> None:
        """Raise AssertionError unless the books balance for exactly these live sequences and the lent blocks."""
        refs = [0] * self.num_blocks
        for block in self.lent_blocks:
            _check(self.hashes[block] is None, f"lent block {block} carries a prefix's name")
            refs[block] += 1
        for seq in seqs:
            table = seq.block_table
            _check(len(set(table)) == len(table), f"a block appears twice in one table: {seq}")
            _check(seq.num_computed_tokens <= len(table) * self.block_size, f"computed tokens without slots: {seq}")
            _check(len(seq.block_hashes) <= seq.num_computed_tokens // self.block_size, f"named an unfinished block: {seq}")
            for block, h in zip(table, seq.block_hashes):
                _check(self.hashes[block] in (None, h), f"block {block} is named for another prefix: {seq}")
            for block in table:
                refs[block] += 1
        _check(refs == self.ref_counts, f"ref counts {self.ref_counts} != table references {refs}")
        free = [b for b in range(self.num_blocks) if refs[b] == 0]
        _check(sorted(self.free_blocks) == free, f"free list {list(self.free_blocks)} != unreferenced blocks {free}")
        _check(self.num_free_blocks + self.num_used_blocks == self.num_blocks, "free + used != num_blocks")
        for h, block in self.hash_to_block.items():
            _check(self.hashes[block] == h, f"hash map points at block {block}, which carries another name")
        _check(sum(h is not None for h in self.hashes) == len(self.hash_to_block), "named blocks missing from the hash map")


def _check(ok: bool, message: str) -> None:
    if not ok:  # not `assert`: the check must also hold under python -O
        raise AssertionError(message)
