"""Triton kernel behind ``pykernels.apply_rotary`` and ``pykernels.rope_and_cache``: one launch for both.

The kernel rotates rows of d values by the cos/sin of each token's position (see pykernels/rope.py for the
math) and writes them to a destination that may be the source (in place), a fresh tensor, or the rope
columns of a paged-cache row chosen by a slot id; the k program of a token block also copies the latent
part of the cache rows.

cos/sin are computed, not read from the table: pair i of position p turns by the float32 angle
``float(p) * inv_freq[i]`` (the product ``YarnRotary.cos_sin_cache`` holds), reduced to [-pi, pi] in float64
(three-part 2 pi, every product exact but the last), then cos/sin in float32 times the mscale ratio: the
table's values to float32 rounding, without its T x d x 4 bytes of (random-row) reads or the dependent
round trip position -> table row.

Grid (1-D): ``cdiv(T, BLOCK_T) * (n_q + 1)`` programs, ``n_q = cdiv(H, BLOCK_H)``; program ``i`` works on
token block ``i // (n_q + 1)`` and, with ``j = i % (n_q + 1)``, on heads ``[j * BLOCK_H, (j + 1) * BLOCK_H)``
of q (``j < n_q``) or on k, the latent rows and the error flag (``j == n_q``). Consecutive programs walk a
token block's heads, then its k row: memory is traversed in order.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

ERR_POSITION = tl.constexpr(1)  # error-flag bits, the same as pykernels.rope's
ERR_SLOT = tl.constexpr(2)
# 2 pi in three float32-exact parts (6.28125 has 8 significant bits, the middle part 24): with a whole
# number of turns n < 2^15, n * TWO_PI_HI and n * TWO_PI_MID are exact in float64, and n * TWO_PI_LO is
# ~1e-17 off. The parts are float32 values, so a Triton version that types float literals as float32
# cannot round them.
TWO_PI_HI = tl.constexpr(6.28125)
TWO_PI_MID = tl.constexpr(0.0019353071693331003)
TWO_PI_LO = tl.constexpr(1.0253376273028358e-11)
INV_TWO_PI = tl.constexpr(0.15915494309189535)


@dataclass(frozen=True)
class TritonLaunch:
    """Launch shape of the kernel. ``evict_first`` marks every q/k/latent/cache access evict-first (the
    data is touched once)."""

    block_t: int  # tokens per program (a power of two)
    block_h: int  # q heads per program (a power of two)
    num_warps: int
    evict_first: bool = False

    def __post_init__(self) -> None:
        for name in ("block_t", "block_h", "num_warps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"{name}: expected a positive power of two, got {value!r}")


# Default launch shape: tiles of 16 heads x 16 tokens (q: 16 x 16 x 64 bf16 = 32 KiB in flight per
# program, 16 loads of 16 bytes per thread before any store); 4 warps x 4 threads cover the 16 tokens, so
# a thread computes the cos/sin of its pairs once for its 16 heads. Fewer tokens per program while the
# grid would have fewer than PROGRAMS_PER_SM programs per SM (decode: spread a few tokens over the SMs).
DEFAULT_BLOCK_T = 16
DEFAULT_BLOCK_H = 16
DEFAULT_NUM_WARPS = 4
PROGRAMS_PER_SM = 2


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def launch_for(T: int, H: int, device: torch.device) -> TritonLaunch:
    """The default launch shape for T tokens of H heads on ``device`` (bench/tune_rope.py sweeps others)."""
    block_h = min(DEFAULT_BLOCK_H, triton.next_power_of_2(H))
    programs_per_block = triton.cdiv(H, block_h) + 1
    block_t = min(DEFAULT_BLOCK_T, triton.next_power_of_2(T))
    while block_t > 1 and triton.cdiv(T, block_t) * programs_per_block < PROGRAMS_PER_SM * _num_sms(device):
        block_t //= 2
    return TritonLaunch(block_t=block_t, block_h=block_h, num_warps=DEFAULT_NUM_WARPS)


@triton.jit
def _cos_sin(positions, inv_freq, t, t_ok, max_position, cos_sin_scale,
             D: tl.constexpr,  # rotary_dim (even)
             HALF_BLOCK: tl.constexpr):  # next power of two >= D // 2
    """cos, sin ``[BLOCK_T, HALF_BLOCK]`` float32 of tokens ``t [BLOCK_T]`` (a bad position: cos 1, sin 0),
    ``pos_ok [BLOCK_T]`` and ``pos_bad [BLOCK_T]`` (a real token whose position is out of range)."""
    pos = tl.load(positions + t, mask=t_ok, other=0).to(tl.int64)
    in_range = (pos >= 0) & (pos < max_position)
    pos_ok = t_ok & in_range
    pos_bad = t_ok & (in_range == 0)
    i = tl.arange(0, HALF_BLOCK)
    freq = tl.load(inv_freq + i, mask=i < D // 2, other=0.0)
    angle = tl.where(pos_ok, pos, 0).to(tl.float32)[:, None] * freq[None, :]  # the table's float32 product
    a = angle.to(tl.float64)
    turns = tl.floor(a * INV_TWO_PI + 0.5)
    reduced = (((a - turns * TWO_PI_HI) - turns * TWO_PI_MID) - turns * TWO_PI_LO).to(tl.float32)
    cos = tl.where(pos_ok[:, None], tl.cos(reduced) * cos_sin_scale, 1.0)
    sin = tl.where(pos_ok[:, None], tl.sin(reduced) * cos_sin_scale, 0.0)
    return cos, sin, pos_ok, pos_bad


@triton.jit
def _load_pairs(src, rows, mask,
                D: tl.constexpr, HALF_BLOCK: tl.constexpr,  # as in _cos_sin
                INTERLEAVED: tl.constexpr,  # True: pairs (2i, 2i+1); False: pairs (i, i + D/2)
                EVICT: tl.constexpr):  # eviction policy of the accesses ("" or "evict_first")
    """The pairs (a, b) of the rows ``src + rows[h, t]`` (D values each), float32 ``[BH, BT, HALF_BLOCK]``."""
    if INTERLEAVED:
        cols = tl.arange(0, 2 * HALF_BLOCK)  # value 2i + parity
        x = tl.load(src + rows[:, :, None] + cols[None, None, :], mask=mask[:, :, None] & (cols < D)[None, None, :],
                    other=0.0, eviction_policy=EVICT)
        a, b = tl.split(tl.reshape(x.to(tl.float32), (x.shape[0], x.shape[1], HALF_BLOCK, 2)))
    else:
        i = tl.arange(0, HALF_BLOCK)  # pair i = (i, i + D/2)
        offs = rows[:, :, None] + i[None, None, :]
        m = mask[:, :, None] & (i < D // 2)[None, None, :]
        a = tl.load(src + offs, mask=m, other=0.0, eviction_policy=EVICT).to(tl.float32)
        b = tl.load(src + offs + D // 2, mask=m, other=0.0, eviction_policy=EVICT).to(tl.float32)
    return a, b


@triton.jit
def _rotate_store(a, b, cos, sin, dst, rows, mask,
                  D: tl.constexpr, HALF_BLOCK: tl.constexpr, INTERLEAVED: tl.constexpr,  # as in _load_pairs
                  EVICT: tl.constexpr):
    """Rotate pairs (a, b) ``[BH, BT, HALF_BLOCK]`` by cos, sin ``[BT, HALF_BLOCK]`` and store them at
    ``dst + rows[h, t]`` in the same layout."""
    c = cos[None, :, :]
    s = sin[None, :, :]
    out_a = a * c - b * s
    out_b = b * c + a * s
    if INTERLEAVED:
        cols = tl.arange(0, 2 * HALF_BLOCK)
        out = tl.reshape(tl.join(out_a, out_b), (a.shape[0], a.shape[1], 2 * HALF_BLOCK))
        tl.store(dst + rows[:, :, None] + cols[None, None, :], out.to(dst.dtype.element_ty),
                 mask=mask[:, :, None] & (cols < D)[None, None, :], eviction_policy=EVICT)
    else:
        i = tl.arange(0, HALF_BLOCK)
        offs = rows[:, :, None] + i[None, None, :]
        m = mask[:, :, None] & (i < D // 2)[None, None, :]
        tl.store(dst + offs, out_a.to(dst.dtype.element_ty), mask=m, eviction_policy=EVICT)
        tl.store(dst + offs + D // 2, out_b.to(dst.dtype.element_ty), mask=m, eviction_policy=EVICT)


@triton.jit
def _rope_rows_kernel(
    q_src, q_dst, k_src, k_dst, latent, positions, inv_freq, slots, flag,
    q_src_stride_t, q_src_stride_h, q_dst_stride_t, q_dst_stride_h,  # element strides of q rows
    k_src_stride_t, k_dst_stride_t, latent_stride_t,  # element strides of k rows, k_dst rows, latent rows
    T, H, max_position, k_dst_rows,  # tokens, heads, positions' bound, rows of k_dst (slot bound)
    cos_sin_scale,  # YarnRotary's mscale ratio
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
    EVICT: tl.constexpr,  # eviction policy of the q/k/latent/cache accesses
):
    # NOTES: every program loads its q/k/latent values before the positions, which they do not depend on,
    # so the loads overlap: a program waits for one memory round trip, then computes cos/sin, then stores.
    # Tiles are [heads, tokens, D]: Triton spreads threads and warps over the middle (token) dimension and
    # repeats the head dimension in registers, so a thread computes the cos/sin of its pairs once per token
    # and uses them for all its heads (a [tokens, heads, D] tile made each thread compute them for every
    # token of the block: 16x the sincos work, more than the memory time at h16).
    # Masks are built from tensors (`t_ok[None, :] & ...`), never from a scalar boolean: Triton's CPU
    # interpreter mishandles a scalar broadcast into a mask.
    n_q = tl.cdiv(H, BLOCK_H)
    pid = tl.program_id(0)
    t = (pid // (n_q + 1)).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    j = pid % (n_q + 1)
    t_ok = t < T
    if j < n_q:
        h = j * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
        ok = (h < H)[:, None] & t_ok[None, :]  # [BLOCK_H, BLOCK_T]
        src_rows = h[:, None] * q_src_stride_h + t[None, :] * q_src_stride_t
        a, b = _load_pairs(q_src, src_rows, ok, D, HALF_BLOCK, INTERLEAVED, EVICT)
        cos, sin, pos_ok, _ = _cos_sin(positions, inv_freq, t, t_ok, max_position, cos_sin_scale, D, HALF_BLOCK)
        if COPY_BAD_ROWS:
            store = ok
        else:
            store = ok & pos_ok[None, :]
        _rotate_store(a, b, cos, sin, q_dst, h[:, None] * q_dst_stride_h + t[None, :] * q_dst_stride_t, store,
                      D, HALF_BLOCK, INTERLEAVED, EVICT)
    else:
        one = tl.arange(0, 1)  # k is a one-head tile [1, BLOCK_T, D]
        k_ok = (one == 0)[:, None] & t_ok[None, :]  # [1, BLOCK_T]
        ka, kb = _load_pairs(k_src, one[:, None] + t[None, :] * k_src_stride_t, k_ok, D, HALF_BLOCK, INTERLEAVED,
                             EVICT)
        if HAS_LATENT:
            c = tl.arange(0, BLOCK_L)
            src_latent = latent + t[:, None] * latent_stride_t + c[None, :]  # [BLOCK_T, BLOCK_L]
            v = tl.load(src_latent, mask=t_ok[:, None] & (c < L)[None, :], eviction_policy=EVICT)
        cos, sin, pos_ok, pos_bad = _cos_sin(positions, inv_freq, t, t_ok, max_position, cos_sin_scale, D,
                                             HALF_BLOCK)
        err = tl.max(pos_bad.to(tl.int32), axis=0) * ERR_POSITION
        if USE_SLOTS:
            slot = tl.load(slots + t, mask=t_ok, other=-1).to(tl.int64)
            slot_bad = t_ok & ((slot < -1) | (slot >= k_dst_rows))
            err = err | (tl.max(slot_bad.to(tl.int32), axis=0) * ERR_SLOT)
            write = pos_ok & (slot >= 0) & (slot < k_dst_rows)  # [BLOCK_T]
            dst_row = tl.where(write, slot, 0)
        else:
            dst_row = t
            if COPY_BAD_ROWS:
                write = t_ok
            else:
                write = pos_ok
        dst_rows = one[:, None] + dst_row[None, :] * k_dst_stride_t  # [1, BLOCK_T]
        _rotate_store(ka, kb, cos, sin, k_dst + L, dst_rows, (one == 0)[:, None] & write[None, :], D, HALF_BLOCK,
                      INTERLEAVED, EVICT)
        if HAS_LATENT:
            tl.static_assert(USE_SLOTS, "the latent row goes to a cache slot")
            dst_latent = k_dst + dst_row[:, None] * k_dst_stride_t + c[None, :]
            tl.store(dst_latent, v, mask=write[:, None] & (c < L)[None, :], eviction_policy=EVICT)
            for start in tl.static_range(BLOCK_L, L, BLOCK_L):  # latent rows wider than BLOCK_L
                v = tl.load(src_latent + start, mask=t_ok[:, None] & (start + c < L)[None, :],
                            eviction_policy=EVICT)
                tl.store(dst_latent + start, v, mask=write[:, None] & (start + c < L)[None, :], eviction_policy=EVICT)
        if err != 0:
            tl.atomic_or(flag, err)


# Latent values per copy iteration of the k program (512 = DeepSeek's kv_lora_rank: one pass).
BLOCK_L_MAX = 512


def rope_rows(q_src: torch.Tensor, q_dst: torch.Tensor, k_src: torch.Tensor, k_dst: torch.Tensor,
              latent: torch.Tensor | None, positions: torch.Tensor, inv_freq: torch.Tensor, cos_sin_scale: float,
              max_position: int, slots: torch.Tensor | None, flag: torch.Tensor, *, interleaved: bool,
              copy_bad_rows: bool, launch: TritonLaunch | None = None) -> None:
    """Launch the kernel on validated tensors (pykernels/rope.py checks them).

    q_src, q_dst ``[T, H, d]`` (may be the same view), k_src ``[T, d]``, k_dst ``[rows, L + d]`` (the rope
    values go to columns ``[L, L + d)`` of row ``slots[t]``, or of row t when ``slots`` is None), latent
    ``[T, L]`` or None, positions ``[T]``, inv_freq float32 ``[d/2]``, flag int32 ``[1]``. ``launch``: the
    launch shape (default ``launch_for``).
    """
    T, H, d = q_src.shape
    if T == 0:
        return
    if launch is None:
        launch = launch_for(T, H, q_src.device)
    L = 0 if latent is None else latent.shape[1]
    block_h = min(launch.block_h, triton.next_power_of_2(H))
    grid = (triton.cdiv(T, launch.block_t) * (triton.cdiv(H, block_h) + 1),)
    _rope_rows_kernel[grid](
        q_src, q_dst, k_src, k_dst, latent if latent is not None else k_src, positions, inv_freq,
        slots if slots is not None else positions, flag,
        q_src.stride(0), q_src.stride(1), q_dst.stride(0), q_dst.stride(1),
        k_src.stride(0), k_dst.stride(0), latent.stride(0) if latent is not None else 0,
        T, H, max_position, k_dst.shape[0], float(cos_sin_scale),
        L=L, D=d, HALF_BLOCK=triton.next_power_of_2(d // 2), BLOCK_T=launch.block_t, BLOCK_H=block_h,
        BLOCK_L=min(BLOCK_L_MAX, triton.next_power_of_2(max(L, 1))),
        INTERLEAVED=interleaved, USE_SLOTS=slots is not None, HAS_LATENT=latent is not None,
        COPY_BAD_ROWS=copy_bad_rows, EVICT="evict_first" if launch.evict_first else "",
        num_warps=launch.num_warps,
    )
