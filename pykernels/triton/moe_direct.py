"""Triton: moe_ffn's direct layout, the decode path (``moe_ffn_triton(layout="direct")``; the default up to
``moe_configs.DIRECT_MAX_TOKENS`` tokens on the shapes the table holds direct tiles for).

The direct layout of ``moe_ffn`` (decode, one token: its top_k routes are distinct experts): 1 launch, no
permutation::

    h        = w[p] * silu(x[t] @ gate_e[J].T) * (x[t] @ up_e[J].T)   slice item (route p = t*top_k + k,
    part[p,J] = h @ w2_e[:, J].T                                       I tile J): both GEMMs, h in registers
    y[t]     = sum_k sum_J part[t*top_k + k, J]                        sum items (token, H-columns): float32,
                                                                       a fixed order

_direct_kernel runs it all: a program per SM (or a few) takes work items from a counter in global memory,
every slice item first, and a sum item waits (spinning on a per-token counter) until the slice items of its
token are done. Items are handed out in order, so an item waits only for earlier items, held by running
programs: it cannot deadlock, whatever the launch size. A slice item streams its share of the expert's three
matrices (Lite at 64-column I tiles: 6 x 22 = 132 items of 768 KiB, one per SM of the H200), and a whole
unit waits for no other item's h: the only wait is the short sum at the end. The (route, I tile) units left
after the last full round over the SMs are split, so that the SMs finish together (236B: 144 units on 132
SMs, 12 split): each into h pieces of as few as 8 columns (matrix-vector steps, to a small h buffer), then
into down chunks of H rows that wait for their unit's h. The float32 parts cost N x cdiv(I, BLOCK_N) x H x 4
bytes of writes and reads (1 % of the weights on Lite). The counters are left zero by each launch (no memset
node per call).

The gate/up tile comes from grouped_gemm's ``_silu_gate_up``, the weight descriptors from its ``_weight_desc``.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from pykernels.triton.grouped_gemm import _precision, _silu_gate_up, _weight_desc
from pykernels.triton.moe_configs import GemmConfig


@triton.jit
def _route_h(
    x_ptr, w13_ptr, w13_desc, weights_ptr,
    route,  # p = t * TOP_K + k
    expert,  # the route's expert (in range)
    pid_n,  # I tile
    hidden, inter, stride_xm, stride_w13e, stride_w13n,
    TOP_K: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_TMA: tl.constexpr, SINGLE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """h [BM, BN] in x's dtype: w_p * silu(x_t @ gate_e.T) * (x_t @ up_e.T) on the I tile's columns (0 past
    column I), rounded once. Every row is the token's (the A tile repeats it)."""
    m = tl.arange(0, BLOCK_M)  # [BM]
    a_ptrs = x_ptr + (route // TOP_K).to(tl.int64) * stride_xm + tl.arange(0, BLOCK_K)[None, :] + 0 * m[:, None]
    h = _silu_gate_up(a_ptrs, w13_ptr, w13_desc, expert, pid_n, hidden, inter, stride_w13e, stride_w13n,
                      inter * stride_w13n, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, USE_TMA, SINGLE_DOT)
    i_cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] I-columns
    h = tl.where((i_cols < inter)[None, :], h * tl.load(weights_ptr + route).to(tl.float32), 0.0)
    return h.to(x_ptr.dtype.element_ty)


