"""MoE routing: DeepSeek-V2's softmax gate, from router logits to the top-k experts of every token.

``topk_weights, topk_ids = moe_route(router_logits, top_k, *, method="greedy", n_group=1, topk_group=1,
                                     routed_scaling_factor=1.0, norm_topk_prob=False, backend=None)``

The math (DeepSeek's modeling_deepseek.py ``MoEGate``), per token row ``x = router_logits[t]`` of E logits::

    s        = softmax(float32(x))                              # [E], over all routed experts
    greedy:
        chosen = the top_k experts by s
    group_limited_greedy (E experts in n_group groups of E / n_group consecutive ids):
        g[j]   = max of s over group j                          # [n_group]
        kept   = the top topk_group groups by g
        chosen = the top_k experts by s among the experts of the kept groups
    w        = s[chosen]                                        # [top_k]
    w        = w / (sum(w) + 1e-20)            if norm_topk_prob and top_k > 1
             = w * routed_scaling_factor       otherwise (DeepSeek-V2 does not scale normalised weights)

Ranking and ties (identical in every backend, so ids match the reference exactly):

- Experts are ranked by their float32 logit, which orders them exactly like their softmax score
  (softmax is increasing) without the ties that rounding of ``exp`` could create between distinct logits.
  Groups are ranked by their largest logit, likewise. ``-0.0`` and ``+0.0`` are the same logit.
- Equal keys: the lower expert id (group id) wins.
- Output order: column j of ``topk_ids`` holds the j-th best expert, i.e. weights in non-increasing order,
  equal weights by increasing id. ``topk_weights[t, j]`` belongs to ``topk_ids[t, j]``.
- group_limited_greedy never picks an expert outside the kept groups (DeepSeek zeroes their scores; here
  ``top_k <= topk_group * E / n_group`` is required, so there are always enough kept experts).
- NaN logits give NaN weights and unspecified (but in-range) ids.

Outputs: ``topk_weights`` float32 ``[T, top_k]``, ``topk_ids`` int32 ``[T, top_k]``.
"""
from __future__ import annotations

import math

import torch

from pykernels import _backend
from pykernels._checks import check_choice, check_positive_int, check_tensor

__all__ = ["moe_route", "moe_route_reference", "METHODS"]

METHODS = ("greedy", "group_limited_greedy")
SUPPORTED_BACKENDS = ("torch", "triton")
# Fastest first on CUDA tensors: the Triton kernel is one launch; the reference is about ten.
CUDA_PREFERENCE = ("triton", "torch")

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# The Triton kernel holds a whole row of logits in one warp's registers: E up to this many experts.
TRITON_MAX_EXPERTS = 1024


