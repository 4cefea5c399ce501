"""The expert-parallel MoE layer: dispatch → ``pk.grouped_ffn`` on this rank's experts → combine."""
from __future__ import annotations

import torch

from pykernels._checks import check_tensor
from pykernels.ep.buffer import Buffer


def moe_ffn_expert_parallel(buf: Buffer, x: torch.Tensor, w13_local: torch.Tensor, w2_local: torch.Tensor,
                            topk_weights: torch.Tensor, topk_ids: torch.Tensor, *, low_latency: bool = False,
                            backend: str | None = None) -> torch.Tensor:
    """``pk.moe_ffn`` with the experts spread over the ranks of ``buf``'s group.

    ``y [T, H] = Σ_k topk_weights[t, k] · expert_{topk_ids[t, k]}(x[t])``, each expert
    ``down(silu(gate(x)) · up(x))``, computed on the rank that owns it.

    Args:
        buf: the ``pk.ep.Buffer`` of the group (its hidden, num_experts and dtype fit the layer).
        x: ``[T, H]``; topk_weights float32 ``[T, K]``; topk_ids int32/int64 ``[T, K]`` global expert ids.
        w13_local: ``[E_local, 2I, H]`` and w2_local ``[E_local, H, I]``: the experts this rank owns,
            global ids ``buf.local_experts`` (rank r: ``[r·E_local, (r+1)·E_local)``), in x's dtype.
        low_latency: the nvlink backend's fixed-capacity mode (decode; CUDA-graph capturable). The padding
            rows past ``tokens_per_expert.sum()`` go through ``grouped_ffn`` as rows of no expert and are
            ignored by combine.
        backend: the backend of ``pk.grouped_ffn``.

    Every rank of the group calls it, with its own tokens (T may differ between ranks, and may be 0).
    """
    from pykernels.moe_ffn import grouped_ffn

    E_local = buf.num_local_experts
    check_tensor("w13_local", w13_local, dtype=buf.dtype, ndim=3, device=buf.device)
    if w13_local.size(0) != E_local or w13_local.size(2) != buf.hidden or w13_local.size(1) % 2:
        raise ValueError(f"w13_local: expected shape ({E_local}, 2*I, {buf.hidden}) (this rank's experts), "
                         f"got {tuple(w13_local.shape)}")
    inter = w13_local.size(1) // 2
    check_tensor("w2_local", w2_local, dtype=buf.dtype, shape=(E_local, buf.hidden, inter), device=buf.device)
    recv_x, _, _, tokens_per_expert, handle = buf.dispatch(x, topk_ids, topk_weights, low_latency=low_latency)
    if handle.num_recv_rows == 0:
        expert_out = recv_x                                                  # [0, H]: nothing came here
    else:
        offsets = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)     # [E_local] row ends
        expert_out = grouped_ffn(recv_x, w13_local, w2_local, offsets, backend=backend)
    return buf.combine(expert_out, handle)
