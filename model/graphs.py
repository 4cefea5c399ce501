"""The decode step in CUDA graphs: one replay per generated token, for a whole batch.

    runner = DecodeGraphs(model, cache, buckets=(1, 8, 32))     # captures on first use of a bucket
    runner.input_ids[:n] = first_tokens                         # after prefill
    for _ in range(steps):
        next_ids = runner.step(n)                               # [n]; also fed back as the next input

One step, everything on the device (embedding -> layers -> lm_head -> argmax), for the first ``bucket``
rows of the cache, ``bucket`` the smallest captured size >= n:

    length  = cache_seqlens[b]                                  # tokens so far; 0 = padding row
    active  = 0 < length < capacity[b]                          # capacity: tokens its reserved blocks hold
    pos     = length                                            # the new token's position
    slot    = block_table[b, pos // block_size] * block_size + pos % block_size   if active, else -1
    cache_seqlens[b] += active                                  # mla_decode sees the new token
    logits  = model.decode_step(input_ids, pos, slot, block_table, cache_seqlens)
    input_ids = argmax(logits)

Static buffers: ``input_ids`` [max_batch] (the runner's), the cache's ``block_table``, ``cache_seqlens``,
``capacity`` and latent cache; ``logits`` and ``next_ids`` live in the graphs' memory pool. The host only
replays and mirrors the length bookkeeping (``cache.decoded``); blocks must be reserved before
(``cache.reserve``). Rows the bucket covers beyond n must be padding (length 0): slot -1 writes nothing
(rope_and_cache skips it) and length 0 attends to nothing (mla_decode returns 0).

Without CUDA (or ``use_graphs=False``) the same step runs eagerly, so the CPU tests run this code.
NOTES: a graph keeps the addresses of the weights and of the fast path's derived weights it was captured
with: after changing weights in place, derived weights are prepared again (``model.prepare_fast``) but an
existing runner must be rebuilt.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from model.cache import PagedLatentCache
from model.model import DeepseekV2

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


# Vocabulary columns per group of the two-stage argmax (first_argmax).
ARGMAX_GROUP = 1024


def first_argmax(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim of logits [b, V] -> int64 [b], the first maximum like ``Tensor.argmax``.

    In two stages when V is a multiple of ARGMAX_GROUP: the maximum of each group of columns, then the first
    group holding the largest. torch's one-stage argmax reduces a row in one thread block: 28 µs for one row
    of Lite's 102,400 logits on the H200, against a few µs for the two small reductions.
    """
    b, V = logits.shape
    if V % ARGMAX_GROUP or V == ARGMAX_GROUP:
        return logits.argmax(-1)
    groups = logits.view(b, V // ARGMAX_GROUP, ARGMAX_GROUP)
    within = groups.argmax(-1)  # [b, G] first maximum of each group
    best = groups.gather(-1, within[..., None])[..., 0]  # [b, G]
    g = best.argmax(-1)  # [b] first group holding the maximum: the first maximum overall
    return g * ARGMAX_GROUP + within.gather(-1, g[:, None])[:, 0]


class DecodeGraphs:
    """Decode steps of ``model`` over ``cache``, one CUDA graph per batch-size bucket."""

    def __init__(self, model: DeepseekV2, cache: PagedLatentCache, *, buckets: Sequence[int] | None = None,
                 use_graphs: bool | None = None):
        if cache.device != model.device:
            raise ValueError(f"cache: expected a cache on the model's device {model.device}, got {cache.device}")
        if buckets is None:
            buckets = [b for b in DEFAULT_BUCKETS if b < cache.batch_size] + [cache.batch_size]
        buckets = sorted(set(buckets))
        if not buckets or any(isinstance(b, bool) or not isinstance(b, int) or not 0 < b <= cache.batch_size
                              for b in buckets):
            raise ValueError(f"buckets: expected batch sizes in [1, {cache.batch_size}] (the cache's batch "
                             f"size), got {buckets}")
        if use_graphs is None:
            use_graphs = model.device.type == "cuda"
        if use_graphs and model.device.type != "cuda":
            raise ValueError(f"use_graphs: CUDA graphs need a CUDA model, this one is on {model.device}")
        self.model = model
        self.cache = cache
        self.buckets = buckets
        self.use_graphs = use_graphs
        self.input_ids = torch.zeros(cache.batch_size, dtype=torch.int64, device=model.device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # bucket -> (logits, next_ids)
        self._pool = None
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        model.prepare_fast()

    def bucket(self, n: int) -> int:
        """The smallest bucket holding n rows."""
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"n: expected at most {self.buckets[-1]} rows (the largest bucket), got {n}")

    @torch.no_grad()
    def step(self, n: int) -> torch.Tensor:
        """One decode step for rows 0..n-1 -> next token ids int64 [n] (a view of a static buffer, also
        written to ``input_ids``; overwritten by the next step)."""
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"n: expected a positive number of rows, got {n!r}")
        b = self.bucket(n)
        cache = self.cache
        padding = [r for r in range(n, b) if cache.lengths[r] > 0]
        if padding:
            raise ValueError(f"n: rows {padding} are not empty but lie outside the first {n} rows this step "
                             f"covers; pass n > {padding[-1]}")
        if self.use_graphs and b not in self._graphs:
            self._capture(b)  # leaves the cache's lengths as they were
        cache.decoded(n, 1)  # checks every live row has room (raising before anything runs), then counts the step
        if self.use_graphs:
            self._graphs[b].replay()
            self._last = self._outputs[b]
        else:
            self._last = self._body(b)
        return self._last[1][:n]

    def logits(self, n: int) -> torch.Tensor:
        """Logits [n, vocab] of the last step (a view of a static buffer)."""
        if self._last is None:
            raise RuntimeError("no step has run yet")
        return self._last[0][:n]

    def capture(self, buckets: Sequence[int] | None = None) -> None:
        """Capture the graphs of ``buckets`` (default: all) now rather than at their first step."""
        if not self.use_graphs:
            return
        for b in sorted({self.bucket(n) for n in (buckets or self.buckets)}, reverse=True):
            if b not in self._graphs:  # largest first: the shared pool then fits the smaller ones
                self._capture(b)

    # ---- the step ------------------------------------------------------------------------------------------

    def _body(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The step over the first b rows (see the module doc) -> (logits [b, vocab], next_ids [b])."""
        cache = self.cache
        bs, max_blocks = cache.block_size, cache.max_blocks_per_seq
        seqlens = cache.cache_seqlens[:b]  # int32 [b], advanced in place
        block_table = cache.block_table[:b]  # int32 [b, M]
        active = (seqlens > 0) & (seqlens < cache.capacity[:b])  # [b]
        pos = seqlens.long()  # [b]
        block = block_table.gather(1, (pos // bs).clamp_(max=max_blocks - 1)[:, None])[:, 0]  # [b]
        slots = torch.where(active, block.long() * bs + pos % bs, -1)  # [b]
        seqlens.add_(active.to(torch.int32))
        logits = self.model.decode_step(self.input_ids[:b], pos, slots, block_table, seqlens, cache)  # [b, V]
        next_ids = first_argmax(logits)  # [b]
        self.input_ids[:b].copy_(next_ids)
        return logits, next_ids

    def _capture(self, b: int) -> None:
        """Warm up once eagerly (compiles kernels, allocates lazily made state) with the step's effects
        undone, then capture. Rows past their length may get a cache row written at their next position;
        it lies beyond their length and is written again by the step that uses it."""
        cache = self.cache
        saved = (cache.cache_seqlens.clone(), self.input_ids.clone())
        stream = torch.cuda.Stream(self.model.device)
        stream.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(stream):
            self._body(b)
        torch.cuda.current_stream(self.model.device).wait_stream(stream)
        cache.cache_seqlens.copy_(saved[0])
        self.input_ids.copy_(saved[1])
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the NVML sampler's thread (bench) may run while this thread captures
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            outputs = self._body(b)
        self._graphs[b] = graph
        self._outputs[b] = outputs
