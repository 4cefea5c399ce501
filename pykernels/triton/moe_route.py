"""Triton kernel of ``pykernels.moe_route``: one launch from router logits to (topk_weights, topk_ids).

Each program is ONE warp and owns ``BLOCK_T`` token rows. A row's E logits are held as a
``[BLOCK_G, BLOCK_S]`` tile (groups x experts of a group, both padded to powers of two; greedy routing is
one group of E), so the program's tile is ``[BLOCK_T, BLOCK_G, BLOCK_S]`` and every reduction (row max,
softmax sum, group max, arg-max) stays inside the warp: register work and shuffles, no shared memory and
no barrier. Steps: float32 softmax statistics; for group-limited routing the group maxima and the
``TOPK_GROUP`` best groups; then ``TOP_K`` rounds of arg-max over one packed (logit, id) key per expert,
each round masking its winner; the weights from the kept keys, normalised or scaled. The math and the tie
rules are in ``pykernels/moe_route.py``; they are restated where the code implements them.

Sizing: few tokens (decode) -> one token per program, so the rows spread over the SMs and the latency of
the one launch is a single row's dependent chain; many tokens (prefill) -> ``ELEMENTS_PER_THREAD`` logits
a thread, enough rows per warp to keep the issue slots busy.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Logits a thread holds at most (x, the int64 keys and the softmax terms of each stay in registers).
ELEMENTS_PER_THREAD = 16
# Programs that keep the GPU's SMs busy (about one per SM on Hopper): below this many rows, one row each.
TARGET_PROGRAMS = 128
_WARP = 32
INT64_MIN = tl.constexpr(-(2**63))
# Low 32 bits of a key: LOW_ID_BASE - expert id, so that among equal logits the lower id has the larger key.
LOW_ID_BASE = tl.constexpr(0x7FFFFFFF)


@triton.jit
def _order_bits(v):
    """float32 -> int32 with the same order (negative floats: magnitude bits flipped); its own inverse."""
    bits = v.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


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
    BLOCK_K: tl.constexpr,  # next power of two >= TOP_K
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    g = tl.arange(0, BLOCK_G)[None, :, None]  # [1, BG, 1] group
    s = tl.arange(0, BLOCK_S)[None, None, :]  # [1, 1, BS] expert within its group
    expert = g * GROUP_SIZE + s  # [1, BG, BS] expert id
    e_ok = (g < N_GROUP) & (s < GROUP_SIZE)
    row_ok = rows < num_tokens
    ptrs = logits_ptr + rows.to(tl.int64)[:, None, None] * stride_t + expert
    x = tl.load(ptrs, mask=row_ok[:, None, None] & e_ok, other=0.0).to(tl.float32)  # [BT, BG, BS]
    # One zero (-0.0 == +0.0 in every comparison below); padding lanes never win a max.
    x = tl.where(x == 0.0, 0.0, x)
    x = tl.where(e_ok, x, float("-inf"))

    # Softmax statistics, float32: s[e] = exp(x[e] - row_max) / denom.
    row_max = tl.max(tl.max(x, axis=2), axis=1)  # [BT]
    p = tl.where(e_ok, tl.exp(x - row_max[:, None, None]), 0.0)
    denom = tl.sum(tl.sum(p, axis=2), axis=1)  # [BT]

    # Ranking keys, one int64 per expert: high 32 bits = the logit in an order-preserving integer form
    # (ranks exactly like the score, no rounding ties), low 32 bits = LOW_ID_BASE - id, so one max picks
    # the best logit and, among equal ones, the lowest id. Keys are unique; dead lanes hold INT64_MIN,
    # which no logit reaches (only the NaN 0xffffffff comes next to it).
    key = (_order_bits(x).to(tl.int64) << 32) | (-expert + LOW_ID_BASE).to(tl.int64)  # [BT, BG, BS]
    alive = e_ok
    if N_GROUP > 1:
        # Group key = the group's largest logit, lower group id on ties; keep the TOPK_GROUP best groups.
        gmax = tl.max(x, axis=2)  # [BT, BG]
        gid = tl.arange(0, BLOCK_G)[None, :]  # [1, BG]
        gkey = (_order_bits(gmax).to(tl.int64) << 32) | (-gid + LOW_ID_BASE).to(tl.int64)
        gkey = tl.where(gid < N_GROUP, gkey, INT64_MIN)
        kept = tl.zeros((BLOCK_T, BLOCK_G), dtype=tl.int1)  # [BT, BG] groups kept so far
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.max(gkey, axis=1)  # [BT]
            won = gkey == best[:, None]
            kept = kept | won
            gkey = tl.where(won, INT64_MIN, gkey)
        alive = alive & kept[:, :, None]
    key = tl.where(alive, key, INT64_MIN)

    # TOP_K rounds of arg-max-then-mask; column j of `top` keeps the j-th best key.
    kcols = tl.arange(0, BLOCK_K)[None, :]  # [1, BK]
    top = tl.full((BLOCK_T, BLOCK_K), INT64_MIN, tl.int64)
    for j in tl.static_range(TOP_K):
        best = tl.max(tl.max(key, axis=2), axis=1)  # [BT]
        key = tl.where(key == best[:, None, None], INT64_MIN, key)
        top = tl.where(kcols == j, best[:, None], top)

    # Decode the kept keys: ids from the low bits (clamped: a NaN row keeps ids in range), logits from the high.
    pick = -top.to(tl.int32) + LOW_ID_BASE  # truncation keeps the low 32 bits
    pick = tl.minimum(tl.maximum(pick, 0), NUM_EXPERTS - 1)  # [BT, BK]
    logit = _order_bits((top >> 32).to(tl.int32)).to(tl.float32, bitcast=True)
    w = tl.exp(logit - row_max[:, None]) / denom[:, None]  # = s[pick]
    k_ok = kcols < TOP_K
    if NORM:
        w = w / (tl.sum(tl.where(k_ok, w, 0.0), axis=1)[:, None] + 1e-20)
    else:
        w = w * scale
    out = rows.to(tl.int64)[:, None] * TOP_K + kcols
    out_mask = row_ok[:, None] & k_ok
    tl.store(weights_ptr + out, w, mask=out_mask)
    tl.store(ids_ptr + out, pick, mask=out_mask)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the routing kernel on validated inputs (see ``pykernels.moe_route``): two allocations, one launch."""
    num_tokens, num_experts = router_logits.shape
    weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=router_logits.device)
    ids = torch.empty((num_tokens, top_k), dtype=torch.int32, device=router_logits.device)
    if num_tokens == 0:
        return weights, ids
    block_t, block_g, block_s = launch_shape(num_tokens, num_experts, n_group)
    _moe_route_kernel[(triton.cdiv(num_tokens, block_t),)](
        router_logits, weights, ids, num_tokens, router_logits.stride(0), routed_scaling_factor,
        NUM_EXPERTS=num_experts, GROUP_SIZE=num_experts // n_group, TOP_K=top_k, N_GROUP=n_group,
        TOPK_GROUP=topk_group, NORM=bool(norm_topk_prob and top_k > 1),
        BLOCK_T=block_t, BLOCK_G=block_g, BLOCK_S=block_s, BLOCK_K=triton.next_power_of_2(top_k), num_warps=1,
    )
    return weights, ids
