"""Maps sequences to KV blocks: one block table per sequence, shared by all layers for now.

A sequence's cached tokens occupy ``ceil(num_cached / block_size)`` blocks of its table. Forked
sequences share blocks; before a sequence writes into a block that others still hold, the block is
copied (copy-on-write), and the copy is reported so the model runner can copy the cache memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvcrush_ov.engine.block_pool import BlockPool


@dataclass
class BlockTable:
    blocks: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are (or are being) written into the blocks


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self.tables: dict[int, BlockTable] = {}

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def table(self, seq_id: int) -> BlockTable:
        return self.tables.setdefault(seq_id, BlockTable())

    def blocks_needed(self, seq_id: int, new_tokens: int) -> int:
        """Free blocks a write of ``new_tokens`` would take (new blocks + copy-on-write)."""
        t = self.tables.get(seq_id) or BlockTable()
        need = self._blocks_for(t.num_cached + new_tokens) - len(t.blocks)
        if new_tokens and t.num_cached % self.block_size and t.blocks \
                and self.pool.ref_count(t.blocks[-1]) > 1:
            need += 1
        return max(need, 0)

    def can_append(self, seq_id: int, new_tokens: int) -> bool:
        return self.blocks_needed(seq_id, new_tokens) <= self.pool.num_free

    def growth_block(self) -> int:
        """Blocks one more block of tokens takes (the scheduler's admission watermark)."""
        return 1

    def fits(self, need: int) -> bool:
        """Whether ``need`` blocks (a sum of :meth:`blocks_needed`) are free."""
        return need <= self.pool.num_free

    def append_slots(self, seq_id: int, new_tokens: int) -> list[tuple[int, int]]:
        """Reserve room for ``new_tokens`` more tokens; return (src, dst) block copies to do.

        Raises NoFreeBlocks (nothing changed) if the pool cannot hold them.
        """
        t = self.table(seq_id)
        copies: list[tuple[int, int]] = []
        need_new = self._blocks_for(t.num_cached + new_tokens) - len(t.blocks)
        shared_tail = (new_tokens > 0 and t.num_cached % self.block_size != 0 and t.blocks
                       and self.pool.ref_count(t.blocks[-1]) > 1)
        fresh = self.pool.allocate(max(need_new, 0) + (1 if shared_tail else 0))
        if shared_tail:
            src, dst = t.blocks[-1], fresh.pop()
            self.pool.free([src])
            t.blocks[-1] = dst
            copies.append((src, dst))
        t.blocks.extend(fresh)
        t.num_cached += new_tokens
        return copies

    def fork(self, parent: int, child: int) -> None:
        """``child`` shares every block of ``parent`` (no cache memory is copied)."""
        p = self.tables[parent]
        self.pool.share(p.blocks)
        self.tables[child] = BlockTable(list(p.blocks), p.num_cached)

    def truncate(self, seq_id: int, num_tokens: int) -> None:
        """Forget the tokens from ``num_tokens`` on (their blocks return to the pool)."""
        t = self.tables[seq_id]
        keep = self._blocks_for(num_tokens)
        self.pool.free(t.blocks[keep:])
        del t.blocks[keep:]
        t.num_cached = min(t.num_cached, num_tokens)

    def free(self, seq_id: int) -> None:
        t = self.tables.pop(seq_id, None)
        if t is not None:
            self.pool.free(t.blocks)

    def check_invariants(self) -> None:
        for sid, t in self.tables.items():
            if len(t.blocks) != self._blocks_for(t.num_cached):
                raise AssertionError(f"sequence {sid}: {len(t.blocks)} blocks for "
                                     f"{t.num_cached} tokens")
        self.pool.check_invariants([t.blocks for t in self.tables.values()])
