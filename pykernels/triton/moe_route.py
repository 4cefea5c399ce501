"""Triton kernel of ``pykernels.moe_route``: one launch from router logits to (topk_weights, topk_ids).

Each program owns ``BLOCK_T`` token rows (one warp by default). A row's E logits are held as a
``[BLOCK_G, BLOCK_S]`` tile (groups x experts of a group, both padded to powers of two; greedy routing is
one group of E), so the program's tile is ``[BLOCK_T, BLOCK_G, BLOCK_S]``; with one warp every reduction
(softmax sum, group max, arg-max) stays inside it: register work, shuffles or ``redux.sync``, no shared
memory and no barrier. Steps: the logits as int32 order bits (same order as the scores, no rounding ties);
for group-limited routing the group maxima and the ``TOPK_GROUP`` best groups; then ``TOP_K`` rounds of
arg-max over the kept experts, each masking its winner and noting the round (its output column) on the
winner's lane; the softmax statistics in float32; the weights, normalised or scaled. The math and the
tie rules are in ``pykernels/moe_route.py``; they are restated where the code implements them.

Latency: at decode sizes a program is one row's dependent chain, and the ``TOP_K`` arg-max rounds are
most of it. The code variants (``Variant``, constexpr flags; bench/tune_route.py times them):

- ranking: one int64 (logit bits, inverted id) key a lane, one max a round, but a 64-bit max crosses the
  warp as 5 levels of two shuffles and a two-word compare (RANK_INT64); the int32 bits, then the lowest id
  holding the best bits, two reductions a round, each one ``redux.sync`` when a row fills the warp
  (RANK_VALUE_ID); one int32 max a round that marks every lane of the best value, exact when no round
  marks two lanes, else ranked again by RANK_VALUE_ID (RANK_DISTINCT);
- max_from_top: the softmax row max is round 0's winner instead of a separate float reduction;
- scatter: each winner lane stores its weight and id at its column, instead of gathering a [BT, K] tile;
- reverse: the tile holds a group's experts in descending order, which keeps the compiler from
  vectorising the load, so the load, the reductions and the scattered stores share one layout.

Sizing: few tokens (decode) -> one token per program, so the rows spread over the SMs and the latency of
the one launch is a single row's dependent chain; many tokens (prefill) -> ``ELEMENTS_PER_THREAD`` logits
a thread, enough rows per warp to keep the issue slots busy.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Logits a thread holds at most (x, the keys and the softmax terms of each stay in registers).
ELEMENTS_PER_THREAD = 16
# Programs that keep the GPU's SMs busy (about one per SM on Hopper): below this many rows, one row each.
TARGET_PROGRAMS = 128
_WARP = 32
INT64_MIN = tl.constexpr(-(2**63))
INT32_MIN = tl.constexpr(-(2**31))
# Low 32 bits of a key: LOW_ID_BASE - expert id, so that among equal logits the lower id has the larger key.
LOW_ID_BASE = tl.constexpr(0x7FFFFFFF)
# The id of a lane that cannot be picked (dead, or already picked) in the int32 ranking: above every id.
NO_ID = tl.constexpr(0x7FFFFFFF)


# Ranking methods (Variant.ranking), see the module docstring.
RANK_INT64 = tl.constexpr(0)  # one int64 (logit bits, inverted id) key: one 64-bit max a round
RANK_VALUE_ID = tl.constexpr(1)  # the best int32 bits, then the lowest id holding them: two reductions a round
RANK_DISTINCT = tl.constexpr(2)  # one int32 max a round marking every lane of that value; RANK_VALUE_ID on ties


class Variant(NamedTuple):
    """Code variants of the kernel that bench/tune_route.py compares (its constexpr flags)."""

    ranking: int  # RANK_*
    max_from_top: bool  # the softmax row max is round 0's winner (else its own float max reduction)
    scatter: bool  # each winner lane stores its weight and id at column rank (else a [BT, BK] tile)
    reverse: bool  # experts laid out in descending order in the tile (no vector loads; see the kernel)


# The kernel's constexpr defaults are the same.
DEFAULT_VARIANT = Variant(RANK_DISTINCT.value, max_from_top=True, scatter=True, reverse=True)


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
def _rank_by_value_then_id(ob, sel, kcols, TOP_K: tl.constexpr, TILE: tl.constexpr):
    """TOP_K rounds of (the best order bits, then the lowest id holding them), each a 32-bit reduction.

    ob: [BT, BG, BS] int32 order bits, INT32_MIN where dead; sel: the lane's expert id where alive, else NO_ID.
    Returns rank [BT, BG, BS] (the round each lane won, else -1), round 0's bits [BT] (the row max), and with
    TILE the [BT, BK] tiles of each column's bits and id (else zeros).
    """
    rank = tl.full(ob.shape, -1, tl.int32)
    top0 = tl.zeros((ob.shape[0],), tl.int32)
    top_bits = tl.zeros((ob.shape[0], kcols.shape[1]), tl.int32)
    top_ids = tl.zeros((ob.shape[0], kcols.shape[1]), tl.int32)
    for j in tl.static_range(TOP_K):
        best = _max_of_row(ob)  # [BT]
        pick = _min_of_row(tl.where(ob == best[:, None, None], sel, NO_ID))  # [BT]
        won = sel == pick[:, None, None]
        ob = tl.where(won, INT32_MIN, ob)
        sel = tl.where(won, NO_ID, sel)
        rank = tl.where(won, j, rank)
        if j == 0:
            top0 = best
        if TILE:
            top_bits = tl.where(kcols == j, best[:, None], top_bits)
            top_ids = tl.where(kcols == j, pick[:, None], top_ids)
    return rank, top0, top_bits, top_ids


@triton.jit
def _moe_route_kernel(
    logits_ptr,  # [T, E] router logits, any float dtype, stride 1 along E
    weights_ptr,  # [T, TOP_K] float32 out
    ids_ptr,  # [T, TOP_K] int32 out
    num_tokens,
    stride_t,  # elements between consecutive rows of logits
    scale,  # routed_scaling_factor (unused when NORM)
    NUM_EXPERTS: tl.constexpr,  # E
    GROUP_SIZE: tl.constexpr,  # experts per group, E / N_GROUP (E for greedy routing)
    TOP_K: tl.constexpr,  # experts chosen per token
    N_GROUP: tl.constexpr,  # expert groups; 1 means plain greedy routing
    TOPK_GROUP: tl.constexpr,  # groups kept per token (group-limited routing)
    NORM: tl.constexpr,  # normalise the weights to sum 1 instead of scaling them
    BLOCK_T: tl.constexpr,  # token rows per program
    BLOCK_G: tl.constexpr,  # next power of two >= N_GROUP
    BLOCK_S: tl.constexpr,  # next power of two >= GROUP_SIZE
    BLOCK_K: tl.constexpr,  # next power of two >= TOP_K (the output tile when not SCATTER)
    RANKING: tl.constexpr = 2,  # Variant.ranking (default: DEFAULT_VARIANT's)
    MAX_FROM_TOP: tl.constexpr = True,  # Variant.max_from_top
    SCATTER: tl.constexpr = True,  # Variant.scatter
    REVERSE: tl.constexpr = True,  # Variant.reverse
):
    tl.static_assert(SCATTER or RANKING != RANK_DISTINCT, "RANK_DISTINCT finds no ids: it needs SCATTER")
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None, None]  # [BT, 1, 1]
    g = tl.arange(0, BLOCK_G)[None, :, None]  # [1, BG, 1] group
    s = tl.arange(0, BLOCK_S)[None, None, :]  # [1, 1, BS] expert within its group
    if REVERSE:
        # Descending experts: no contiguity for the compiler to vectorise, so the load takes the layout of
        # the scattered stores (one element a thread per lane step) and no shuffles convert between them.
        s = BLOCK_S - 1 - s
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
        if RANKING == RANK_INT64:
            gkey = (gob.to(tl.int64) << 32) | (-gid + LOW_ID_BASE).to(tl.int64)
            gkey = tl.where(gid < N_GROUP, gkey, INT64_MIN)
            for _ in tl.static_range(TOPK_GROUP):
                best = tl.max(gkey, axis=1)  # [BT]
                won = gkey == best[:, None]
                kept = kept | won
                gkey = tl.where(won, INT64_MIN, gkey)
        else:
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

    # TOP_K rounds of arg-max-then-mask. rank[e] = the round expert e won (its output column), else -1.
    # NOTES: a row has at least TOP_K alive experts (validated: top_k <= topk_group * E / n_group), so every
    # round's winner is one alive lane, never picked before, even when logits are NaN.
    kcols = tl.arange(0, BLOCK_K)[None, :]  # [1, BK]
    sel = tl.where(alive, expert, NO_ID)  # [BT, BG, BS] the id of a lane that can still be picked
    if RANKING == RANK_INT64:
        # One key per expert: high 32 bits = the order bits, low 32 bits = LOW_ID_BASE - id, so one max picks
        # the best logit and, among equal ones, the lowest id. Keys are unique; dead lanes hold INT64_MIN,
        # which no alive key reaches (the NaN 0xffffffff has order bits INT32_MIN, but id bits above 0).
        key = (ob.to(tl.int64) << 32) | (-expert + LOW_ID_BASE).to(tl.int64)  # [BT, BG, BS]
        key = tl.where(alive, key, INT64_MIN)
        rank = tl.full((BLOCK_T, BLOCK_G, BLOCK_S), -1, tl.int32)
        top0 = tl.zeros((BLOCK_T,), tl.int32)
        top_bits = tl.zeros((BLOCK_T, BLOCK_K), tl.int32)  # [BT, BK] order bits of column j's logit (tile output)
        top_ids = tl.zeros((BLOCK_T, BLOCK_K), tl.int32)  # [BT, BK] column j's expert (tile output)
        for j in tl.static_range(TOP_K):
            best_key = _max_of_row(key)  # [BT]
            won = key == best_key[:, None, None]
            key = tl.where(won, INT64_MIN, key)
            rank = tl.where(won, j, rank)
            best = (best_key >> 32).to(tl.int32)
            if j == 0:
                top0 = best
            if not SCATTER:
                top_bits = tl.where(kcols == j, best[:, None], top_bits)
                top_ids = tl.where(kcols == j, -best_key.to(tl.int32)[:, None] + LOW_ID_BASE, top_ids)
    elif RANKING == RANK_VALUE_ID or BLOCK_G * BLOCK_S <= TOP_K:
        rank, top0, top_bits, top_ids = _rank_by_value_then_id(ob, sel, kcols, TOP_K, not SCATTER)
    else:
        # Round j marks every lane holding the j-th largest distinct value: one 32-bit max a round. Without
        # ties that is one new lane a round, TOP_K lanes in all, and the ranks are exact. A row that marks more
        # lanes (equal logits, or a round that reached the dead lanes' INT32_MIN and so marked every lane) is
        # ranked again below by RANK_VALUE_ID's rounds. NOTES: a round marks no new lane only once all lanes
        # are marked, so "TOP_K lanes marked" proves one lane a round only when the tile has more than TOP_K.
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
    if MAX_FROM_TOP:
        row_max = _bits_to_float(top0)  # [BT]
    else:
        row_max = _max_of_row(x)
    p = tl.where(e_ok, tl.exp(x - row_max[:, None, None]), 0.0)  # [BT, BG, BS]
    denom = tl.sum(tl.sum(p, axis=2), axis=1)  # [BT]

    if RANKING == RANK_DISTINCT and BLOCK_G * BLOCK_S > TOP_K:
        if rank_again:
            rank, top0, top_bits, top_ids = _rank_by_value_then_id(ob, sel, kcols, TOP_K, False)

    if SCATTER:
        w = p / denom[:, None, None]  # [BT, BG, BS] = s
        picked = rank >= 0
        if NORM:
            w = w / (tl.sum(tl.sum(tl.where(picked, w, 0.0), axis=2), axis=1)[:, None, None] + 1e-20)
        else:
            w = w * scale
        out = rows.to(tl.int64) * TOP_K + rank
        tl.store(weights_ptr + out, w, mask=picked & row_ok)
        tl.store(ids_ptr + out, expert, mask=picked & row_ok)
    else:
        rows1 = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
        pick = tl.minimum(tl.maximum(top_ids, 0), NUM_EXPERTS - 1)  # [BT, BK] (in range for NaN rows too)
        w = tl.exp(_bits_to_float(top_bits) - row_max[:, None]) / denom[:, None]  # = s[pick]
        k_ok = kcols < TOP_K
        if NORM:
            w = w / (tl.sum(tl.where(k_ok, w, 0.0), axis=1)[:, None] + 1e-20)
        else:
            w = w * scale
        out = rows1.to(tl.int64)[:, None] * TOP_K + kcols
        out_mask = (rows1 < num_tokens)[:, None] & k_ok
        tl.store(weights_ptr + out, w, mask=out_mask)
        tl.store(ids_ptr + out, pick, mask=out_mask)


class Launch(NamedTuple):
    """One launch's shape: rows per program, warps per program, the padded tile, the code variant."""

    block_t: int
    num_warps: int
    block_g: int
    block_s: int
    variant: Variant = DEFAULT_VARIANT


