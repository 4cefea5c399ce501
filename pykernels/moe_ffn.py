"""Routed-expert FFNs of a DeepSeek MoE layer: SiLU-gated experts in the fused (transformers 5 / vLLM) layout.

``y = moe_ffn(x, w13, w2, topk_weights, topk_ids, *, backend=None)``
``y = grouped_ffn(x_sorted, w13, w2, offsets, *, backend=None)``

Weights: ``w13 [E, 2I, H]`` holds expert e's gate rows ``w13[e, :I]`` then its up rows ``w13[e, I:]``;
``w2 [E, H, I]`` is its down projection. One expert applied to one row ``v [H]``::

    expert_e(v) = w2[e] @ (silu(w13[e, :I] @ v) * (w13[e, I:] @ v))       # [H];  silu(a) = a * sigmoid(a)

moe_ffn, per token t (the k routes of ``topk_ids[t]`` / ``topk_weights[t]``, from ``moe_route``)::

    y[t] = sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t])

grouped_ffn works on rows already grouped by expert (what expert-parallel dispatch hands over), with
``offsets [E]`` the cumulative row ends (``torch._grouped_mm``'s ``offs``): rows ``[offsets[e-1], offsets[e])``
(``offsets[-1]`` read as 0) belong to expert e, and ``offsets[E-1]`` is the row count::

    y_sorted[r] = expert_{e(r)}(x_sorted[r])                                  # no weighting

Bad values: ids outside [0, E) and offsets that decrease, start below 0 or do not end at the row count
raise ValueError when ``pykernels._checks.value_checks_enabled`` allows reading them (always for CPU
tensors; on CUDA only with ``PYKERNELS_CHECK_VALUES=1``, since it costs a host synchronisation). Without
the check every backend stays memory-safe: a (token, k) route with an out-of-range id contributes
nothing, rows past ``offsets[E-1]`` produce zeros, and decreasing offsets give unspecified rows.

Backends: "torch" is the reference below (float32 math, no host synchronisation, E dense expert
applications: the oracle, not a fast path); "triton" is the grouped-GEMM pipeline of
``pykernels/triton/grouped_gemm.py`` (moe_ffn: the expert-sorted row layout; the direct layout of
``pykernels/triton/moe_direct.py``, one launch and no permutation, up to ``moe_configs.DIRECT_MAX_TOKENS``
tokens; see there). Eager calls launch
it directly; the ``torch.library`` op is the entry point under torch.compile and dispatch modes
(``pykernels._backend.direct_call_ok``).
"cuda" runs the GEMMs of ``pykernels/moe_gemm_sm90.py`` (persistent, warp-specialized wgmma kernels for
Hopper; bfloat16, H and I multiples of 8) on rows gathered into expert order, their outputs summed back per
token (``pykernels/triton/moe_rows.py``); it is forced only: the whole op measured level with Triton's
(``bench/results/<gpu>/moe.json`` has both backends).
``backend=None`` picks Triton for CUDA tensors (the reference does E times the routed work, so it cannot
win at any shape) and the reference on the CPU. The per-shape choices are the row layout and the tile
configuration: ``pykernels/triton/moe_configs.py`` keys the tiles by (GEMM, H, I, rows per expert), sets
the direct layout's token limit, and holds the winners of the tuning sweep ``bench/tune_moe.py``;
``bench/bench_moe.py`` records the result against the torch._grouped_mm pipeline.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pykernels import _backend
from pykernels._checks import check_positive_int, check_same_device, check_same_dtype, check_tensor, value_checks_enabled

__all__ = ["moe_ffn", "grouped_ffn", "moe_ffn_reference", "grouped_ffn_reference"]

SUPPORTED_BACKENDS = ("torch", "triton", "cuda")
# Fastest first on CUDA tensors (see the module docstring; "cuda" is taken only when forced).
CUDA_PREFERENCE = ("triton", "torch")

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ID_DTYPES = (torch.int32, torch.int64)


def _check_values(t: torch.Tensor) -> bool:
    """``value_checks_enabled``, and never while torch.compile traces (values are not known then, even on the CPU)."""
    return value_checks_enabled(t) and not torch.compiler.is_compiling()


def _check_sm90(op: str, x: torch.Tensor, hidden: int, inter: int) -> None:
    """backend="cuda" runs the sm_90 GEMMs: bfloat16, H and I multiples of 8, a Hopper GPU."""
    from pykernels import moe_gemm_sm90

    if x.dtype != torch.bfloat16 or not moe_gemm_sm90.supports(hidden, inter) or not moe_gemm_sm90.available(x.device):
        raise ValueError(
            f"backend: 'cuda' for {op} needs bfloat16, H and I multiples of 8 and a Hopper GPU; got "
            f"{str(x.dtype).removeprefix('torch.')}, H = {hidden}, I = {inter} on {x.device}"
        )


def _check_weights(x_name: str, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> tuple[int, int, int]:
    """Checks shared by both ops; returns (E, H, I)."""
    check_tensor(x_name, x, dtype=_DTYPES, ndim=2, last_dim_contiguous=True)
    hidden = x.shape[1]
    check_positive_int(f"{x_name} (H, dimension 1)", hidden)
    check_tensor("w13", w13, dtype=_DTYPES, ndim=3, last_dim_contiguous=True)
    check_tensor("w2", w2, dtype=_DTYPES, ndim=3, last_dim_contiguous=True)
    check_same_dtype((x_name, "w13", "w2"), (x, w13, w2))
    check_same_device((x_name, "w13", "w2"), (x, w13, w2))
    num_experts, two_i, w13_hidden = w13.shape
    check_positive_int("w13 (E, dimension 0)", num_experts)
    if two_i == 0 or two_i % 2 != 0:
        raise ValueError(f"w13: expected an even, non-zero dimension 1 (2I: gate rows then up rows), got shape {tuple(w13.shape)}")
    if w13_hidden != hidden:
        raise ValueError(f"w13: expected dimension 2 = H = {hidden} ({x_name} dimension 1), got shape {tuple(w13.shape)}")
    inter = two_i // 2
    check_tensor("w2", w2, shape=(num_experts, hidden, inter))
    return num_experts, hidden, inter


def moe_ffn(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Weighted sum over each token's routed experts; returns ``y [T, H]`` in x's dtype.

    Args:
        x: `[T, H]`, bfloat16, float16 or float32, stride 1 in the last dimension.
        w13: `[E, 2I, H]`, x's dtype and device, gate rows then up rows; stride 1 in the last dimension.
        w2: `[E, H, I]`, x's dtype and device; stride 1 in the last dimension.
        topk_weights: `[T, top_k]`, float32 (or bfloat16/float16), the routing weights.
        topk_ids: `[T, top_k]`, int32 (or int64), expert ids in [0, E). Repeated ids add up.
        backend: None, "torch", "triton" or "cuda" (see the module docstring).

    Raises TypeError (wrong type or dtype) or ValueError (shape, device, layout, ids) naming the argument.
    """
    num_experts, hidden, inter = _check_weights("x", x, w13, w2)
    num_tokens = x.shape[0]
    check_tensor("topk_ids", topk_ids, dtype=_ID_DTYPES, ndim=2)
    top_k = topk_ids.shape[1]
    check_positive_int("topk_ids (top_k, dimension 1)", top_k)
    check_tensor("topk_ids", topk_ids, shape=(num_tokens, top_k))
    check_tensor("topk_weights", topk_weights, dtype=_WEIGHT_DTYPES, shape=(num_tokens, top_k))
    check_same_device(("x", "topk_weights", "topk_ids"), (x, topk_weights, topk_ids))
    if _check_values(topk_ids) and topk_ids.numel() > 0:
        bad = (topk_ids < 0) | (topk_ids >= num_experts)
        if bool(bad.any()):
            t, k = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"topk_ids: expected expert ids in [0, {num_experts}) (E = w13 dimension 0), got {int(topk_ids[t, k])} at [{t}, {k}]"
            )
    chosen = _backend.resolve("moe_ffn", backend, x.device, SUPPORTED_BACKENDS, CUDA_PREFERENCE)
    if chosen == "cuda":
        _check_sm90("moe_ffn", x, hidden, inter)
        if _backend.direct_call_ok(x, w13, w2, topk_weights):
            from pykernels.moe_gemm_sm90 import moe_ffn_sm90

            return moe_ffn_sm90(x, w13, w2, topk_weights, topk_ids)
    if chosen == "triton" and _backend.direct_call_ok(x, w13, w2, topk_weights):
        from pykernels.triton.grouped_gemm import moe_ffn_triton

        return moe_ffn_triton(x, w13, w2, topk_weights, topk_ids)
    return torch.ops.pykernels.moe_ffn(x, w13, w2, topk_weights, topk_ids, chosen)


