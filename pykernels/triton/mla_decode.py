"""Triton split-KV ("flash decoding") MLA decode over a paged latent cache.

Two kernels:

1. ``_mla_decode_split_kernel``, one program per (row block, batch, split). A *row* is one
   (query position, head) pair: the ``q_len * num_heads`` rows of a sequence are flattened
   (row = i * num_heads + h, the order of ``out[b]``) and cut into blocks of ``BLOCK_M``, so all 16
   heads of a DeepSeek-V2-Lite query (and 2 x 16 rows for q_len = 2) share one program and every
   cache row is read from memory once per row block. The program walks its split's slice of the
   sequence in tiles of ``BLOCK_N`` cache rows; each tile is loaded once, its first 512 columns + the
   64 rope columns, and serves both as K in ``s = q . k`` and (the first 512) as V in ``acc += p . v``.
   Below 64 rows (mma.sync) the 512 columns come as four quarters, which keeps the tensor-core work of
   a tile in independent chains (``_attend``); 64+ rows (warp-group MMAs) take them whole
   (``_attend_wide``). Online softmax in float32 in
   base 2 (the softmax scale is folded into log2(e)); both products accumulate in float32. The
   block ids of a split are staged in registers before its tile loop, so the loop's loads depend on
   no load inside it and Triton's software pipeliner keeps ``num_stages - 1`` tiles in flight while
   the program computes on one. With one split the program writes ``out`` and ``lse`` directly;
   with several it writes each split's normalised output and base-2 LSE to float32 scratch.

2. ``_mla_decode_combine_kernel``, one program per (row, batch, column block): merges the
   splits by their LSE in float32: ``out = sum_s w_s o_s / sum_s w_s``, ``w_s = 2^(lse_s - max lse)``.

Split count: chosen on the host from shapes only (batch, row blocks, ``max_blocks_per_seq *
block_size``, SM count), so the op has no host synchronisation and can be captured in a CUDA
graph and replayed with other lengths. Each program derives its slice from the sequence's real
length on the device: ``chunk = max(roundup(cdiv(n, splits), BLOCK_N), min_chunk)``; splits past
the end of a short sequence do no work and report LSE = -inf.

NOTES: memory safety without value checks: lengths are clamped to ``[0, max_blocks_per_seq *
block_size]``, block-table reads are masked to the blocks a length covers, block ids are clamped
to ``[0, num_blocks)``, and cache rows at or past a sequence's length are never loaded (masked
loads), so NaN-filled blocks past the end cannot leak into the result.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pykernels import _backend

_LOG2E = 1.4426950408889634
_LN2: tl.constexpr = tl.constexpr(0.6931471805599453)  # converts base-2 LSE to natural log


@dataclass(frozen=True)
class MLADecodeConfig:
    """Launch parameters of the split kernel (see the table below)."""

    block_m: int  # rows (query position x head pairs) per program
    block_n: int  # cache rows per tile
    num_warps: int
    num_stages: int  # software-pipelining depth of the cache-tile loads
    programs_per_sm: int = 1  # programs resident per SM (shared memory / registers): the split model's slots
    min_chunk: int = 256  # fewest cache rows one split takes (rounded up to block_n)


# Chosen configs, by rows per sequence (q_len * num_heads), for 2-byte elements, from
# `python -m bench.tune_mla_decode` on the H200 (bench/results/nvidia-h200/tune/mla_decode.json). All are
# software-pipelined: while a program computes on one cache tile, the next tiles' loads
# are in flight (num_stages - 1 buffers; possible because the block ids are staged in registers first).
# - up to 16 rows (h16, q_len 1): bound by reading the cache; all 16 rows of a sequence in one program so
#   each cache row is read once. 32-row tiles x 3 stages (93 KB of shared memory) let two programs share
#   an SM: four tiles in flight per SM (best at b64/s4096 and b32/s32K; 64-row tiles at one program per
#   SM tie at b128/s8192 and lose elsewhere). A split may be one tile (min_chunk 32): a program walks its
#   tiles at 1.3-2 µs each whatever the load (1.30 µs with one program per SM since the value columns are
#   cut into quarters, 1.79 before), so a few sequences want many short splits (H200 probe, quarters:
#   b1/s4096 128 splits 8.4 µs, 16 splits (a 256-row floor) 16.1 µs; b1/s32K 128 splits 19.4 µs, 256 splits
#   20.8 µs: the split model below picks 128).
# - 17 to 32 rows (h16 with q_len 2): as for 16 rows, 32-row tiles x 3 stages and two programs per SM (b64/s4096
#   at 4 splits: 110.8 µs, against 115.1 for 8 warps with 64-row tiles at one per SM; tune/mla_decode_rows32.json).
# - more (h16 with q_len 3-4, h32 ... h128): compute grows with the rows; 64 rows per program reuse each
#   cache tile across 64 (query, head) rows; 8 warps (acc [64, 512] = 128 registers per thread), 64-row
#   tiles, two stages (221 KB of shared memory with q; H200 probe with _attend_wide: h128 b64 s4096 338-360
#   µs at 2/1 splits against 367-375 for 32-row tiles; q_len 4 h16 176 against 189). h128 has two row
#   blocks; they run side by side (row block is the fastest grid axis), so the second read of a tile
#   comes from the L2.
# fp32 (allowed for testing) halves block_n and pipelines one stage to fit the same shared memory.
CONFIG_TABLE: tuple[tuple[int, MLADecodeConfig], ...] = (
    # (max rows, config); first match wins
    (16, MLADecodeConfig(block_m=16, block_n=32, num_warps=4, num_stages=3, programs_per_sm=2, min_chunk=32)),
    (32, MLADecodeConfig(block_m=32, block_n=32, num_warps=4, num_stages=3, programs_per_sm=2, min_chunk=32)),
    (1 << 30, MLADecodeConfig(block_m=64, block_n=64, num_warps=8, num_stages=2)),
)

# Most block-table entries one program stages in registers at a time (128 x 64 = 8192 positions).
BT_CHUNK_MAX = 128

# Under the interpreter: small tiles keep the CPU tests fast (shape coverage matters there, not speed).
INTERPRETER_CONFIG = MLADecodeConfig(block_m=16, block_n=16, num_warps=4, num_stages=1, min_chunk=16)

# Split model (choose_num_splits), in units of one tile's time for a program alone on its SM, fitted to the
# split-count grid of `python -m bench.tune_mla_decode --split-grid` on the H200 (h16, b 1..128, s 4K..32K;
# bench/results/nvidia-h200/tune/mla_decode_splits.json):
# a program's fixed cost (launch slot, the seqlen -> block table -> first tile chain, epilogue) is ~3 tiles;
PROGRAM_COST_TILES = 3.0
# two programs sharing an SM stream 1.2x the tiles of one (the second hides the first's load latency), so each
# of them takes 2 / 1.2 tile times a tile: sharing pays for long splits (b64 s4096: 4 splits, 84 µs against
# 94 at 2) and loses for short ones (b16 s4096: 8 splits 30.6 µs against 32.1 at 16; b1 s32K: 128 splits
# 19.5 µs against 20.9 at 256);
CO_RESIDENT_SPEEDUP = 1.2
# the combine kernel's launch and its dependent wait are ~2 tiles whenever there are splits.
COMBINE_LAUNCH_TILES = 2.0
# The largest split count the model considers (b = 1 fills 132 SMs with ~128).
MAX_SPLITS = 512

# The combine kernel: one program merges BLOCK_DV value columns of one row over TILE_S splits at a
# time, issuing the LSE and partial loads of a tile together (no load waits on another), so a row
# costs one memory round trip per tile, not one per split. At most _COMBINE_TILE_ELEMS float32 per
# tile (32 values per thread with 4 warps); BLOCK_DV shrinks as splits grow so that b = 1 with 128
# splits still spreads over 16 rows x 16 column blocks = 256 programs.
_COMBINE_TILE_ELEMS = 4096
_COMBINE_MIN_BLOCK_DV = 32
_COMBINE_WARPS = 4


def default_config(rows: int, elem_bytes: int) -> MLADecodeConfig:
    """The table's config for ``rows = q_len * num_heads`` rows per sequence."""
    if _backend.triton_interpreted():
        return INTERPRETER_CONFIG
    for max_rows, config in CONFIG_TABLE:
        if rows <= max_rows:
            break
    if elem_bytes > 2:
        config = dataclasses.replace(config, block_n=max(16, config.block_n // 2), num_stages=1)
    return config


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Off the GPU (Triton's interpreter runs programs one after another) the split model sees this
# many "SMs": a few splits, so the combine path is exercised without hundreds of serial programs.
INTERPRETER_SMS = 8


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (132 on an H200); INTERPRETER_SMS off the GPU."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=4096)
def choose_num_splits(batch: int, row_blocks: int, capacity: int, config: MLADecodeConfig, sms: int,
                      head_dim: int = 576, head_dim_v: int = 512,
                      program_cost_tiles: float = PROGRAM_COST_TILES) -> int:
    """Splits per (sequence, row block), from host-known values only (no cache_seqlens).

    ``capacity`` = max_blocks_per_seq * block_size, the longest length the block table allows; the
    model assumes every sequence is that long. With P = batch * row_blocks programs per split,
    ``tiles = capacity / block_n`` and k = min(programs_per_sm, ceil(P * s / sms)) programs sharing an SM,
    it takes the split count s minimising, in tile times of a program alone on its SM::

        ceil(P * s / (sms * programs_per_sm)) * (ceil(tiles / s) * u_k + k * program_cost_tiles)   waves
        + [s > 1] * (COMBINE_LAUNCH_TILES + partial_tiles * P * s / (sms * programs_per_sm))       combine

    where u_1 = 1 and u_2 = 2 / CO_RESIDENT_SPEEDUP (co-resident programs share the SM's bandwidth), and
    ``partial_tiles`` is a split's float32 partial (written and read back) over a tile's bytes. Wave
    quantisation and co-residency are what it weighs: b = 1 at s = 32K gets 128 splits (one program per SM;
    256 would halve each program's tiles but share SMs and double the partials), b = 64 at s = 4096 gets 4
    (two long programs per SM), b = 128 at s = 8192 gets 2. Splits never get shorter than
    ``config.min_chunk`` rows. ``program_cost_tiles`` (default PROGRAM_COST_TILES) is exposed for the
    tuning sweep, which fits it.
    """
    programs = batch * row_blocks
    if programs == 0 or capacity == 0:
        return 1
    slots = sms * config.programs_per_sm
    tiles = triton.cdiv(capacity, config.block_n)
    min_chunk_tiles = triton.cdiv(config.min_chunk, config.block_n)
    max_splits = max(1, min(MAX_SPLITS, tiles // min_chunk_tiles))
    partial_tiles = (config.block_m * head_dim_v * 4 * 2) / (config.block_n * head_dim * 2)

    def modelled(s: int) -> float:
        sharing = min(config.programs_per_sm, math.ceil(programs * s / sms))  # programs per SM
        tile_time = 1.0 if sharing == 1 else sharing / CO_RESIDENT_SPEEDUP
        t = math.ceil(programs * s / slots) * (math.ceil(tiles / s) * tile_time + sharing * program_cost_tiles)
        if s > 1:
            t += COMBINE_LAUNCH_TILES + partial_tiles * programs * s / slots
        return t

    return min(range(1, max_splits + 1), key=modelled)


@triton.jit
def _block_table_chunk(bt_row, stride_btj, chunk_start, end, num_blocks,
                       PAGE: tl.constexpr, BT_CHUNK: tl.constexpr):
    """The block ids of cache positions [chunk_start, chunk_start + BT_CHUNK * PAGE) of one sequence, as a
    register vector [BT_CHUNK] (entries at or past ``end`` are 0; ids clamped into the cache). Staging them
    before the tile loop keeps the cache-tile addresses free of loads inside the loop, which is what lets
    Triton's software pipeliner keep several tiles in flight (a block-table load inside the loop limits it
    to one)."""
    j = chunk_start // PAGE + tl.arange(0, BT_CHUNK)  # [BT_CHUNK] block-table columns
    ids = tl.load(bt_row + j * stride_btj, mask=j * PAGE < end, other=0)
    return tl.minimum(tl.maximum(ids, 0), num_blocks - 1)


@triton.jit
def _tile_rows(K, bt_chunk, chunk_start, stride_kblock, stride_krow, tile, end, PAGE: tl.constexpr,
               BLOCK_N: tl.constexpr, BT_CHUNK: tl.constexpr):
    """Cache rows [tile, tile + BLOCK_N) of one sequence: their positions, which of them are < end (the
    rest are never read), and a pointer to each row. ``bt_chunk`` holds the block ids from ``chunk_start``."""
    pos = tile + tl.arange(0, BLOCK_N)  # [N] cache positions
    pos_ok = pos < end
    first_page = chunk_start // PAGE
    if PAGE % BLOCK_N == 0:
        # A tile lies inside one page (tiles start at multiples of BLOCK_N): one uniform block id.
        slot = tl.arange(0, BT_CHUNK) == tile // PAGE - first_page
        block_id = tl.sum(tl.where(slot, bt_chunk, 0), axis=0)
    else:
        page = tl.minimum(pos // PAGE - first_page, BT_CHUNK - 1)  # [N]
        block_id = tl.gather(bt_chunk, page, axis=0)
    k_row = K + block_id.to(tl.int64) * stride_kblock + (pos % PAGE) * stride_krow  # [N] pointers
    return pos, pos_ok, k_row


@triton.jit
def _load_tile(K, bt_chunk, chunk_start, stride_kblock, stride_krow, tile, end,
               DV: tl.constexpr, DR: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
               BT_CHUNK: tl.constexpr):
    """The tile of ``_tile_rows`` as four ``[BLOCK_N, DV / 4]`` quarters of K's first columns (also V) +
    ``[BLOCK_N, DR]`` (rope columns); rows at or past ``end`` are zeros."""
    pos, pos_ok, k_row = _tile_rows(K, bt_chunk, chunk_start, stride_kblock, stride_krow, tile, end, PAGE,
                                    BLOCK_N, BT_CHUNK)
    DQ: tl.constexpr = DV // 4
    cols = tl.arange(0, DQ)[None, :]
    v0 = tl.load(k_row[:, None] + cols, mask=pos_ok[:, None], other=0.0)  # [N, DQ]
    v1 = tl.load(k_row[:, None] + DQ + cols, mask=pos_ok[:, None], other=0.0)
    v2 = tl.load(k_row[:, None] + 2 * DQ + cols, mask=pos_ok[:, None], other=0.0)
    v3 = tl.load(k_row[:, None] + 3 * DQ + cols, mask=pos_ok[:, None], other=0.0)
    k_r = tl.load(k_row[:, None] + DV + tl.arange(0, DR)[None, :], mask=pos_ok[:, None], other=0.0)  # [N, DR]
    return pos, pos_ok, v0, v1, v2, v3, k_r


@triton.jit
def _softmax_step(s, m_i):
    """Online-softmax step on scores ``s [M, N]`` (base 2, -inf where unseen) with running max ``m_i [M]``:
    (new max, the factor rescaling the old sums, p = 2^(s - new max))."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [M]
    # A row that has seen nothing yet keeps m = -inf; subtract 0 instead so 2^(s - m) is 0, not NaN.
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, tl.exp2(m_i - m_sub), tl.exp2(s - m_sub[:, None])


@triton.jit
def _attend(q0, q1, q2, q3, q_r, K, bt_row, stride_btj, stride_kblock, stride_krow, start, end, limit, num_blocks,
            qk_scale, DV: tl.constexpr, DR: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, BT_CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over [start, end) of the sequence for fewer than 64 rows (mma.sync):
    ``s[M, N] = q . k^T`` then ``acc[M, DV] += p . v``, with q, v and acc cut into four column quarters
    (q0..q3, acc0..acc3). Returns (acc0, acc1, acc2, acc3, m, l): the unnormalised output, the running
    max (base 2) and the running sum.

    Why quarters: with 16 rows a warp holds one 16 x 8 block of s, so one dot over the 576 key columns
    is a chain of 36 dependent MMAs per warp (~33 cycles each: ~0.6 us a tile, about half the per-tile
    time that limited a program to ~27 GB/s). Five dots (four quarters + the rope columns) are
    independent chains of <= 8 that ptxas interleaves. The row sum is kept per column (``l_cols
    [M, N]``) and reduced once at the end: one cross-warp reduction a tile less."""
    DQ: tl.constexpr = DV // 4
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of s (base 2)
    l_cols = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # running sums of 2^(s - m_i), per tile column
    acc0 = tl.zeros([BLOCK_M, DQ], dtype=tl.float32)  # running sum of 2^(s - m_i) v, by column quarter
    acc1 = tl.zeros([BLOCK_M, DQ], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, DQ], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_M, DQ], dtype=tl.float32)
    # Whole tiles whose pages all fit one staged chunk of the block table (tiles start at multiples of
    # BLOCK_N, not necessarily of PAGE, so a chunk of BT_CHUNK entries covers BT_CHUNK - 1 pages of tiles).
    CHUNK_ROWS: tl.constexpr = (BT_CHUNK - 1) * PAGE // BLOCK_N * BLOCK_N
    for chunk_start in range(start, end, CHUNK_ROWS):
        bt_chunk = _block_table_chunk(bt_row, stride_btj, chunk_start, end, num_blocks, PAGE, BT_CHUNK)
        for tile in range(chunk_start, tl.minimum(chunk_start + CHUNK_ROWS, end), BLOCK_N):
            pos, pos_ok, v0, v1, v2, v3, k_r = _load_tile(K, bt_chunk, chunk_start, stride_kblock, stride_krow,
                                                          tile, end, DV, DR, PAGE, BLOCK_N, BT_CHUNK)
            # Five independent dots, scaled before summing (Triton folds add(dot(a, b, 0), x) into
            # dot(a, b, x), which would chain them again).
            s0 = tl.dot(q0, tl.trans(v0), input_precision=DOT_PRECISION)  # [M, N]
            s1 = tl.dot(q1, tl.trans(v1), input_precision=DOT_PRECISION)
            s2 = tl.dot(q2, tl.trans(v2), input_precision=DOT_PRECISION)
            s3 = tl.dot(q3, tl.trans(v3), input_precision=DOT_PRECISION)
            s_r = tl.dot(q_r, tl.trans(k_r), input_precision=DOT_PRECISION)
            s = (s0 * qk_scale + s1 * qk_scale) + (s2 * qk_scale + s3 * qk_scale) + s_r * qk_scale
            visible = pos_ok[None, :] & (pos[None, :] < limit[:, None])  # [M, N]
            m_i, alpha, p = _softmax_step(tl.where(visible, s, float("-inf")), m_i)
            l_cols = l_cols * alpha[:, None] + p
            p_v = p.to(v0.dtype)
            acc0 = tl.dot(p_v, v0, acc0 * alpha[:, None], input_precision=DOT_PRECISION)  # [M, DQ]
            acc1 = tl.dot(p_v, v1, acc1 * alpha[:, None], input_precision=DOT_PRECISION)
            acc2 = tl.dot(p_v, v2, acc2 * alpha[:, None], input_precision=DOT_PRECISION)
            acc3 = tl.dot(p_v, v3, acc3 * alpha[:, None], input_precision=DOT_PRECISION)
    return acc0, acc1, acc2, acc3, m_i, tl.sum(l_cols, axis=1)


@triton.jit
def _attend_wide(q_v, q_r, K, bt_row, stride_btj, stride_kblock, stride_krow, start, end, limit, num_blocks,
                 qk_scale, DV: tl.constexpr, DR: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BT_CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``_attend`` for 64+ rows (warp-group MMAs): whole-width operands, ``s = q_v . v^T + q_r . k_r^T`` and
    ``acc[M, DV] += p . v`` as two and one dots. The tensor cores pipeline a dot's accumulation chain
    themselves, and one [M, DV] accumulator gives the PV product 256-wide instructions (H200 probe, h128
    b64 s4096, 64-row tiles: 338 µs against 367 for quartered dots). Returns (acc, m, l).

    NOTES: what limits this path (h128 reaches ~30 % of the matmul rate). Triton places all warps of a dot
    whose result feeds another dot along M (warpsPerCTA [8, 1]), so with 64 rows and 8 warps both warp
    groups compute the whole of s: the QK product, 53 % of the FLOPs, runs twice. 128 rows would give each
    warp group its own 64, but acc [128, 512] in float32 is the whole register file; 4 warps would hold
    acc [64, 512] in 256 registers a thread. FlashMLA splits the value columns between two warp groups and
    shares p through shared memory (warp specialisation), which Triton does not do on Hopper."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of s (base 2)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of 2^(s - m_i)
    acc = tl.zeros([BLOCK_M, DV], dtype=tl.float32)  # running sum of 2^(s - m_i) v
    CHUNK_ROWS: tl.constexpr = (BT_CHUNK - 1) * PAGE // BLOCK_N * BLOCK_N  # as in _attend
    for chunk_start in range(start, end, CHUNK_ROWS):
        bt_chunk = _block_table_chunk(bt_row, stride_btj, chunk_start, end, num_blocks, PAGE, BT_CHUNK)
        for tile in range(chunk_start, tl.minimum(chunk_start + CHUNK_ROWS, end), BLOCK_N):
            pos, pos_ok, k_row = _tile_rows(K, bt_chunk, chunk_start, stride_kblock, stride_krow, tile, end, PAGE,
                                            BLOCK_N, BT_CHUNK)
            v = tl.load(k_row[:, None] + tl.arange(0, DV)[None, :], mask=pos_ok[:, None], other=0.0)  # [N, DV]
            k_r = tl.load(k_row[:, None] + DV + tl.arange(0, DR)[None, :], mask=pos_ok[:, None], other=0.0)
            s = tl.dot(q_v, tl.trans(v), input_precision=DOT_PRECISION)  # [M, N]
            s = tl.dot(q_r, tl.trans(k_r), s, input_precision=DOT_PRECISION) * qk_scale
            visible = pos_ok[None, :] & (pos[None, :] < limit[:, None])
            m_i, alpha, p = _softmax_step(tl.where(visible, s, float("-inf")), m_i)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _store_cols(dst, acc, inv_l, row_ok, DC: tl.constexpr):
    """``acc * inv_l`` rounded to the destination's type into columns [0, DC) of the rows at ``dst [M, 1]``."""
    tl.store(dst + tl.arange(0, DC)[None, :], (acc * inv_l[:, None]).to(dst.dtype.element_ty), mask=row_ok[:, None])


# Runtime sizes that change per call are not specialised (Triton would otherwise compile a variant
# for values equal to 1 or divisible by 16).
@triton.jit(do_not_specialize=["stride_btb", "num_blocks", "max_blocks", "num_splits", "min_chunk"])
def _mla_decode_split_kernel(
    Q,  # [B, QL, H, DV + DR], last dim contiguous
    K,  # [num_blocks, PAGE, 1, DV + DR], last dim contiguous
    BLOCK_TABLE,  # int32 [B, max_blocks]
    SEQLENS,  # int32 [B]
    O_PART,  # float32 [B, num_splits, QL * H, DV]  (used when SPLIT)
    LSE_PART,  # float32 [B, num_splits, QL * H]     (used when SPLIT; base 2)
    OUT,  # [B, QL, H, DV] contiguous                (used when not SPLIT)
    LSE,  # float32 [B, H, QL] contiguous             (used when not SPLIT; natural log)
    stride_qb, stride_qi, stride_qh,
    stride_kblock, stride_krow,
    stride_btb, stride_btj,
    qk_scale,  # softmax_scale * log2(e)
    q_len, num_heads, num_blocks, max_blocks, num_splits, min_chunk,
    DV: tl.constexpr,  # value columns (512): the first DV columns of a cache row
    DR: tl.constexpr,  # rope columns (64): the rest of the row, used only in q.k
    PAGE: tl.constexpr,  # cache block size (rows per block)
    BLOCK_M: tl.constexpr,  # rows (query position x head) per program
    BLOCK_N: tl.constexpr,  # cache rows per tile
    BT_CHUNK: tl.constexpr,  # block-table entries staged in registers per pass of the tile loop
    CAUSAL: tl.constexpr,  # query i sees positions < n - q_len + i + 1
    SPLIT: tl.constexpr,  # write float32 partials for the combine kernel, else the final out/lse
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (no TF32), "tf32" otherwise (ignored for 16-bit)
):
    row_block = tl.program_id(0)  # fastest axis: the row blocks of one (sequence, split) run together
    b = tl.program_id(1)
    split = tl.program_id(2)
    rows_total = q_len * num_heads

    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)  # [M] flattened (i, h)
    row_ok = rows < rows_total
    qi = rows // num_heads  # query position
    head = rows % num_heads
    cols_r = tl.arange(0, DR)

    # Sequence length, clamped into what the block table can address.
    n = tl.load(SEQLENS + b)
    n = tl.minimum(tl.maximum(n, 0), max_blocks * PAGE)
    # Keys each row sees: positions < limit.
    if CAUSAL:
        limit = n - q_len + qi + 1  # [M]
    else:
        limit = tl.zeros([BLOCK_M], dtype=tl.int32) + n

    # This split's slice [start, end) of the sequence, in whole tiles.
    chunk = tl.cdiv(tl.cdiv(n, num_splits), BLOCK_N) * BLOCK_N
    chunk = tl.maximum(chunk, min_chunk)
    start = split * chunk
    end = tl.minimum(start + chunk, n)

    q_row = Q + b.to(tl.int64) * stride_qb + qi * stride_qi + head * stride_qh  # [M] pointers
    q_r = tl.load(q_row[:, None] + DV + cols_r[None, :], mask=row_ok[:, None], other=0.0)  # [M, DR]
    bt_row = BLOCK_TABLE + b.to(tl.int64) * stride_btb
    DQ: tl.constexpr = DV // 4
    if BLOCK_M >= 64:
        q_v = tl.load(q_row[:, None] + tl.arange(0, DV)[None, :], mask=row_ok[:, None], other=0.0)  # [M, DV]
        acc, m_i, l_i = _attend_wide(q_v, q_r, K, bt_row, stride_btj, stride_kblock, stride_krow, start, end,
                                     limit, num_blocks, qk_scale, DV, DR, PAGE, BLOCK_M, BLOCK_N, BT_CHUNK,
                                     DOT_PRECISION)
    else:
        q_cols = q_row[:, None] + tl.arange(0, DQ)[None, :]  # [M, DQ]: q's value columns, by quarter
        q0 = tl.load(q_cols, mask=row_ok[:, None], other=0.0)
        q1 = tl.load(q_cols + DQ, mask=row_ok[:, None], other=0.0)
        q2 = tl.load(q_cols + 2 * DQ, mask=row_ok[:, None], other=0.0)
        q3 = tl.load(q_cols + 3 * DQ, mask=row_ok[:, None], other=0.0)
        acc0, acc1, acc2, acc3, m_i, l_i = _attend(
            q0, q1, q2, q3, q_r, K, bt_row, stride_btj, stride_kblock, stride_krow, start, end, limit, num_blocks,
            qk_scale, DV, DR, PAGE, BLOCK_M, BLOCK_N, BT_CHUNK, DOT_PRECISION)

    seen_any = l_i > 0.0
    inv_l = 1.0 / tl.where(seen_any, l_i, 1.0)  # [M]; outputs are 0 for rows that saw nothing
    lse2 = tl.where(seen_any, m_i + tl.log2(tl.where(seen_any, l_i, 1.0)), float("-inf"))  # [M] base 2
    if SPLIT:
        part = (b * num_splits + split).to(tl.int64) * rows_total + rows  # [M]
        tl.store(LSE_PART + part, lse2, mask=row_ok)
        # Splits that saw nothing write zeros (weight 0 in the combine, which reads every partial).
        dst = O_PART + part[:, None] * DV  # [M, 1]: float32 partials
    else:
        lse_idx = (b.to(tl.int64) * num_heads + head) * q_len + qi  # lse is [B, H, QL]
        tl.store(LSE + lse_idx, lse2 * _LN2, mask=row_ok)
        dst = OUT + (b.to(tl.int64) * rows_total + rows)[:, None] * DV  # [M, 1]: out is [B, QL, H, DV] contiguous
    if BLOCK_M >= 64:
        _store_cols(dst, acc, inv_l, row_ok, DV)
    else:
        _store_cols(dst, acc0, inv_l, row_ok, DQ)
        _store_cols(dst + DQ, acc1, inv_l, row_ok, DQ)
        _store_cols(dst + 2 * DQ, acc2, inv_l, row_ok, DQ)
        _store_cols(dst + 3 * DQ, acc3, inv_l, row_ok, DQ)


@triton.jit(do_not_specialize=["num_splits"])
def _mla_decode_combine_kernel(
    O_PART,  # float32 [B, num_splits, QL * H, DV]
    LSE_PART,  # float32 [B, num_splits, QL * H], base 2
    OUT,  # [B, QL, H, DV] contiguous
    LSE,  # float32 [B, H, QL] contiguous, natural log
    q_len, num_heads, num_splits,
    DV: tl.constexpr,  # value columns (512)
    BLOCK_DV: tl.constexpr,  # value columns per program (DV is cut into DV / BLOCK_DV programs)
    BLOCK_S: tl.constexpr,  # num_splits rounded up to a power of two: all LSEs are read at once
    TILE_S: tl.constexpr,  # splits whose partials are loaded together (<= BLOCK_S)
):
    row = tl.program_id(0)  # flattened (i, h)
    b = tl.program_id(1)
    col_block = tl.program_id(2)
    rows_total = q_len * num_heads
    cols = col_block * BLOCK_DV + tl.arange(0, BLOCK_DV)  # [BLOCK_DV]

    # Partial (b, split s, row) is at first + s * rows_total.
    first = b.to(tl.int64) * num_splits * rows_total + row
    all_splits = tl.arange(0, BLOCK_S)  # the LSE pass reads every split's LSE at once
    lse_s = tl.load(LSE_PART + first + all_splits * rows_total, mask=all_splits < num_splits, other=float("-inf"))
    m = tl.max(lse_s, axis=0)
    m_sub = tl.where(m == float("-inf"), 0.0, m)  # every split empty: all weights 0, not NaN
    denom = tl.sum(tl.exp2(lse_s - m_sub), axis=0)

    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for s0 in range(0, num_splits, TILE_S):
        splits = s0 + tl.arange(0, TILE_S)  # [TILE_S]
        live = splits < num_splits
        part = first + splits * rows_total
        lse_tile = tl.load(LSE_PART + part, mask=live, other=float("-inf"))  # [TILE_S]
        # Every split wrote its partial (zeros when it saw nothing), so the load need not wait for the LSEs.
        o_s = tl.load(O_PART + part[:, None] * DV + cols[None, :], mask=live[:, None], other=0.0)  # [TILE_S, BLOCK_DV]
        acc += tl.sum(tl.exp2(lse_tile - m_sub)[:, None] * o_s, axis=0)  # [BLOCK_DV]

    o = acc / tl.where(denom > 0.0, denom, 1.0)
    tl.store(OUT + (b.to(tl.int64) * rows_total + row) * DV + cols, o.to(OUT.dtype.element_ty))
    qi = row // num_heads
    head = row % num_heads
    lse = tl.where(denom > 0.0, (m_sub + tl.log2(tl.where(denom > 0.0, denom, 1.0))) * _LN2, float("-inf"))
    tl.store(LSE + (b.to(tl.int64) * num_heads + head) * q_len + qi, lse, mask=col_block == 0)


def _is_pow2_at_least_16(x: int) -> bool:
    return x >= 16 and x & (x - 1) == 0


def check_supported(head_dim: int, head_dim_v: int) -> None:
    """The Triton kernel needs head_dim - head_dim_v and head_dim_v / 4 (it works on quarters of the
    value columns) to be powers of two >= 16 (512 + 64)."""
    if (head_dim_v % 4 or not _is_pow2_at_least_16(head_dim_v // 4)
            or not _is_pow2_at_least_16(head_dim - head_dim_v)):
        raise ValueError(
            "head_dim_v: the triton backend needs head_dim_v >= 64 and head_dim - head_dim_v >= 16, both powers"
            f" of two (e.g. 512 + 64), got head_dim_v={head_dim_v} of head_dim={head_dim}"
        )


def fallback_config(config: MLADecodeConfig) -> MLADecodeConfig:
    """A conservative config with the same rows per program: small tiles, one stage
    (q + one K tile stay under 120 KB of shared memory at 64 rows)."""
    return MLADecodeConfig(block_m=config.block_m, block_n=32, num_warps=8 if config.block_m >= 64 else 4,
                           num_stages=1, min_chunk=config.min_chunk)


# Configs that failed to compile or launch on this machine, and what replaced them (see mla_decode_triton).
_REPLACED: dict[MLADecodeConfig, MLADecodeConfig] = {}


def mla_decode_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    softmax_scale: float,
    causal: bool,
    *,
    config: MLADecodeConfig | None = None,
    num_splits: int | None = None,
    fallback: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernels on validated inputs (see pykernels.mla_decode); returns ``(out, lse)``.

    ``config`` and ``num_splits`` override the table and the heuristic (the tuning sweep uses them).
    With ``fallback``, a config that fails to compile or launch here (out of shared memory, a
    layout this Triton version rejects) is replaced by ``fallback_config(config)`` for the rest of
    the process, with a warning; without it the error propagates (tests and the sweep).
    """
    batch, q_len, num_heads, head_dim = q.shape
    check_supported(head_dim, head_dim_v)
    out = torch.empty((batch, q_len, num_heads, head_dim_v), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, num_heads, q_len), dtype=torch.float32, device=q.device)
    if batch == 0:
        return out, lse
    if config is None:
        config = default_config(q_len * num_heads, q.element_size())
    config = _REPLACED.get(config, config) if fallback else config
    args = (q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, out, lse)
    try:
        _launch(*args, config, num_splits)
    except Exception as error:  # noqa: BLE001 - compile/launch failures of a config; re-raised below
        replacement = fallback_config(config)
        if not fallback or replacement == config:
            raise
        warnings.warn(f"pykernels.mla_decode: {config} failed here ({type(error).__name__}: "
                      f"{str(error).strip()[:200]}); using {replacement} from now on", RuntimeWarning, stacklevel=2)
        _REPLACED[config] = replacement
        _launch(*args, replacement, num_splits)
    return out, lse


def _launch(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, out, lse,
            config: MLADecodeConfig, num_splits: int | None) -> None:
    """The split kernel, and the combine kernel when there is more than one split."""
    batch, q_len, num_heads, head_dim = q.shape
    num_blocks, page = k_cache.shape[0], k_cache.shape[1]
    max_blocks = block_table.shape[1]
    rows = q_len * num_heads
    row_blocks = triton.cdiv(rows, config.block_m)
    if num_splits is None:
        num_splits = choose_num_splits(batch, row_blocks, max_blocks * page, config, num_sms(q.device))
    split = num_splits > 1
    min_chunk = triton.cdiv(config.min_chunk, config.block_n) * config.block_n
    # Stage a whole split's block ids at once where they fit BT_CHUNK_MAX entries (one pass of the tile loop).
    split_len = max(triton.cdiv(max_blocks * page, num_splits), min_chunk, config.block_n)
    bt_chunk = min(triton.next_power_of_2(triton.cdiv(split_len, page) + 2), BT_CHUNK_MAX)
    bt_chunk = max(bt_chunk, triton.next_power_of_2(triton.cdiv(config.block_n, page) + 1))
    if split:
        o_part = torch.empty((batch, num_splits, rows, head_dim_v), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((batch, num_splits, rows), dtype=torch.float32, device=q.device)
    else:
        o_part = lse_part = lse  # unused by the kernel when SPLIT is False

    _mla_decode_split_kernel[(row_blocks, batch, num_splits)](
        q, k_cache, block_table, cache_seqlens, o_part, lse_part, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1),
        block_table.stride(0), block_table.stride(1),
        softmax_scale * _LOG2E,
        q_len, num_heads, num_blocks, max_blocks, num_splits, min_chunk,
        DV=head_dim_v,
        DR=head_dim - head_dim_v,
        PAGE=page,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BT_CHUNK=bt_chunk,
        CAUSAL=causal,
        SPLIT=split,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if split:
        block_s = triton.next_power_of_2(num_splits)
        block_dv = min(max(_COMBINE_TILE_ELEMS // block_s, _COMBINE_MIN_BLOCK_DV), head_dim_v)
        _mla_decode_combine_kernel[(rows, batch, head_dim_v // block_dv)](
            o_part, lse_part, out, lse,
            q_len, num_heads, num_splits,
            DV=head_dim_v,
            BLOCK_DV=block_dv,
            BLOCK_S=block_s,
            TILE_S=min(block_s, _COMBINE_TILE_ELEMS // block_dv),
            num_warps=_COMBINE_WARPS,
        )
