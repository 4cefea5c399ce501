"""Absorbed-weight MLA decode over a paged latent cache (FlashMLA's argument conventions).

``out, lse = mla_decode(q, k_cache, block_table, cache_seqlens, head_dim_v=512, softmax_scale=None, causal=False)``

Every head attends to the one latent KV "head" of the cache (multi-query attention in the
576-dim latent space): the keys are whole cache rows (``kv_lora_rank + rope_dim`` = 512 + 64),
the values are the first ``head_dim_v`` columns of the same rows.

Cache layout: ``k_cache[num_blocks, block_size, 1, head_dim]``; position ``t`` of sequence ``b``
lives in row ``t % block_size`` of block ``block_table[b, t // block_size]``. Blocks past a
sequence's end (and block-table entries past it) are never read.

Math, per batch element ``b``, query position ``i < q_len`` and head ``h``::

    n       = cache_seqlens[b]
    K[t]    = k_cache[block_table[b, t // block_size], t % block_size, 0, :]      # [head_dim]
    V[t]    = K[t][:head_dim_v]                                                  # [head_dim_v]
    seen    = n                       if not causal                              # keys the query sees
            = n - q_len + i + 1       if causal      (query i is the (n - q_len + i)-th token)
    s[t]    = softmax_scale * q[b, i, h] . K[t]          for t < seen
    lse     = log(sum_t exp(s[t]))                        natural log; -inf when seen = 0
    out     = sum_t exp(s[t] - lse) * V[t]                0 when seen = 0

Outputs: ``out[b, i, h]`` (q's dtype) and ``lse[b, h, i]`` (float32).
"""
from __future__ import annotations

import math

import torch

from pykernels import _backend
from pykernels._checks import (
    check_choice,
    check_positive_int,
    check_same_device,
    check_same_dtype,
    check_tensor,
    value_checks_enabled,
)

__all__ = ["mla_decode", "mla_decode_reference"]

