"""Route-aware permutation for ``pykernels.moe_ffn``, on the device and without a host synchronisation.

From ``topk_ids [T, top_k]`` (flattened: route ``p = t * top_k + k``) it builds the expert-sorted order of
the routes in one of two layouts (the grouped GEMMs of ``grouped_gemm.py`` read either):

unpadded (``permute``)
    offsets     int32 [E]      cumulative row ends of the expert-sorted order (``grouped_ffn``'s ``offsets``)
    sorted_pair int32 [N]      position -> route p; positions [offsets[e-1], offsets[e]) hold expert e's
                               routes in increasing p (a stable, deterministic order). A GEMM finds the
                               expert of its M tile from ``offsets`` and masks the rows past the expert's end.
padded, vLLM's "align" layout (``permute_padded``)
    sorted_pair int32 [(cdiv(N, PAD) + E) * PAD]   each expert's segment rounded up to a multiple of PAD
                               rows; the padding rows hold N (no route)
    block_expert int32 [cdiv(N, PAD) + E]          expert of each PAD-row block; E past the last used block
                               A GEMM reads its tile's expert with one load and masks rows holding N.

Routes with an id outside [0, E) get no position (in the unpadded layout the positions past
``offsets[E-1]`` are left unwritten). ``permute_with_positions`` also returns the inverse map of the
unpadded layout, ``position int32 [N]`` (route p -> its position, -1 without one), for GEMMs that write
their rows in sorted order and leave the top-k sum to gather them (``moe_rows.combine``); the Triton GEMMs
scatter each row back to its route p directly.

Two kernels over chunks of ``CHUNK`` routes (``SMALL_CHUNK`` for decode batches past one chunk):
``_count_kernel`` writes each chunk's per-expert counts; then ``_scatter_kernel`` turns them into the
chunk's first position per expert (all counts before it, read ``PREFIX_ROWS`` chunks at a time) and ranks
the chunk's routes in order. When all routes fit in one chunk (decode, up to 21 tokens at top-6), the
scatter kernel counts them itself: one launch. Loops stop at the chunk's last route, so a decode step of 6
routes does one step of each loop.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Routes per program: small, so that the prefix over chunks, not a long serial loop, carries the work
# (a program's latency is a few SUB steps); 128 routes = 21 tokens at top-6 in one launch.
CHUNK = 128
# Past one chunk and up to SMALL_CHUNK_MAX_PAIRS routes (decode batches), a program ranks one SUB step of
# routes: its latency is one step, not four, and the prefix over the counts of all chunks stays small
# (T = 64 at top-6 on the H200: the 3-program scatter took 8.0 µs, each program walking 4 dependent steps).
SMALL_CHUNK = 32
SMALL_CHUNK_MAX_PAIRS = 4096
# Routes ranked per step: the one-hot [SUB, BLOCK_E] matrix stays in registers (32 x 256 int32 at 4 warps).
SUB = 32
# Elements of one step's [rows, BLOCK_E] tile in the prefix over chunks and the block-expert table.
_PREFIX_ELEMENTS = 4096
_NUM_WARPS = 4


@triton.jit
def _chunk_counts(ids_ptr, chunk, num_pairs, experts, CHUNK: tl.constexpr, SUB: tl.constexpr, BLOCK_E: tl.constexpr):
    """Per-expert route counts [BLOCK_E] of one chunk (ids outside [0, E) count in no valid lane)."""
    total = tl.zeros((BLOCK_E,), tl.int32)
    for s in range(0, tl.minimum(CHUNK, num_pairs - chunk * CHUNK), SUB):
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
    offsets_ptr,  # PAD == 0: [E] int32 out, cumulative row ends; PAD > 0: [num_blocks] int32 out, block experts
    pair_ptr,  # [positions] int32 out: sorted position -> route (PAD > 0: padding rows get N)
    position_ptr,  # WRITE_POSITION: [N] int32 out, route -> sorted position (-1: none)
    num_pairs,  # N
    num_experts,
    num_chunks,
    num_blocks,  # PAD > 0: blocks of PAD rows the GEMMs may visit (cdiv(N, PAD) + E)
    CHUNK: tl.constexpr,  # routes per program
    SUB: tl.constexpr,  # routes per step
    BLOCK_E: tl.constexpr,  # next power of two >= E
    PREFIX_ROWS: tl.constexpr,  # chunks (or blocks) read per step of the prefix loops
    COUNT_HERE: tl.constexpr,  # one chunk holds every route: count them here instead of reading counts
    PAD: tl.constexpr,  # 0: unpadded layout; > 0: segments rounded up to multiples of PAD rows
    WRITE_POSITION: tl.constexpr,  # PAD == 0 only: also write the inverse map
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
        for c0 in range(0, num_chunks, PREFIX_ROWS):
            c = c0 + tl.arange(0, PREFIX_ROWS)  # [PR] chunks
            rows = tl.load(counts_ptr + c[:, None] * num_experts + experts[None, :],
                           mask=(c < num_chunks)[:, None] & e_ok[None, :], other=0)  # [PR, BE]
            total += tl.sum(rows, axis=0)
            before += tl.sum(tl.where((c < chunk)[:, None], rows, 0), axis=0)
    if PAD > 0:
        segment = (total + PAD - 1) // PAD * PAD  # [BE] rows of each expert, padded
    else:
        segment = total
    ends = tl.cumsum(segment, axis=0)  # [BE]
    starts = ends - segment
    if chunk == 0:
        if PAD > 0:
            # Padding rows [starts + total, ends) of each expert hold N, PAD_STEP columns at a time.
            PAD_STEP: tl.constexpr = 16 if PAD > 16 else PAD
            for j0 in tl.static_range(0, PAD, PAD_STEP):
                pos = (starts + total)[:, None] + j0 + tl.arange(0, PAD_STEP)[None, :]  # [BE, PS]
                tl.store(pair_ptr + pos, tl.full((BLOCK_E, PAD_STEP), 0, tl.int32) + num_pairs,
                         mask=e_ok[:, None] & (pos < ends[:, None]))
            # Expert of block b = the experts whose padded segment ends at or before the block's first row.
            for b0 in range(0, num_blocks, PREFIX_ROWS):
                b = b0 + tl.arange(0, PREFIX_ROWS)  # [PR]
                done = (ends[None, :] <= (b * PAD)[:, None]) & e_ok[None, :]  # [PR, BE]
                tl.store(offsets_ptr + b, tl.sum(done.to(tl.int32), axis=1), mask=b < num_blocks)
        else:
            tl.store(offsets_ptr + experts, ends, mask=e_ok)

    # base[e]: the position of this chunk's next route of expert e.
    base = starts + before
    for s in range(0, tl.minimum(CHUNK, num_pairs - chunk * CHUNK), SUB):
        p = chunk * CHUNK + s + tl.arange(0, SUB)  # [SUB]
        ids = tl.load(ids_ptr + p, mask=p < num_pairs, other=-1)
        onehot = (ids[:, None] == experts[None, :]) & e_ok[None, :]  # [SUB, BE]
        ones = onehot.to(tl.int32)
        rank = tl.cumsum(ones, axis=0) - ones  # routes of the same expert earlier in this step
        pos = tl.sum(tl.where(onehot, base[None, :] + rank, 0), axis=1)  # [SUB]
        valid = tl.sum(ones, axis=1) > 0  # id in [0, E)
        tl.store(pair_ptr + pos, p.to(tl.int32), mask=valid)
        if WRITE_POSITION:
            tl.store(position_ptr + p, tl.where(valid, pos, -1), mask=p < num_pairs)
        base += tl.sum(ones, axis=0)


def padded_blocks(num_pairs: int, num_experts: int, pad: int) -> int:
    """Blocks of ``pad`` rows that the padded layout of ``num_pairs`` routes can use: cdiv(N, pad) + E."""
    return triton.cdiv(num_pairs, pad) + num_experts


def _launch(ids: torch.Tensor, num_experts: int, out_map: torch.Tensor, sorted_pair: torch.Tensor,
            num_blocks: int, pad: int, position: torch.Tensor | None = None) -> None:
    num_pairs = ids.numel()
    block_e = triton.next_power_of_2(num_experts)
    prefix_rows = max(1, _PREFIX_ELEMENTS // block_e)
    chunk = SMALL_CHUNK if CHUNK < num_pairs <= SMALL_CHUNK_MAX_PAIRS else CHUNK
    num_chunks = max(1, triton.cdiv(num_pairs, chunk))
    if num_chunks == 1:
        counts = out_map  # not read
    else:
        counts = torch.empty((num_chunks, num_experts), dtype=torch.int32, device=ids.device)
        _count_kernel[(num_chunks,)](
            ids, counts, num_pairs, num_experts, CHUNK=chunk, SUB=SUB, BLOCK_E=block_e, num_warps=_NUM_WARPS
        )
    _scatter_kernel[(num_chunks,)](
        ids, counts, out_map, sorted_pair, sorted_pair if position is None else position, num_pairs, num_experts,
        num_chunks, num_blocks, CHUNK=chunk, SUB=SUB, BLOCK_E=block_e, PREFIX_ROWS=prefix_rows,
        COUNT_HERE=num_chunks == 1, PAD=pad, WRITE_POSITION=position is not None, num_warps=_NUM_WARPS,
    )


def _unpadded(topk_ids: torch.Tensor, num_experts: int, positions: bool) -> tuple[torch.Tensor, ...]:
    ids = topk_ids.contiguous().view(-1)  # [N]
    offsets = torch.empty(num_experts, dtype=torch.int32, device=ids.device)
    sorted_pair = torch.empty(ids.numel(), dtype=torch.int32, device=ids.device)
    position = torch.empty(ids.numel(), dtype=torch.int32, device=ids.device) if positions else None
    _launch(ids, num_experts, offsets, sorted_pair, 0, 0, position)
    return (offsets, sorted_pair) if position is None else (offsets, sorted_pair, position)


def permute(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpadded layout: ``(offsets int32 [E], sorted_pair int32 [T * top_k])`` (see the module docstring)."""
    return _unpadded(topk_ids, num_experts, positions=False)


def permute_with_positions(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``permute`` and the inverse map: ``(offsets [E], sorted_pair [N], position [N])``, int32, with
    ``position[sorted_pair[r]] = r`` and -1 for routes whose id is outside [0, E)."""
    return _unpadded(topk_ids, num_experts, positions=True)


def permute_padded(topk_ids: torch.Tensor, num_experts: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded layout: ``(block_expert int32 [cdiv(N, pad) + E], sorted_pair int32 [that * pad])`` (see the
    module docstring); ``pad`` is a power of two (the GEMMs' row tile or a multiple of it)."""
    if pad <= 0 or pad & (pad - 1):
        raise ValueError(f"pad: expected a power of two, got {pad}")
    ids = topk_ids.contiguous().view(-1)  # [N]
    num_blocks = padded_blocks(ids.numel(), num_experts, pad)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=ids.device)
    sorted_pair = torch.empty(num_blocks * pad, dtype=torch.int32, device=ids.device)
    _launch(ids, num_experts, block_expert, sorted_pair, num_blocks, pad)
    return block_expert, sorted_pair
