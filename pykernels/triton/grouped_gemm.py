"""Triton grouped-GEMM expert FFN: the backend of ``pykernels.moe_ffn`` and ``pykernels.grouped_ffn``.

``moe_ffn`` runs in one of three row layouts (``moe_ffn_triton(layout=...)``; by default "direct" up to
``moe_configs.DIRECT_MAX_TOKENS`` tokens on the shapes tuned for it, "sorted" otherwise). No layout
synchronises with the host.

"direct" (decode, one token) -- 1 launch, no permutation: see ``pykernels/triton/moe_direct.py``.

"sorted" (the unpadded layout of moe_permute.permute) -- 3 launches up to ``moe_permute.CHUNK`` routes
(21 tokens at top-6), 4 beyond::

    offsets, sorted_pair = permute(topk_ids)                 expert-sorted order of the routes
    h[r]   = silu(x[t(r)] @ gate_e.T) * (x[t(r)] @ up_e.T)   ROWS="gather": r in expert e's rows,
                                                              t(r) = sorted_pair[r] // top_k (rows gathered)
    buf[p] = w[p] * (h[r] @ w2[e].T)                          _down_kernel, p = sorted_pair[r]: scattered back
                                                              to route order, weighted, rounded once to x's dtype
    y[t]   = sum_k buf[t * top_k + k]                         _sum_topk_kernel, float32, k = 0, 1, ... in order

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
applied to h before its single rounding (where the sorted layouts round the weighted down output), and
the parts stay float32 up to the one rounding of y.

Weight tiles come in one of three ways (``GemmConfig.tma`` / ``single_dot``, chosen per shape by the table):
pointer loads with two dots (gate, up); TMA descriptors over the weights viewed 2-D (zero fill past the
edges, no masks); or, for gate_up, one pointer-loaded [BLOCK_K, 2 * BLOCK_N] operand holding the gate and
the up rows side by side and one wide dot whose accumulator the epilogue splits.

NOTES: rows of masked or out-of-range work read row 0 (a valid address) and are never stored; weights
are addressed with 64-bit offsets (w13 of the 236B model has 2.5e9 elements). A route whose expert id is
outside [0, E) is skipped by the direct layout's slice items and sums and by every down GEMM. Inside the
k-step loops no load feeds an address (expert ids are staged before the loop), so Triton's pipeliner
keeps ``num_stages`` weight tiles in flight.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from pykernels.triton import moe_configs
from pykernels.triton.moe_configs import GemmConfig
from pykernels.triton.moe_permute import permute, permute_padded

# Hidden columns per program of the top-k sum (8 KiB of bf16 per route row read).
_SUM_BLOCK_H = 1024
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
    x_ptr, w13_ptr, w13_desc, h_ptr, pair_ptr,
    expert,  # the tile's expert (in range)
    pid_n,  # I tile
    row_begin,  # first row of h
    row_end,  # "sorted"/"gather": end of the expert's rows (rows >= it are masked); "padded": unused
    num_pairs, hidden, inter, top_k, stride_xm, stride_we, stride_wn, stride_hm, up_shift,
    ROWS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, SINGLE_DOT: tl.constexpr,
):
    """h[rows, cols] of one (M tile, N tile) of _gate_up_kernel (its arguments; BLOCK_M may be half the kernel's)."""
    m = tl.arange(0, BLOCK_M)  # [BM]
    if ROWS == "padded":
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
    a_ptrs = x_ptr + src.to(tl.int64)[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :]  # [BM, BK]
    h = _silu_gate_up(a_ptrs, w13_ptr, w13_desc, expert, pid_n, hidden, inter, stride_we, stride_wn, up_shift,
                      EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, USE_TMA, SINGLE_DOT)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] I-columns
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hm + cols[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < inter)[None, :])


