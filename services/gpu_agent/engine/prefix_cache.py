"""Automatic prefix caching: the KV of full blocks of tokens outlives the
request that computed it, so a later request whose tokens begin the same way
(a shared system prompt, the earlier turns of a conversation, a preempted
request computed again) starts from it instead of computing it again.

A block is `block_tokens` consecutive tokens at a block-aligned position,
with the pool slots that hold their KV. It is keyed by its tokens and the
block before it (its parent's id), so a key names the whole prefix up to
its end, exactly (dict keys compare the tokens: no hash can collide).

Blocks are reference-counted by the sequences that use them: a sequence that
matched a chain of blocks at admission holds them, and when it ends (or is
preempted) its own fully computed blocks join the cache. A block no sequence
holds is "reclaimable": kept while memory allows, kept in least-recently-used
order, and given back first (evict) whenever memory is needed: for a
sequence's next slots, when the engine's limit shrinks, or when the engine is
switched off (clear). Reclaimable blocks are the deepest of their chain
first in that order, so a parent is never given back before its children:
a chain is always touched from its root.

Not thread safe: the batch scheduler calls it under the engine's lock."""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass

DEFAULT_BLOCK_TOKENS = 16

BlockKey = tuple[int, tuple[int, ...]]  # (parent block id, 0 for the first block; the block's tokens)


@dataclass(eq=False)
class CachedBlock:
    key: BlockKey
    block_id: int
    slots: list[int]
    refs: int = 0  # sequences holding it


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0  # tokens of the sequences admitted with the cache on
    hit_tokens: int = 0  # of those, tokens whose KV came from the cache
    reclaimable_tokens: int = 0  # slots of the blocks no sequence holds
    cached_tokens: int = 0  # slots of every cached block, held or not


class PrefixCache:
    def __init__(self, block_tokens: int = DEFAULT_BLOCK_TOKENS, tokens_per_page: int = 1):
        if block_tokens < 1:
            raise ValueError(f"a cache block holds at least one token, got {block_tokens}")
        self.block_tokens = block_tokens
        self.tokens_per_page = max(1, tokens_per_page)
        self._blocks: dict[BlockKey, CachedBlock] = {}
        self._reclaimable: OrderedDict[int, CachedBlock] = OrderedDict()  # least recently used first
        self._reclaimable_in_page: Counter[int] = Counter()  # pool page -> reclaimable slots on it
        self._next_id = 1
        self.queried_tokens = 0
        self.hit_tokens = 0

    # ---- sequences ------------------------------------------------------------

    def match(self, token_ids: list[int]) -> list[CachedBlock]:
        """The longest chain of cached blocks that begins token_ids, leaving at least its last
        token to compute (its logits give the next token); the caller holds them until it
        calls release() or unmatch()."""
        chain: list[CachedBlock] = []
        parent = 0
        n = self.block_tokens
        for i in range((len(token_ids) - 1) // n):
            block = self._blocks.get((parent, tuple(token_ids[i * n : (i + 1) * n])))
            if block is None:
                break
            chain.append(block)
            parent = block.block_id
        for block in chain:
            self._hold(block)
        return chain

    def count_admitted(self, num_tokens: int, hit_tokens: int) -> None:
        self.queried_tokens += num_tokens
        self.hit_tokens += hit_tokens

    def unmatch(self, chain: list[CachedBlock]) -> None:
        """Gives back a match that was not used (the sequence was not admitted after all)."""
        self._let_go(chain)

    def release(self, held: list[CachedBlock], token_ids: list[int], slots: list[int], num_computed: int) -> list[int]:
        """A sequence ends or is preempted: it lets go of the blocks it held (the first
        len(held) blocks of its slots), and its other fully computed blocks join the cache
        (where another sequence cached the same block meanwhile, that one is kept). Returns
        the slots to free: those of no cached block."""
        n = self.block_tokens
        chain = list(held)
        parent = held[-1].block_id if held else 0
        to_free: list[int] = []
        full = min(num_computed, len(slots)) // n
        for i in range(len(held), full):
            key = (parent, tuple(token_ids[i * n : (i + 1) * n]))
            block = self._blocks.get(key)
            if block is None:
                block = CachedBlock(key, self._next_id, slots[i * n : (i + 1) * n])
                self._next_id += 1
                self._blocks[key] = block
                self._hold(block)  # counted as held until _let_go below, like the matched ones
            else:
                to_free.extend(slots[i * n : (i + 1) * n])
                self._hold(block)
            chain.append(block)
            parent = block.block_id
        to_free.extend(slots[max(full, len(held)) * n :])
        self._let_go(chain)
        return to_free

    # ---- memory -----------------------------------------------------------------

    def evict(self, tokens: int) -> list[int]:
        """Gives back reclaimable blocks, least recently used first, until at least `tokens`
        slots are freed or none is left; returns their slots."""
        freed: list[int] = []
        while self._reclaimable and len(freed) < tokens:
            _, block = self._reclaimable.popitem(last=False)
            self._count_pages(block, -1)
            del self._blocks[block.key]
            freed.extend(block.slots)
        return freed

    def clear(self) -> list[int]:
        """Every block (none may be held: the engine is being switched off); returns their slots."""
        held = sum(1 for b in self._blocks.values() if b.refs)
        if held:
            raise RuntimeError(f"{held} cached blocks are still held by sequences")
        return self.evict(len(self._blocks) * self.block_tokens)

    def stats(self) -> PrefixCacheStats:
        reclaimable = len(self._reclaimable) * self.block_tokens
        return PrefixCacheStats(
            self.queried_tokens, self.hit_tokens, reclaimable, len(self._blocks) * self.block_tokens
        )

    @property
    def reclaimable_in_page(self) -> Counter[int]:
        """Pool page -> how many of its slots only the cache keeps (for the pages requests hold)."""
        return self._reclaimable_in_page

    # ---- internals ----------------------------------------------------------------

    def _hold(self, block: CachedBlock) -> None:
        if block.refs == 0 and self._reclaimable.pop(block.block_id, None) is not None:
            self._count_pages(block, -1)
        block.refs += 1

    def _let_go(self, chain: list[CachedBlock]) -> None:
        # Deepest first: the chain's root ends up the most recently used, so children go first.
        for block in reversed(chain):
            block.refs -= 1
            if block.refs == 0:
                self._reclaimable[block.block_id] = block
                self._count_pages(block, +1)

    def _count_pages(self, block: CachedBlock, sign: int) -> None:
        for slot in block.slots:
            page = slot // self.tokens_per_page
            self._reclaimable_in_page[page] += sign
            if self._reclaimable_in_page[page] <= 0:
                del self._reclaimable_in_page[page]
