"""MoE router logits: DeepSeek's gate matmul, in float32, from bf16/fp16/fp32 hidden states.

``router_logits = moe_gate(x, weight, *, backend=None)``

The math (DeepSeek's modeling_deepseek.py ``MoEGate``: ``F.linear(hidden_states.float(), self.weight.float())``)::

    router_logits[t, e] = sum_h float32(x[t, h]) * weight[e, h]        # float32 products and sums

``x`` converted to float32 is exact (bf16 and fp16 values are float32 values), so the only rounding is
the float32 accumulation; its order is fixed in every backend, so a backend gives bit-identical logits
for the same inputs run after run (no atomics, no split reductions that race). Different token counts
may pick different tilings, i.e. a different (equally accurate) summation order.

The result is what ``pk.moe_route`` takes: ``router_logits`` float32 ``[T, E]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pykernels import _backend
from pykernels._checks import check_positive_int, check_same_device, check_tensor

__all__ = ["moe_gate", "moe_gate_reference"]

SUPPORTED_BACKENDS = ("torch", "triton")
# Fastest first on CUDA tensors: the Triton kernel reads x once in its own dtype and the weight once, in one
# launch; the reference is three kernels on the decode path (x.float() copy, cuBLAS GEMV/GEMM, split-K reduce).
CUDA_PREFERENCE = ("triton", "torch")
# backend=None takes the Triton kernel up to this many tokens and the reference beyond. On the H200
# (bench/results/nvidia-h200/moe.json, alone; weights from the L2): T = 1 1.65 µs vs 6.0 (Lite) and 4.05 vs
# 7.79 (236B), but T = 64 on 236B 249 µs vs 21: the rows kernel keeps a float32 sum per (token, expert) per
# thread and its programs grow with T. In the Lite decode step (python -m profiles step, beside the shared
# experts' stream) T = 64 took 16.0 µs against 11.6 for the reference. Between 1 and 64 it is unmeasured.
TRITON_DEFAULT_MAX_TOKENS = 8

_X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def moe_gate(x: torch.Tensor, weight: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Router logits ``float32(x) @ weight.T`` with float32 accumulation in a fixed order.

    Args:
        x: `[T, H]` hidden states, bfloat16, float16 or float32, stride 1 in the last dimension (any row stride).
        weight: `[E, H]` float32 gate weight (``MoEGate.weight``), stride 1 in the last dimension.
        backend: None (Triton on CUDA for T <= ``TRITON_DEFAULT_MAX_TOKENS``, else the reference), "torch" or
            "triton".

    Returns:
        router_logits: float32 `[T, E]`, contiguous.

    Raises TypeError (wrong type or dtype) or ValueError (shape, layout, device) naming the argument.
    """
    check_tensor("x", x, dtype=_X_DTYPES, ndim=2, last_dim_contiguous=True)
    check_tensor("weight", weight, dtype=torch.float32, ndim=2, last_dim_contiguous=True)
    check_same_device(("x", "weight"), (x, weight))
    num_experts, hidden = weight.shape
    check_positive_int("weight (E, dimension 0)", num_experts)
    check_positive_int("weight (H, dimension 1)", hidden)
    if x.shape[1] != hidden:
        raise ValueError(f"x: expected H = {hidden} columns like weight [E, H], got shape {tuple(x.shape)}")

    chosen = _backend.resolve("moe_gate", backend, x.device, SUPPORTED_BACKENDS, CUDA_PREFERENCE)
    if backend is None and chosen == "triton" and x.shape[0] > TRITON_DEFAULT_MAX_TOKENS:
        chosen = "torch"
    if _backend.direct_call_ok(x, weight):  # eager: skip the op's dispatch (tens of µs of host time)
        if chosen == "triton":
            from pykernels.triton.moe_gate import moe_gate_triton

            return moe_gate_triton(x, weight)
        return moe_gate_reference(x, weight)
    return torch.ops.pykernels.moe_gate(x, weight, chosen)


def moe_gate_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The oracle: DeepSeek's own expression, one float32 GEMM (cuBLAS on CUDA, unless the user allowed TF32)."""
    return F.linear(x.float(), weight)  # [T, E]


@torch.library.custom_op("pykernels::moe_gate", mutates_args=())
def _moe_gate_op(x: torch.Tensor, weight: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "triton":
        from pykernels.triton.moe_gate import moe_gate_triton

        return moe_gate_triton(x, weight)
    return moe_gate_reference(x, weight)


@_moe_gate_op.register_fake
def _(x, weight, backend):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)
