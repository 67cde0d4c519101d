"""Automatic prefix caching for the batching engine: the K/V of prompt prefixes it has already computed,
kept in blocks of `block` tokens under an LRU bounded in bytes (vLLM's automatic prefix caching, llama.cpp's
cache_prompt).

    cache = PrefixCache(lm, budget_bytes=1e9, block=64)
    n = cache.copy_into(prompt, rows, limit)   # rows: each cache tensor's (H, L, D) row; n tokens now there
    cache.store(prompt, rows)                  # after the prefill: the prompt's whole blocks, kept

A block is keyed by a hash of the whole token prefix up to its end (its parent's key and its own tokens), so a
block is found only behind the same tokens: a key's block holds its tokens and its parent's key, and both are
compared on lookup, so a hash collision can never hand a request another prompt's K/V. Positions are absolute
(rotary): a prefix's K/V are those of positions 0..n-1, the same in every prompt that starts with it.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass
class Block:
    parent: int | None        # the key of the block before it, None for a prompt's first block
    tokens: tuple[int, ...]
    kv: np.ndarray            # (n cache tensors, H, block, D)


class PrefixCache:
    def __init__(self, lm, budget_bytes: float, block: int = 64):
        assert block >= 1
        self.block = block
        self.block_bytes = len(lm.past_names) * lm.n_kv_heads * block * lm.head_dim * np.dtype(lm.past_dtype).itemsize
        self.max_blocks = int(budget_bytes // self.block_bytes)
        self.blocks: OrderedDict[int, Block] = OrderedDict()  # least recently used first
        self.lookups = self.hits = self.hit_tokens = self.evictions = 0

    def _chain(self, prompt: list[int]) -> list[tuple[int, int | None, tuple[int, ...]]]:
        """(key, parent key, tokens) of each whole block of the prompt, in order."""
        chain, parent = [], None
        for start in range(0, len(prompt) - self.block + 1, self.block):
            tokens = tuple(prompt[start:start + self.block])
            key = hash((parent, tokens))
            chain.append((key, parent, tokens))
            parent = key
        return chain

    def _match(self, chain) -> list[tuple[int, Block]]:
        """The cached blocks at the head of a chain, up to the first one missing."""
        found = []
        for key, parent, tokens in chain:
            b = self.blocks.get(key)
            if b is None or b.parent != parent or b.tokens != tokens:
                break
            found.append((key, b))
        return found

    def _touch(self, keys: list[int]) -> None:
        # deepest first, so a prompt's first block ends most recent: the LRU evicts leaves before the blocks
        # they hang from (an evicted parent would leave its children unreachable)
        for key in reversed(keys):
            self.blocks.move_to_end(key)

    def copy_into(self, prompt: list[int], rows: list[np.ndarray], limit: int) -> int:
        """Copy the longest cached prefix of `prompt`, at most `limit` tokens, into `rows` (each cache tensor's
        (H, L, D) row); returns how many tokens it copied."""
        self.lookups += 1
        found = self._match(self._chain(prompt))
        n = min(len(found) * self.block, limit)
        if n <= 0:
            return 0
        for j, (_, b) in enumerate(found[:-(-n // self.block)]):
            start = j * self.block
            width = min(self.block, n - start)
            for row, kv in zip(rows, b.kv):
                row[:, start:start + width] = kv[:, :width]
        self._touch([key for key, _ in found])
        self.hits += 1
        self.hit_tokens += n
        return n

    def store(self, prompt: list[int], rows: list[np.ndarray]) -> None:
        """Keep the whole blocks of `prompt` that `rows` now hold (after its prefill) and the cache lacks."""
        if self.max_blocks == 0:
            return
        chain = self._chain(prompt)[:self.max_blocks]
        have = self._match(chain)
        self._touch([key for key, _ in have])  # out of the eviction's way while the rest go in
        for j, (key, parent, tokens) in enumerate(chain[len(have):], start=len(have)):
            b = self.blocks.get(key)  # None, or a collision: another prefix's block under this key
            if b is None and len(self.blocks) >= self.max_blocks:
                self.blocks.popitem(last=False)
                self.evictions += 1
            start = j * self.block
            kv = np.stack([row[:, start:start + self.block] for row in rows])
            self.blocks[key] = Block(parent, tokens, kv)
        self._touch([key for key, _, _ in chain])

    def stats(self) -> dict:
        return {"blocks": len(self.blocks), "max_blocks": self.max_blocks, "block_tokens": self.block,
                "bytes": len(self.blocks) * self.block_bytes, "lookups": self.lookups, "hits": self.hits,
                "hit_tokens": self.hit_tokens, "evictions": self.evictions}
