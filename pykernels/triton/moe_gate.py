"""Triton kernels of ``pykernels.moe_gate``: router logits ``float32(x) @ weight.T`` in one launch.

Two kernels, both with float32 products and sums in an order fixed by the launch shape (no atomics, no
split-K across programs), and both reading x in its own dtype and converting it in registers:

``_gate_rows_kernel`` (decode, T < ``DOT_MIN_TOKENS``): a grid of (E blocks x T blocks); a program owns
``BLOCK_T`` tokens x ``BLOCK_E`` experts and walks H in ``BLOCK_K`` chunks. Each chunk is viewed as
``[KT, V]``: thread j of the program owns the V consecutive columns ``V*j .. V*j + V-1`` (at most one
16-byte load of a weight row), holds all BLOCK_T x BLOCK_E (token, expert) pairs for them, and sums its V products
per pair in registers (``acc [BT, BE, KT]``). Only at the end is ``acc`` summed over the KT threads.
So a chunk costs BT*BE*V FMAs per thread against (BT + BE)*V loaded values, and no cross-thread work;
the chunk loop is unrolled (H is a compile-time constant) so the loads of later chunks can be issued before
the products of earlier ones. The weight is the bulk of the bytes (0.5 MB Lite, 3.3 MB 236B); the grid is
sized to spread it over at least ``TARGET_PROGRAMS`` programs where E and T allow (T = 1, E = 64: one
expert row per program, 64 programs).

``_gate_dot_kernel`` (prefill, forced ``backend="triton"`` only by default: see
``pykernels.moe_gate.TRITON_DEFAULT_MAX_TOKENS``): classic tiles with ``tl.dot(..., input_precision="ieee")``
(float32 FMAs, no TF32), the K loop pipelined through shared memory.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Programs that cover the GPU's SMs (132 on H200) about once: the rows kernel widens BLOCK_E only while it keeps
# this many.
TARGET_PROGRAMS = 128
# From this many tokens on, the dot kernel (register-tiled tiles, a pipelined K loop); below it the rows kernel,
# sized for decode. backend=None leaves Triton past pykernels.moe_gate.TRITON_DEFAULT_MAX_TOKENS (8), so both
# run past that only when backend="triton" is forced: at T = 8192 the dot kernel measured 0.55x (Lite) and
# 0.24x (236B) the reference on the H200, and the rows kernel at T = 64 on 236B 0.09x. Where the two kernels
# cross is not measured.
DOT_MIN_TOKENS = 257
# Rows kernel: tokens per program at most (x rows are re-read from L2 by every E block; with BLOCK_E <= 8, acc is <= 64 registers).
MAX_BLOCK_T = 8
# Rows kernel: experts per program at most.
MAX_BLOCK_E = 8
# Rows kernel: (token, expert) products a thread does per chunk, BT * BE * V, about this many.
PRODUCTS_PER_THREAD = 128
# Rows kernel: at most 4 columns a thread per chunk, one 16-byte float32 load of a weight row. NOTES: wider, the
# weight load splits into two 16-byte vectors while a 16-bit x row stays one, the two get different layouts and
# the compiler converts x through shared memory every chunk (seen in the sm_90 TTGIR).
MAX_VEC = 4
_NUM_WARPS = 4
_THREADS = 32 * _NUM_WARPS


class GateConfig(NamedTuple):
    dot: bool  # which kernel: _gate_dot_kernel (True) or _gate_rows_kernel
    block_t: int  # tokens per program
    block_e: int  # experts per program
    block_k: int  # columns of H per chunk (rows kernel: KT * V)
    vec: int  # rows kernel: consecutive columns per thread (V); dot kernel: unused (1)
    num_warps: int
    num_stages: int


@triton.jit
def _gate_rows_kernel(
    x_ptr,  # [T, H] bf16 / fp16 / fp32, stride 1 along H
    w_ptr,  # [E, H] float32, stride 1 along H
    out_ptr,  # [T, E] float32 out, contiguous
    num_tokens,
    num_experts,
    stride_x,  # elements between rows of x
    stride_w,  # elements between rows of weight
    H: tl.constexpr,  # hidden size (compile-time: the chunk loop unrolls, and only a ragged last chunk is masked)
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK_E: tl.constexpr,  # experts per program
    KT: tl.constexpr,  # threads along H per chunk (= 32 * num_warps)
    V: tl.constexpr,  # consecutive columns per thread per chunk
):
    BLOCK_K: tl.constexpr = KT * V
    e0 = tl.program_id(0) * BLOCK_E
    t0 = tl.program_id(1) * BLOCK_T
    t = t0 + tl.arange(0, BLOCK_T)[:, None, None, None]  # [BT, 1, 1, 1]
    e = e0 + tl.arange(0, BLOCK_E)[None, :, None, None]  # [1, BE, 1, 1]
    col = tl.arange(0, KT)[None, None, :, None] * V + tl.arange(0, V)[None, None, None, :]  # [1, 1, KT, V]
    t_ok = t < num_tokens
    e_ok = e < num_experts
    x_rows = x_ptr + t.to(tl.int64) * stride_x  # [BT, 1, 1, 1]
    w_rows = w_ptr + e.to(tl.int64) * stride_w  # [1, BE, 1, 1]

    acc = tl.zeros((BLOCK_T, BLOCK_E, KT), dtype=tl.float32)
    for i in tl.static_range((H + BLOCK_K - 1) // BLOCK_K):
        k = i * BLOCK_K + col  # [1, 1, KT, V]
        if (i + 1) * BLOCK_K <= H:  # full chunk: only the row masks
            xv = tl.load(x_rows + k, mask=t_ok, other=0.0)
            wv = tl.load(w_rows + k, mask=e_ok, other=0.0)
        else:  # the ragged last chunk
            k_ok = k < H
            xv = tl.load(x_rows + k, mask=t_ok & k_ok, other=0.0)
            wv = tl.load(w_rows + k, mask=e_ok & k_ok, other=0.0)
        # [BT, 1, KT, V] * [1, BE, KT, V]: the V products of a pair summed in the thread that owns them.
        acc += tl.sum(xv.to(tl.float32) * wv, axis=3)  # [BT, BE, KT]
    logits = tl.sum(acc, axis=2)  # [BT, BE]: the one cross-thread reduction

    tt = t0 + tl.arange(0, BLOCK_T)[:, None]  # [BT, 1]
    ee = e0 + tl.arange(0, BLOCK_E)[None, :]  # [1, BE]
    tl.store(out_ptr + tt.to(tl.int64) * num_experts + ee, logits, mask=(tt < num_tokens) & (ee < num_experts))


@triton.jit
def _gate_dot_kernel(
    x_ptr,  # [T, H] bf16 / fp16 / fp32, stride 1 along H
    w_ptr,  # [E, H] float32, stride 1 along H
    out_ptr,  # [T, E] float32 out, contiguous
    num_tokens,
    num_experts,
    stride_x,  # elements between rows of x
    stride_w,  # elements between rows of weight
    H: tl.constexpr,  # hidden size
    BLOCK_T: tl.constexpr,  # tokens per program (>= 16: tl.dot's smallest M)
    BLOCK_E: tl.constexpr,  # experts per program (>= 16)
    BLOCK_K: tl.constexpr,  # columns of H per step (>= 16)
):
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)  # [BE]
    kk = tl.arange(0, BLOCK_K)  # [BK]
    x_ptrs = x_ptr + t.to(tl.int64)[:, None] * stride_x + kk[None, :]  # [BT, BK]
    w_ptrs = w_ptr + e.to(tl.int64)[None, :] * stride_w + kk[:, None]  # [BK, BE]: weight read transposed
    t_ok = (t < num_tokens)[:, None]
    e_ok = (e < num_experts)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if H % BLOCK_K == 0:
            xv = tl.load(x_ptrs + k0, mask=t_ok, other=0.0)
            wv = tl.load(w_ptrs + k0, mask=e_ok, other=0.0)
        else:
            xv = tl.load(x_ptrs + k0, mask=t_ok & (kk[None, :] + k0 < H), other=0.0)
            wv = tl.load(w_ptrs + k0, mask=e_ok & (kk[:, None] + k0 < H), other=0.0)
        acc = tl.dot(xv.to(tl.float32), wv, acc, input_precision="ieee")  # [BT, BE]
    tl.store(out_ptr + t.to(tl.int64)[:, None] * num_experts + e[None, :], acc, mask=t_ok & e_ok)


def launch_config(num_tokens: int, num_experts: int, hidden: int) -> GateConfig:
    """Kernel and tile sizes for ``[T, H] @ [E, H].T``; see the module docstring."""
    if num_tokens >= DOT_MIN_TOKENS:
        block_e = 32 if num_experts % 64 else 64  # E = 160: five full 32-expert tiles
        return GateConfig(True, 64, block_e, 32, 1, _NUM_WARPS, 3)
    block_t = min(triton.next_power_of_2(max(num_tokens, 1)), MAX_BLOCK_T)
    t_blocks = triton.cdiv(max(num_tokens, 1), block_t)
    # The widest expert block that still leaves TARGET_PROGRAMS programs (more experts per program = fewer
    # re-reads of the x rows); one expert per program when even that leaves fewer.
    block_e = 1
    while (block_e < MAX_BLOCK_E and block_e < num_experts
           and triton.cdiv(num_experts, 2 * block_e) * t_blocks >= TARGET_PROGRAMS):
        block_e *= 2
    vec = max(1, min(MAX_VEC, PRODUCTS_PER_THREAD // (block_t * block_e)))
    vec = min(vec, max(1, triton.next_power_of_2(hidden) // _THREADS))
    return GateConfig(False, block_t, block_e, _THREADS * vec, vec, _NUM_WARPS, 1)


def moe_gate_triton(x: torch.Tensor, weight: torch.Tensor, config: GateConfig | None = None) -> torch.Tensor:
    """Launch on validated inputs (see ``pykernels.moe_gate``): one allocation, one launch.

    ``config`` overrides ``launch_config`` (tuning and tests)."""
    num_tokens, hidden = x.shape
    num_experts = weight.shape[0]
    out = torch.empty((num_tokens, num_experts), dtype=torch.float32, device=x.device)
    if num_tokens == 0:
        return out
    cfg = config or launch_config(num_tokens, num_experts, hidden)
    grid = (triton.cdiv(num_experts, cfg.block_e), triton.cdiv(num_tokens, cfg.block_t))
    args = (x, weight, out, num_tokens, num_experts, x.stride(0), weight.stride(0))
    if cfg.dot:
        _gate_dot_kernel[grid](*args, H=hidden, BLOCK_T=cfg.block_t, BLOCK_E=cfg.block_e, BLOCK_K=cfg.block_k,
                               num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        _gate_rows_kernel[grid](*args, H=hidden, BLOCK_T=cfg.block_t, BLOCK_E=cfg.block_e,
                                KT=cfg.block_k // cfg.vec, V=cfg.vec, num_warps=cfg.num_warps,
                                num_stages=cfg.num_stages)
    return out
