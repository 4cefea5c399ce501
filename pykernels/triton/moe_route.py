"""Triton kernel of ``pykernels.moe_route``: one launch from router logits to (topk_weights, topk_ids).

Each program owns ``BLOCK_T`` token rows in one warp. A row's E logits are held as a ``[BLOCK_G, BLOCK_S]``
tile (groups x experts of a group, both padded to powers of two; greedy routing is one group of E), so the
program's tile is ``[BLOCK_T, BLOCK_G, BLOCK_S]``; in one warp every reduction (softmax sum, group max,
arg-max) is register work, shuffles or ``redux.sync``: no shared memory and no barrier. The math and the tie
rules are in ``pykernels/moe_route.py``; they are restated where the code implements them. Steps:

1. Load the tile with a group's experts in descending order: the compiler finds no contiguity to vectorise,
   so the load takes the layout of the scattered stores of step 5 and no shuffles convert between them.
2. The logits as int32 order bits (same order as the scores, no rounding ties); for group-limited routing
   the group maxima and the ``TOPK_GROUP`` best groups (best bits, then the lowest group id).
3. ``TOP_K`` rounds of one int32 max over the kept experts, each marking every lane that holds that value
   with the round (its output column). Without ties that is one lane a round and the ranks are exact; a
   program with a row that marked more than ``TOP_K`` lanes (equal logits) ranks its rows again, each round
   the best bits then the lowest id holding them (two reductions a round).
4. The softmax statistics in float32, the row max being round 0's value.
5. Each winner lane stores its own weight (normalised or scaled) and id at its column.

Measured (bench/results/nvidia-h200/tune/route.json: bench/tune_route.py's sweep of the ranking methods,
the row max, the stores and the tile order, H200, triton 3.6, CUDA-graph replays): Lite T=64 E=64 1.415 µs,
the fastest candidate (bench_moe: 1.43 µs = 6.23x the eager gate, against 1.92 µs / 4.63x with one int64
key a lane, a float row max and a [T, K] output tile); 236B T=64 2.38 µs, 4 % behind the int64 key with a
tile output (2.28); Lite T=8192 3.50 µs at the default 8 rows a program (3.24 at 4 rows); 236B T=8192 7.73
µs (value-then-id ranking with a tile output: 7.53).

Sizing: few tokens (decode) -> one token per program, so the rows spread over the SMs and the latency of
the one launch is a single row's dependent chain; many tokens (prefill) -> ``ELEMENTS_PER_THREAD`` logits
a thread, enough rows per warp to keep the issue slots busy.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Logits a thread holds at most (x, the order bits and the softmax terms of each stay in registers).
ELEMENTS_PER_THREAD = 16
# Programs that keep the GPU's SMs busy (about one per SM on Hopper): below this many rows, one row each.
TARGET_PROGRAMS = 128
# Warps a program: one keeps every reduction inside the warp (no shared memory, no barrier).
NUM_WARPS = 1
_WARP = 32
INT32_MIN = tl.constexpr(-(2**31))
# The id of a lane that cannot be picked (dead, or already picked): above every id.
NO_ID = tl.constexpr(0x7FFFFFFF)


@triton.jit
def _order_bits(v):
    """float32 -> int32 with the same order (negative floats: magnitude bits flipped); its own inverse."""
    bits = v.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _bits_to_float(ob):
    """The inverse of ``_order_bits``: int32 order bits -> the float32 they came from."""
    return _order_bits(ob).to(tl.float32, bitcast=True)


@triton.jit
def _max_of_row(v):
    """[BT, BG, BS] -> [BT]: the maximum over a row's experts."""
    return tl.max(tl.max(v, axis=2), axis=1)


@triton.jit
def _min_of_row(v):
    """[BT, BG, BS] -> [BT]: the minimum over a row's experts."""
    return tl.min(tl.min(v, axis=2), axis=1)


