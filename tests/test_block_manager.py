"""The block manager: paged-KV allocation, reference counting and prefix caching."""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from quantkit.runtime.block_manager import BlockManager
from quantkit.runtime.sequence import Sequence

BS = 4


def compute(bm: BlockManager, seq: Sequence, n: int | None = None) -> None:
    """What a model step does to the books: slots for n more tokens, which then count as computed."""
    n = seq.num_uncomputed_tokens if n is None else n
    assert bm.ensure_slots(seq, n)
    seq.num_computed_tokens += n
    bm.mark_computed(seq)


def admitted(bm: BlockManager, tokens: list[int]) -> Sequence:
    """A sequence admitted with its prefix hits and then fully computed."""
    seq = Sequence(tokens)
    bm.allocate_prompt(seq)
    compute(bm, seq)
    return seq


def test_allocate_and_free():
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = Sequence(list(range(10)))
    assert bm.allocate_prompt(seq) == 0  # empty cache
    assert bm.ensure_slots(seq, 10)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5 and bm.num_used_blocks == 3
    seq.num_computed_tokens = 10
    assert bm.ensure_slots(seq, 2)  # tokens 10, 11 still fit in the third block
    assert len(seq.block_table) == 3
    assert bm.ensure_slots(seq, 3) and len(seq.block_table) == 4
    table = list(seq.block_table)
    assert not bm.ensure_slots(seq, 100)  # short: nothing allocated
    assert seq.block_table == table and bm.num_free_blocks == 4
    assert bm.can_allocate(4) and not bm.can_allocate(5)
    bm.check_invariants([seq])
    bm.free(seq)
    assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert bm.num_free_blocks == 8
    bm.check_invariants([])


def test_sequences_with_a_common_prefix_share_its_full_blocks():
    bm = BlockManager(num_blocks=16, block_size=BS)
    prefix = [7, 1, 2, 3, 9, 9, 4, 5]  # two full blocks
    a = admitted(bm, prefix + [11])
    b = Sequence(prefix + [12, 13])
    assert bm.allocate_prompt(b) == 8
    assert b.block_table == a.block_table[:2]
    assert b.num_computed_tokens == b.num_cached_tokens == 8 and b.num_uncomputed_tokens == 2
    assert [bm.ref_counts[x] for x in b.block_table] == [2, 2]
    compute(bm, b)
    bm.check_invariants([a, b])

    bm.free(a)
    assert [bm.ref_counts[x] for x in b.block_table[:2]] == [1, 1]  # b still holds them
    bm.check_invariants([b])
    shared = b.block_table[:2]
    bm.free(b)
    assert bm.num_free_blocks == 16

    c = Sequence(prefix + [5])  # freed named blocks are still cache hits
    assert bm.allocate_prompt(c) == 8 and c.block_table == shared
    bm.check_invariants([c])


def test_a_different_earlier_block_breaks_the_chain():
    bm = BlockManager(num_blocks=16, block_size=BS)
    admitted(bm, [1, 2, 3, 4, 5, 6, 7, 8, 0])
    # Same second block, different first block: the second block's K/V differs, no hit at all.
    assert bm.allocate_prompt(Sequence([9, 2, 3, 4, 5, 6, 7, 8, 0])) == 0


def test_the_block_holding_the_last_token_is_never_a_hit():
    bm = BlockManager(num_blocks=16, block_size=BS)
    tokens = [1, 2, 3, 4, 5, 6, 7, 8]  # exactly two full blocks
    a = admitted(bm, tokens)
    b = Sequence(tokens)
    # The model must compute at least the last token to produce logits.
    assert bm.allocate_prompt(b) == 4
    assert b.block_table == a.block_table[:1] and b.num_uncomputed_tokens == 4
    compute(bm, b)
    # b recomputed block 2 into its own block: the first name wins, b's copy stays anonymous...
    duplicate = b.block_table[1]
    assert duplicate != a.block_table[1] and bm.hashes[duplicate] is None
    bm.check_invariants([a, b])
    # ...and, worthless once freed, goes to the front of the free list to be reused first.
    bm.free(b)
    assert next(iter(bm.free_blocks)) == duplicate


def test_eviction_takes_tails_first_and_drops_the_names():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = admitted(bm, list(range(9)))  # blocks: full, full, partial
    head, tail, partial = a.block_table
    bm.free(a)
    assert list(bm.free_blocks) == [partial, 3, tail, head]  # anonymous first, then tail, head

    d = Sequence([50 + i for i in range(12)])  # unrelated, needs 3 blocks: evicts the tail
    assert bm.allocate_prompt(d) == 0 and bm.ensure_slots(d, 12)
    assert tail in d.block_table and bm.hashes[tail] is None and len(bm.hash_to_block) == 1
    e = Sequence(list(range(9)))
    assert bm.allocate_prompt(e) == 4 and e.block_table == [head]  # the head survived
    bm.check_invariants([d, e])
    bm.free(e)

    f = Sequence([90])  # the last free block is the cached head: taking it evicts it
    assert bm.allocate_prompt(f) == 0 and bm.ensure_slots(f, 1)
    assert f.block_table == [head] and bm.hash_to_block == {} and bm.num_free_blocks == 0
    assert bm.allocate_prompt(Sequence(list(range(9)))) == 0
    bm.check_invariants([d, f])


