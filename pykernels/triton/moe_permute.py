"""Route-aware permutation for ``pykernels.moe_ffn``, on the device and without a host synchronisation.

From ``topk_ids [T, top_k]`` (flattened: route ``p = t * top_k + k``) it builds

    offsets     int32 [E]   cumulative row ends of the expert-sorted order (``grouped_ffn``'s ``offsets``)
    sorted_pair int32 [T * top_k]  position -> route p; positions [offsets[e-1], offsets[e]) hold expert e's
                                   routes in increasing p (a stable, deterministic order)

Routes with an id outside [0, E) get no position (the positions past ``offsets[E-1]`` are left unwritten).
The inverse map is not needed: the down GEMM scatters each row back to its route p directly.

Two kernels over chunks of ``CHUNK`` routes: ``_count_kernel`` writes each chunk's per-expert counts; then
``_scatter_kernel`` turns them into the chunk's first position per expert (all counts before it) and ranks
the chunk's routes in order. When all routes fit in one chunk (decode), the scatter kernel counts them
itself: one launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Routes per program. At top-6 a decode step of up to 85 tokens fits one chunk (one launch); prefill
# spreads over T * top_k / CHUNK programs.
CHUNK = 512
# Routes ranked per step: the one-hot [SUB, BLOCK_E] matrix stays in registers (32 x 256 int32 at 4 warps).
SUB = 32
_NUM_WARPS = 4


@triton.jit
def _chunk_counts(ids_ptr, chunk, num_pairs, experts, CHUNK: tl.constexpr, SUB: tl.constexpr, BLOCK_E: tl.constexpr):
    """Per-expert route counts [BLOCK_E] of one chunk (ids outside [0, E) count in no valid lane)."""
    total = tl.zeros((BLOCK_E,), tl.int32)
    for s in range(0, CHUNK, SUB):
        p = chunk * CHUNK + s + tl.arange(0, SUB)  # [SUB]
        ids = tl.load(ids_ptr + p, mask=p < num_pairs, other=-1)
        total += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    return total


@triton.jit
def _count_kernel(
    ids_ptr,  # [N] expert id per route, int32 or int64
    counts_ptr,  # [num_chunks, E] int32 out
    num_pairs,
    num_experts,
    CHUNK: tl.constexpr,  # routes per program
    SUB: tl.constexpr,  # routes per step
    BLOCK_E: tl.constexpr,  # next power of two >= E
):
    chunk = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    total = _chunk_counts(ids_ptr, chunk, num_pairs, experts, CHUNK, SUB, BLOCK_E)
    tl.store(counts_ptr + chunk * num_experts + experts, total, mask=experts < num_experts)


@triton.jit
def _scatter_kernel(
    ids_ptr,  # [N] expert id per route, int32 or int64
    counts_ptr,  # [num_chunks, E] int32 from _count_kernel (unused when COUNT_HERE)
    offsets_ptr,  # [E] int32 out: cumulative row ends
    pair_ptr,  # [N] int32 out: sorted position -> route
    num_pairs,
    num_experts,
    num_chunks,
    CHUNK: tl.constexpr,  # routes per program
    SUB: tl.constexpr,  # routes per step
    BLOCK_E: tl.constexpr,  # next power of two >= E
    COUNT_HERE: tl.constexpr,  # one chunk holds every route: count them here instead of reading counts
):
    chunk = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)  # [BE]
    e_ok = experts < num_experts
    if COUNT_HERE:
        total = _chunk_counts(ids_ptr, chunk, num_pairs, experts, CHUNK, SUB, BLOCK_E)
        total = tl.where(e_ok, total, 0)
        before = tl.zeros((BLOCK_E,), tl.int32)
    else:
        total = tl.zeros((BLOCK_E,), tl.int32)  # routes per expert, all chunks
        before = tl.zeros((BLOCK_E,), tl.int32)  # routes per expert in the chunks before this one
        for c in range(0, num_chunks):
            row = tl.load(counts_ptr + c * num_experts + experts, mask=e_ok, other=0)
            total += row
            before += tl.where(c < chunk, row, 0)
    ends = tl.cumsum(total, axis=0)  # [BE]
    if chunk == 0:
        tl.store(offsets_ptr + experts, ends, mask=e_ok)

    # base[e]: the position of this chunk's next route of expert e.
    base = ends - total + before
    for s in range(0, CHUNK, SUB):
        p = chunk * CHUNK + s + tl.arange(0, SUB)  # [SUB]
        ids = tl.load(ids_ptr + p, mask=p < num_pairs, other=-1)
        onehot = (ids[:, None] == experts[None, :]) & e_ok[None, :]  # [SUB, BE]
        ones = onehot.to(tl.int32)
        rank = tl.cumsum(ones, axis=0) - ones  # routes of the same expert earlier in this step
        pos = tl.sum(tl.where(onehot, base[None, :] + rank, 0), axis=1)  # [SUB]
        valid = tl.sum(ones, axis=1) > 0  # id in [0, E)
        tl.store(pair_ptr + pos, p.to(tl.int32), mask=valid)
        base += tl.sum(ones, axis=0)


def permute(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(offsets int32 [E], sorted_pair int32 [T * top_k])`` for ``topk_ids [T, top_k]`` (see the module docstring)."""
    ids = topk_ids.contiguous().view(-1)  # [N]
    num_pairs = ids.numel()
    device = ids.device
    offsets = torch.empty(num_experts, dtype=torch.int32, device=device)
    sorted_pair = torch.empty(num_pairs, dtype=torch.int32, device=device)
    block_e = triton.next_power_of_2(num_experts)
    num_chunks = max(1, triton.cdiv(num_pairs, CHUNK))
    if num_chunks == 1:
        counts = offsets  # not read
    else:
        counts = torch.empty((num_chunks, num_experts), dtype=torch.int32, device=device)
        _count_kernel[(num_chunks,)](
            ids, counts, num_pairs, num_experts, CHUNK=CHUNK, SUB=SUB, BLOCK_E=block_e, num_warps=_NUM_WARPS
        )
    _scatter_kernel[(num_chunks,)](
        ids, counts, offsets, sorted_pair, num_pairs, num_experts, num_chunks,
        CHUNK=CHUNK, SUB=SUB, BLOCK_E=block_e, COUNT_HERE=num_chunks == 1, num_warps=_NUM_WARPS,
    )
    return offsets, sorted_pair
