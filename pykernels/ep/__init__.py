"""Expert-parallel all-to-all: ``pk.ep.Buffer`` (dispatch / combine) and the expert-parallel MoE layer.

See ``pykernels/ep/buffer.py`` for the math and the wire scheme, and docs/expert_parallel.md for the
design of both backends and of the multi-node (InfiniBand + NVLink) scheme.
"""
from pykernels.ep.buffer import (
    Buffer,
    BufferSizes,
    DispatchHandle,
    EPError,
    EPTimeoutError,
    TorchDispatchHandle,
)
from pykernels.ep.moe import moe_ffn_expert_parallel

__all__ = [
    "Buffer",
    "BufferSizes",
    "DispatchHandle",
    "TorchDispatchHandle",
    "EPError",
    "EPTimeoutError",
    "moe_ffn_expert_parallel",
]