def test_disabled_prefix_caching_never_shares():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    a = admitted(bm, list(range(9)))
    b = Sequence(list(range(9)))
    assert bm.allocate_prompt(b) == 0 and bm.hash_to_block == {}
    compute(bm, b)
    assert not set(a.block_table) & set(b.block_table)
    bm.check_invariants([a, b])


def test_lent_blocks_come_only_from_the_free_list_lose_their_names_and_balance_the_books():
    bm = BlockManager(num_blocks=6, block_size=BS)
    live = admitted(bm, list(range(9)))  # 3 blocks, 2 of them named
    done = admitted(bm, [7] * 9)
    bm.free(done)  # its 2 named blocks stay cache hits in the free list
    lent = bm.allocate_blocks(3)
    assert sorted(lent) == [3, 4, 5] and not set(lent) & set(live.block_table)  # done's blocks; live holds 0-2
    assert all(bm.hashes[b] is None for b in lent) and len(bm.hash_to_block) == 2  # only the live sequence's names remain
    bm.check_invariants([live])
    bm.lent_blocks.discard(lent[0])  # the books count lent blocks like a sequence's: one unaccounted for is caught
    with pytest.raises(AssertionError, match="ref counts"):
        bm.check_invariants([live])
    bm.lent_blocks.add(lent[0])
    with pytest.raises(ValueError, match="1 blocks asked for, 0 free"):
        bm.allocate_blocks(1)
    bm.release_blocks(lent)
    assert sorted(bm.free_blocks) == sorted(lent) and not bm.lent_blocks
    with pytest.raises(ValueError, match="was not lent"):
        bm.release_blocks(lent[:1])
    bm.check_invariants([live])
    assert bm.allocate_prompt(Sequence([7] * 9)) == 0  # the overwritten prefix is no longer a hit


class FakeKV:
    """The cache as the model runner fills it: slot -> the prefix whose last token's K/V it holds."""

    def __init__(self, bm: BlockManager):
        self.bm, self.slots = bm, {}

    def slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.bm.block_size] * self.bm.block_size + pos % self.bm.block_size

    def write(self, seq: Sequence, n: int) -> None:
        for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
            block = seq.block_table[pos // self.bm.block_size]
            # Writing into a shared or named block would corrupt another sequence's K/V.
            assert self.bm.ref_counts[block] == 1 and self.bm.hashes[block] is None
            self.slots[self.slot(seq, pos)] = tuple(seq.token_ids[: pos + 1])

    def check(self, seq: Sequence) -> None:
        """Attention over the computed tokens reads exactly this sequence's K/V."""
        for pos in range(seq.num_computed_tokens):
            assert self.slots.get(self.slot(seq, pos)) == tuple(seq.token_ids[: pos + 1])


class BlockManagerMachine(RuleBasedStateMachine):
    """Random admissions, chunked computation, generation and frees, with a 3-token vocabulary so
    that prefixes collide often and the 10-block cache is short often."""

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(num_blocks=10, block_size=2)
        self.kv = FakeKV(self.bm)
        self.live: list[Sequence] = []
        self.lent: list[list[int]] = []  # scratch blocks out on loan (LLMEngine.score)

    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=9))
    def admit(self, tokens):
        seq = Sequence(tokens)
        cached = self.bm.allocate_prompt(seq)
        assert cached % 2 == 0 and cached < len(tokens)
        self.kv.check(seq)  # every hit holds exactly this prefix's K/V
        self.live.append(seq)

    @rule(data=st.data())
    def compute(self, data):
        if not self.live:
            return
        seq = data.draw(st.sampled_from(self.live))
        n = data.draw(st.integers(1, seq.num_uncomputed_tokens))
        table = list(seq.block_table)
        if not self.bm.ensure_slots(seq, n):
            assert seq.block_table == table
            return
        self.kv.write(seq, n)
        seq.num_computed_tokens += n
        self.bm.mark_computed(seq)
        self.kv.check(seq)
        if seq.num_uncomputed_tokens == 0:
            seq.append_token(data.draw(st.integers(0, 2)))

    @rule(data=st.data())
    def free(self, data):
        if not self.live:
            return
        seq = data.draw(st.sampled_from(self.live))
        self.live.remove(seq)
        self.bm.free(seq)

    @rule(n=st.integers(1, 4))
    def lend(self, n):
        if n > self.bm.num_free_blocks:
            return
        blocks = self.bm.allocate_blocks(n)
        for block in blocks:  # scoring writes its own K/V there: no sequence may read it as theirs
            assert self.bm.ref_counts[block] == 1 and self.bm.hashes[block] is None
            for slot in range(block * self.bm.block_size, (block + 1) * self.bm.block_size):
                self.kv.slots[slot] = ("scratch",)
        for seq in self.live:
            self.kv.check(seq)
        self.lent.append(blocks)

    @rule(data=st.data())
    def give_back(self, data):
        if self.lent:
            self.bm.release_blocks(self.lent.pop(data.draw(st.integers(0, len(self.lent) - 1))))

    @invariant()
    def books_balance(self):
        self.bm.check_invariants(self.live)

    def teardown(self):
        for blocks in self.lent:
            self.bm.release_blocks(blocks)
        for seq in self.live:
            self.bm.free(seq)
        self.bm.check_invariants([])
        assert self.bm.num_free_blocks == self.bm.num_blocks


BlockManagerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_block_manager_state_machine = BlockManagerMachine.TestCase