@triton.jit
def _rank_by_value_then_id(ob, sel, TOP_K: tl.constexpr):
    """TOP_K rounds of (the best order bits, then the lowest id holding them), each a 32-bit reduction.

    ob: [BT, BG, BS] int32 order bits, INT32_MIN where dead; sel: the lane's expert id where alive, else NO_ID.
    Returns rank [BT, BG, BS] (the round each lane won, else -1) and round 0's bits [BT] (the row max).
    """
    rank = tl.full(ob.shape, -1, tl.int32)
    top0 = tl.zeros((ob.shape[0],), tl.int32)
    for j in tl.static_range(TOP_K):
        best = _max_of_row(ob)  # [BT]
        pick = _min_of_row(tl.where(ob == best[:, None, None], sel, NO_ID))  # [BT]
        won = sel == pick[:, None, None]
        ob = tl.where(won, INT32_MIN, ob)
        sel = tl.where(won, NO_ID, sel)
        rank = tl.where(won, j, rank)
        if j == 0:
            top0 = best
    return rank, top0


@triton.jit
def _moe_route_kernel(
    logits_ptr,  # [T, E] router logits, any float dtype, stride 1 along E
    weights_ptr,  # [T, TOP_K] float32 out
    ids_ptr,  # [T, TOP_K] int32 out
    num_tokens,
    stride_t,  # elements between consecutive rows of logits
    scale,  # routed_scaling_factor (unused when NORM)
    GROUP_SIZE: tl.constexpr,  # experts per group, E / N_GROUP (E for greedy routing)
    TOP_K: tl.constexpr,  # experts chosen per token
    N_GROUP: tl.constexpr,  # expert groups; 1 means plain greedy routing
    TOPK_GROUP: tl.constexpr,  # groups kept per token (group-limited routing)
    NORM: tl.constexpr,  # normalise the weights to sum 1 instead of scaling them
    BLOCK_T: tl.constexpr,  # token rows per program
    BLOCK_G: tl.constexpr,  # next power of two >= N_GROUP
    BLOCK_S: tl.constexpr,  # next power of two >= GROUP_SIZE
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None, None]  # [BT, 1, 1]
    g = tl.arange(0, BLOCK_G)[None, :, None]  # [1, BG, 1] group
    # [1, 1, BS] expert within its group, descending: no contiguity for the compiler to vectorise, so the load
    # takes the layout of the scattered stores (one element a thread per lane step), no shuffles between them.
    s = BLOCK_S - 1 - tl.arange(0, BLOCK_S)[None, None, :]
    expert = g * GROUP_SIZE + s  # [1, BG, BS] expert id
    e_ok = (g < N_GROUP) & (s < GROUP_SIZE)
    row_ok = rows < num_tokens  # [BT, 1, 1]
    ptrs = logits_ptr + rows.to(tl.int64) * stride_t + expert
    x = tl.load(ptrs, mask=row_ok & e_ok, other=0.0).to(tl.float32)  # [BT, BG, BS]
    # One zero (-0.0 == +0.0 in every comparison below); padding lanes never win a max.
    x = tl.where(x == 0.0, 0.0, x)
    x = tl.where(e_ok, x, float("-inf"))
    # The logit as an int32 of the same order: ranks exactly like the score, no rounding ties.
    ob = tl.where(e_ok, _order_bits(x), INT32_MIN)  # [BT, BG, BS]

    alive = e_ok
    if N_GROUP > 1:
        # Group key = the group's largest logit, lower group id on ties; keep the TOPK_GROUP best groups.
        gob = tl.max(ob, axis=2)  # [BT, BG]
        gid = tl.arange(0, BLOCK_G)[None, :]  # [1, BG]
        kept = tl.zeros((BLOCK_T, BLOCK_G), dtype=tl.int1)  # [BT, BG] groups kept so far
        gob = tl.where(gid < N_GROUP, gob, INT32_MIN)
        gsel = tl.where(gid < N_GROUP, gid, NO_ID)  # [1, BG] groups still to pick
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.max(gob, axis=1)[:, None]  # [BT, 1]
            won = gsel == tl.min(tl.where(gob == best, gsel, NO_ID), axis=1)[:, None]
            kept = kept | won
            gob = tl.where(won, INT32_MIN, gob)
            gsel = tl.where(won, NO_ID, gsel)
        alive = alive & kept[:, :, None]
    ob = tl.where(alive, ob, INT32_MIN)

    # TOP_K rounds: rank[e] = the round expert e won (its output column), else -1.
    # NOTES: a row has at least TOP_K alive experts (validated: top_k <= topk_group * E / n_group), so every
    # round's winner is one alive lane, never picked before, even when logits are NaN.
    sel = tl.where(alive, expert, NO_ID)  # [BT, BG, BS] the id of a lane that can still be picked
    if BLOCK_G * BLOCK_S <= TOP_K:
        rank, top0 = _rank_by_value_then_id(ob, sel, TOP_K)
    else:
        # Round j marks every lane holding the j-th largest distinct value: one 32-bit max a round. Without
        # ties that is one new lane a round, TOP_K lanes in all, and the ranks are exact. A row that marks more
        # lanes (equal logits, or a round that reached the dead lanes' INT32_MIN and so marked every lane) is
        # ranked again below by value then id. NOTES: a round marks no new lane only once all lanes are
        # marked, so "TOP_K lanes marked" proves one lane a round only when the tile has more than TOP_K.
        rank = tl.full((BLOCK_T, BLOCK_G, BLOCK_S), -1, tl.int32)
        top0 = tl.zeros((BLOCK_T,), tl.int32)
        left = ob
        for j in tl.static_range(TOP_K):
            best = _max_of_row(left)  # [BT]
            won = left == best[:, None, None]
            left = tl.where(won, INT32_MIN, left)
            rank = tl.where(won, j, rank)
            if j == 0:
                top0 = best
        marked = tl.sum(tl.sum((rank >= 0).to(tl.int32), axis=2), axis=1)  # [BT]
        marked = tl.where(tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T) < num_tokens, marked, TOP_K)
        rank_again = tl.max(marked, axis=0) > TOP_K

    # Softmax statistics, float32: s[e] = exp(x[e] - row_max) / denom. Round 0's winner is the row's largest
    # logit (the best group is always kept); a NaN row gives NaN weights either way.
    row_max = _bits_to_float(top0)  # [BT]
    p = tl.where(e_ok, tl.exp(x - row_max[:, None, None]), 0.0)  # [BT, BG, BS]
    denom = tl.sum(tl.sum(p, axis=2), axis=1)  # [BT]

    if BLOCK_G * BLOCK_S > TOP_K:
        if rank_again:
            rank, top0 = _rank_by_value_then_id(ob, sel, TOP_K)

    w = p / denom[:, None, None]  # [BT, BG, BS] = s
    picked = rank >= 0
    if NORM:
        w = w / (tl.sum(tl.sum(tl.where(picked, w, 0.0), axis=2), axis=1)[:, None, None] + 1e-20)
    else:
        w = w * scale
    out = rows.to(tl.int64) * TOP_K + rank
    tl.store(weights_ptr + out, w, mask=picked & row_ok)
    tl.store(ids_ptr + out, expert, mask=picked & row_ok)