@triton.jit
def _route_parts(
    h,  # [BM, BN] from _route_h
    w2_ptr, w2_desc, part_ptr,
    part_row,  # the row of part written (see _direct_kernel)
    expert, pid_n,
    h_lo, h_hi,  # the H-columns of part written (h_lo a multiple of BLOCK_H)
    hidden, inter, stride_w2e, stride_w2n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, USE_TMA: tl.constexpr, EVEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """part[part_row, h_lo:h_hi] = h @ w2_e[h_lo:h_hi, I tile pid_n].T in float32 (row 0 of each [BM, BLOCK_H]
    step is stored)."""
    m = tl.arange(0, BLOCK_M)  # [BM]
    i_cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] I-columns
    hs = h_lo + tl.arange(0, BLOCK_H)  # [BH] H-rows of w2 of the first step
    b_ptrs = w2_ptr + expert.to(tl.int64) * stride_w2e + hs[None, :].to(tl.int64) * stride_w2n + i_cols[:, None]
    o_ptrs = part_ptr + part_row.to(tl.int64) * hidden + hs[None, :] + 0 * m[:, None]
    hs -= h_lo
    for h0 in range(h_lo, h_hi, BLOCK_H):
        if USE_TMA:
            # Rows of the [E * H, I] view (past row H: the next expert's, never stored); zero past column I.
            b = w2_desc.load([expert * hidden + h0, pid_n * BLOCK_N]).T  # [BN, BH]
        elif EVEN:
            b = tl.load(b_ptrs)
        else:
            b = tl.load(b_ptrs, mask=(i_cols < inter)[:, None] & ((h0 + hs) < h_hi)[None, :], other=0.0)
        part = tl.dot(h, b, input_precision=DOT_PRECISION)  # [BM, BH]
        tl.store(o_ptrs, part, mask=(m == 0)[:, None] & ((h0 + hs) < h_hi)[None, :])
        b_ptrs += BLOCK_H * stride_w2n
        o_ptrs += BLOCK_H


@triton.jit
def _route_slice(
    x_ptr, w13_ptr, w13_desc, w2_ptr, w2_desc, part_ptr, weights_ptr, timeline_ptr, item, route, expert, pid_n,
    part_row, hidden, inter, stride_xm, stride_w13e, stride_w13n, stride_w2e, stride_w2n,
    TOP_K: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GU_TMA: tl.constexpr, GU_SINGLE_DOT: tl.constexpr, BLOCK_H: tl.constexpr, DN_TMA: tl.constexpr,
    DN_EVEN: tl.constexpr, DOT_PRECISION: tl.constexpr, TIMELINE: tl.constexpr,
):
    """One slice item of _direct_kernel: h of the route's I tile ``pid_n`` (BLOCK_N columns), then its part."""
    h = _route_h(x_ptr, w13_ptr, w13_desc, weights_ptr, route, expert, pid_n, hidden, inter, stride_xm, stride_w13e,
                 stride_w13n, TOP_K, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, GU_TMA, GU_SINGLE_DOT, DOT_PRECISION)
    if TIMELINE:
        _stamp(timeline_ptr, item, 1, tl.sum(tl.sum(h.to(tl.float32), axis=1), axis=0).to(tl.int32))
    _route_parts(h, w2_ptr, w2_desc, part_ptr, part_row, expert, pid_n, 0, hidden, hidden, inter, stride_w2e,
                 stride_w2n, BLOCK_M, BLOCK_N, BLOCK_H, DN_TMA, DN_EVEN, DOT_PRECISION)


