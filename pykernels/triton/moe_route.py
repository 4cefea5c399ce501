"""Triton kernel of ``pykernels.moe_route``: one launch from router logits to (topk_weights, topk_ids).

Each program owns ``BLOCK_T`` token rows and holds their ``E`` logits in registers (``[BLOCK_T, BLOCK_E]``):
float32 softmax, then (group-limited) selection by repeated arg-max over packed (logit, id) keys, then the weights. The math and the
tie rules are in ``pykernels/moe_route.py``; they are restated where the code implements them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Logits held per program (BLOCK_T * BLOCK_E): 2048 float32 values are 16 registers a thread at 4 warps,
# room for the logits, the scores and the selection mask without spilling.
_ELEMENTS_PER_PROGRAM = 2048
_NUM_WARPS = 4
INT64_MIN = tl.constexpr(-(2**63))


@triton.jit
def _moe_route_kernel(
    logits_ptr,  # [T, E] router logits, any float dtype, stride 1 along E
    weights_ptr,  # [T, TOP_K] float32 out
    ids_ptr,  # [T, TOP_K] int32 out
    num_tokens,
    num_experts,
    stride_t,  # elements between consecutive rows of logits
    group_size,  # experts per group (E / N_GROUP)
    scale,  # routed_scaling_factor (unused when NORM)
    TOP_K: tl.constexpr,  # experts chosen per token
    N_GROUP: tl.constexpr,  # expert groups; 1 means plain greedy routing
    TOPK_GROUP: tl.constexpr,  # groups kept per token (group-limited routing)
    NORM: tl.constexpr,  # normalise the weights to sum 1 instead of scaling them
    BLOCK_T: tl.constexpr,  # token rows per program
    BLOCK_E: tl.constexpr,  # next power of two >= E
    BLOCK_G: tl.constexpr,  # next power of two >= N_GROUP
    BLOCK_K: tl.constexpr,  # next power of two >= TOP_K
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    cols = tl.arange(0, BLOCK_E)  # [BE] expert ids
    row_ok = rows < num_tokens
    col_ok = cols < num_experts
    ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride_t + cols[None, :]
    x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)  # [BT, BE]
    # One zero (-0.0 == +0.0 in every comparison below); padding lanes never win a max.
    x = tl.where(x == 0.0, 0.0, x)
    x = tl.where(col_ok[None, :], x, float("-inf"))

    # s = softmax(x) over the E experts, in float32: s[e] = p[e] / sum(p).
    row_max = tl.max(x, axis=1)  # [BT]
    p = tl.where(col_ok[None, :], tl.exp(x - row_max[:, None]), 0.0)  # [BT, BE]

    # alive: experts still eligible. Ranking key: the logit (orders like the score, no rounding ties).
    alive = (cols[None, :] < num_experts) & (rows[:, None] >= 0)  # [BT, BE]
    if N_GROUP > 1:
        # Group key = the group's largest logit; keep the TOPK_GROUP best groups, lower group id on ties.
        group_of = cols // group_size  # [BE]
        gcols = tl.arange(0, BLOCK_G)  # [BG]
        gkey = tl.full((BLOCK_T, BLOCK_G), float("-inf"), tl.float32)
        for g in range(N_GROUP):
            gmax = tl.max(tl.where((group_of == g)[None, :], x, float("-inf")), axis=1)  # [BT]
            gkey = tl.where((gcols == g)[None, :], gmax[:, None], gkey)
        galive = (gcols[None, :] < N_GROUP) & (rows[:, None] >= 0)  # [BT, BG]
        kept = (cols[None, :] < 0) & (rows[:, None] < 0)  # [BT, BE] all False
        for _ in range(TOPK_GROUP):
            best = tl.max(tl.where(galive, gkey, float("-inf")), axis=1)  # [BT]
            pick = tl.min(tl.where(galive & (gkey == best[:, None]), gcols[None, :], BLOCK_G), axis=1)  # [BT]
            galive = galive & (gcols[None, :] != pick[:, None])
            kept = kept | (group_of[None, :] == pick[:, None])
        alive = alive & kept

    # Repeated arg-max over one int64 key per expert, so one reduction picks both the best logit and the
    # lowest id among equal ones: high 32 bits = the logit's bits mapped to a signed integer of the same
    # order (negative floats: magnitude bits flipped), low 32 bits = BLOCK_E - 1 - id. Eliminated and
    # padding lanes hold INT64_MIN, which no logit reaches (only the NaN 0xffffffff maps next to it).
    xbits = x.to(tl.int32, bitcast=True)
    order = xbits ^ ((xbits >> 31) & 0x7FFFFFFF)
    key = (order.to(tl.int64) << 32) | (BLOCK_E - 1 - cols).to(tl.int64)[None, :]  # [BT, BE]
    key = tl.where(alive, key, INT64_MIN)
    denom = tl.sum(p, axis=1)  # [BT]
    kcols = tl.arange(0, BLOCK_K)  # [BK]
    top_w = tl.zeros((BLOCK_T, BLOCK_K), tl.float32)
    top_id = tl.zeros((BLOCK_T, BLOCK_K), tl.int32)
    for j in range(TOP_K):
        best = tl.max(key, axis=1)  # [BT]
        # NOTES: keys are unique, so exactly one lane wins; clamp anyway so a NaN row keeps ids in range.
        pick = tl.minimum(tl.maximum(BLOCK_E - 1 - best.to(tl.int32), 0), num_experts - 1)
        key = tl.where(cols[None, :] == pick[:, None], INT64_MIN, key)
        hi = (best >> 32).to(tl.int32)
        logit = (hi ^ ((hi >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)  # the mapping is its own inverse
        w = tl.exp(logit - row_max) / denom  # = s[pick]
        top_w = tl.where((kcols == j)[None, :], w[:, None], top_w)
        top_id = tl.where((kcols == j)[None, :], pick[:, None], top_id)

    if NORM:
        top_w = top_w / (tl.sum(top_w, axis=1)[:, None] + 1e-20)
    else:
        top_w = top_w * scale
    out = rows.to(tl.int64)[:, None] * TOP_K + kcols[None, :]
    out_mask = row_ok[:, None] & (kcols[None, :] < TOP_K)
    tl.store(weights_ptr + out, top_w, mask=out_mask)
    tl.store(ids_ptr + out, top_id, mask=out_mask)


def moe_route_triton(
    router_logits: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the routing kernel on validated inputs (see ``pykernels.moe_route``)."""
    num_tokens, num_experts = router_logits.shape
    weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=router_logits.device)
    ids = torch.empty((num_tokens, top_k), dtype=torch.int32, device=router_logits.device)
    if num_tokens == 0:
        return weights, ids
    block_e = triton.next_power_of_2(num_experts)
    block_t = max(1, min(_ELEMENTS_PER_PROGRAM // block_e, triton.next_power_of_2(num_tokens)))
    grid = (triton.cdiv(num_tokens, block_t),)
    _moe_route_kernel[grid](
        router_logits, weights, ids, num_tokens, num_experts, router_logits.stride(0),
        num_experts // n_group, routed_scaling_factor,
        TOP_K=top_k, N_GROUP=n_group, TOPK_GROUP=topk_group, NORM=bool(norm_topk_prob and top_k > 1),
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_G=triton.next_power_of_2(n_group),
        BLOCK_K=triton.next_power_of_2(top_k), num_warps=_NUM_WARPS,
    )
    return weights, ids