SUPPORTED_BACKENDS = ("torch", "triton")
# Fastest first on CUDA tensors.
CUDA_PREFERENCE = ("triton", "torch")

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def mla_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int = 512,
    softmax_scale: float | None = None,
    causal: bool = False,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over a paged latent KV cache; returns ``(out, lse)``.

    Args:
        q: `[batch, q_len, num_heads, head_dim]`, bfloat16, float16 or float32; head_dim is
            kv_lora_rank + rope_dim (576 for DeepSeek-V2). Stride 1 in the last dimension.
        k_cache: `[num_blocks, block_size, 1, head_dim]`, q's dtype and device; stride 1 in the
            last dimension. The values are its first ``head_dim_v`` columns.
        block_table: int32 `[batch, max_blocks_per_seq]`, block ids into ``k_cache``.
        cache_seqlens: int32 `[batch]`, keys per sequence (0 <= n <= max_blocks_per_seq * block_size).
        head_dim_v: columns of the cache rows used as values (0 < head_dim_v <= head_dim).
        softmax_scale: multiplies q.k before the softmax; default ``head_dim ** -0.5``.
        causal: query ``i`` of ``q_len`` sees cache positions ``< n - q_len + i + 1`` (the last
            ``q_len`` cache rows are the queries' own tokens). With ``q_len > 1`` every non-empty
            sequence must hold at least ``q_len`` keys; an empty one (n = 0, e.g. batch padding)
            gives out = 0 and lse = -inf.
        backend: None (the fastest available for the device), "torch" or "triton".

    Returns:
        out: `[batch, q_len, num_heads, head_dim_v]`, q's dtype.
        lse: float32 `[batch, num_heads, q_len]`, natural log of the softmax denominator.

    Raises TypeError (wrong type or dtype) or ValueError (shape, device, layout, values) naming the
    argument. Values of ``block_table`` and ``cache_seqlens`` are checked when
    ``pykernels._checks.value_checks_enabled`` allows it (always for CPU tensors); the kernels stay
    memory-safe without the checks (block ids and lengths are clamped into range).
    """
    check_tensor("q", q, dtype=_DTYPES, ndim=4, last_dim_contiguous=True)
    batch, q_len, num_heads, head_dim = q.shape
    check_tensor("k_cache", k_cache, dtype=_DTYPES, ndim=4, last_dim_contiguous=True)
    check_same_dtype(("q", "k_cache"), (q, k_cache))
    check_tensor("block_table", block_table, dtype=torch.int32, ndim=2)
    check_tensor("cache_seqlens", cache_seqlens, dtype=torch.int32, ndim=1)
    check_same_device(("q", "k_cache", "block_table", "cache_seqlens"), (q, k_cache, block_table, cache_seqlens))
    check_tensor("k_cache", k_cache, shape=(None, None, 1, head_dim))
    check_tensor("block_table", block_table, shape=(batch, None))
    check_tensor("cache_seqlens", cache_seqlens, shape=(batch,))
    check_positive_int("q (q_len, dimension 1)", q_len)
    check_positive_int("q (num_heads, dimension 2)", num_heads)
    check_positive_int("k_cache (num_blocks, dimension 0)", k_cache.shape[0])
    check_positive_int("k_cache (block_size, dimension 1)", k_cache.shape[1])
    check_positive_int("head_dim_v", head_dim_v)
    if head_dim_v > head_dim:
        raise ValueError(f"head_dim_v: expected at most q's head_dim {head_dim}, got {head_dim_v}")
    if softmax_scale is None:
        softmax_scale = head_dim**-0.5
    is_number = isinstance(softmax_scale, (int, float)) and not isinstance(softmax_scale, bool)
    if not is_number or not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale: expected a finite float or None, got {softmax_scale!r}")
    check_choice("causal", causal, (False, True))
    if value_checks_enabled(cache_seqlens) and value_checks_enabled(block_table):
        _check_values(block_table, cache_seqlens, k_cache.shape[0], k_cache.shape[1], q_len, causal)

    chosen = _backend.resolve("mla_decode", backend, q.device, SUPPORTED_BACKENDS, CUDA_PREFERENCE)
    if chosen == "triton":
        from pykernels.triton.mla_decode import check_supported

        check_supported(head_dim, head_dim_v)
        if q.device.type != "cuda" and q.dtype == torch.bfloat16:
            raise TypeError(
                "q: Triton's CPU interpreter computes bfloat16 wrongly; use float16/float32 or backend='torch'"
            )
    return torch.ops.pykernels.mla_decode(
        q, k_cache, block_table, cache_seqlens, head_dim_v, float(softmax_scale), bool(causal), chosen
    )


def _check_values(
    block_table: torch.Tensor, cache_seqlens: torch.Tensor, num_blocks: int, block_size: int, q_len: int, causal: bool
) -> None:
    """Value checks that read ``block_table`` and ``cache_seqlens`` (a host synchronisation on CUDA)."""
    capacity = block_table.shape[1] * block_size
    lengths = cache_seqlens.long()  # [batch]
    bad = (lengths < 0) | (lengths > capacity)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"cache_seqlens: expected lengths in [0, {capacity}] (block_table holds {block_table.shape[1]} blocks"
            f" of {block_size}), got {int(lengths[b])} for sequence {b}"
        )
    if causal and q_len > 1:
        short = (lengths > 0) & (lengths < q_len)
        if bool(short.any()):
            b = int(short.nonzero()[0, 0])
            raise ValueError(
                f"cache_seqlens: with causal=True and q_len={q_len} a non-empty sequence needs at least"
                f" {q_len} keys (its queries' own tokens), got {int(lengths[b])} for sequence {b}"
            )
    used = torch.arange(block_table.shape[1], device=block_table.device) * block_size < lengths[:, None]  # [B, M]
    ids = block_table.long()
    out_of_range = used & ((ids < 0) | (ids >= num_blocks))
    if bool(out_of_range.any()):
        b, j = (int(x) for x in out_of_range.nonzero()[0])
        raise ValueError(
            f"block_table: expected block ids in [0, {num_blocks}) for the blocks a sequence uses,"
            f" got {int(ids[b, j])} at [{b}, {j}] (sequence length {int(lengths[b])})"
        )


def mla_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    softmax_scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: the math of the module docstring in float32, over every block-table position.

    No host synchronisation: all ``max_blocks_per_seq * block_size`` positions are gathered and the
    ones past each sequence's length are masked. Block ids are clamped into the cache so an
    unchecked table cannot index outside it; the rows they give are masked like any other.
    """
    batch, q_len, num_heads, head_dim = q.shape
    num_blocks, block_size = k_cache.shape[:2]
    max_blocks = block_table.shape[1]
    capacity = max_blocks * block_size
    device = q.device

    ids = block_table.long().clamp(0, num_blocks - 1)  # [B, M]
    kv = k_cache[ids.reshape(-1), :, 0, :].reshape(batch, capacity, head_dim).float()  # [B, P, D]
    lengths = cache_seqlens.long().clamp(0, capacity)  # [B]
    pos = torch.arange(capacity, device=device)  # [P]
    # NOTES: rows past a sequence's end may hold anything (NaN in the tests): zero them, so that
    # neither q.k nor p.v can carry them into the result.
    kv = torch.where((pos < lengths[:, None])[..., None], kv, 0.0)

    seen = lengths[:, None].expand(batch, q_len)  # [B, Q]
    if causal:
        seen = seen - (q_len - 1 - torch.arange(q_len, device=device))
    visible = pos < seen[..., None]  # [B, Q, P]

    s = softmax_scale * torch.einsum("bqhd,bpd->bhqp", q.float(), kv)  # [B, H, Q, P]
    s = s.masked_fill(~visible[:, None], -math.inf)
    lse = torch.logsumexp(s, dim=-1)  # [B, H, Q]; -inf where nothing is visible
    p = torch.where(visible[:, None], torch.exp(s - lse[..., None]), 0.0)  # [B, H, Q, P]
    out = torch.einsum("bhqp,bpd->bqhd", p, kv[..., :head_dim_v])  # [B, Q, H, Dv]
    return out.to(q.dtype), lse


@torch.library.custom_op("pykernels::mla_decode", mutates_args=())
def _mla_decode_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    softmax_scale: float,
    causal: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from pykernels.triton.mla_decode import mla_decode_triton

        return mla_decode_triton(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)
    return mla_decode_reference(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)


@_mla_decode_op.register_fake
def _(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, backend):
    batch, q_len, num_heads, _ = q.shape
    out = q.new_empty((batch, q_len, num_heads, head_dim_v))
    lse = q.new_empty((batch, num_heads, q_len), dtype=torch.float32)
    return out, lse
