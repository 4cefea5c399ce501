"""Triton kernel behind ``pykernels.apply_rotary`` and ``pykernels.rope_and_cache``: one launch for both.

The kernel rotates rows of d values by the cos/sin table row of each token's position (see
pykernels/rope.py for the math) and writes them to a destination that may be the source (in place), a
fresh tensor, or the rope columns of a paged-cache row chosen by a slot id; the k program of each token
also copies the latent part of the cache row.

Grid ``(T, cdiv(H, BLOCK_H) + 1)``: program ``(t, j)`` with ``j < cdiv(H, BLOCK_H)`` rotates heads
``[j * BLOCK_H, (j + 1) * BLOCK_H)`` of q's row t; the last program of the row rotates k, copies the latent
row and raises the error flag for a bad position or slot id.
"""
from __future__ import annotations

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
def _rotate_store(a, b, cos, sin, dst, rows, mask,
                  D: tl.constexpr, HALF_BLOCK: tl.constexpr, INTERLEAVED: tl.constexpr):  # as in _load_pairs
    """Rotate pairs (a, b) by cos, sin ``[HALF_BLOCK]`` and store them at ``dst + rows[r]`` in the same layout."""
    out_a = a * cos[None, :] - b * sin[None, :]
    out_b = b * cos[None, :] + a * sin[None, :]
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
    H, max_position, k_dst_rows,  # heads, table rows, rows of k_dst (slot bound)
    L: tl.constexpr,  # latent width (0 for apply_rotary): a constant, so the latent copy is vectorised
    D: tl.constexpr,  # rotary_dim
    HALF_BLOCK: tl.constexpr,  # next power of two >= D // 2
    BLOCK_H: tl.constexpr,  # heads per q program
    BLOCK_L: tl.constexpr,  # latent values per copy iteration
    INTERLEAVED: tl.constexpr,  # pair layout, see _load_pairs
    USE_SLOTS: tl.constexpr,  # k goes to k_dst row slots[t] (rope_and_cache) instead of row t (apply_rotary)
    HAS_LATENT: tl.constexpr,  # copy latent[t, :L] to the start of k's destination row
    COPY_BAD_ROWS: tl.constexpr,  # a bad position still writes its rows, unrotated (apply_rotary's outputs)
):
    # NOTES: the q/k values are loaded before the position, which they do not depend on, so the two
    # loads overlap (decode: two memory round trips, not three). A bad position reads table row 0 and
    # rotates by nothing (cos 1, sin 0). Masks are built as `index < where(ok, limit, 0)` rather than
    # `mask & ok` with a scalar ok: same result, and Triton's CPU interpreter mishandles a scalar boolean
    # broadcast into a mask.
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    n_q_programs = tl.cdiv(H, BLOCK_H)
    i = tl.arange(0, HALF_BLOCK)
    if j < n_q_programs:
        h = j * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
        h_ok = h < H
        a, b = _load_pairs(q_src, t * q_src_stride_t + h * q_src_stride_h, h_ok, D, HALF_BLOCK, INTERLEAVED)
        pos = tl.load(positions + t).to(tl.int64)
        pos_ok = (pos >= 0) & (pos < max_position)
        row = tl.where(pos_ok, pos, 0) * D
        cos = tl.where(pos_ok, tl.load(cos_sin + row + i, mask=i < D // 2, other=1.0), 1.0)
        sin = tl.where(pos_ok, tl.load(cos_sin + row + D // 2 + i, mask=i < D // 2, other=0.0), 0.0)
        if COPY_BAD_ROWS:
            store = h_ok
        else:
            store = h < tl.where(pos_ok, H, 0)
        _rotate_store(a, b, cos, sin, q_dst, t * q_dst_stride_t + h * q_dst_stride_h, store, D, HALF_BLOCK,
                      INTERLEAVED)
    else:
        one = tl.arange(0, 1)  # a one-row tile for k
        ka, kb = _load_pairs(k_src, one * 0 + t * k_src_stride_t, one == 0, D, HALF_BLOCK, INTERLEAVED)
        if HAS_LATENT:
            c = tl.arange(0, BLOCK_L)
            v = tl.load(latent + t * latent_stride_t + c, mask=c < L)  # the first BLOCK_L latent values
        pos = tl.load(positions + t).to(tl.int64)
        pos_ok = (pos >= 0) & (pos < max_position)
        row = tl.where(pos_ok, pos, 0) * D
        cos = tl.where(pos_ok, tl.load(cos_sin + row + i, mask=i < D // 2, other=1.0), 1.0)
        sin = tl.where(pos_ok, tl.load(cos_sin + row + D // 2 + i, mask=i < D // 2, other=0.0), 0.0)
        err = tl.where(pos_ok, 0, ERR_POSITION)
        if USE_SLOTS:
            slot = tl.load(slots + t).to(tl.int64)
            err = err | tl.where((slot < -1) | (slot >= k_dst_rows), ERR_SLOT, 0)
            write = pos_ok & (slot >= 0) & (slot < k_dst_rows)
            dst_base = tl.where(write, slot, 0) * k_dst_stride_t
            k_store = one < tl.where(write, 1, 0)
        else:
            dst_base = t * k_dst_stride_t
            if COPY_BAD_ROWS:
                k_store = one == 0
            else:
                k_store = one < tl.where(pos_ok, 1, 0)
        _rotate_store(ka, kb, cos, sin, k_dst, one * 0 + dst_base + L, k_store, D, HALF_BLOCK, INTERLEAVED)
        if HAS_LATENT:
            tl.static_assert(USE_SLOTS, "the latent row goes to a cache slot")
            write_all = tl.zeros_like(c) < tl.where(write, 1, 0)  # [BLOCK_L] = write
            tl.store(k_dst + dst_base + c, v, mask=(c < L) & write_all)
            for start in tl.static_range(BLOCK_L, L, BLOCK_L):  # latent rows wider than BLOCK_L
                v = tl.load(latent + t * latent_stride_t + start + c, mask=(start + c) < L)
                tl.store(k_dst + dst_base + start + c, v, mask=((start + c) < L) & write_all)
        if err != 0:
            tl.atomic_or(flag, err)


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
    block_h = min(BLOCK_H_MAX, triton.next_power_of_2(max(H, 1)))
    grid = (T, triton.cdiv(H, block_h) + 1)
    _rope_rows_kernel[grid](
        q_src, q_dst, k_src, k_dst, latent if latent is not None else k_src, positions, cos_sin_cache,
        slots if slots is not None else positions, flag,
        q_src.stride(0), q_src.stride(1), q_dst.stride(0), q_dst.stride(1),
        k_src.stride(0), k_dst.stride(0), latent.stride(0) if latent is not None else 0,
        H, cos_sin_cache.shape[0], k_dst.shape[0],
        L=L, D=d, HALF_BLOCK=triton.next_power_of_2(d // 2), BLOCK_H=block_h,
        BLOCK_L=min(BLOCK_L_MAX, triton.next_power_of_2(max(L, 1))),
        INTERLEAVED=interleaved, USE_SLOTS=slots is not None, HAS_LATENT=latent is not None,
        COPY_BAD_ROWS=copy_bad_rows, num_warps=NUM_WARPS,
    )