def launch_shape(num_tokens: int, num_experts: int, n_group: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_G, BLOCK_S) for ``num_tokens`` rows of ``num_experts`` logits in ``n_group`` groups."""
    block_g = triton.next_power_of_2(n_group)
    block_s = triton.next_power_of_2(num_experts // n_group)
    most_rows = max(1, ELEMENTS_PER_THREAD * _WARP // (block_g * block_s))
    block_t = min(most_rows, triton.next_power_of_2(triton.cdiv(max(num_tokens, 1), TARGET_PROGRAMS)))
    return block_t, block_g, block_s


def default_launch(num_tokens: int, num_experts: int, n_group: int) -> Launch:
    """The launch ``moe_route_triton`` makes without an explicit one: ``launch_shape``, one warp a program."""
    block_t, block_g, block_s = launch_shape(num_tokens, num_experts, n_group)
    return Launch(block_t, 1, block_g, block_s)


def moe_route_triton(
    router_logits: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool,
    launch: Launch | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the routing kernel on validated inputs (see ``pykernels.moe_route``): two allocations, one launch.

    ``launch`` (bench/tune_route.py's knob) replaces ``default_launch``: any power-of-two block_t and any
    num_warps give the same results; block_g and block_s must be ``launch_shape``'s.
    """
    num_tokens, num_experts = router_logits.shape
    weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=router_logits.device)
    ids = torch.empty((num_tokens, top_k), dtype=torch.int32, device=router_logits.device)
    if num_tokens == 0:
        return weights, ids
    launch = launch or default_launch(num_tokens, num_experts, n_group)
    v = launch.variant
    _moe_route_kernel[(triton.cdiv(num_tokens, launch.block_t),)](
        router_logits, weights, ids, num_tokens, router_logits.stride(0), routed_scaling_factor,
        NUM_EXPERTS=num_experts, GROUP_SIZE=num_experts // n_group, TOP_K=top_k, N_GROUP=n_group,
        TOPK_GROUP=topk_group, NORM=bool(norm_topk_prob and top_k > 1),
        BLOCK_T=launch.block_t, BLOCK_G=launch.block_g, BLOCK_S=launch.block_s,
        BLOCK_K=triton.next_power_of_2(top_k), RANKING=v.ranking, MAX_FROM_TOP=v.max_from_top, SCATTER=v.scatter,
        REVERSE=v.reverse, num_warps=launch.num_warps,
    )
    return weights, ids
