"""Token rows into and out of the expert-sorted order of ``moe_permute.permute_with_positions``, for GEMMs
that read and write whole row tiles in that order (the sm_90 grouped GEMMs load them by TMA):

    gather_sorted  x_sorted[r] = x[sorted_pair[r] // top_k]     r < offsets[E-1]; the rows past are not written
    combine        y[t] = sum_k weights[t, k] * out[position[t * top_k + k]]
                   float32, k = 0, 1, ... in order (deterministic); a route with position -1 (its expert id
                   was outside [0, E)) adds nothing

Both are row copies at the memory's pace: gather_sorted writes N = T * top_k rows and reads each token row
top_k times (from the L2), combine reads N rows and writes T.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_GATHER_ROWS = 4     # rows per program
_BLOCK_H = 1024      # hidden columns per step (2 KiB of bf16 per row)


@triton.jit
def _gather_kernel(
    x_ptr,  # [T, H] token rows
    pair_ptr,  # [N] int32: sorted position -> route
    offsets_ptr,  # [E] int32 cumulative row ends: rows >= offsets[E-1] belong to no expert
    out_ptr,  # [N, H] out
    num_experts,
    hidden,
    TOP_K: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # [R]
    live = rows < tl.load(offsets_ptr + num_experts - 1)
    token = (tl.load(pair_ptr + rows, mask=live, other=0) // TOP_K).to(tl.int64)  # [R]
    for h0 in range(0, hidden, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)  # [BH]
        mask = live[:, None] & (cols < hidden)[None, :]
        v = tl.load(x_ptr + token[:, None] * hidden + cols[None, :], mask=mask)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * hidden + cols[None, :], v, mask=mask)


@triton.jit
def _combine_kernel(
    out_ptr,  # [N, H] expert outputs in sorted order
    position_ptr,  # [T * TOP_K] int32: route -> sorted position (-1: none)
    weights_ptr,  # [T * TOP_K] routing weights
    y_ptr,  # [T, H] out
    hidden,
    TOP_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_H,), tl.float32)
    for k in range(TOP_K):  # fixed order: deterministic
        pos = tl.load(position_ptr + t * TOP_K + k)
        w = tl.load(weights_ptr + t * TOP_K + k).to(tl.float32)
        limit = tl.where(pos >= 0, hidden, 0)  # (a route without a position reads nothing)
        v = tl.load(out_ptr + tl.maximum(pos, 0).to(tl.int64) * hidden + cols, mask=cols < limit, other=0.0)
        acc += w * v.to(tl.float32)
    tl.store(y_ptr + t * hidden + cols, acc.to(y_ptr.dtype.element_ty), mask=cols < hidden)


def gather_sorted(x: torch.Tensor, sorted_pair: torch.Tensor, offsets: torch.Tensor, top_k: int) -> torch.Tensor:
    """x_sorted [N, H] (N = sorted_pair's length) from x [T, H], contiguous; see the module docstring."""
    num_rows, hidden = sorted_pair.numel(), x.shape[1]
    out = torch.empty((num_rows, hidden), dtype=x.dtype, device=x.device)
    if num_rows:
        _gather_kernel[(triton.cdiv(num_rows, _GATHER_ROWS),)](
            x, sorted_pair, offsets, out, offsets.numel(), hidden, TOP_K=top_k, ROWS=_GATHER_ROWS,
            BLOCK_H=_BLOCK_H, num_warps=4)
    return out


def combine(out: torch.Tensor, position: torch.Tensor, weights: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y [T, H] (written) from out [N, H], position [T * top_k] and weights [T, top_k]; see the module
    docstring. All contiguous."""
    num_tokens, hidden = y.shape
    if num_tokens:
        top_k = position.numel() // num_tokens
        _combine_kernel[(num_tokens, triton.cdiv(hidden, _BLOCK_H))](
            out, position, weights, y, hidden, TOP_K=top_k, BLOCK_H=_BLOCK_H, num_warps=4)
    return y
