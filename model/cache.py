"""Paged latent KV cache for MLA.

Each layer's cache is ``k_cache [num_blocks, block_size, 1, C + R]`` (C = kv_lora_rank 512, R = rope dim
64; 576 values per token): row ``p % block_size`` of block ``block_table[b, p // block_size]`` holds
token p of sequence b as ``(kv_a_layernorm(latent), rotate(k_pe))``, the layout ``pk.mla_decode``
reads (FlashMLA's). All layers share one allocation ``kv [num_layers, num_blocks, block_size, 1, C + R]``
and one block table.

Bookkeeping (which blocks a sequence owns, lengths) lives on the host; ``append`` copies the block
table and lengths to the device and returns the token positions and cache slots of the new tokens,
so a model step never reads device values back.

A CUDA-graph decode step (model/graphs.py) cannot ask the host for blocks: ``reserve`` hands a sequence
all the blocks it will need up front, the step computes positions and slots on the device from
``cache_seqlens``, ``block_table`` and ``capacity`` and advances ``cache_seqlens`` itself, and
``decoded`` mirrors that advance in the host bookkeeping. ``release`` empties one sequence (its row
then reads as batch padding: length 0, capacity 0).
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.config import DeepseekV2Config

DEFAULT_BLOCK_SIZE = 64  # FlashMLA's page size
MIN_BLOCK_SIZE = 16


@dataclass
class CacheStep:
    """Where the new tokens of one model step go.

    ``starts`` [B + 1] (host): sequence b's new tokens are rows starts[b]:starts[b+1] of the step's tokens.
    """
    positions: torch.Tensor      # int64 [T], position of each new token in its sequence
    slot_mapping: torch.Tensor   # int64 [T], row of k_cache.view(-1, C + R) each new token is written to
    starts: list[int]
    lengths: list[int]           # host, each sequence's length after this step
    block_table: torch.Tensor    # int32 [B, max_blocks_per_seq] (the cache's own tensor)
    cache_seqlens: torch.Tensor  # int32 [B], == lengths, on the device
    block_size: int

    def context_rows(self, b: int, k_cache: torch.Tensor) -> torch.Tensor:
        """All cached rows of sequence b, in position order: [lengths[b], C + R]."""
        n = self.lengths[b]
        blocks = self.block_table[b, : math.ceil(n / self.block_size)].long()
        return k_cache[blocks].reshape(-1, k_cache.shape[-1])[:n]


class PagedLatentCache:
    """Latent cache for ``batch_size`` sequences of up to ``max_seq_len`` tokens each.

    ``num_blocks`` defaults to enough blocks for every sequence at full length; blocks are handed out
    from a free list as sequences grow, so a sequence's blocks need not be contiguous.
    """

    def __init__(self, cfg: DeepseekV2Config, batch_size: int, max_seq_len: int, *,
                 block_size: int = DEFAULT_BLOCK_SIZE, num_blocks: int | None = None,
                 dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
        for name, value in (("batch_size", batch_size), ("max_seq_len", max_seq_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < MIN_BLOCK_SIZE
                or block_size & (block_size - 1)):
            raise ValueError(f"block_size: expected a power of two >= {MIN_BLOCK_SIZE}, got {block_size!r}")
        self.cfg = cfg
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.block_size = block_size
        self.max_blocks_per_seq = math.ceil(max_seq_len / block_size)
        if num_blocks is None:
            num_blocks = batch_size * self.max_blocks_per_seq
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks <= 0:
            raise ValueError(f"num_blocks: expected a positive integer, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self.dtype = dtype
        self.device = torch.device(device)
        self.kv = torch.zeros(cfg.num_hidden_layers, num_blocks, block_size, 1, cfg.kv_cache_dim,
                              dtype=dtype, device=self.device)
        self.block_table = torch.zeros(batch_size, self.max_blocks_per_seq, dtype=torch.int32, device=self.device)
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=self.device)
        # int32 [B]: tokens each sequence's blocks hold (len(blocks[b]) * block_size), for device-side steps
        self.capacity = torch.zeros(batch_size, dtype=torch.int32, device=self.device)
        self.reset()

    def reset(self) -> None:
        """Empty every sequence and return all blocks to the free list."""
        self.lengths = [0] * self.batch_size
        self.blocks: list[list[int]] = [[] for _ in range(self.batch_size)]
        self.free = deque(range(self.num_blocks))
        self.cache_seqlens.zero_()
        self.capacity.zero_()
        self.block_table.zero_()

    def layer(self, i: int) -> torch.Tensor:
        """Layer i's k_cache [num_blocks, block_size, 1, C + R] (a view)."""
        return self.kv[i]

    def append(self, counts: Sequence[int]) -> CacheStep:
        """Reserve room for ``counts[b]`` new tokens at the end of each sequence b; return their places.

        Checks everything before changing anything: on an error the cache is as it was.
        """
        if len(counts) != self.batch_size:
            raise ValueError(f"counts: expected {self.batch_size} entries (one per sequence), got {len(counts)}")
        bs = self.block_size
        new_blocks = 0
        for b, n in enumerate(counts):
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"counts[{b}]: expected a non-negative integer, got {n!r}")
            if self.lengths[b] + n > self.max_seq_len:
                raise ValueError(f"counts[{b}]: sequence {b} would hold {self.lengths[b] + n} tokens, more than "
                                 f"max_seq_len {self.max_seq_len}")
            new_blocks += max(math.ceil((self.lengths[b] + n) / bs) - len(self.blocks[b]), 0)
        if new_blocks > len(self.free):
            raise RuntimeError(f"cache full: this step needs {new_blocks} new blocks, {len(self.free)} are free "
                               f"(num_blocks {self.num_blocks})")
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        for b, n in enumerate(counts):
            old, new = self.lengths[b], self.lengths[b] + n
            while len(self.blocks[b]) * bs < new:
                self.blocks[b].append(self.free.popleft())
            positions.extend(range(old, new))
            slots.extend(self.blocks[b][p // bs] * bs + p % bs for p in range(old, new))
            self.lengths[b] = new
            starts.append(starts[-1] + n)
        self._sync_device()
        return CacheStep(
            positions=torch.tensor(positions, dtype=torch.int64, device=self.device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=self.device),
            starts=starts, lengths=list(self.lengths), block_table=self.block_table,
            cache_seqlens=self.cache_seqlens, block_size=bs)

    # ---- device-side decode steps (model/graphs.py) ----------------------------------------------------

    def reserve(self, row: int, length: int) -> None:
        """Give sequence ``row`` blocks for ``length`` tokens now, so later steps need no host allocation."""
        self._check_row(row)
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= self.max_seq_len:
            raise ValueError(f"length: expected an integer in [0, max_seq_len {self.max_seq_len}], got {length!r}")
        need = max(math.ceil(length / self.block_size) - len(self.blocks[row]), 0)
        if need > len(self.free):
            raise RuntimeError(f"cache full: sequence {row} needs {need} more blocks for {length} tokens, "
                               f"{len(self.free)} are free (num_blocks {self.num_blocks})")
        for _ in range(need):
            self.blocks[row].append(self.free.popleft())
        if need:
            self._sync_device()

    def room(self, row: int) -> int:
        """Tokens sequence ``row`` can still take without new blocks."""
        return len(self.blocks[row]) * self.block_size - self.lengths[row]

    def decoded(self, rows: int, steps: int = 1) -> None:
        """Mirror on the host what ``steps`` device-side decode steps over the first ``rows`` sequences did:
        each non-empty sequence grew by one token a step. Raises (changing nothing) if one lacks the room,
        which the caller must check before running the steps (a full sequence stops growing on the device)."""
        if not 0 <= rows <= self.batch_size:
            raise ValueError(f"rows: expected 0..{self.batch_size}, got {rows!r}")
        full = [b for b in range(rows) if self.lengths[b] > 0 and self.room(b) < steps]
        if full:
            raise RuntimeError(f"sequences {full} have no room for {steps} more tokens: reserve() them first")
        for b in range(rows):
            if self.lengths[b] > 0:
                self.lengths[b] += steps

    def release(self, row: int) -> None:
        """Empty sequence ``row`` and return its blocks; its row becomes padding (length 0, capacity 0)."""
        self._check_row(row)
        self.free.extend(self.blocks[row])
        self.blocks[row] = []
        self.lengths[row] = 0
        self.block_table[row].zero_()
        self.cache_seqlens[row] = 0
        self.capacity[row] = 0

    def _check_row(self, row: int) -> None:
        if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < self.batch_size:
            raise ValueError(f"row: expected a sequence index in [0, {self.batch_size}), got {row!r}")

    def _sync_device(self) -> None:
        """Copy the host's block lists, lengths and capacities to the device tensors."""
        table = torch.zeros(self.batch_size, self.max_blocks_per_seq, dtype=torch.int32)
        for b, blocks in enumerate(self.blocks):
            table[b, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        self.block_table.copy_(table)
        self.cache_seqlens.copy_(torch.tensor(self.lengths, dtype=torch.int32))
        self.capacity.copy_(torch.tensor([len(b) * self.block_size for b in self.blocks], dtype=torch.int32))