def launch_shape(num_tokens: int, num_experts: int, n_group: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_G, BLOCK_S) for ``num_tokens`` rows of ``num_experts`` logits in ``n_group`` groups."""
    block_g = triton.next_power_of_2(n_group)
    block_s = triton.next_power_of_2(num_experts // n_group)
    most_rows = max(1, ELEMENTS_PER_THREAD * _WARP // (block_g * block_s))
    block_t = min(most_rows, triton.next_power_of_2(triton.cdiv(max(num_tokens, 1), TARGET_PROGRAMS)))
    return block_t, block_g, block_s


def moe_route_triton(
    router_logits: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool,
    *,
    block_t: int | None = None,
    num_warps: int = NUM_WARPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the routing kernel on validated inputs (see ``pykernels.moe_route``): two allocations, one launch.

    ``block_t`` (rows per program, a power of two; default ``launch_shape``'s) and ``num_warps`` are
    bench/tune_route.py's knobs: every value gives the same results.
    """
    num_tokens, num_experts = router_logits.shape
    weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=router_logits.device)
    ids = torch.empty((num_tokens, top_k), dtype=torch.int32, device=router_logits.device)
    if num_tokens == 0:
        return weights, ids
    default_block_t, block_g, block_s = launch_shape(num_tokens, num_experts, n_group)
    block_t = block_t or default_block_t
    _moe_route_kernel[(triton.cdiv(num_tokens, block_t),)](
        router_logits, weights, ids, num_tokens, router_logits.stride(0), routed_scaling_factor,
        GROUP_SIZE=num_experts // n_group, TOP_K=top_k, N_GROUP=n_group, TOPK_GROUP=topk_group,
        NORM=bool(norm_topk_prob and top_k > 1), BLOCK_T=block_t, BLOCK_G=block_g, BLOCK_S=block_s,
        num_warps=num_warps,
    )
    return weights, ids