@triton.jit
def _piece_h(
    x_ptr, w13_ptr, weights_ptr, route, expert,
    col0,  # the piece's first I-column
    hidden, inter, stride_xm, stride_w13e, stride_w13n,
    TOP_K: tl.constexpr, PIECE_N: tl.constexpr, PIECE_K: tl.constexpr, PIECE_STAGES: tl.constexpr,
):
    """h [PIECE_N] in x's dtype of the route's I-columns from col0 (0 past I), as _route_h, but as a
    matrix-vector product of the one token (no dot: a piece may be 8 columns, under tl.dot's 16); each step
    reads [2 * PIECE_N, PIECE_K] of w13, PIECE_STAGES steps in flight."""
    j = tl.arange(0, 2 * PIECE_N)  # [2PN] gate columns, then the same up columns
    cols = col0 + j % PIECE_N
    ks = tl.arange(0, PIECE_K)  # [PK]
    w_ptrs = (w13_ptr + expert.to(tl.int64) * stride_w13e + (cols + (j // PIECE_N) * inter).to(tl.int64)[:, None]
              * stride_w13n + ks[None, :])  # [2PN, PK]
    x_ptrs = x_ptr + (route // TOP_K).to(tl.int64) * stride_xm + ks  # [PK]
    acc = tl.zeros((2 * PIECE_N,), tl.float32)
    for k0 in tl.range(0, hidden, PIECE_K, num_stages=PIECE_STAGES):
        k_ok = (k0 + ks) < hidden
        w = tl.load(w_ptrs, mask=(cols < inter)[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(x_ptrs, mask=k_ok, other=0.0)
        acc += tl.sum(w.to(tl.float32) * a.to(tl.float32)[None, :], axis=1)
        w_ptrs += PIECE_K
        x_ptrs += PIECE_K
    g, u = tl.split(tl.permute(tl.reshape(acc, (2, PIECE_N)), (1, 0)))  # [PN] each
    n = col0 + tl.arange(0, PIECE_N)  # [PN] I-columns
    h = tl.where(n < inter, g * tl.sigmoid(g) * u * tl.load(weights_ptr + route).to(tl.float32), 0.0)
    return h.to(x_ptr.dtype.element_ty)


@triton.jit
def _wait_count(count_ptr, need):
    """Return once the int32 at count_ptr reaches ``need`` (acquire: what was stored before its releases is
    visible after). The acquire (an atomic read) once per check; between checks, plain volatile reads spin,
    paced by _pause, so that waiting programs neither queue atomics in front of the releases nor poll the
    counter's L2 line back to back."""
    while tl.atomic_add(count_ptr, 0, sem="acquire", scope="gpu") < need:
        while _pause(tl.load(count_ptr, volatile=True)) < need:
            pass


@triton.jit
def _sum_slices(
    part_ptr, y_ptr,
    t,  # the token
    pid_c,  # H-column block
    hidden, num_pairs, i_tiles, stride_ym,
    TOP_K: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """y[t, cols] = the sum of the token's parts (see _direct_kernel): a [I tiles, columns] tile per route
    k = 0, 1, ..., added up elementwise in that order (independent loads, no reduction between them), then
    summed over the I tiles; float32, a fixed order (the same bits whatever program runs it)."""
    j = tl.arange(0, BLOCK_J)[:, None]  # [BJ, 1] I tile
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BC]
    live = (j < i_tiles) & (cols < hidden)[None, :]  # [BJ, BC]
    acc = tl.zeros((BLOCK_J, BLOCK_C), tl.float32)
    for k in tl.static_range(TOP_K):
        row = (j * num_pairs + t * TOP_K + k).to(tl.int64)  # [BJ, 1] the route's units
        acc += tl.load(part_ptr + row * hidden + cols[None, :], mask=live, other=0.0)
    tl.store(y_ptr + t.to(tl.int64) * stride_ym + cols, tl.sum(acc, axis=0).to(y_ptr.dtype.element_ty),
             mask=cols < hidden)


@triton.jit
def _zero_part(part_ptr, part_row, h_lo, h_hi, hidden, BLOCK: tl.constexpr):
    """part[part_row, h_lo:h_hi] = 0 (a route with a bad id adds nothing)."""
    cols = tl.arange(0, BLOCK)
    for h0 in range(h_lo, h_hi, BLOCK):
        tl.store(part_ptr + part_row.to(tl.int64) * hidden + h0 + cols, tl.zeros((BLOCK,), tl.float32),
                 mask=h0 + cols < h_hi)


@triton.jit
def _pause(v):
    """Sleep about 200 ns (nanosleep), then return ``v``: the spacing of a spin loop's reads."""
    return tl.inline_asm_elementwise("nanosleep.u32 200;\n\tmov.b32 $0, $1;", "=r,r", [v], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def _stamp(timeline_ptr, item, slot, dep):
    """timeline[item, slot] = the global timer (ns), read after ``dep`` (an int32 it waits for);
    timeline[item, 3] = this program's SM."""
    t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [dep], dtype=tl.int64, is_pure=False, pack=1)
    tl.store(timeline_ptr + item * 4 + slot, t)
    sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [dep], dtype=tl.int32, is_pure=False, pack=1)
    tl.store(timeline_ptr + item * 4 + 3, sm.to(tl.int64))


@triton.jit
def _direct_kernel(
    x_ptr,  # [T, H] tokens
    w13_ptr,  # [E, 2I, H] gate rows then up rows; stride 1 along H
    w13_desc,  # TMA descriptor of w13 viewed as [E * 2I, H], blocks [GU_BLOCK_N, GU_BLOCK_K] (GU_TMA only)
    w2_ptr,  # [E, H, I]; stride 1 along I
    w2_desc,  # TMA descriptor of w2 viewed as [E * H, I], blocks [DN_BLOCK_H, GU_BLOCK_N] (DN_TMA only)
    part_ptr,  # [units, H] float32 scratch: per unit its share of the down GEMM
    hbuf_ptr,  # [units - head_units, GU_BLOCK_N] scratch, x's dtype: h of each split unit
    y_ptr,  # [T, H] out, x's dtype
    ids_ptr,  # [N] expert id per route (topk_ids flattened, int32 or int64)
    weights_ptr,  # [N] routing weight per route
    sync_ptr,  # [T + 1 + split units] int32, zero at launch and left zero: [t] slice work of token t done, in
    #            SPLITs of a unit (all: TOP_K * cdiv(I, GU_BLOCK_N) * SPLIT); [T] the next work item to hand
    #            out; [T + 1 + v] h pieces of split unit v done
    timeline_ptr,  # TIMELINE: [items, 4] int64 out: per item the global timer (ns) at its start, at the end of
    #                its first phase (h / the wait) and at its end, and its SM (bench/tune_moe.py --timeline)
    num_tokens,  # T
    hidden,  # H
    inter,  # I
    num_experts,
    head_units,  # units run whole; the rest are split (see the docstring)
    stride_xm,
    stride_w13e,
    stride_w13n,
    stride_w2e,
    stride_w2n,
    stride_ym,
    TOP_K: tl.constexpr,  # routes per token
    # The gate_up tile of a whole unit (see _silu_gate_up; BLOCK_M rows of the one token):
    GU_EVEN_K: tl.constexpr, GU_BLOCK_M: tl.constexpr, GU_BLOCK_N: tl.constexpr, GU_BLOCK_K: tl.constexpr,
    GU_TMA: tl.constexpr, GU_SINGLE_DOT: tl.constexpr,
    DN_BLOCK_H: tl.constexpr,  # H-rows of w2 per step of a slice item's down GEMM
    DN_TMA: tl.constexpr,  # w2 tiles of a whole unit through the TMA descriptor
    DN_EVEN: tl.constexpr,  # I % GU_BLOCK_N == 0 and H % DN_BLOCK_H == 0: no masks on w2 pointer loads
    SPLIT: tl.constexpr,  # h pieces and down chunks of a split unit
    PIECE_K: tl.constexpr,  # H-columns of w13 per step of an h piece (see _piece_h)
    PIECE_STAGES: tl.constexpr,  # an h piece's steps in flight
    SUM_BLOCK_J: tl.constexpr,  # next power of two >= cdiv(I, GU_BLOCK_N)
    SUM_BLOCK_C: tl.constexpr,  # H-columns per sum item
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (no TF32 rounding); 16-bit inputs ignore it
    TIMELINE: tl.constexpr,  # record the items' timeline (diagnosis only)
    PDL: tl.constexpr,  # launched as a programmatic dependent launch (see DIRECT_PDL)
):
    """The direct layout in one launch (see the module docstring). A unit is (route p, I tile J of GU_BLOCK_N
    columns), numbered u = J * N + p; its share of the down GEMM is part row u. The work items, in order:
    units [0, head_units) whole (both GEMMs); each later (split) unit as SPLIT h pieces (GU_BLOCK_N / SPLIT
    columns of h each, to hbuf), then as SPLIT down chunks (cdiv(H, SPLIT) rows of its part each, from the
    unit's whole h); then the sum items (token, H-column block). The many small items of the split units
    even out the programs' finish. A program takes the next item from a counter until none is left. Whole
    units and down chunks store their part (zeros for a bad id) and count their share done for the token
    (release); a down chunk first waits until its unit's h pieces are done, a sum item until its token's
    count is complete (acquire; once per token and program). Items are handed out in order, so every item
    waited for is already held by a running program that waits only for earlier items: no launch size or
    residency can deadlock. Each program draws one ticket past the items, and last, so the program that draws
    the very last ticket (items + programs - 1) knows every program is done with the counters: it sets them
    back to zero, and the next launch needs no memset."""
    PIECE_N: tl.constexpr = GU_BLOCK_N // SPLIT
    num_pairs = num_tokens * TOP_K
    i_tiles = tl.cdiv(inter, GU_BLOCK_N)
    units = num_pairs * i_tiles
    num_split = units - head_units
    h_items = head_units + num_split * SPLIT  # the end of the h pieces
    slice_items = h_items + num_split * SPLIT  # the end of the down chunks
    items = slice_items + num_tokens * tl.cdiv(hidden, SUM_BLOCK_C)
    chunk_h = tl.cdiv(tl.cdiv(hidden, SPLIT), DN_BLOCK_H) * DN_BLOCK_H  # H-rows of a down chunk
    done_ptr = sync_ptr
    next_ptr = sync_ptr + num_tokens
    h_done_ptr = sync_ptr + num_tokens + 1
    ready = num_tokens * 0 - 1  # the token whose slices this program has seen done (int32)
    if PDL:
        # The next launch may start now (its programs wait below, in their turn); this one touches no
        # memory before the previous kernel is complete and its writes visible.
        gdc_launch_dependents()
        gdc_wait()
    item = tl.atomic_add(next_ptr, 1, sem="acq_rel", scope="gpu")  # (acq_rel: orders the clearing below)
    while item < items:
        if TIMELINE:
            _stamp(timeline_ptr, item, 0, item)
        if item < slice_items:
            # N-tile-major: the routes of one I tile are consecutive, so routes that share an expert (several
            # tokens) read the same weight tile at about the same time (from the L2 after the first).
            whole = item < head_units
            is_h = (item >= head_units) & (item < h_items)
            piece = tl.where(item < h_items, item - head_units, item - h_items)
            v = tl.where(whole, 0, piece // SPLIT)  # the split unit
            q = piece % SPLIT  # the h piece, or the down chunk
            u = tl.where(whole, item, head_units + v)
            route = u % num_pairs
            e_raw = tl.load(ids_ptr + route)  # int32 or int64: checked before the cast
            expert = e_raw.to(tl.int32)
            bad = (e_raw < 0) | (e_raw >= num_experts)  # a bad id: the route adds nothing
            if whole:
                if bad:
                    _zero_part(part_ptr, u, 0, hidden, hidden, 1024)
                else:
                    _route_slice(x_ptr, w13_ptr, w13_desc, w2_ptr, w2_desc, part_ptr, weights_ptr, timeline_ptr, item,
                                 route, expert, u // num_pairs, u, hidden, inter, stride_xm, stride_w13e,
                                 stride_w13n, stride_w2e, stride_w2n, TOP_K, GU_EVEN_K, GU_BLOCK_M, GU_BLOCK_N,
                                 GU_BLOCK_K, GU_TMA, GU_SINGLE_DOT, DN_BLOCK_H, DN_TMA, DN_EVEN, DOT_PRECISION,
                                 TIMELINE)
            elif SPLIT > 1:
                if is_h:
                    if not bad:
                        h_piece = _piece_h(x_ptr, w13_ptr, weights_ptr, route, expert,
                                           (u // num_pairs) * GU_BLOCK_N + q * PIECE_N, hidden, inter, stride_xm,
                                           stride_w13e, stride_w13n, TOP_K, PIECE_N, PIECE_K, PIECE_STAGES)
                        tl.store(hbuf_ptr + v * GU_BLOCK_N + q * PIECE_N + tl.arange(0, PIECE_N), h_piece)
                else:
                    _wait_count(h_done_ptr + v, SPLIT)
                    if TIMELINE:
                        _stamp(timeline_ptr, item, 1, item)
                    h_lo = q * chunk_h
                    h_hi = tl.minimum(hidden, h_lo + chunk_h)
                    if bad:
                        _zero_part(part_ptr, u, h_lo, h_hi, hidden, 1024)
                    else:
                        n = tl.arange(0, GU_BLOCK_N)
                        m = tl.arange(0, GU_BLOCK_M)[:, None]
                        h_unit = tl.load(hbuf_ptr + v * GU_BLOCK_N + n[None, :] + 0 * m)  # [BM, BN], rows alike
                        _route_parts(h_unit, w2_ptr, w2_desc, part_ptr, u, expert, u // num_pairs, h_lo, h_hi, hidden,
                                     inter, stride_w2e, stride_w2n, GU_BLOCK_M, GU_BLOCK_N, DN_BLOCK_H, DN_TMA, DN_EVEN,
                                     DOT_PRECISION)
            tl.debug_barrier()  # every thread's stores come before the release below
            if is_h:
                tl.atomic_add(h_done_ptr + v, 1, sem="release", scope="gpu")
            else:
                tl.atomic_add(done_ptr + route // TOP_K, tl.where(whole, SPLIT, 1), sem="release", scope="gpu")
            if TIMELINE:
                _stamp(timeline_ptr, item, 2, item)
        else:
            t = (item - slice_items) % num_tokens
            pid_c = (item - slice_items) // num_tokens
            if t != ready:  # once per token and program
                _wait_count(done_ptr + t, TOP_K * i_tiles * SPLIT)
                ready = t
            if TIMELINE:
                _stamp(timeline_ptr, item, 1, item)
            _sum_slices(part_ptr, y_ptr, t, pid_c, hidden, num_pairs, i_tiles, stride_ym, TOP_K, SUM_BLOCK_J,
                        SUM_BLOCK_C)
            if TIMELINE:
                tl.debug_barrier()
                _stamp(timeline_ptr, item, 2, item)
        item = tl.atomic_add(next_ptr, 1, sem="acq_rel", scope="gpu")
    if item == items + tl.num_programs(0) - 1:  # the last ticket: every program is done with the counters
        zero = tl.arange(0, 1024)
        for i0 in range(0, num_tokens + 1 + num_split, 1024):
            tl.store(sync_ptr + i0 + zero, tl.zeros((1024,), tl.int32), mask=i0 + zero < num_tokens + 1 + num_split)


# Programs of the direct kernel per SM (tuned with bench/tune_moe.py). Any number is safe (the work items
# are handed out in order; see _direct_kernel); programs that do not fit beside each other just start late.
# Triton's interpreter runs the programs one after another: there the first does every item.
DIRECT_PROGRAMS_PER_SM = 1
INTERPRETER_PROGRAMS = 2
# Launch the direct kernel as a programmatic dependent launch (Hopper): its programs may start during the
# previous kernel's tail (they wait, griddepcontrol.wait, before touching memory), and they let the next
# kernel do the same. Lite at T = 1 in CUDA graphs: 33.10 µs off, 32.24 µs on (tune/moe_direct_pdl.json).
DIRECT_PDL = True
# Most float32 elements a sum item loads at once (I tiles x H-columns, per route), and the most sum
# items per token (at most one per SM: one round). The sum's tile shape sets its order of additions, so it
# depends on the shape alone, not on the launch: the same bits whatever DIRECT_PROGRAMS_PER_SM and the GPU.
_SUM_TILE = 4096
_SUM_ITEMS = 128
# Fewest I-columns of an h piece of a split unit; the w13 bytes per step of an h piece, and its steps in flight.
_PIECE_MIN_N = 8
_PIECE_STEP_BYTES = 16384
_PIECE_STAGES = 6
# The direct kernel's counters, per (device, stream): zeroed once, left zero by every launch.
_SYNC: dict[tuple[int, int], torch.Tensor] = {}


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def direct_split(units: int, sms: int, block_n: int) -> tuple[int, int]:
    """(units run whole, pieces of each later unit) of the direct kernel: whole units in full rounds over the
    SMs, the units left over split in as many pieces (a power of two, >= _PIECE_MIN_N columns each) as the
    SMs hold in one round, so that the SMs finish together (236B at 64 columns: 144 units on 132 SMs, 12
    split in 8). Which units are split (so how their parts are computed) follows the SM count, not the launch
    size: the same bits on one GPU at any launch."""
    left = units % sms if units > sms else 0
    split = min(block_n // _PIECE_MIN_N, sms // left) if left else 1
    split = 1 << (split.bit_length() - 1) if split >= 2 else 1
    return (units - left, split) if split > 1 else (units, 1)


def piece_k(block_n: int, split: int, elem_bytes: int) -> int:
    """H-columns of w13 per step of an h piece (block_n / split I-columns): _PIECE_STEP_BYTES of gate and up rows."""
    return max(16, _PIECE_STEP_BYTES // (2 * (block_n // split) * elem_bytes))


def _sync_buffer(device: torch.device, size: int) -> torch.Tensor:
    """int32 [>= size] zeros for _direct_kernel's counters, which each launch leaves zero on its way out: one
    buffer per device and stream, as launches on one stream never overlap (a launch on another stream, or a
    CUDA graph captured on one, gets its own). The first use on a stream zeroes it (under graph capture: a
    memset node in the graph). NOTES: graphs captured on one stream share its buffer, so two of them must
    not replay at the same time on different streams."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.index if device.index is not None else -1, stream)
    buf = _SYNC.get(key)
    if buf is None or buf.numel() < size:
        buf = _SYNC[key] = torch.zeros(max(size, 64), dtype=torch.int32, device=device)
    return buf


def moe_ffn_direct(x, w13, w2, weights, ids, y, top_k: int, cfg_gu: GemmConfig, cfg_dn: GemmConfig,
                   timeline: torch.Tensor | None = None) -> None:
    """y [T, H] = moe_ffn in the direct layout, one launch of _direct_kernel. ``cfg_gu``: the slice items'
    gate_up tile (its block_n is the I tile of an item), num_warps and num_stages; ``cfg_dn``: block_n H-rows
    of w2 per step of an item's down GEMM, tma (its other fields are unused). ``timeline``: int64 [>= items,
    4], filled with the items' timeline (see _direct_kernel; diagnosis)."""
    num_tokens, hidden = x.shape
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    i_tiles = triton.cdiv(inter, cfg_gu.block_n)
    units = ids.numel() * i_tiles  # (route, I tile)
    sms, programs = INTERPRETER_PROGRAMS, INTERPRETER_PROGRAMS
    if x.device.type == "cuda":
        sms = _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
        programs = DIRECT_PROGRAMS_PER_SM * sms
    head, split = direct_split(units, sms, cfg_gu.block_n)
    part = torch.empty((units, hidden), dtype=torch.float32, device=x.device)
    hbuf = torch.empty((max(units - head, 1), cfg_gu.block_n), dtype=x.dtype, device=x.device)
    sync = _sync_buffer(x.device, num_tokens + 1 + units - head)  # see _direct_kernel's sync_ptr
    block_j = triton.next_power_of_2(i_tiles)
    block_c = max(16, min(_SUM_TILE // block_j, triton.next_power_of_2(triton.cdiv(hidden, _SUM_ITEMS))))
    items = head + (units - head) * 2 * split + num_tokens * triton.cdiv(hidden, block_c)
    if timeline is not None and (timeline.dtype != torch.int64 or timeline.shape[0] < items):
        raise ValueError(f"timeline: expected int64 [>= {items}, 4], got {timeline.dtype} {list(timeline.shape)}")
    gu_tma, w13_desc = _weight_desc(w13, cfg_gu)
    dn_tma, w2_desc = _weight_desc(w2, cfg_dn._replace(block_k=cfg_gu.block_n))  # [block_h, I tile] blocks
    pdl = DIRECT_PDL and x.device.type == "cuda"
    _direct_kernel[(min(items, programs),)](
        x, w13, w13_desc, w2, w2_desc, part, hbuf, y, ids, weights, sync, sync if timeline is None else timeline,
        num_tokens, hidden, inter, num_experts, head,
        x.stride(0), w13.stride(0), w13.stride(1), w2.stride(0), w2.stride(1), y.stride(0),
        TOP_K=top_k, GU_EVEN_K=hidden % cfg_gu.block_k == 0, GU_BLOCK_M=cfg_gu.block_m, GU_BLOCK_N=cfg_gu.block_n,
        GU_BLOCK_K=cfg_gu.block_k, GU_TMA=gu_tma, GU_SINGLE_DOT=cfg_gu.single_dot and not gu_tma,
        DN_BLOCK_H=cfg_dn.block_n, DN_TMA=dn_tma,
        DN_EVEN=inter % cfg_gu.block_n == 0 and hidden % cfg_dn.block_n == 0, SPLIT=split,
        PIECE_K=piece_k(cfg_gu.block_n, split, x.element_size()), PIECE_STAGES=_PIECE_STAGES,
        SUM_BLOCK_J=block_j, SUM_BLOCK_C=block_c, DOT_PRECISION=_precision(x.dtype), TIMELINE=timeline is not None,
        PDL=pdl, num_warps=cfg_gu.num_warps, num_stages=cfg_gu.num_stages, **({"launch_pdl": True} if pdl else {}),
    )
