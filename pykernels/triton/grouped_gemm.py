"""Triton grouped-GEMM expert FFN: the backend of ``pykernels.moe_ffn`` and ``pykernels.grouped_ffn``.

``moe_ffn`` runs in one of three row layouts (``moe_ffn_triton(layout=...)``; by default "direct" up to
``moe_configs.DIRECT_MAX_TOKENS`` tokens, "sorted" beyond). No layout synchronises with the host.

"direct" (decode, one token: its top_k routes are distinct experts) -- 1 launch, no permutation::

    h[p]   = w[p] * silu(x[t] @ gate_e.T) * (x[t] @ up_e.T)     gate_up items (I tile, route p = t*top_k + k)
    y[t]   = sum_k h[t*top_k + k] @ w2[e_k].T                    down items (H tile, token): one fp32
                                                                 accumulator over the k routes in order

  _direct_kernel runs both GEMMs: a program per SM (or a few) takes work items from a counter in global
  memory, all gate_up items first, and a down item waits (spinning on a per-token counter) until the
  gate_up items of its token are done. Items are handed out in order, so the items waited for are held by
  running programs that wait for nothing: it cannot deadlock, whatever the launch size. This removes the
  launch gap between the GEMMs, and the ramp and drain of a second grid (T = 1 on the H200: 38.5 µs, the
  sorted layout 42; bench/results/nvidia-h200/moe.json).

"sorted" (the unpadded layout of moe_permute.permute) -- 3 launches up to ``moe_permute.CHUNK`` routes
(21 tokens at top-6), 4 beyond::

    offsets, sorted_pair = permute(topk_ids)                 expert-sorted order of the routes
    h[r]   = silu(x[t(r)] @ gate_e.T) * (x[t(r)] @ up_e.T)   ROWS="gather": r in expert e's rows,
                                                              t(r) = sorted_pair[r] // top_k (rows gathered)
    buf[p] = w[p] * (h[r] @ w2[e].T)                          _down_kernel, p = sorted_pair[r]: scattered back
                                                              to route order, weighted, rounded once to x's dtype
    y[t]   = sum_k buf[t * top_k + k]                         _sum_topk_kernel, float32, k = 0, 1, ... in order

  With ``moe_configs.FUSED_TOPK_SUM`` the last launch goes: the down GEMM counts each stored route row in
  per (token, H tile), and the program that stores a token's last row of an H tile sums the token's rows
  in the same order (_sum_finished_tokens: the same bits), while other programs still run the GEMM;
  _zero_unrouted_kernel writes the rows of tokens without a valid route (nobody's last row).

"padded" (vLLM's align layout, moe_permute.permute_padded): as "sorted", but each expert's rows are padded
to whole tiles, so a GEMM program reads its tile's expert with one load (ROWS="padded") instead of a
prefix sum over the E offsets, and masks the padding rows by their sentinel route N.

``grouped_ffn`` runs the two GEMMs alone on rows that are already sorted (ROWS="sorted": no gather, no
weight, no scatter).

Work items of the sorted layouts: a GEMM program owns one (M tile, N tile). M tiles are expert-local:
expert e's rows [offsets[e-1], offsets[e]) are cut into ceil(count / BLOCK_M) tiles, the last one masked
(no padding in memory). A program finds its expert by a prefix sum of the tiles per expert, computed from
``offsets`` (E values) at its start; the grid is launched for the most tiles any routing can need,
``min(rows, cdiv(rows, BLOCK_M) + E)``, and programs past the real tiles return at once.
With ``GemmConfig.split_tail`` an expert's last tile, when it holds at most BLOCK_M / 2 rows, runs the
same code at half height (a second compiled k loop in the same kernel; shared memory is reused, not
added): the 236B prefill's 307 rows per expert then cost 128 + 128 + 64 computed rows instead of 3 x 128.

The gate/up GEMM computes the gate and the up columns of the same I-columns in one program (two
accumulators over one A tile), so silu(gate) * up happens in registers: the 2I-wide intermediate never
goes to memory. Every output element is one fixed-order dot product and the sum over top-k runs in a
fixed order: the same input gives bit-identical output. In the direct layout the routing weight is
applied to h before its single rounding (the same one rounding as the sorted layouts' weighted down
output), so the down GEMM sums the k routes in one accumulator without a buffer.

Weight tiles come in one of three ways (``GemmConfig.tma`` / ``single_dot``, chosen per shape by the table):
pointer loads with two dots (gate, up); TMA descriptors over the weights viewed 2-D (zero fill past the
edges, no masks); or, for gate_up, one pointer-loaded [BLOCK_K, 2 * BLOCK_N] operand holding the gate and
the up rows side by side and one wide dot whose accumulator the epilogue splits.

NOTES: rows of masked or out-of-range work read row 0 (a valid address) and are never stored; weights
are addressed with 64-bit offsets (w13 of the 236B model has 2.5e9 elements). A route whose expert id is
outside [0, E) reads expert 0 in the direct gate_up and is skipped by every down GEMM. Inside the
k-step loops no load feeds an address (expert ids are staged before the loop), so Triton's pipeliner
keeps ``num_stages`` weight tiles in flight.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from pykernels.triton import moe_configs
from pykernels.triton.moe_configs import GemmConfig
from pykernels.triton.moe_permute import permute, permute_padded

# Hidden columns per program of the top-k sum (8 KiB of bf16 per route row read).
_SUM_BLOCK_H = 1024
# Tokens per program, and columns per store, of _zero_unrouted_kernel (moe_configs.FUSED_TOPK_SUM).
_ZERO_BLOCK_T = 64
_ZERO_BLOCK_H = 128
LAYOUTS = ("direct", "sorted", "padded")


@triton.jit
def _expert_tile(offsets_ptr, num_experts, num_rows, pid_m, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(expert, first row, row end) of expert-local M tile ``pid_m``; expert >= num_experts past the last tile."""
    e = tl.arange(0, BLOCK_E)  # [BE]
    e_ok = e < num_experts
    ends = tl.load(offsets_ptr + e, mask=e_ok, other=0)  # [BE]
    starts = tl.load(offsets_ptr + e - 1, mask=e_ok & (e > 0), other=0)
    ends = tl.minimum(ends, num_rows)  # memory safety under unchecked offsets
    starts = tl.maximum(starts, 0)
    tiles = tl.maximum(ends - starts + BLOCK_M - 1, 0) // BLOCK_M  # [BE]; a decreasing offset gives 0 tiles
    tile_end = tl.cumsum(tiles, axis=0)
    expert = tl.sum((tile_end <= pid_m).to(tl.int32), axis=0)
    mine = e == expert
    first_tile = tl.sum(tl.where(mine, tile_end - tiles, 0), axis=0)
    row_begin = tl.sum(tl.where(mine, starts, 0), axis=0) + (pid_m - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(mine, ends, 0), axis=0)
    return expert, row_begin, row_end