def grouped_ffn(
    x_sorted: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    offsets: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Each expert's FFN on its contiguous block of rows; returns ``y_sorted [R, H]`` in x_sorted's dtype.

    Args:
        x_sorted: `[R, H]` rows grouped by expert, bfloat16, float16 or float32; stride 1 in the last dimension.
        w13: `[E, 2I, H]`, x_sorted's dtype and device, gate rows then up rows; stride 1 in the last dimension.
        w2: `[E, H, I]`, x_sorted's dtype and device; stride 1 in the last dimension.
        offsets: int32 `[E]`, cumulative row ends: non-decreasing, offsets[0] >= 0, offsets[E-1] == R.
        backend: None, "torch", "triton" or "cuda" (see the module docstring).

    Raises TypeError (wrong type or dtype) or ValueError (shape, device, layout, offsets) naming the argument.
    """
    num_experts, hidden, inter = _check_weights("x_sorted", x_sorted, w13, w2)
    rows = x_sorted.shape[0]
    check_tensor("offsets", offsets, dtype=torch.int32, shape=(num_experts,))
    check_same_device(("x_sorted", "offsets"), (x_sorted, offsets))
    if _check_values(offsets):
        ends = offsets.long()
        if int(ends[0]) < 0:
            raise ValueError(f"offsets: expected offsets[0] >= 0, got {int(ends[0])}")
        drops = ends[1:] < ends[:-1]
        if bool(drops.any()):
            e = int(drops.nonzero()[0, 0]) + 1
            raise ValueError(
                f"offsets: expected non-decreasing cumulative row ends, got offsets[{e - 1}] = {int(ends[e - 1])}"
                f" > offsets[{e}] = {int(ends[e])}"
            )
        if int(ends[-1]) != rows:
            raise ValueError(f"offsets: expected offsets[{num_experts - 1}] = R = {rows} (x_sorted dimension 0), got {int(ends[-1])}")
    chosen = _backend.resolve("grouped_ffn", backend, x_sorted.device, SUPPORTED_BACKENDS, CUDA_PREFERENCE)
    if chosen == "cuda":
        _check_sm90("grouped_ffn", x_sorted, hidden, inter)
        if _backend.direct_call_ok(x_sorted, w13, w2):
            from pykernels.moe_gemm_sm90 import grouped_ffn_sm90

            return grouped_ffn_sm90(x_sorted, w13, w2, offsets)
    if chosen == "triton" and _backend.direct_call_ok(x_sorted, w13, w2):
        from pykernels.triton.grouped_gemm import grouped_ffn_triton

        return grouped_ffn_triton(x_sorted, w13, w2, offsets)
    return torch.ops.pykernels.grouped_ffn(x_sorted, w13, w2, offsets, chosen)


def _expert_float32(v: torch.Tensor, w13_e: torch.Tensor, w2_e: torch.Tensor) -> torch.Tensor:
    """expert(v) for rows ``v [R, H]`` (float32) with one expert's ``w13_e [2I, H]`` and ``w2_e [H, I]``."""
    gate, up = w13_e.float().chunk(2, dim=0)  # [I, H] each
    h = F.silu(v @ gate.T) * (v @ up.T)  # [R, I]
    return h @ w2_e.float().T  # [R, H]


def moe_ffn_reference(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """The oracle: ``y = sum_e coef[:, e] * expert_e(x)`` in float32, ``coef[t, e] = sum_k w[t, k] [ids[t, k] == e]``.

    Every expert runs on every token (E times the work of the routed FFN) so that no shape depends on
    device values: no host synchronisation. Routes with an out-of-range id get coefficient 0.
    """
    num_experts = w13.shape[0]
    ids = topk_ids.long()  # [T, k]
    valid = (ids >= 0) & (ids < num_experts)
    coef = torch.zeros(x.shape[0], num_experts, dtype=torch.float32, device=x.device)  # [T, E]
    coef.scatter_add_(1, torch.where(valid, ids, 0), torch.where(valid, topk_weights.float(), 0.0))
    xf = x.float()  # [T, H]
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, H]
    for e in range(num_experts):
        y += coef[:, e, None] * _expert_float32(xf, w13[e], w2[e])
    return y.to(x.dtype)


def grouped_ffn_reference(x_sorted: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The oracle: row r goes through expert ``e(r) = #{e : offsets[e] <= r}`` in float32; rows with e(r) = E get 0.

    Like ``moe_ffn_reference``, every expert runs on every row and a mask keeps its own: no host synchronisation.
    """
    num_experts = w13.shape[0]
    rows = torch.arange(x_sorted.shape[0], device=x_sorted.device, dtype=torch.int64)  # [R]
    expert_of_row = torch.searchsorted(offsets.long(), rows, right=True)  # [R], in [0, E]
    xf = x_sorted.float()  # [R, H]
    y = torch.zeros(x_sorted.shape, dtype=torch.float32, device=x_sorted.device)  # [R, H]
    for e in range(num_experts):
        mine = (expert_of_row == e).float()[:, None]  # [R, 1]
        y += mine * _expert_float32(xf, w13[e], w2[e])
    return y.to(x_sorted.dtype)


@torch.library.custom_op("pykernels::moe_ffn", mutates_args=())
def _moe_ffn_op(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    if backend == "triton":
        from pykernels.triton.grouped_gemm import moe_ffn_triton

        return moe_ffn_triton(x, w13, w2, topk_weights, topk_ids)
    if backend == "cuda":
        from pykernels.moe_gemm_sm90 import moe_ffn_sm90

        return moe_ffn_sm90(x, w13, w2, topk_weights, topk_ids)
    return moe_ffn_reference(x, w13, w2, topk_weights, topk_ids)


@_moe_ffn_op.register_fake
def _(x, w13, w2, topk_weights, topk_ids, backend):
    return torch.empty_like(x)


@torch.library.custom_op("pykernels::grouped_ffn", mutates_args=())
def _grouped_ffn_op(x_sorted: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, offsets: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "triton":
        from pykernels.triton.grouped_gemm import grouped_ffn_triton

        return grouped_ffn_triton(x_sorted, w13, w2, offsets)
    if backend == "cuda":
        from pykernels.moe_gemm_sm90 import grouped_ffn_sm90

        return grouped_ffn_sm90(x_sorted, w13, w2, offsets)
    return grouped_ffn_reference(x_sorted, w13, w2, offsets)


@_grouped_ffn_op.register_fake
def _(x_sorted, w13, w2, offsets, backend):
    return torch.empty_like(x_sorted)