@triton.jit
def _silu_gate_up(
    a_ptrs,  # [BM, BK] pointers to the first K step of the tile's x rows
    w13_ptr, w13_desc, expert, pid_n, hidden, inter, stride_we, stride_wn, up_shift,
    EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, SINGLE_DOT: tl.constexpr,
):
    """float32 [BM, BN] silu(x @ gate_e.T) * (x @ up_e.T) on I tile ``pid_n`` (see _gate_up_kernel for the
    arguments); columns >= I hold finite junk, never to be stored."""
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] I-columns
    cols_ld = cols % inter  # in range for loads
    ks = tl.arange(0, BLOCK_K)  # [BK]
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

    return acc_g * tl.sigmoid(acc_g) * acc_u


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
            _gate_up_tile(x_ptr, w13_ptr, w13_desc, h_ptr, pair_ptr, expert, pid_n, row_begin, row_end,
                          num_pairs, hidden, inter, top_k, stride_xm, stride_we, stride_wn, stride_hm, up_shift,
                          ROWS, EVEN_K, BLOCK_M // 2, BLOCK_N, BLOCK_K, DOT_PRECISION, USE_TMA, SINGLE_DOT)
        else:
            _gate_up_tile(x_ptr, w13_ptr, w13_desc, h_ptr, pair_ptr, expert, pid_n, row_begin, row_end,
                          num_pairs, hidden, inter, top_k, stride_xm, stride_we, stride_wn, stride_hm, up_shift,
                          ROWS, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, USE_TMA, SINGLE_DOT)
    else:
        _gate_up_tile(x_ptr, w13_ptr, w13_desc, h_ptr, pair_ptr, expert, pid_n, row_begin, row_end,
                      num_pairs, hidden, inter, top_k, stride_xm, stride_we, stride_wn, stride_hm, up_shift,
                      ROWS, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, USE_TMA, SINGLE_DOT)


@triton.jit
def _down_tile(
    h_ptr, w2_ptr, w2_desc, out_ptr, pair_ptr, weights_ptr,
    expert,  # the tile's expert (in range)
    pid_n,  # H tile
    row_begin,  # first sorted row of the tile
    row_end,  # "sorted"/"gather": end of the expert's rows (rows >= it are masked); "padded": unused
    num_pairs, hidden, inter, stride_hm, stride_we, stride_wn, stride_om,
    ROWS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
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
):
    tl.static_assert(not SPLIT_TAIL or (BLOCK_M >= 32 and ROWS != "padded"))
    expert, pid_n, row_begin, row_end = _program_tile(map_ptr, num_experts, num_rows, num_m_tiles,
                                                      tl.cdiv(hidden, BLOCK_N), ROWS, PAD, BLOCK_M, BLOCK_E, GROUP_M)
    if expert >= num_experts:
        return
    if SPLIT_TAIL:
        if row_end - row_begin <= BLOCK_M // 2:
            _down_tile(h_ptr, w2_ptr, w2_desc, out_ptr, pair_ptr, weights_ptr, expert, pid_n, row_begin, row_end,
                       num_pairs, hidden, inter, stride_hm, stride_we, stride_wn, stride_om,
                       ROWS, EVEN_K, BLOCK_M // 2, BLOCK_N, BLOCK_K, DOT_PRECISION, USE_TMA)
        else:
            _down_tile(h_ptr, w2_ptr, w2_desc, out_ptr, pair_ptr, weights_ptr, expert, pid_n, row_begin, row_end,
                       num_pairs, hidden, inter, stride_hm, stride_we, stride_wn, stride_om,
                       ROWS, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, USE_TMA)
    else:
        _down_tile(h_ptr, w2_ptr, w2_desc, out_ptr, pair_ptr, weights_ptr, expert, pid_n, row_begin, row_end,
                   num_pairs, hidden, inter, stride_hm, stride_we, stride_wn, stride_om,
                   ROWS, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, USE_TMA)


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


def _down(h, w2, cfg: GemmConfig, rows: str, row_map, out, *, pair=None, weights=None, num_pairs=0, pad=0) -> None:
    """out = the down GEMM of h in row layout ``rows`` ("sorted", "gather", "padded"; see _gate_up)."""
    num_experts, hidden, inter = w2.shape
    num_rows = h.shape[0]
    m_tiles = num_rows // cfg.block_m if rows == "padded" else _m_tiles(num_rows, num_experts, cfg.block_m)
    grid = (m_tiles * triton.cdiv(hidden, cfg.block_n),)
    use_tma, w2_desc = _weight_desc(w2, cfg)
    _down_kernel[grid](
        h, w2, w2_desc, out, row_map, row_map if pair is None else pair, h if weights is None else weights,
        num_rows, num_pairs, hidden, inter, num_experts,
        h.stride(0), w2.stride(0), w2.stride(1), out.stride(0), m_tiles,
        ROWS=rows, PAD=pad, EVEN_K=inter % cfg.block_k == 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        BLOCK_E=triton.next_power_of_2(num_experts), GROUP_M=cfg.group_m, DOT_PRECISION=_precision(h.dtype),
        USE_TMA=use_tma, SPLIT_TAIL=cfg.split_tail and rows != "padded", num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
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
        layout = moe_configs.layout_for(num_tokens, hidden, inter)
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
        from pykernels.triton.moe_direct import moe_ffn_direct  # (it builds on this module's tiles)

        moe_ffn_direct(x, w13, w2, weights, ids, y, top_k, cfg_gu, cfg_dn)
        return y
    buf = torch.empty((num_pairs, hidden), dtype=x.dtype, device=x.device)  # [N, H] route order
    if layout == "padded":
        pad = max(cfg_gu.block_m, cfg_dn.block_m)
        block_expert, sorted_pair = permute_padded(topk_ids, num_experts, pad)
        h = _gate_up(x, w13, cfg_gu, "padded", block_expert, pair=sorted_pair, num_rows=sorted_pair.numel(),
                     num_pairs=num_pairs, top_k=top_k, pad=pad)  # [R_padded, I]
        _down(h, w2, cfg_dn, "padded", block_expert, buf, pair=sorted_pair, weights=weights, num_pairs=num_pairs,
              pad=pad)
    else:
        offsets, sorted_pair = permute(topk_ids, num_experts)
        h = _gate_up(x, w13, cfg_gu, "gather", offsets, pair=sorted_pair, num_rows=num_pairs, top_k=top_k)  # [N, I]
        _down(h, w2, cfg_dn, "gather", offsets, buf, pair=sorted_pair, weights=weights)
    sum_topk(buf, ids, y, num_experts, top_k)
    return y


def sum_topk(buf: torch.Tensor, ids: torch.Tensor, y: torch.Tensor, num_experts: int, top_k: int) -> None:
    """y [T, H] = the sum over k of buf [T * top_k, H] (route order; float32, a fixed order), skipping the
    routes whose id in ``ids`` [T * top_k] is outside [0, E) (their rows were never written)."""
    num_tokens, hidden = y.shape
    grid = (num_tokens, triton.cdiv(hidden, _SUM_BLOCK_H))
    _sum_topk_kernel[grid](buf, ids, y, hidden, num_experts, TOP_K=top_k, BLOCK_H=_SUM_BLOCK_H, num_warps=4)


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