@triton.jit
def _tile_ids(num_m_tiles, num_n_tiles, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program: GROUP_M consecutive M tiles (mostly one expert) sweep the N tiles together."""
    pid = tl.program_id(0)
    per_group = GROUP_M * num_n_tiles
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    return pid_m, pid_n


@triton.jit
def _program_tile(map_ptr, num_experts, num_rows, num_m_tiles, num_n_tiles, ROWS: tl.constexpr, PAD: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr):
    """(expert, N tile, first row, row end) of this program's work item in a sorted layout; expert >= E past
    the last real tile ("padded": from the block experts at ``map_ptr``; else from the offsets)."""
    pid_m, pid_n = _tile_ids(num_m_tiles, num_n_tiles, GROUP_M)
    if ROWS == "padded":
        expert = tl.load(map_ptr + pid_m * BLOCK_M // PAD)
        row_begin = pid_m * BLOCK_M
        row_end = row_begin + BLOCK_M
    else:
        expert, row_begin, row_end = _expert_tile(map_ptr, num_experts, num_rows, pid_m, BLOCK_M, BLOCK_E)
    return expert, pid_n, row_begin, row_end


@triton.jit
def _gate_up_tile(
    x_ptr, w13_ptr, w13_desc, h_ptr, pair_ptr, weights_ptr,
    expert,  # the tile's expert (in range)
    pid_n,  # I tile
    row_begin,  # first row of h ("route": the route)
    row_end,  # "sorted"/"gather": end of the expert's rows (rows >= it are masked); others: unused
    num_pairs, hidden, inter, top_k, stride_xm, stride_we, stride_wn, stride_hm, up_shift,
    ROWS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, SINGLE_DOT: tl.constexpr,
):
    """h[rows, cols] of one (M tile, N tile) of _gate_up_kernel (its arguments; BLOCK_M may be half the kernel's)."""
    m = tl.arange(0, BLOCK_M)  # [BM]
    if ROWS == "route":
        # Every row of the A tile is the route's token; only row 0 is stored.
        rows = row_begin + 0 * m  # [BM] rows of h
        row_ok = m == 0
        src = rows // top_k
    elif ROWS == "padded":
        rows = row_begin + m  # [BM] padded sorted rows
        route = tl.load(pair_ptr + rows)
        row_ok = route < num_pairs
        src = tl.where(row_ok, route, 0) // top_k
    else:
        rows = row_begin + m  # [BM] sorted rows
        row_ok = rows < row_end
        rows = tl.where(row_ok, rows, 0)
        if ROWS == "gather":
            src = tl.load(pair_ptr + rows, mask=row_ok, other=0) // top_k  # [BM] token of each row
        else:
            src = rows
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] I-columns
    cols_ld = cols % inter  # in range for loads; columns >= I are never stored
    ks = tl.arange(0, BLOCK_K)  # [BK]

    a_ptrs = x_ptr + src.to(tl.int64)[:, None] * stride_xm + ks[None, :]  # [BM, BK]
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if USE_TMA:
        # Rows of the [E * 2I, H] view. Past column I the gate tile reads up rows and the up tile the next
        # expert's rows (or TMA's zero fill past the end): those columns are never stored.
        gate_row = expert * (2 * inter) + pid_n * BLOCK_N
        for k0 in range(0, hidden, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
            else:
                a = tl.load(a_ptrs, mask=((k0 + ks) < hidden)[None, :], other=0.0)
            g = w13_desc.load([gate_row, k0])  # [BN, BK], zero past H
            u = w13_desc.load([gate_row + inter, k0])
            acc_g = tl.dot(a, g.T, acc_g, input_precision=DOT_PRECISION)
            acc_u = tl.dot(a, u.T, acc_u, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K
    elif SINGLE_DOT:
        # Columns j < BN of the operand are gate rows, j >= BN the up rows of the same I-columns: one
        # wide MMA per step reads the A tile once; the epilogue splits the accumulator in two.
        j = tl.arange(0, 2 * BLOCK_N)  # [2BN]
        w_rows = (pid_n * BLOCK_N + j % BLOCK_N) % inter + (j // BLOCK_N) * inter
        b_ptrs = w13_ptr + expert.to(tl.int64) * stride_we + w_rows[None, :].to(tl.int64) * stride_wn + ks[:, None]
        acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                k_ok = (k0 + ks) < hidden
                a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        acc_g, acc_u = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))
    else:
        w_base = w13_ptr + expert.to(tl.int64) * stride_we
        g_ptrs = w_base + cols_ld[None, :].to(tl.int64) * stride_wn + ks[:, None]  # [BK, BN] = gate_e.T tile
        u_ptrs = g_ptrs + up_shift  # [BK, BN] = up_e.T tile
        for k0 in range(0, hidden, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
                g = tl.load(g_ptrs)
                u = tl.load(u_ptrs)
            else:
                k_ok = (k0 + ks) < hidden
                a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
                g = tl.load(g_ptrs, mask=k_ok[:, None], other=0.0)
                u = tl.load(u_ptrs, mask=k_ok[:, None], other=0.0)
            acc_g = tl.dot(a, g, acc_g, input_precision=DOT_PRECISION)
            acc_u = tl.dot(a, u, acc_u, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K

    h = acc_g * tl.sigmoid(acc_g) * acc_u  # silu(gate) * up, float32
    if ROWS == "route":
        h = h * tl.load(weights_ptr + row_begin).to(tl.float32)
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hm + cols[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < inter)[None, :])


@triton.jit
def _gate_up_kernel(
    x_ptr,  # [T, H] tokens, or [R, H] expert-sorted rows (ROWS="sorted")
    w13_ptr,  # [E, 2I, H] gate rows then up rows; stride 1 along H
    w13_desc,  # TMA descriptor of w13 viewed as [E * 2I, H], blocks [BLOCK_N, BLOCK_K] (USE_TMA only)
    h_ptr,  # [R, I] out: silu(gate) * up, x's dtype
    map_ptr,  # "sorted"/"gather": [E] int32 cumulative row ends; "padded": [R / PAD] block experts
    pair_ptr,  # "gather"/"padded": [R] int32 sorted row -> route (padded: N in padding rows)
    num_rows,  # R: rows of h
    num_pairs,  # N: routes (the padding sentinel of "padded")
    hidden,  # H (reduction)
    inter,  # I (output columns)
    num_experts,
    top_k,  # routes per token
    stride_xm,
    stride_we,
    stride_wn,
    stride_hm,
    up_shift,  # I * stride_wn: from a gate row to the up row of the same column
    num_m_tiles,  # M tiles launched (an upper bound of the real ones)
    ROWS: tl.constexpr,  # "sorted" | "gather" | "padded" (see the module docstring)
    PAD: tl.constexpr,  # "padded": rows per block of the padded layout (a multiple of BLOCK_M)
    EVEN_K: tl.constexpr,  # H % BLOCK_K == 0: no mask along the reduction
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # I-columns per tile (of gate and of up each)
    BLOCK_K: tl.constexpr,  # reduction step
    BLOCK_E: tl.constexpr,  # next power of two >= E
    GROUP_M: tl.constexpr,  # M tiles per swizzle group
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (no TF32 rounding); 16-bit inputs ignore it
    USE_TMA: tl.constexpr,  # weight tiles through the TMA descriptor instead of pointer loads
    SINGLE_DOT: tl.constexpr,  # (pointer loads only) gate and up tiles as one [BK, 2 * BN] operand, one dot
    SPLIT_TAIL: tl.constexpr,  # ("sorted"/"gather" only) an expert's last tile of <= BLOCK_M / 2 rows runs half-height
):
    tl.static_assert(not SPLIT_TAIL or (BLOCK_M >= 32 and (ROWS == "sorted" or ROWS == "gather")))
    expert, pid_n, row_begin, row_end = _program_tile(map_ptr, num_experts, num_rows, num_m_tiles,
                                                      tl.cdiv(inter, BLOCK_N), ROWS, PAD, BLOCK_M, BLOCK_E, GROUP_M)
    if expert >= num_experts:
        return
    if SPLIT_TAIL:
        if row_end - row_begin <= BLOCK_M // 2:
            _gate_up_tile(x_ptr, w13_ptr, w13_desc, h_ptr, pair_ptr, pair_ptr, expert, pid_n, row_begin, row_end,
                          num_pairs, hidden, inter, top_k, stride_xm, stride_we, stride_wn, stride_hm, up_shift,
                          ROWS, EVEN_K, BLOCK_M // 2, BLOCK_N, BLOCK_K, DOT_PRECISION, USE_TMA, SINGLE_DOT)
        else:
            _gate_up_tile(x_ptr, w13_ptr, w13_desc, h_ptr, pair_ptr, pair_ptr, expert, pid_n, row_begin, row_end,
                          num_pairs, hidden, inter, top_k, stride_xm, stride_we, stride_wn, stride_hm, up_shift,
                          ROWS, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, USE_TMA, SINGLE_DOT)
    else:
        _gate_up_tile(x_ptr, w13_ptr, w13_desc, h_ptr, pair_ptr, pair_ptr, expert, pid_n, row_begin, row_end,
                      num_pairs, hidden, inter, top_k, stride_xm, stride_we, stride_wn, stride_hm, up_shift,
                      ROWS, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, USE_TMA, SINGLE_DOT)


@triton.jit
def _down_tile(
    h_ptr, w2_ptr, w2_desc, out_ptr, pair_ptr, weights_ptr,
    expert,  # the tile's expert (in range)
    pid_n,  # H tile
    row_begin,  # first sorted row of the tile
    row_end,  # "sorted"/"gather": end of the expert's rows (rows >= it are masked); "padded": unused
    num_pairs, hidden, inter, num_experts, stride_hm, stride_we, stride_wn, stride_om, y_ptr, counts_ptr, ids_ptr,
    ROWS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, TOP_K: tl.constexpr, BLOCK_R: tl.constexpr,
    FUSED_SUM: tl.constexpr,
):
    """out rows of one (M tile, N tile) of _down_kernel (its arguments; BLOCK_M may be half the kernel's)."""
    rows = row_begin + tl.arange(0, BLOCK_M)  # [BM] sorted rows ("padded": padding rows are never stored)
    if ROWS != "padded":
        row_ok = rows < row_end
        rows = tl.where(row_ok, rows, 0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] H-columns
    cols_ld = cols % hidden
    ks = tl.arange(0, BLOCK_K)

    a_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hm + ks[None, :]  # [BM, BK]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if USE_TMA:
        # Rows of the [E * H, I] view; past column H they belong to the next expert (never stored).
        w_row = expert * hidden + pid_n * BLOCK_N
        for k0 in range(0, inter, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
            else:
                a = tl.load(a_ptrs, mask=((k0 + ks) < inter)[None, :], other=0.0)
            b = w2_desc.load([w_row, k0])  # [BN, BK], zero past I
            acc = tl.dot(a, b.T, acc, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K
    else:
        b_ptrs = w2_ptr + expert.to(tl.int64) * stride_we + cols_ld[None, :].to(tl.int64) * stride_wn + ks[:, None]
        for k0 in range(0, inter, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                k_ok = (k0 + ks) < inter
                a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K

    # The routes are read after the loop (fewer registers held across it).
    if ROWS == "sorted":
        dest = rows
    else:
        if ROWS == "padded":
            route = tl.load(pair_ptr + rows)  # [BM]; N in padding rows
            row_ok = route < num_pairs
        else:
            route = tl.load(pair_ptr + rows, mask=row_ok, other=0)  # [BM] route of each row
        dest = tl.where(row_ok, route, 0)
        w = tl.load(weights_ptr + dest, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * w[:, None]
    o_ptrs = out_ptr + dest.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < hidden)[None, :])
    if FUSED_SUM:
        _sum_finished_tokens(out_ptr, y_ptr, counts_ptr, ids_ptr, dest, row_ok, pid_n, hidden, num_experts, stride_om,
                             TOP_K, BLOCK_R, BLOCK_M, BLOCK_N)


@triton.jit
def _sum_finished_tokens(
    out_ptr,  # [N, H] the weighted route rows (route order)
    y_ptr,  # [T, H] out
    counts_ptr,  # [T, cdiv(H, BLOCK_N)] int32, zero at launch: route rows stored so far per (token, H tile)
    ids_ptr,  # [N] expert id per route
    dest,  # [BM] the routes whose rows this tile just stored (valid where row_ok)
    row_ok, pid_n, hidden, num_experts, stride_om,
    TOP_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The top-k sum inside the down GEMM: each stored route row counts itself in for its (token, H tile);
    the program that brings the count to the token's number of valid routes reads the token's rows and
    writes y[token] = sum over k = 0, 1, ... in float32 (the order and the rounding of _sum_topk_kernel:
    the same bits). The release (after a barrier: every thread's stores) and acquire are the count's
    atomic; a second barrier orders the acquire before every thread's reads."""
    tl.debug_barrier()
    token = dest // TOP_K  # [BM]
    r = tl.arange(0, BLOCK_R)[None, :]  # [1, BR]
    e = tl.load(ids_ptr + token[:, None] * TOP_K + r, mask=row_ok[:, None] & (r < TOP_K), other=-1)  # [BM, BR]
    valid = (e >= 0) & (e < num_experts)  # routes with a bad id were never computed
    need = tl.sum(valid.to(tl.int32), axis=1)  # [BM]
    num_n_tiles = tl.cdiv(hidden, BLOCK_N)
    seen = tl.atomic_add(counts_ptr + token * num_n_tiles + pid_n, 1, mask=row_ok, sem="acq_rel", scope="gpu")
    tl.debug_barrier()
    last = row_ok & (seen + 1 == need)  # [BM]
    rows_in = (token * TOP_K).to(tl.int64)[:, None] * stride_om  # [BM, 1] the token's first route row
    # Column slices of at most 64: the [BM, slice] float32 sum stays small beside the tile's other registers.
    SLICE: tl.constexpr = BLOCK_N if BLOCK_N < 64 else 64
    for c0 in tl.static_range(0, BLOCK_N, SLICE):
        cols = pid_n * BLOCK_N + c0 + tl.arange(0, SLICE)  # [SLICE]
        col_ok = (cols < hidden)[None, :]
        acc = tl.zeros((BLOCK_M, SLICE), tl.float32)
        for k in tl.static_range(TOP_K):
            live = last & (tl.sum(tl.where(r == k, valid.to(tl.int32), 0), axis=1) > 0)  # [BM]
            v_ptrs = out_ptr + rows_in + k * stride_om + cols[None, :]
            acc += tl.load(v_ptrs, mask=live[:, None] & col_ok, other=0.0, cache_modifier=".cg").to(tl.float32)
        tl.store(y_ptr + token.to(tl.int64)[:, None] * hidden + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=last[:, None] & col_ok)


@triton.jit
def _down_kernel(
    h_ptr,  # [R, I] expert-sorted rows
    w2_ptr,  # [E, H, I]; stride 1 along I
    w2_desc,  # TMA descriptor of w2 viewed as [E * H, I], blocks [BLOCK_N, BLOCK_K] (USE_TMA only)
    out_ptr,  # [N, H] route-ordered ("gather"/"padded") or [R, H] expert-sorted rows ("sorted") out, x's dtype
    map_ptr,  # "sorted"/"gather": [E] int32 cumulative row ends; "padded": [R / PAD] block experts
    pair_ptr,  # "gather"/"padded": [R] int32 sorted row -> route
    weights_ptr,  # "gather"/"padded": [N] routing weight per route
    num_rows,  # R
    num_pairs,  # N (the padding sentinel of "padded")
    hidden,  # H (output columns)
    inter,  # I (reduction)
    num_experts,
    stride_hm,
    stride_we,
    stride_wn,
    stride_om,
    y_ptr,  # FUSED_SUM: [T, H] out, the sum of each token's route rows
    counts_ptr,  # FUSED_SUM: [T, cdiv(H, BLOCK_N)] int32, zero at launch
    ids_ptr,  # FUSED_SUM: [N] expert id per route
    num_m_tiles,  # M tiles launched (an upper bound of the real ones)
    ROWS: tl.constexpr,  # "sorted": out[r] = row; "gather"/"padded": out[sorted_pair[r]] = w * row
    PAD: tl.constexpr,  # "padded": rows per block of the padded layout (a multiple of BLOCK_M)
    EVEN_K: tl.constexpr,  # I % BLOCK_K == 0: no mask along the reduction
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # H-columns per tile
    BLOCK_K: tl.constexpr,  # reduction step
    BLOCK_E: tl.constexpr,  # next power of two >= E
    GROUP_M: tl.constexpr,  # M tiles per swizzle group
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (no TF32 rounding); 16-bit inputs ignore it
    USE_TMA: tl.constexpr,  # weight tiles through the TMA descriptor instead of pointer loads
    SPLIT_TAIL: tl.constexpr,  # ("sorted"/"gather" only) an expert's last tile of <= BLOCK_M / 2 rows runs half-height
    TOP_K: tl.constexpr,  # FUSED_SUM: routes per token
    BLOCK_R: tl.constexpr,  # FUSED_SUM: next power of two >= TOP_K
    FUSED_SUM: tl.constexpr,  # ("gather"/"padded" only) the top-k sum in the epilogue (_sum_finished_tokens)
):
    tl.static_assert(not SPLIT_TAIL or (BLOCK_M >= 32 and ROWS != "padded"))
    tl.static_assert(not FUSED_SUM or ROWS != "sorted")
    expert, pid_n, row_begin, row_end = _program_tile(map_ptr, num_experts, num_rows, num_m_tiles,
                                                      tl.cdiv(hidden, BLOCK_N), ROWS, PAD, BLOCK_M, BLOCK_E, GROUP_M)
    if expert >= num_experts:
        return
    if SPLIT_TAIL:
        if row_end - row_begin <= BLOCK_M // 2:
            _down_tile(h_ptr, w2_ptr, w2_desc, out_ptr, pair_ptr, weights_ptr, expert, pid_n, row_begin, row_end,
                       num_pairs, hidden, inter, num_experts, stride_hm, stride_we, stride_wn, stride_om, y_ptr,
                       counts_ptr, ids_ptr, ROWS, EVEN_K, BLOCK_M // 2, BLOCK_N, BLOCK_K, DOT_PRECISION, USE_TMA,
                       TOP_K, BLOCK_R, FUSED_SUM)
        else:
            _down_tile(h_ptr, w2_ptr, w2_desc, out_ptr, pair_ptr, weights_ptr, expert, pid_n, row_begin, row_end,
                       num_pairs, hidden, inter, num_experts, stride_hm, stride_we, stride_wn, stride_om, y_ptr,
                       counts_ptr, ids_ptr, ROWS, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, USE_TMA,
                       TOP_K, BLOCK_R, FUSED_SUM)
    else:
        _down_tile(h_ptr, w2_ptr, w2_desc, out_ptr, pair_ptr, weights_ptr, expert, pid_n, row_begin, row_end,
                   num_pairs, hidden, inter, num_experts, stride_hm, stride_we, stride_wn, stride_om, y_ptr,
                   counts_ptr, ids_ptr, ROWS, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, USE_TMA,
                   TOP_K, BLOCK_R, FUSED_SUM)


@triton.jit
def _down_route_tile(
    h_ptr, w2_ptr, w2_desc, y_ptr, ids_ptr,
    t,  # the token
    pid_n,  # H tile
    hidden, inter, num_experts, stride_hm, stride_we, stride_wn, stride_ym,
    TOP_K: tl.constexpr, BLOCK_R: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    """y[t, cols] = sum over the token's routes k (in order) and the k steps of h[t*TOP_K + k] . w2[e_k]:
    one loop of TOP_K * cdiv(I, BLOCK_K) steps, so the pipeline never drains between experts. Row 0 of the
    [BLOCK_M, BLOCK_N] dot is the token's; the other rows are zeros."""
    r = tl.arange(0, BLOCK_R)
    e_raw = tl.load(ids_ptr + t * TOP_K + r, mask=r < TOP_K, other=-1)
    experts = tl.where((e_raw >= 0) & (e_raw < num_experts), e_raw, -1).to(tl.int32)  # [BR]; -1: skipped route
    m = tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] H-columns
    cols_ld = cols % hidden
    ks = tl.arange(0, BLOCK_K)
    a_base = h_ptr + t.to(tl.int64) * TOP_K * stride_hm + ks[None, :] + 0 * m[:, None]  # [BM, BK], route k = 0
    b_base = w2_ptr + cols_ld[None, :].to(tl.int64) * stride_wn + ks[:, None]  # [BK, BN], expert 0
    k_steps = tl.cdiv(inter, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for i in range(0, TOP_K * k_steps):
        k = i // k_steps
        k0 = (i - k * k_steps) * BLOCK_K
        e = tl.sum(tl.where(r == k, experts, 0), axis=0)  # from registers: no load feeds an address here
        live_row = (m == 0) & ((m * 0 + e) >= 0)  # [BM]: row 0 of a live route
        a_ok = live_row[:, None] & ((k0 + ks) < inter)[None, :]  # [BM, BK]
        a = tl.load(a_base + k * stride_hm + k0, mask=a_ok, other=0.0)
        e = tl.maximum(e, 0)
        if USE_TMA:
            b = w2_desc.load([e * hidden + pid_n * BLOCK_N, k0])  # [BN, BK], zero past I
            acc = tl.dot(a, b.T, acc, input_precision=DOT_PRECISION)
        else:
            b_ptrs = b_base + e.to(tl.int64) * stride_we + k0
            if EVEN_K:
                b = tl.load(b_ptrs)
            else:
                b = tl.load(b_ptrs, mask=((k0 + ks) < inter)[:, None], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    y_ptrs = y_ptr + t.to(tl.int64) * stride_ym + cols[None, :] + 0 * m[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(m == 0)[:, None] & (cols < hidden)[None, :])


@triton.jit
def _pause(v):
    """Sleep about 200 ns (nanosleep), then return ``v``: the spacing of a spin loop's reads."""
    return tl.inline_asm_elementwise("nanosleep.u32 200;\n\tmov.b32 $0, $1;", "=r,r", [v], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def _direct_kernel(
    x_ptr,  # [T, H] tokens
    w13_ptr,  # [E, 2I, H] gate rows then up rows; stride 1 along H
    w13_desc,  # TMA descriptor of w13 viewed as [E * 2I, H], blocks [GU_BLOCK_N, GU_BLOCK_K] (GU_TMA only)
    w2_ptr,  # [E, H, I]; stride 1 along I
    w2_desc,  # TMA descriptor of w2 viewed as [E * H, I], blocks [DN_BLOCK_N, DN_BLOCK_K] (DN_TMA only)
    h_ptr,  # [N, I] scratch: each route's weighted silu(gate) * up, x's dtype
    y_ptr,  # [T, H] out, x's dtype
    ids_ptr,  # [N] expert id per route (topk_ids flattened, int32 or int64)
    weights_ptr,  # [N] routing weight per route
    sync_ptr,  # [T + 1] int32, zero at launch: [t] finished gate_up items of token t (all: TOP_K * cdiv(I,
    #            GU_BLOCK_N)); [T] the next work item to hand out
    num_tokens,  # T
    hidden,  # H
    inter,  # I
    num_experts,
    stride_xm,
    stride_w13e,
    stride_w13n,
    stride_w2e,
    stride_w2n,
    stride_hm,
    stride_ym,
    TOP_K: tl.constexpr,  # routes per token
    BLOCK_R: tl.constexpr,  # next power of two >= TOP_K
    # The gate_up tile (see _gate_up_tile; BLOCK_M rows of the one route) and the down tile (_down_route_tile):
    GU_EVEN_K: tl.constexpr, GU_BLOCK_M: tl.constexpr, GU_BLOCK_N: tl.constexpr, GU_BLOCK_K: tl.constexpr,
    GU_TMA: tl.constexpr, GU_SINGLE_DOT: tl.constexpr,
    DN_EVEN_K: tl.constexpr, DN_BLOCK_M: tl.constexpr, DN_BLOCK_N: tl.constexpr, DN_BLOCK_K: tl.constexpr,
    DN_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (no TF32 rounding); 16-bit inputs ignore it
):
    """The direct layout in one launch (see the module docstring). The work items are every gate_up item
    (route, I tile), then every down item (token, H tile); a program takes the next item from a counter
    until none is left. A gate_up item stores its tile of h and counts itself done for its token (release);
    a down item waits until its token's count is complete (acquire), then runs _down_route_tile. Items are
    handed out in order, so every gate_up item a down item waits for is already held by a running program
    that waits for nothing: no launch size or residency can deadlock."""
    num_pairs = num_tokens * TOP_K
    gu_tiles = tl.cdiv(inter, GU_BLOCK_N)
    gu_items = num_pairs * gu_tiles
    items = gu_items + num_tokens * tl.cdiv(hidden, DN_BLOCK_N)
    done_ptr = sync_ptr
    next_ptr = sync_ptr + num_tokens
    item = tl.atomic_add(next_ptr, 1, sem="relaxed", scope="gpu")
    while item < items:
        if item < gu_items:
            # N-tile-major: the routes of one I tile are consecutive, so routes that share an expert (several
            # tokens) read the same weight tile at about the same time (from the L2 after the first).
            route = item % num_pairs
            pid_n = item // num_pairs
            e_raw = tl.load(ids_ptr + route)
            expert = tl.where((e_raw >= 0) & (e_raw < num_experts), e_raw, 0).to(tl.int32)
            _gate_up_tile(x_ptr, w13_ptr, w13_desc, h_ptr, ids_ptr, weights_ptr, expert, pid_n, route, route + 1,
                          num_pairs, hidden, inter, TOP_K, stride_xm, stride_w13e, stride_w13n, stride_hm,
                          inter * stride_w13n, "route", GU_EVEN_K, GU_BLOCK_M, GU_BLOCK_N, GU_BLOCK_K, DOT_PRECISION,
                          GU_TMA, GU_SINGLE_DOT)
            tl.debug_barrier()  # every thread's stores of h come before the release below
            tl.atomic_add(done_ptr + route // TOP_K, 1, sem="release", scope="gpu")
        else:
            t = (item - gu_items) % num_tokens
            pid_n = (item - gu_items) // num_tokens
            # The acquire (an atomic read) once per check; between checks, plain volatile reads spin, paced
            # by _pause, so that waiting programs neither queue atomics in front of the gate_up releases nor
            # poll the flag's L2 line back to back (T = 1 on the H200 times the same with an atomic spin).
            while tl.atomic_add(done_ptr + t, 0, sem="acquire", scope="gpu") < TOP_K * gu_tiles:
                while _pause(tl.load(done_ptr + t, volatile=True)) < TOP_K * gu_tiles:
                    pass
            _down_route_tile(h_ptr, w2_ptr, w2_desc, y_ptr, ids_ptr, t, pid_n, hidden, inter, num_experts, stride_hm,
                             stride_w2e, stride_w2n, stride_ym, TOP_K, BLOCK_R, DN_EVEN_K, DN_BLOCK_M, DN_BLOCK_N,
                             DN_BLOCK_K, DOT_PRECISION, DN_TMA)
        item = tl.atomic_add(next_ptr, 1, sem="relaxed", scope="gpu")


@triton.jit
def _sum_topk_kernel(
    buf_ptr,  # [T * TOP_K, H] weighted expert outputs in route order
    ids_ptr,  # [T * TOP_K] expert id per route (int32 or int64)
    y_ptr,  # [T, H] out
    hidden,
    num_experts,
    TOP_K: tl.constexpr,  # routes per token
    BLOCK_H: tl.constexpr,  # hidden columns per program
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < hidden
    acc = tl.zeros((BLOCK_H,), tl.float32)
    for k in range(TOP_K):  # fixed order: deterministic
        e = tl.load(ids_ptr + t * TOP_K + k)
        # Routes with a bad id were never computed: read none of their row.
        limit = tl.where((e >= 0) & (e < num_experts), hidden, 0)
        v = tl.load(buf_ptr + (t * TOP_K + k) * hidden + cols, mask=cols < limit, other=0.0)
        acc += v.to(tl.float32)
    tl.store(y_ptr + t * hidden + cols, acc.to(y_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _zero_unrouted_kernel(
    ids_ptr,  # [T * TOP_K] expert id per route (int32 or int64)
    y_ptr,  # [T, H] out: the rows of tokens without a valid route set to 0
    num_tokens,
    hidden,
    num_experts,
    TOP_K: tl.constexpr,  # routes per token
    BLOCK_R: tl.constexpr,  # next power of two >= TOP_K
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK_H: tl.constexpr,  # hidden columns per store
):
    """y[t] = 0 for each token none of whose ids is in [0, E): the fused top-k sum writes every other row."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    r = tl.arange(0, BLOCK_R)[None, :]  # [1, BR]
    e = tl.load(ids_ptr + t.to(tl.int64)[:, None] * TOP_K + r, mask=(t < num_tokens)[:, None] & (r < TOP_K), other=-1)
    dead = (t < num_tokens) & (tl.sum(((e >= 0) & (e < num_experts)).to(tl.int32), axis=1) == 0)  # [BT]
    if tl.max(dead.to(tl.int32), axis=0) > 0:
        cols = tl.arange(0, BLOCK_H)
        for h0 in range(0, hidden, BLOCK_H):
            y_ptrs = y_ptr + t.to(tl.int64)[:, None] * hidden + (h0 + cols)[None, :]
            tl.store(y_ptrs, tl.zeros((BLOCK_T, BLOCK_H), y_ptr.dtype.element_ty),
                     mask=dead[:, None] & ((h0 + cols) < hidden)[None, :])


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _tma_ok(w: torch.Tensor) -> bool:
    """Whether weights ``w`` can be read through a 2-D TMA descriptor (contiguous, 16-byte aligned rows)."""
    return w.is_contiguous() and (w.shape[-1] * w.element_size()) % 16 == 0 and w.data_ptr() % 16 == 0


def _m_tiles(rows: int, num_experts: int, block_m: int) -> int:
    """Most expert-local M tiles any split of ``rows`` rows over ``num_experts`` experts can need."""
    return min(rows, triton.cdiv(rows, block_m) + num_experts)


def _weight_desc(w: torch.Tensor, cfg: GemmConfig):
    """(use TMA, what the kernel's ``*_desc`` argument gets): a TMA descriptor of ``w`` viewed as [E * rows,
    columns] with [BLOCK_N, BLOCK_K] blocks when ``cfg.tma`` and ``w`` allows it, else ``w`` itself (unused)."""
    if cfg.tma and _tma_ok(w):
        return True, TensorDescriptor.from_tensor(w.view(-1, w.shape[-1]), [cfg.block_n, cfg.block_k])
    return False, w


def _gate_up(x, w13, cfg: GemmConfig, rows: str, row_map, *, pair=None, num_rows, num_pairs=0, top_k=1,
             pad=0) -> torch.Tensor:
    """h [num_rows, I] of the gate/up GEMM in row layout ``rows`` ("sorted", "gather", "padded");
    ``row_map`` is the kernel's ``map_ptr`` (offsets or block experts)."""
    num_experts, two_i, hidden = w13.shape
    inter = two_i // 2
    h = torch.empty((num_rows, inter), dtype=x.dtype, device=x.device)
    m_tiles = num_rows // cfg.block_m if rows == "padded" else _m_tiles(num_rows, num_experts, cfg.block_m)
    grid = (m_tiles * triton.cdiv(inter, cfg.block_n),)
    use_tma, w13_desc = _weight_desc(w13, cfg)
    _gate_up_kernel[grid](
        x, w13, w13_desc, h, row_map, row_map if pair is None else pair,
        num_rows, num_pairs, hidden, inter, num_experts, top_k,
        x.stride(0), w13.stride(0), w13.stride(1), h.stride(0), inter * w13.stride(1), m_tiles,
        ROWS=rows, PAD=pad, EVEN_K=hidden % cfg.block_k == 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        BLOCK_E=triton.next_power_of_2(num_experts), GROUP_M=cfg.group_m, DOT_PRECISION=_precision(x.dtype),
        USE_TMA=use_tma, SINGLE_DOT=cfg.single_dot and not use_tma, SPLIT_TAIL=cfg.split_tail and rows != "padded",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return h


def _down(h, w2, cfg: GemmConfig, rows: str, row_map, out, *, pair=None, weights=None, num_pairs=0, pad=0,
          sum_into=None, ids=None, top_k=1) -> None:
    """out = the down GEMM of h in row layout ``rows`` ("sorted", "gather", "padded"; see _gate_up). With
    ``sum_into`` (y [T, H]; "gather"/"padded", ``ids`` the flattened topk_ids), the kernel also writes each
    token's top-k sum to y, except for tokens without a valid route (see moe_ffn_triton)."""
    num_experts, hidden, inter = w2.shape
    num_rows = h.shape[0]
    m_tiles = num_rows // cfg.block_m if rows == "padded" else _m_tiles(num_rows, num_experts, cfg.block_m)
    fused = sum_into is not None
    counts = (torch.zeros((sum_into.shape[0], triton.cdiv(hidden, cfg.block_n)), dtype=torch.int32, device=h.device)
              if fused else out)
    grid = (m_tiles * triton.cdiv(hidden, cfg.block_n),)
    use_tma, w2_desc = _weight_desc(w2, cfg)
    _down_kernel[grid](
        h, w2, w2_desc, out, row_map, row_map if pair is None else pair, h if weights is None else weights,
        num_rows, num_pairs, hidden, inter, num_experts,
        h.stride(0), w2.stride(0), w2.stride(1), out.stride(0), sum_into if fused else out, counts,
        ids if fused else row_map, m_tiles, ROWS=rows, PAD=pad, EVEN_K=inter % cfg.block_k == 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        BLOCK_E=triton.next_power_of_2(num_experts), GROUP_M=cfg.group_m, DOT_PRECISION=_precision(h.dtype),
        USE_TMA=use_tma, SPLIT_TAIL=cfg.split_tail and rows != "padded", TOP_K=top_k,
        BLOCK_R=triton.next_power_of_2(top_k), FUSED_SUM=fused, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


# Programs of the direct kernel per SM (tuned with bench/tune_moe.py). Any number is safe (the work items
# are handed out in order; see _direct_kernel); programs that do not fit beside each other just start late.
# Triton's interpreter runs the programs one after another: there the first does every item.
DIRECT_PROGRAMS_PER_SM = 1
INTERPRETER_PROGRAMS = 2


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _direct(x, w13, w2, weights, ids, y, top_k: int, cfg_gu: GemmConfig, cfg_dn: GemmConfig) -> None:
    """y [T, H] = moe_ffn in the direct layout, one launch of _direct_kernel (num_warps and num_stages from
    ``cfg_gu``; each GEMM's tile from its config)."""
    num_tokens, hidden = x.shape
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    h = torch.empty((ids.numel(), inter), dtype=x.dtype, device=x.device)  # [N, I]
    sync = torch.zeros(num_tokens + 1, dtype=torch.int32, device=x.device)  # see _direct_kernel's sync_ptr
    items = ids.numel() * triton.cdiv(inter, cfg_gu.block_n) + num_tokens * triton.cdiv(hidden, cfg_dn.block_n)
    programs = INTERPRETER_PROGRAMS
    if x.device.type == "cuda":
        device_index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        programs = DIRECT_PROGRAMS_PER_SM * _sm_count(device_index)
    gu_tma, w13_desc = _weight_desc(w13, cfg_gu)
    dn_tma, w2_desc = _weight_desc(w2, cfg_dn)
    _direct_kernel[(min(items, programs),)](
        x, w13, w13_desc, w2, w2_desc, h, y, ids, weights, sync, num_tokens, hidden, inter, num_experts,
        x.stride(0), w13.stride(0), w13.stride(1), w2.stride(0), w2.stride(1), h.stride(0), y.stride(0),
        TOP_K=top_k, BLOCK_R=triton.next_power_of_2(top_k),
        GU_EVEN_K=hidden % cfg_gu.block_k == 0, GU_BLOCK_M=cfg_gu.block_m, GU_BLOCK_N=cfg_gu.block_n,
        GU_BLOCK_K=cfg_gu.block_k, GU_TMA=gu_tma, GU_SINGLE_DOT=cfg_gu.single_dot and not gu_tma,
        DN_EVEN_K=inter % cfg_dn.block_k == 0, DN_BLOCK_M=cfg_dn.block_m, DN_BLOCK_N=cfg_dn.block_n,
        DN_BLOCK_K=cfg_dn.block_k, DN_TMA=dn_tma,
        DOT_PRECISION=_precision(x.dtype), num_warps=cfg_gu.num_warps, num_stages=cfg_gu.num_stages,
    )


def moe_ffn_triton(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    gate_up_config: GemmConfig | None = None,
    down_config: GemmConfig | None = None,
    layout: str | None = None,
) -> torch.Tensor:
    """``pykernels.moe_ffn`` on validated inputs. ``layout``: "direct", "sorted" or "padded" (None: the
    table's choice for the token count, ``moe_configs.layout_for``); the configs override the table (tuning)."""
    num_tokens, hidden = x.shape
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    if layout is None:
        layout = moe_configs.layout_for(num_tokens)
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    y = torch.empty((num_tokens, hidden), dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return y
    direct = layout == "direct"
    cfg_gu = gate_up_config or moe_configs.pick("gate_up", hidden, inter, num_pairs, num_experts, x.element_size(), direct)
    cfg_dn = down_config or moe_configs.pick("down", hidden, inter, num_pairs, num_experts, x.element_size(), direct)
    ids = topk_ids.contiguous().view(-1)  # [N]
    weights = topk_weights.contiguous().view(-1)  # [N]
    if direct:
        _direct(x, w13, w2, weights, ids, y, top_k, cfg_gu, cfg_dn)
        return y
    buf = torch.empty((num_pairs, hidden), dtype=x.dtype, device=x.device)  # [N, H] route order
    fused = moe_configs.FUSED_TOPK_SUM
    if fused:
        block_r = triton.next_power_of_2(top_k)
        _zero_unrouted_kernel[(triton.cdiv(num_tokens, _ZERO_BLOCK_T),)](
            ids, y, num_tokens, hidden, num_experts, TOP_K=top_k, BLOCK_R=block_r, BLOCK_T=_ZERO_BLOCK_T,
            BLOCK_H=_ZERO_BLOCK_H, num_warps=4,
        )
    summed = dict(sum_into=y, ids=ids, top_k=top_k) if fused else {}
    if layout == "padded":
        pad = max(cfg_gu.block_m, cfg_dn.block_m)
        block_expert, sorted_pair = permute_padded(topk_ids, num_experts, pad)
        h = _gate_up(x, w13, cfg_gu, "padded", block_expert, pair=sorted_pair, num_rows=sorted_pair.numel(),
                     num_pairs=num_pairs, top_k=top_k, pad=pad)  # [R_padded, I]
        _down(h, w2, cfg_dn, "padded", block_expert, buf, pair=sorted_pair, weights=weights, num_pairs=num_pairs,
              pad=pad, **summed)
    else:
        offsets, sorted_pair = permute(topk_ids, num_experts)
        h = _gate_up(x, w13, cfg_gu, "gather", offsets, pair=sorted_pair, num_rows=num_pairs, top_k=top_k)  # [N, I]
        _down(h, w2, cfg_dn, "gather", offsets, buf, pair=sorted_pair, weights=weights, **summed)
    if not fused:
        grid = (num_tokens, triton.cdiv(hidden, _SUM_BLOCK_H))
        _sum_topk_kernel[grid](buf, ids, y, hidden, num_experts, TOP_K=top_k, BLOCK_H=_SUM_BLOCK_H, num_warps=4)
    return y


def grouped_ffn_triton(
    x_sorted: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    offsets: torch.Tensor,
    gate_up_config: GemmConfig | None = None,
    down_config: GemmConfig | None = None,
) -> torch.Tensor:
    """``pykernels.grouped_ffn`` on validated inputs; rows no expert owns come out 0."""
    num_rows, hidden = x_sorted.shape
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    # NOTES: zeros, not empty: rows past offsets[E-1] belong to no expert and are never written.
    y = torch.zeros((num_rows, hidden), dtype=x_sorted.dtype, device=x_sorted.device)
    if num_rows == 0:
        return y
    elem = x_sorted.element_size()
    cfg_gu = gate_up_config or moe_configs.pick("gate_up", hidden, inter, num_rows, num_experts, elem)
    cfg_dn = down_config or moe_configs.pick("down", hidden, inter, num_rows, num_experts, elem)
    h = _gate_up(x_sorted, w13, cfg_gu, "sorted", offsets, num_rows=num_rows)  # [R, I]
    _down(h, w2, cfg_dn, "sorted", offsets, y)
    return y