def moe_route(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    method: str = "greedy",
    n_group: int = 1,
    topk_group: int = 1,
    routed_scaling_factor: float = 1.0,
    norm_topk_prob: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``top_k`` experts per token with DeepSeek's gate; returns ``(topk_weights, topk_ids)``.

    Args:
        router_logits: `[T, E]`, bfloat16, float16 or float32, stride 1 in the last dimension.
        top_k: experts per token, 1 <= top_k <= E.
        method: "greedy" or "group_limited_greedy".
        n_group, topk_group: group_limited_greedy's groups (E divisible by n_group, 1 <= topk_group <= n_group,
            top_k <= topk_group * E / n_group). Validated for both methods; only group_limited_greedy uses them.
        routed_scaling_factor: multiplies the weights unless they are normalised (finite float).
        norm_topk_prob: normalise the top-k weights to sum 1 (when top_k > 1) instead of scaling them.
        backend: None (the fastest available for the device: Triton on CUDA, the reference on the CPU),
            "torch" or "triton".

    Returns:
        topk_weights: float32 `[T, top_k]`, non-increasing along each row.
        topk_ids: int32 `[T, top_k]`, expert ids in [0, E); equal weights by increasing id.

    Raises TypeError (wrong type or dtype) or ValueError (shape, layout, values) naming the argument.
    """
    check_tensor("router_logits", router_logits, dtype=_DTYPES, ndim=2, last_dim_contiguous=True)
    num_experts = router_logits.shape[1]
    check_positive_int("router_logits (E, dimension 1)", num_experts)
    check_positive_int("top_k", top_k)
    if top_k > num_experts:
        raise ValueError(f"top_k: expected at most E = {num_experts} (router_logits dimension 1), got {top_k}")
    check_choice("method", method, METHODS)
    check_positive_int("n_group", n_group)
    check_positive_int("topk_group", topk_group)
    if topk_group > n_group:
        raise ValueError(f"topk_group: expected at most n_group = {n_group}, got {topk_group}")
    if method == "group_limited_greedy":
        if num_experts % n_group != 0:
            raise ValueError(f"n_group: expected a divisor of E = {num_experts} (router_logits dimension 1), got {n_group}")
        kept_experts = topk_group * (num_experts // n_group)
        if top_k > kept_experts:
            raise ValueError(
                f"top_k: expected at most topk_group * E / n_group = {kept_experts} experts of the kept groups, got {top_k}"
            )
    if (
        isinstance(routed_scaling_factor, bool)
        or not isinstance(routed_scaling_factor, (int, float))
        or not math.isfinite(routed_scaling_factor)
    ):
        raise ValueError(f"routed_scaling_factor: expected a finite float, got {routed_scaling_factor!r}")
    check_choice("norm_topk_prob", norm_topk_prob, (False, True))

    chosen = _backend.resolve("moe_route", backend, router_logits.device, SUPPORTED_BACKENDS, CUDA_PREFERENCE)
    if chosen == "triton" and num_experts > TRITON_MAX_EXPERTS:
        if backend == "triton":
            raise ValueError(
                f"router_logits: the triton backend handles at most {TRITON_MAX_EXPERTS} experts, got E = {num_experts}"
            )
        chosen = "torch"
    if method == "greedy":
        n_group, topk_group = 1, 1  # greedy is group-limited routing with one group kept
    args = (router_logits, top_k, n_group, topk_group, float(routed_scaling_factor), bool(norm_topk_prob))
    if chosen == "triton" and _backend.direct_call_ok(router_logits):
        from pykernels.triton.moe_route import moe_route_triton

        return moe_route_triton(*args)
    return torch.ops.pykernels.moe_route(*args, chosen)


def moe_route_reference(
    router_logits: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: the module docstring's math in float32 (``n_group = topk_group = 1`` is greedy).

    Top-k by a stable descending sort, so equal keys keep increasing id order.
    """
    num_tokens, num_experts = router_logits.shape
    logits = router_logits.float()  # [T, E]
    # NOTES: one zero, so that -0.0 and +0.0 rank as equal in every backend.
    logits = torch.where(logits == 0, 0.0, logits)
    scores = torch.softmax(logits, dim=-1)  # [T, E]

    group_size = num_experts // n_group
    group_key = logits.view(num_tokens, n_group, group_size).amax(dim=-1)  # [T, G]
    group_rank = torch.sort(group_key, dim=-1, descending=True, stable=True).indices  # [T, G]
    kept_group = torch.zeros(num_tokens, n_group, dtype=torch.bool, device=logits.device)
    kept_group.scatter_(1, group_rank[:, :topk_group], True)
    kept = kept_group.repeat_interleave(group_size, dim=1)  # [T, E]

    # Rank by (kept first, then logit descending, then id ascending): two stable sorts, the primary key last.
    by_logit = torch.sort(logits, dim=-1, descending=True, stable=True).indices  # [T, E]
    by_kept = torch.sort(kept.gather(1, by_logit).to(torch.int8), dim=-1, descending=True, stable=True).indices
    ids = by_logit.gather(1, by_kept[:, :top_k])  # [T, top_k]

    weights = scores.gather(1, ids)  # [T, top_k]
    if norm_topk_prob and top_k > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        weights = weights * routed_scaling_factor
    return weights, ids.to(torch.int32)


@torch.library.custom_op("pykernels::moe_route", mutates_args=())
def _moe_route_op(
    router_logits: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from pykernels.triton.moe_route import moe_route_triton

        return moe_route_triton(router_logits, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob)
    return moe_route_reference(router_logits, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob)


@_moe_route_op.register_fake
def _(router_logits, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob, backend):
    num_tokens = router_logits.shape[0]
    weights = router_logits.new_empty((num_tokens, top_k), dtype=torch.float32)
    ids = router_logits.new_empty((num_tokens, top_k), dtype=torch.int32)
    return weights, ids
