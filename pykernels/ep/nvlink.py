"""The ``"nvlink"`` backend of ``pk.ep.Buffer`` (the GPUs of one host): CUDA IPC buffers, SM copies."""
from __future__ import annotations

import torch

# Bytes of the signal area at the start of a rank's shared memory: per parity and per source rank, one
# 64-bit dispatch flag and one 64-bit combine flag (room for 8 ranks × 2 parities × 2 flags), padded.
SIGNAL_BYTES = 512


def shared_bytes(num_ranks: int, num_local_experts: int, capacity: int, dispatch_row: int, combine_row: int) -> int:
    """CUDA-IPC bytes one rank shares: signals, then per parity (2) and source rank: counts
    (1 + E_local int32, padded to 16 bytes), ``capacity`` dispatch rows and ``capacity`` combine rows."""
    counts = (4 * (1 + num_local_experts) + 15) // 16 * 16
    return SIGNAL_BYTES + 2 * num_ranks * (counts + capacity * (dispatch_row + combine_row))


def unusable_reason(device: torch.device) -> str | None:
    """Why this rank cannot use the nvlink backend on ``device``, or None when it can."""
    return "the nvlink backend is not implemented yet"
