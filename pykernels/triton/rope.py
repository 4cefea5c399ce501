"""Triton kernel behind ``pykernels.apply_rotary`` and ``pykernels.rope_and_cache``: one launch for both.

The kernel rotates rows of d values by the cos/sin table row of each token's position (see
pykernels/rope.py for the math) and writes them to a destination that may be the source (in place), a
fresh tensor, or the rope columns of a paged-cache row chosen by a slot id; the k program of each token
also copies the latent part of the cache row.

Grid ``(cdiv(T, BLOCK_T), cdiv(H, BLOCK_H) + 1)``: program ``(i, j)`` covers the tokens
``[i * BLOCK_T, (i + 1) * BLOCK_T)``; with ``j < cdiv(H, BLOCK_H)`` it rotates heads
``[j * BLOCK_H, (j + 1) * BLOCK_H)`` of their q rows, and the last program of the block rotates their k rows,
copies their latent rows and raises the error flag for a bad position or slot id. BLOCK_T (tokens per
program) is 1 for decode and larger for prefill (``tokens_per_program``).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Heads per q program: 16 heads x 64 values = 2 KiB of bf16 per program, enough bytes in flight per
# program for both decode (few tokens, h16: one q program per token) and prefill (many programs).
BLOCK_H_MAX = 16
# 4 warps = 128 threads over a [16, 64] tile: 8 values (16 bytes of bf16) per thread.
NUM_WARPS = 4
# Latent values copied per loop iteration of the k program (512 = DeepSeek's kv_lora_rank: one pass).
BLOCK_L_MAX = 512
# Up to this many tokens a launch is decode-sized: one token per program (tokens_per_program).
DECODE_MAX_TOKENS = 256
# Tokens per program above DECODE_MAX_TOKENS (see tokens_per_program): 2 from `python -m bench.tune_rope` on
# the H200 at T = 16384 (% of copy, 1/2/4/8 tokens): rope_and_cache h16 65.9/71.9/69.4/66.3, h128
# 68.3/69.2/62.9/64.3; apply_rotary h16 55.8/67.4/69.9/58.5, h128 80.0/85.9/84.6/75.8.
PREFILL_TOKENS_PER_PROGRAM = 2

ERR_POSITION = tl.constexpr(1)  # error-flag bits, the same as pykernels.rope's
ERR_SLOT = tl.constexpr(2)


@triton.jit
def _load_pairs(src, rows, mask,
                D: tl.constexpr,  # rotary_dim (even)
                HALF_BLOCK: tl.constexpr,  # next power of two >= D // 2
                INTERLEAVED: tl.constexpr):  # True: pairs (2i, 2i+1); False: pairs (i, i + D/2)
    """The pairs (a, b) of the rows ``src + rows[r]`` (d values each), float32 ``[R, HALF_BLOCK]`` each."""
    if INTERLEAVED:
        cols = tl.arange(0, 2 * HALF_BLOCK)  # [2 * HALF_BLOCK]: value 2i + parity
        x = tl.load(src + rows[:, None] + cols[None, :], mask=mask[:, None] & (cols[None, :] < D), other=0.0)
        a, b = tl.split(tl.reshape(x.to(tl.float32), (x.shape[0], HALF_BLOCK, 2)))
    else:
        i = tl.arange(0, HALF_BLOCK)  # [HALF_BLOCK]: pair i = (i, i + D/2)
        offs = rows[:, None] + i[None, :]
        m = mask[:, None] & (i[None, :] < D // 2)
        a = tl.load(src + offs, mask=m, other=0.0).to(tl.float32)
        b = tl.load(src + offs + D // 2, mask=m, other=0.0).to(tl.float32)
    return a, b


@triton.jit
def _load_cos_sin(cos_sin, pos, pos_ok, D: tl.constexpr, HALF_BLOCK: tl.constexpr):
    """cos, sin ``[R, HALF_BLOCK]`` of the table rows ``pos [R]``; the identity (1, 0) where ``pos_ok`` is False
    (those rows read nothing)."""
    i = tl.arange(0, HALF_BLOCK)
    offs = tl.where(pos_ok, pos, 0)[:, None] * D + i[None, :]
    m = pos_ok[:, None] & (i[None, :] < D // 2)
    cos = tl.load(cos_sin + offs, mask=m, other=1.0)
    sin = tl.load(cos_sin + offs + D // 2, mask=m, other=0.0)
    return cos, sin


@triton.jit
def _rotate_store(a, b, cos, sin, dst, rows, mask,
                  D: tl.constexpr, HALF_BLOCK: tl.constexpr, INTERLEAVED: tl.constexpr):  # as in _load_pairs
    """Rotate pairs (a, b) by cos, sin (all ``[R, HALF_BLOCK]``) and store them at ``dst + rows[r]`` in the same
    layout."""
    out_a = a * cos - b * sin
    out_b = b * cos + a * sin
    if INTERLEAVED:
        cols = tl.arange(0, 2 * HALF_BLOCK)
        out = tl.reshape(tl.join(out_a, out_b), (a.shape[0], 2 * HALF_BLOCK))
        tl.store(dst + rows[:, None] + cols[None, :], out.to(dst.dtype.element_ty),
                 mask=mask[:, None] & (cols[None, :] < D))
    else:
        i = tl.arange(0, HALF_BLOCK)
        offs = rows[:, None] + i[None, :]
        m = mask[:, None] & (i[None, :] < D // 2)
        tl.store(dst + offs, out_a.to(dst.dtype.element_ty), mask=m)
        tl.store(dst + offs + D // 2, out_b.to(dst.dtype.element_ty), mask=m)


@triton.jit
def _rope_rows_kernel(
    q_src, q_dst, k_src, k_dst, latent, positions, cos_sin, slots, flag,
    q_src_stride_t, q_src_stride_h, q_dst_stride_t, q_dst_stride_h,  # element strides of q rows
    k_src_stride_t, k_dst_stride_t, latent_stride_t,  # element strides of k rows, k_dst rows, latent rows
    T, H, max_position, k_dst_rows,  # tokens, heads, table rows, rows of k_dst (slot bound)
    L: tl.constexpr,  # latent width (0 for apply_rotary): a constant, so the latent copy is vectorised
    D: tl.constexpr,  # rotary_dim
    HALF_BLOCK: tl.constexpr,  # next power of two >= D // 2
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK_H: tl.constexpr,  # heads per q program
    BLOCK_L: tl.constexpr,  # latent values per copy iteration
    INTERLEAVED: tl.constexpr,  # pair layout, see _load_pairs
    USE_SLOTS: tl.constexpr,  # k goes to k_dst row slots[t] (rope_and_cache) instead of row t (apply_rotary)
    HAS_LATENT: tl.constexpr,  # copy latent[t, :L] to the start of k's destination row
    COPY_BAD_ROWS: tl.constexpr,  # a bad position still writes its rows, unrotated (apply_rotary's outputs)
):
    # NOTES: every load that needs no index value (q/k/latent values) comes first, then positions and
    # slots, then the cos/sin rows they select, then the stores: with BLOCK_T tokens a program has BLOCK_T
    # times the bytes in flight, and a decode step waits for two memory round trips, not three. A bad
    # position reads no table row and rotates by nothing (cos 1, sin 0). Rows past T (the last token block)
    # are masked out everywhere.
    t0 = tl.program_id(0).to(tl.int64) * BLOCK_T
    j = tl.program_id(1)
    if j < tl.cdiv(H, BLOCK_H):
        _rotate_q_block(q_src, q_dst, positions, cos_sin, q_src_stride_t, q_src_stride_h, q_dst_stride_t,
                        q_dst_stride_h, t0, j * BLOCK_H, T, H, max_position, D, HALF_BLOCK, BLOCK_T, BLOCK_H,
                        INTERLEAVED, COPY_BAD_ROWS)
    else:
        _rotate_k_block(k_src, k_dst, latent, positions, cos_sin, slots, flag, k_src_stride_t, k_dst_stride_t,
                        latent_stride_t, t0, T, max_position, k_dst_rows, L, D, HALF_BLOCK, BLOCK_T, BLOCK_L,
                        INTERLEAVED, USE_SLOTS, HAS_LATENT, COPY_BAD_ROWS)


@triton.jit
def _rotate_q_block(q_src, q_dst, positions, cos_sin, q_src_stride_t, q_src_stride_h, q_dst_stride_t,
                    q_dst_stride_h, t0, h0, T, H, max_position,
                    D: tl.constexpr, HALF_BLOCK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                    INTERLEAVED: tl.constexpr, COPY_BAD_ROWS: tl.constexpr):  # as in _rope_rows_kernel
    """q heads ``[h0, h0 + BLOCK_H)`` of tokens ``[t0, t0 + BLOCK_T)``, as ``BLOCK_T * BLOCK_H`` rows."""
    r = tl.arange(0, BLOCK_T * BLOCK_H)  # [R] row r: token t0 + r // BLOCK_H, head h0 + r % BLOCK_H
    t = t0 + r // BLOCK_H
    h = h0 + r % BLOCK_H
    ok = (t < T) & (h < H)
    a, b = _load_pairs(q_src, t * q_src_stride_t + h * q_src_stride_h, ok, D, HALF_BLOCK, INTERLEAVED)
    pos = tl.load(positions + t, mask=ok, other=0).to(tl.int64)
    pos_ok = (pos >= 0) & (pos < max_position)
    cos, sin = _load_cos_sin(cos_sin, pos, pos_ok, D, HALF_BLOCK)
    if COPY_BAD_ROWS:
        store = ok
    else:
        store = ok & pos_ok  # rope_and_cache leaves a bad row as it is
    _rotate_store(a, b, cos, sin, q_dst, t * q_dst_stride_t + h * q_dst_stride_h, store, D, HALF_BLOCK,
                  INTERLEAVED)


@triton.jit
def _rotate_k_block(k_src, k_dst, latent, positions, cos_sin, slots, flag, k_src_stride_t, k_dst_stride_t,
                    latent_stride_t, t0, T, max_position, k_dst_rows,
                    L: tl.constexpr, D: tl.constexpr, HALF_BLOCK: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_L: tl.constexpr, INTERLEAVED: tl.constexpr, USE_SLOTS: tl.constexpr,
                    HAS_LATENT: tl.constexpr, COPY_BAD_ROWS: tl.constexpr):  # as in _rope_rows_kernel
    """k rows (and latent rows) of tokens ``[t0, t0 + BLOCK_T)``, and their error bits."""
    t = t0 + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    t_ok = t < T
    ka, kb = _load_pairs(k_src, t * k_src_stride_t, t_ok, D, HALF_BLOCK, INTERLEAVED)
    if HAS_LATENT:
        c = tl.arange(0, BLOCK_L)
        latent_rows = t[:, None] * latent_stride_t + c[None, :]  # [BLOCK_T, BLOCK_L]
        v = tl.load(latent + latent_rows, mask=t_ok[:, None] & (c[None, :] < L))  # the first BLOCK_L values
    pos = tl.load(positions + t, mask=t_ok, other=0).to(tl.int64)
    if USE_SLOTS:
        slot = tl.load(slots + t, mask=t_ok, other=-1).to(tl.int64)
    pos_ok = (pos >= 0) & (pos < max_position)
    cos, sin = _load_cos_sin(cos_sin, pos, pos_ok, D, HALF_BLOCK)
    err = tl.max(tl.where(t_ok & ~pos_ok, ERR_POSITION, 0), axis=0)
    if USE_SLOTS:
        err = err | tl.max(tl.where(t_ok & ((slot < -1) | (slot >= k_dst_rows)), ERR_SLOT, 0), axis=0)
        write = t_ok & pos_ok & (slot >= 0) & (slot < k_dst_rows)
        dst_base = tl.where(write, slot, 0) * k_dst_stride_t
    else:
        dst_base = t * k_dst_stride_t
        if COPY_BAD_ROWS:
            write = t_ok
        else:
            write = t_ok & pos_ok
    _rotate_store(ka, kb, cos, sin, k_dst, dst_base + L, write, D, HALF_BLOCK, INTERLEAVED)
    if HAS_LATENT:
        tl.static_assert(USE_SLOTS, "the latent row goes to a cache slot")
        dst_rows = dst_base[:, None] + c[None, :]
        tl.store(k_dst + dst_rows, v, mask=write[:, None] & (c[None, :] < L))
        for start in tl.static_range(BLOCK_L, L, BLOCK_L):  # latent rows wider than BLOCK_L
            m = write[:, None] & ((start + c[None, :]) < L)
            v = tl.load(latent + latent_rows + start, mask=m)
            tl.store(k_dst + dst_rows + start, v, mask=m)
    if err != 0:
        tl.atomic_or(flag, err)


def tokens_per_program(T: int) -> int:
    """Tokens per program for T tokens (the table below), or ``PYKERNELS_ROPE_TOKENS_PER_PROGRAM`` for T > 256.

    T <= 256 (decode): 1. Decode time is launch latency; one token per program is the shortest program.
    Larger (prefill): 4. Each program then has 4 x its one-token bytes in flight (an h16 q program: 8 KiB, 64
    bytes a thread, against 16); the table's cos/sin rows add 16 floats a thread. bench/tune_rope.py times
    1, 2, 4 and 8 at the prefill shapes; the environment variable is its knob, read only for T > 256.
    """
    if T <= DECODE_MAX_TOKENS:
        return 1
    override = os.environ.get("PYKERNELS_ROPE_TOKENS_PER_PROGRAM", "")
    if override:
        if override not in ("1", "2", "4", "8"):
            raise ValueError(f"PYKERNELS_ROPE_TOKENS_PER_PROGRAM: expected 1, 2, 4 or 8, got {override!r}")
        return int(override)
    return PREFILL_TOKENS_PER_PROGRAM


def rope_rows(q_src: torch.Tensor, q_dst: torch.Tensor, k_src: torch.Tensor, k_dst: torch.Tensor,
              latent: torch.Tensor | None, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
              slots: torch.Tensor | None, flag: torch.Tensor, *, interleaved: bool, copy_bad_rows: bool) -> None:
    """Launch the kernel on validated tensors (pykernels/rope.py checks them).

    q_src, q_dst ``[T, H, d]`` (may be the same view), k_src ``[T, d]``, k_dst ``[rows, L + d]`` (the rope
    values go to columns ``[L, L + d)`` of row ``slots[t]``, or of row t when ``slots`` is None), latent
    ``[T, L]`` or None, positions ``[T]``, cos_sin_cache float32 ``[P, d]``, flag int32 ``[1]``.
    """
    T, H, d = q_src.shape
    if T == 0:
        return
    L = 0 if latent is None else latent.shape[1]
    block_t = tokens_per_program(T)
    block_h = min(BLOCK_H_MAX, triton.next_power_of_2(max(H, 1)))
    grid = (triton.cdiv(T, block_t), triton.cdiv(H, block_h) + 1)
    _rope_rows_kernel[grid](
        q_src, q_dst, k_src, k_dst, latent if latent is not None else k_src, positions, cos_sin_cache,
        slots if slots is not None else positions, flag,
        q_src.stride(0), q_src.stride(1), q_dst.stride(0), q_dst.stride(1),
        k_src.stride(0), k_dst.stride(0), latent.stride(0) if latent is not None else 0,
        T, H, cos_sin_cache.shape[0], k_dst.shape[0],
        L=L, D=d, HALF_BLOCK=triton.next_power_of_2(d // 2), BLOCK_T=block_t, BLOCK_H=block_h,
        BLOCK_L=min(BLOCK_L_MAX, triton.next_power_of_2(max(L, 1))),
        INTERLEAVED=interleaved, USE_SLOTS=slots is not None, HAS_LATENT=latent is not None,
        COPY_BAD_ROWS=copy_bad_rows, num_warps=NUM_WARPS,
    )
